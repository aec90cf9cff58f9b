"""bench/throttle_ab.py on the CPU with the tiny model: every way runs every round, in rotated
order, and the summary is computed from the rounds (no durations asserted)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.throttle_ab import WAYS, preemption_for, rotated

REPO = Path(__file__).resolve().parent.parent


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


def test_the_ways_wait_where_the_worker_would():
    now = [100.0]
    assert preemption_for("plain", 25) is None
    window = preemption_for("window", 25, clock=lambda: now[0])
    every = preemption_for("every_step", 25, clock=lambda: now[0])
    waits = {"window": 0, "every": 0}

    def counter(name):
        def synchronize():
            waits[name] += 1
        return synchronize

    now[0] = 200.0  # long past the window: only a batch stoppable for its rows still waits
    for _ in range(3):
        window.before_step(counter("window"))
        every.before_step(counter("every"))
    assert waits == {"window": 0, "every": 3}
    assert every.rows == 1 and every.steps == 25
