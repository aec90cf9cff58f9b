"""The generated supervisord config run under the real supervisord: a worker per GPU, each with its
GPU_ID and host (tests/unit/test_supervisor_config.py reads the config back with supervisord's own
parser)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import get_json
from tests.support.supervisord import Stack


class GeneratedStack(Stack):
    """Stack (tests/e2e/test_supervisord.py), but supervisord runs the config the launcher writes."""

    def __init__(self, tmp_path: Path, gpu_count: int, **settings: str) -> None:
        super().__init__(tmp_path, **settings)
        generated = tmp_path / "run" / "supervisord.conf"
        done = subprocess.run([sys.executable, "-m", "launcher.supervisor_config", "--template", str(self.conf),
                               "--output", str(generated), "--assume-gpu-count", str(gpu_count)],
                              env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        self.conf = generated


@pytest.mark.timeout(120)
def test_generated_config_runs_a_worker_per_gpu_under_supervisord(tmp_path):
    # Two GPUs assumed on a CPU machine: the FAKE backend (MODEL_ID=fake) does not touch CUDA, so
    # what is checked is the launcher's wiring: programs, GPU_ID, per-GPU stats with their host.
    stack = GeneratedStack(tmp_path, 2, MODEL_ID="fake", WORKER_HOST="launcher-host")
    try:
        stack.start()
        stack.wait_for_states({"broker": "RUNNING", "gateway": "RUNNING",
                               "gpu_worker:gpu_worker_0": "RUNNING", "gpu_worker:gpu_worker_1": "RUNNING"})
        stats: dict = {}
        deadline = time.monotonic() + 30
        while stats.get("num_gpus") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = get_json(f"{stack.url}/stats")[1]
        assert stats["num_gpus"] == 2 and sorted(stats["gpu_ids"]) == [0, 1], stats
        per_gpu = {(g["host"], g["gpu_id"], g["worker"]) for g in stats["per_gpu_stats"]}
        assert per_gpu == {("launcher-host", 0, "launcher-host-gpu0"), ("launcher-host", 1, "launcher-host-gpu1")}
        assert (tmp_path / "run" / "logs" / "gpu_worker_1.log").exists()
    finally:
        stack.stop()
