"""bench/broker_ceiling.py still runs: a real broker, zero-time fake workers, the client protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.timeout(120)


def test_broker_ceiling_quick_run_reports_rate_and_cpu_per_request(tmp_path):
    out = tmp_path / "ceiling.json"
    done = subprocess.run([sys.executable, "-m", "bench.broker_ceiling", "--quick", "--no-gateway",
                           "--only", "2:1024:1", "--json", str(out)],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(out.read_text())["broker"]
    assert (row["workers"], row["payload_bytes"], row["curve"]) == (2, 1024, True)
    assert row["requests"] > 0 and row["failed"] == 0
    assert row["broker_cpu_us_per_request"] > 0 and row["ceiling_requests_per_s"] > 0
