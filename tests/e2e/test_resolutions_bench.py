"""bench/resolutions.py as a command, on the FAKE backend (``warm_delay``: each warm-up call sleeps
instead of compiling, so a worker's start has a first size and a background warm-up, without a
model): every phase, the result file's fields, and no process left behind, however it ends. The
real compiler runs in the hand-run smoke (``--model tiny``); its pure parts:
tests/unit/test_resolutions_bench.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.procs import kill_all, processes_with

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
SIZES = ["64x64", "64x96", "96x64"]


def harness(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.resolutions", "--model", "fake:delay=0.05,warm_delay=0.2", "--sizes",
            ",".join(SIZES), "--max-batch-size", "2", "--steps", "2", "--arrival-s", "2", "--repeats", "2",
            "--lone-pause-s", "0.05", "--work", str(tmp_path / "work"), *extra]


def test_one_call_measures_every_phase_and_writes_the_issues_file(tmp_path):
    marker = f"BENCH_TEST_MARKER={uuid.uuid4().hex}"
    out = tmp_path / "resolutions.json"
    try:
        done = subprocess.run([*harness(tmp_path, "--out", str(out), "--cold-baseline-s", "100"), "--set", marker],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240, start_new_session=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert processes_with(marker) == [], "service processes outlived the harness"
    finally:
        kill_all(processes_with(marker))
    document = json.loads(out.read_text())
    assert list(document)[:7] == ["card", "model", "square_only", "mixed", "lone_by_size", "ready_s", "command"]
    assert document["card"] == "cpu" and document["model"] == "fake:delay=0.05,warm_delay=0.2"
    assert document["command"].startswith("python -m bench.resolutions --model fake:")
    assert set(document["versions"]) == {"torch", "diffusers", "python"} and document["date"]
    assert document["phases_run"] == ["cold", "traffic", "restart", "new-host", "raw"]

    square, mixed, burst = document["square_only"], document["mixed"], document["burst"]
    assert burst["requests"] == 8 and burst["served"] == 8  # 4 x the max batch size
    assert square["rate"] == mixed["rate"] == pytest.approx(0.5 * burst["throughput_img_s"], abs=1e-3)
    assert square["requests"] == mixed["requests"] > 0  # the same arrival times
    for run in (square, mixed):
        assert run["served"] == run["requests"] and run["throughput_img_s"] > 0 and 0 < run["p50_s"] <= run["p95_s"]
    assert set(square["p50_by_size_s"]) == {"64x64"}
    assert mixed["mix"] == {"64x64": 0.5, "64x96": 0.25, "96x64": 0.25}  # the default: half the native square
    assert set(mixed["requests_by_size"]) <= set(SIZES)
    assert document["eager"] == {"eager_batches": 0, "eager_images": 0}  # every size was warm before traffic

    assert list(document["lone_by_size"]) == SIZES
    for row in document["lone_by_size"].values():
        assert row["service_s"] > 0 and row["raw_batch1_s"] > 0 and len(row["service_runs_s"]) == 2

    ready = document["ready_s"]
    for start in ("cold", "restart_with_cache", "new_host_with_cache"):
        assert 0 < ready[start] <= ready["all_sizes_warm_after"][start], start
        assert ready["could_not_warm"][start] == []
    assert ready["all_sizes_warm"] == ready["all_sizes_warm_after"]["cold"]
    assert document["compile_cache"]["archive"] is None  # the fake backend compiles nothing to carry

    targets = document["targets"]
    assert targets["cold_no_slower"]["baseline_s"] == 100
    assert all(isinstance(target["met"], bool) for name, target in targets.items()
               if name not in ("not_evaluated", "all_met"))
    assert targets["not_evaluated"] == [] and isinstance(targets["all_met"], bool)
    logs = tmp_path / "work" / "logs"
    assert {"worker-cold.log", "worker-restart.log", "worker-new-host.log", "raw.log"} <= {
        path.name for path in logs.iterdir()}


def test_a_later_call_adds_its_phases_to_the_earlier_file(tmp_path):
    out = tmp_path / "resolutions.json"
    first = subprocess.run(harness(tmp_path, "--out", str(out), "--phases", "cold"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=240, start_new_session=True)
    assert first.returncode == 0, first.stderr[-3000:]
    cold = json.loads(out.read_text())
    assert cold["ready_s"]["cold"] > 0 and cold["ready_s"]["restart_with_cache"] is None and not cold["square_only"]

    second = subprocess.run(harness(tmp_path, "--out", str(out), "--phases", "restart,raw"), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=240, start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    both = json.loads(out.read_text())
    assert both["ready_s"]["cold"] == cold["ready_s"]["cold"] and both["ready_s"]["restart_with_cache"] > 0
    assert set(both["lone_by_size"]) == set(SIZES) and all("service_s" not in row
                                                           for row in both["lone_by_size"].values())
    assert both["phases_run"] == ["cold", "restart", "raw"]
    assert both["earlier_commands"] == [cold["command"]] and "--phases restart,raw" in both["command"]


def test_a_killed_harness_stops_every_process_it_started(tmp_path):
    """SIGTERM (a time limit) while the traffic runs: the broker, gateway and worker go with it."""
    marker = f"BENCH_TEST_MARKER={uuid.uuid4().hex}"
    command = harness(tmp_path, "--set", marker)
    command[command.index("fake:delay=0.05,warm_delay=0.2")] = "fake:delay=1,warm_delay=0.1"
    bench = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        for line in bench.stderr:
            if line.startswith("worker-cold:"):  # every size warm: the burst starts now
                break
        time.sleep(1)
        assert len(processes_with(marker)) >= 3, "broker, gateway and worker should be running"
        assert bench.poll() is None, "the harness ended by itself"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with(marker) == [], "service processes outlived the killed harness"
    finally:
        kill_all(processes_with(marker) + [bench.pid])
        bench.wait(timeout=10)
