"""bench/throttle_ab.py run as a command on the CPU with the tiny model: every way runs every round, in
rotated order, and the summary is computed from the rounds (no durations asserted)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from bench.throttle_ab import WAYS, rotated
from tests.support.paths import REPO


def test_each_round_runs_every_way_and_the_summary_comes_from_the_rounds(tmp_path):
    out = tmp_path / "throttle.json"
    result = subprocess.run([sys.executable, "-m", "bench.throttle_ab", "--model", "tiny", "--size", "64", "--steps",
                             "3", "--rounds", "3", "--pause-s", "0", "--out", str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["model"] == "tiny" and document["steps"] == 3 and document["card"]
    assert set(document["versions"]) == {"torch", "diffusers"}
    rounds = document["rounds"]
    assert [list(r) for r in rounds] == [rotated(list(WAYS), i) for i in range(3)]
    assert document["median_s"] == {w: round(statistics.median(r[w] for r in rounds), 4) for w in WAYS}
    assert set(document["median_difference_from_plain_ms"]) == set(WAYS) - {"plain"}
