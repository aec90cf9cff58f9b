"""The README and docs/settings.md stay true to the code, and each service fails at start with a clear message."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import BrokerSettings
from gateway.config import GatewaySettings
from gpu_worker.config import WorkerSettings
from launcher.supervisor_config import LauncherSettings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SETTINGS_DOC = (REPO / "docs" / "settings.md").read_text()  # generated: tests/test_settings_doc.py


@pytest.mark.parametrize("settings_class", [BrokerSettings, GatewaySettings, WorkerSettings, LauncherSettings])
def test_every_setting_is_documented_in_docs_settings_md(settings_class):
    missing = [f.metadata["env"] for f in dataclasses.fields(settings_class)
               if f"| `{f.metadata['env']}` |" not in SETTINGS_DOC]
    assert not missing, (f"docs/settings.md does not document {missing}: "
                         f"run .venv/bin/python -m imagegen.settings_doc > docs/settings.md")


def _relative_links(path: Path) -> list[str]:
    import re

    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    return [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]


def test_the_readme_links_the_reference_docs():
    links = _relative_links(REPO / "README.md")
    for doc in ("docs/settings.md", "docs/api.md", "docs/batching.md", "docs/operations.md", "docs/scale-out.md"):
        assert doc in links, f"README.md does not link {doc}"


@pytest.mark.parametrize("doc", ["README.md", "docs/settings.md", "docs/api.md", "docs/batching.md",
                                 "docs/operations.md"])
def test_links_stay_inside_the_repository_and_lead_to_files_that_exist(doc):
    path = REPO / doc
    links = _relative_links(path)
    assert links, f"{doc} links nothing"
    outside = [link for link in links if not (path.parent / link).resolve().is_relative_to(REPO)]
    assert not outside, f"{doc} links outside the repository: {outside}"
    missing = [link for link in links if not (path.parent / link).exists()]
    assert not missing, f"{doc} links files that do not exist: {missing}"


def test_readme_starts_with_the_serve_and_test_commands_and_ci_runs_the_test_command():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "./scripts/serve.sh" in first_block and "./scripts/test.sh" in first_block
    assert "./scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("scripts/serve.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), f"{script} must be executable"


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
