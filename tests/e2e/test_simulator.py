"""scripts/simulate.py as a command: --compare --json prints the comparison's rows (tests/unit/test_simulator.py
checks the simulator itself)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO


def test_compare_json_command_prints_the_rows():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "simulate.py"), "--compare", "--json"],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {"window", "default", "step"} <= {r["policy"] for r in rows}
    for row in rows:
        assert {"workload", "policy", "throughput_img_s", "p50_s", "p95_s", "p99_s", "avg_batch_size"} <= set(row)
    assert all("batch1_s" in r for r in rows if r["workload"] == "lone")
