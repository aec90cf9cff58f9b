"""bench/abandon_probe.py against a real cluster (broker, gateway, one worker) on the FAKE backend with a per-step delay:
both cases run, the JSON has every figure, and the instants come in their order (no durations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO

DEADLINE_S = "20"


@pytest.fixture
def cluster(make_cluster):
    # The deadline case needs a batch that admission accepts but that outlasts the deadline on any
    # machine, quiet or busy: the FAKE backend sleeps 0.05 s per denoising step, so 1000 steps take
    # 50 s whatever the CPU (the tiny model's speed made the batch finish before the deadline on a
    # quiet machine). Nothing is measured at the fake's warm-up, so the first batch is accepted; the
    # probe (1024x1024, 2 steps: 0.1 s for many work units) then teaches admission a cost per unit low
    # enough that the disconnect case's batch is accepted too.
    return make_cluster(MODEL_ID="fake:step_delay=0.05", REQUEST_TIMEOUT_S=DEADLINE_S, MAX_INFERENCE_STEPS="1000",
                        MAX_BATCH_SIZE="8").start_all(1, timeout_s=180)


@pytest.mark.timeout(600)
def test_the_probe_script_measures_both_cases_in_order(cluster, tmp_path):
    out = tmp_path / "abandon.json"
    command = [sys.executable, "-m", "bench.abandon_probe", "--url", cluster.url, "--deadline-s", DEADLINE_S,
               "--size", "128", "--n", "8", "--steps", "1000", "--abandon-after-s", "3", "--probe-size", "1024",
               "--probe-steps", "2", "--worker-log", str(cluster.dir / "worker0.log"), "--model", "fake",
               "--set", f"REQUEST_TIMEOUT_S={DEADLINE_S}", "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=500)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    assert process.returncode == 0, (stderr[-3000:], cluster.logs())
    document = json.loads(out.read_text())
    assert json.loads(stdout) == document
    assert document["model"] == "fake" and document["settings"] == {"REQUEST_TIMEOUT_S": DEADLINE_S}
    assert document["card"] and set(document["versions"]) == {"torch", "diffusers"}
    assert list(document["cases"]) == ["deadline", "disconnect"]
    deadline, disconnect = document["cases"]["deadline"], document["cases"]["disconnect"]
    assert deadline["answer"]["status"] == 504 and deadline["answer"]["code"] == "deadline_exceeded", deadline
    assert "being generated on worker" in deadline["answer"]["message"], deadline
    assert disconnect["steps"] == deadline["steps"]  # the disconnect case runs the batch admission accepted
    # Refused attempts halve the steps, and only refusals are retried.
    asked = [a["steps"] for a in deadline["attempts"]]
    assert asked == [1000 // 2**i for i in range(len(asked))] and deadline["steps"] == asked[-1]
    assert all(a["status"] in (400, 503) for a in deadline["attempts"][:-1])
    assert deadline["attempts"][-1]["status"] == 504
    for case in (deadline, disconnect):
        probe, worker = case["probe"], case["worker"]
        assert probe["status"] == 200 and probe["batch_size"] == 1, case
        # The order of the instants: sent, abandoned, probe sent, probe done; the GPU freed before it.
        assert 0 <= case["sent_at"] <= case["abandoned_at"] <= probe["sent_at"] <= probe["done_at"], case
        assert probe["gpu_free_by"] <= probe["done_at"] and probe["queue_wait_s"] >= 0, case
        # The worker heard of the cancel, then stopped the batch before the probe ran; the stop
        # came before the batch's last step.
        assert case["sent_at"] <= worker["cancel"]["at"] <= worker["stop"]["at"] <= probe["done_at"], case
        assert worker["stop"]["steps"] == case["steps"] and 0 < worker["stop"]["step"] < case["steps"], case
        assert worker["cancel"]["step"] <= worker["stop"]["step"], case
        assert case["step_s"] > 0 and case["stop_after_abandon_s"] == pytest.approx(
            worker["stop"]["at"] - case["abandoned_at"], abs=2e-4)
        assert case["stop_after_abandon_minus_step_s"] == pytest.approx(
            case["stop_after_abandon_s"] - case["step_s"], abs=2e-4)
        assert case["gpu_free_by_after_abandon_s"] == pytest.approx(probe["gpu_free_by"] - case["abandoned_at"],
                                                                    abs=2e-4)
    # The client's close reaches the worker after it happened; the broker's 504 and its CANCEL go at
    # once, so in the deadline case either may come first.
    # (abandoned_at is read just after the close returns, and log lines carry milliseconds: the worker
    # may log the cancel a few milliseconds "before" it; a cancel far earlier would be a wrong match.)
    assert disconnect["worker"]["cancel"]["at"] >= disconnect["abandoned_at"] - 0.1
    assert disconnect["worker"]["cancel"]["why"] == "cancelled"
