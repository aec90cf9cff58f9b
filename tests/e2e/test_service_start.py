"""Each service, started as its own process, fails at start with a clear message naming the cause."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


def run_service(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_worker_that_cannot_load_its_model_exits_naming_model_id_and_cause(tmp_path):
    missing = str(tmp_path / "no-such-model")
    done = run_service("gpu_worker", MODEL_ID=missing, BROKER_WORKER_ADDRESS="tcp://127.0.0.1:9")
    assert done.returncode == 3
    assert f"MODEL_ID '{missing}'" in done.stderr and "no such folder" in done.stderr


@pytest.mark.parametrize("module, env, variable", [
    ("broker", {"GPU_LOAD_BALANCE_STRATEGY": "fastest"}, "GPU_LOAD_BALANCE_STRATEGY"),
    ("gpu_worker", {"MAX_BATCH_SIZE": "eight"}, "MAX_BATCH_SIZE"),
    ("gpu_worker", {"ENABLE_BATCHING": "maybe"}, "ENABLE_BATCHING"),
    ("gateway", {"GATEWAY_PORT": "70000"}, "GATEWAY_PORT"),
    # beyond what the broker accepts in a registration: the worker would retry forever, unheard
    ("gpu_worker", {"MAX_BATCH_SIZE": "5000"}, "MAX_BATCH_SIZE"),
    ("gpu_worker", {"MAX_BATCH_WAIT_TIME": "7200"}, "MAX_BATCH_WAIT_TIME"),
    ("gateway", {"REQUEST_TIMEOUT_S": "100000"}, "REQUEST_TIMEOUT_S"),
    ("broker", {"HEARTBEAT_INTERVAL_S": "0.001"}, "HEARTBEAT_INTERVAL_S"),  # workers would drop its WELCOME
])
def test_bad_settings_stop_the_service_with_a_message_naming_the_variable(module, env, variable):
    done = run_service(module, **env)
    assert done.returncode == 2
    assert "configuration error" in done.stderr and variable in done.stderr


def test_a_worker_whose_registration_the_broker_would_drop_stops_at_start_saying_why():
    """A derived worker name (WORKER_HOST-gpuN) over the protocol's 128 characters: the broker would
    drop every registration as malformed and the worker would never serve; it stops instead."""
    done = run_service("gpu_worker", MODEL_ID="fake", WORKER_HOST="h" * 200, GPU_ID="0",
                       BROKER_WORKER_ADDRESS="tcp://127.0.0.1:9")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "would refuse this worker's registration" in done.stderr and "worker_name" in done.stderr
    assert "WORKER_NAME" in done.stderr


def test_flags_override_environment_variables():
    done = run_service("broker", "--gpu-load-balance-strategy", "fastest", GPU_LOAD_BALANCE_STRATEGY="round-robin")
    assert done.returncode == 2 and "'fastest'" in done.stderr
