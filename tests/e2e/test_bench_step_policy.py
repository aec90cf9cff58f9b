"""bench/step_policy.py as a command on the CPU with the real tiny pipeline (MODEL_ID=tiny, 64x64,
4 steps, no warm-up): both policies' services run every workload, all requests served, the open-loop
runs get the same arrivals under both, the ratios come from the rows, the targets are all there (no
raw batch of one without a GPU) and no service process outlives it. No duration is asserted. Its pure
parts: tests/unit/test_step_policy_bench.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from bench.step_policy import POLICIES, WORKLOADS, assign_steps
from tests.support.paths import REPO
from tests.support.procs import kill_all, processes_with

pytestmark = pytest.mark.timeout(420)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
# The arrival times are exponential gaps from the seed, scaled by the rate: seed 1990's first four
# arrive within 0.27 / rate seconds, so even a slow machine (rate x 5 s well under 1) sends several.
SEED = "1990"


def test_both_policies_run_every_workload_and_the_ratios_come_from_their_rows(tmp_path):
    marker = f"BENCH_TEST_MARKER={uuid.uuid4().hex}"
    out = tmp_path / "step-policy.json"
    command = [sys.executable, "-m", "bench.step_policy", "--model", "tiny", "--size", "64", "--steps", "4",
               "--burst", "6", "--users", "2", "--requests-per-user", "2", "--duration-s", "5", "--lone-count", "2",
               "--lone-pause-s", "0.1", "--mixed-steps", "2,3,4", "--seed", SEED, "--set", "WORKER_WARMUP=0",
               "--set", "MAX_BATCH_SIZE=4", "--set", marker, "--work", str(tmp_path / "work"), "--out", str(out)]
    try:
        done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=360,
                              start_new_session=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert processes_with(marker) == [], "service processes outlived the harness"
    finally:
        kill_all(processes_with(marker))
    document = json.loads(out.read_text())
    assert list(document)[:6] == ["card", "model", "size", "steps", "versions", "command"]
    assert (document["card"], document["model"], document["size"], document["steps"]) == ("cpu", "tiny", "64x64", 4)
    assert document["command"].startswith("python -m bench.step_policy --model tiny --size 64 ")
    assert set(document["versions"]) == {"torch", "diffusers", "python"}

    policies = document["policies"]
    assert list(policies) == list(POLICIES)
    for name, measured in policies.items():
        for workload in WORKLOADS:
            row = measured[workload]
            assert row["images"] > 0 and row["successful"] == row["images"], (name, workload, row)
            assert row["policy"] == name and row["service_images_per_s"] > 0
            assert 0 < row["latency_p50_s"] <= row["latency_p95_s"] <= row["latency_max_s"]
            assert row["avg_batch_size"] >= 1
        assert measured["burst"]["images"] == 6 and measured["users"]["images"] == 4
        assert measured["lone"]["images"] == 2 and measured["lone"]["median_s"] > 0
        assert measured["recompiles"]["count"] == 0 and Path(measured["worker_log"]).exists()
        assert set(measured["mixed_steps"]["requests_by_steps"]) <= {"2", "3", "4"}
    baseline, step = policies["run-to-completion"], policies["step"]
    # The worker really ran each policy.
    assert "BATCH_POLICY='step'" in Path(step["worker_log"]).read_text()
    assert "BATCH_POLICY='run-to-completion'" in Path(baseline["worker_log"]).read_text()
    # Both policies got the same open-loop arrivals, at the rate from run-to-completion's burst.
    rate = document["rate"]["per_s"]
    assert rate == pytest.approx(0.6 * baseline["burst"]["service_images_per_s"], abs=1e-3)
    for workload in ("staggered", "mixed_steps"):
        assert baseline[workload]["images"] == step[workload]["images"] >= 4
        assert baseline[workload]["rate_per_s"] == step[workload]["rate_per_s"] == rate
    # Each mixed-steps request was sent with the steps drawn for it, the same under both policies.
    drawn = Counter(str(steps) for steps in assign_steps(step["mixed_steps"]["images"], [2, 3, 4], int(SEED)))
    assert baseline["mixed_steps"]["requests_by_steps"] == step["mixed_steps"]["requests_by_steps"] == drawn

    ratios = document["ratios"]
    assert ratios["burst_throughput"] == pytest.approx(
        step["burst"]["service_images_per_s"] / baseline["burst"]["service_images_per_s"], abs=1e-4)
    assert ratios["mixed_steps_p95"] == pytest.approx(
        step["mixed_steps"]["latency_p95_s"] / baseline["mixed_steps"]["latency_p95_s"], abs=1e-4)
    assert ratios["lone_latency"] == pytest.approx(step["lone"]["median_s"] / baseline["lone"]["median_s"], abs=1e-4)
    assert all(ratios[name] > 0 for name in ("users_throughput", "staggered_p50", "staggered_p95", "mixed_steps_p50"))
    assert document["raw"] is None and ratios["lone_over_raw_batch1"] == {"run-to-completion": None, "step": None}

    targets = document["targets"]
    assert set(targets) == {"burst_throughput_within_2pct", "users_throughput_within_2pct",
                            "lone_within_5pct_of_raw_batch1", "no_recompiles_in_step", "every_request_served",
                            "staggered_and_mixed_steps_measured_beside", "not_evaluated", "all_met"}
    assert targets["burst_throughput_within_2pct"]["ratio"] == ratios["burst_throughput"]
    assert targets["lone_within_5pct_of_raw_batch1"]["met"] is None  # no raw batch of one on the CPU
    assert targets["no_recompiles_in_step"]["met"] is None  # TORCH_COMPILE off: nothing compiles
    assert targets["every_request_served"]["met"] is True
    assert targets["staggered_and_mixed_steps_measured_beside"]["met"] is True
    assert targets["all_met"] is None
