"""The generated supervisord config: one worker per GPU, read back with supervisord's own parser
(run under the real supervisord: tests/e2e/test_supervisor_config.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from launcher.supervisor_config import main, render
from tests.support.paths import REPO
from tests.support.supervisord import BIN

TEMPLATE = (REPO / "supervisord.conf").read_text()


@pytest.fixture
def here(tmp_path) -> Path:
    """A folder standing in for the template's: supervisord checks that its run/logs exists."""
    (tmp_path / "run" / "logs").mkdir(parents=True)
    return tmp_path


def parse(text: str, tmp_path: Path) -> dict:
    """{group name: {process name: process config}} as supervisord itself reads ``text``."""
    path = tmp_path / "generated.conf"
    path.write_text(text)
    options = ServerOptions()
    options.configfile = str(path)
    options.process_config(do_usage=False)
    return {g.name: {p.name: p for p in g.process_configs} for g in options.process_group_configs}


def test_one_worker_per_gpu_each_pinned_to_its_gpu(tmp_path, here):
    groups = parse(render(TEMPLATE, here, [0, 2]), tmp_path)
    assert set(groups) == {"broker", "gateway", "gpu_worker"}
    workers = groups["gpu_worker"]
    assert set(workers) == {"gpu_worker_0", "gpu_worker_2"}  # supervisorctl: gpu_worker:gpu_worker_0
    for gpu in (0, 2):
        worker = workers[f"gpu_worker_{gpu}"]
        assert worker.environment["CUDA_VISIBLE_DEVICES"] == str(gpu)
        assert worker.environment["GPU_ID"] == str(gpu)
        assert worker.environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert worker.stdout_logfile == f"{here}/run/logs/gpu_worker_{gpu}.log"
        assert worker.command == "python -m gpu_worker"
        # The template's options are kept: drain time, start order after the broker.
        assert worker.stopwaitsecs == 300 and worker.priority == 20 and worker.stopasgroup
    assert groups["broker"]["broker"].priority < 20 < groups["gateway"]["gateway"].priority


def test_no_gpu_gives_one_cpu_worker_with_gpus_hidden(tmp_path, here):
    workers = parse(render(TEMPLATE, here, []), tmp_path)["gpu_worker"]
    assert list(workers) == ["gpu_worker_cpu"]
    env = workers["gpu_worker_cpu"].environment
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "GPU_ID" not in env


def test_workers_only_leaves_out_broker_and_gateway(tmp_path, here):
    groups = parse(render(TEMPLATE, here, [0, 1, 2, 3, 4, 5, 6, 7], workers_only=True), tmp_path)
    assert set(groups) == {"gpu_worker"}
    assert len(groups["gpu_worker"]) == 8


def test_no_workers_leaves_broker_and_gateway_only(tmp_path, here):
    assert set(parse(render(TEMPLATE, here, [0, 1], no_workers=True), tmp_path)) == {"broker", "gateway"}


def test_the_template_decides_options_and_extra_environment(tmp_path):
    template = TEMPLATE.replace("stopwaitsecs=300", "stopwaitsecs=123").replace(
        'CUDA_DEVICE_ORDER="PCI_BUS_ID",', 'CUDA_DEVICE_ORDER="PCI_BUS_ID",HF_HOME="/models/hf",')
    assert template.count("stopwaitsecs=123") == 1
    (tmp_path / "run" / "logs").mkdir(parents=True)  # supervisord checks its log folder exists
    worker = parse(render(template, tmp_path, [1]), tmp_path)["gpu_worker"]["gpu_worker_1"]
    assert worker.stopwaitsecs == 123
    assert worker.environment["HF_HOME"] == "/models/hf" and worker.environment["CUDA_VISIBLE_DEVICES"] == "1"
    assert worker.stdout_logfile == f"{tmp_path}/run/logs/gpu_worker_1.log"  # %(here)s: the template's folder


def test_main_reads_gpu_ids_and_cuda_visible_devices_from_the_environment(tmp_path, capsys):
    out = tmp_path / "run" / "supervisord.conf"
    code = main(["--output", str(out), "--assume-gpu-count", "8"],
                {"GPU_IDS": "1,5", "CUDA_VISIBLE_DEVICES": "1,3,5"})
    assert code == 0, capsys.readouterr().err
    assert set(parse(out.read_text(), tmp_path)["gpu_worker"]) == {"gpu_worker_1", "gpu_worker_5"}
    assert "2 worker(s) (GPU 1,5" in capsys.readouterr().err


@pytest.mark.parametrize("argv, environ, message", [
    (["--assume-gpu-count", "2"], {"GPU_IDS": "3"}, "GPU_IDS='3' names GPU 3"),
    (["--assume-gpu-count", "2"], {"WORKER_NAME": "w"}, "WORKER_NAME is set, but 2 workers"),
    (["--workers-only"], {}, "--workers-only needs BROKER_WORKER_ADDRESS"),
])
def test_main_refuses_settings_the_config_could_not_honour(tmp_path, capsys, argv, environ, message):
    out = tmp_path / "out.conf"
    assert main(["--output", str(out), *argv], environ) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_gpu_model_ids_give_the_workers_they_name_their_own_model(tmp_path, capsys):
    out = tmp_path / "run" / "supervisord.conf"
    environ = {"GPU_MODEL_IDS": "0=tiny; 2=fake:delay=0.1,fail=1"}  # a model id may hold commas
    assert main(["--output", str(out), "--assume-gpu-count", "3"], environ) == 0, capsys.readouterr().err
    workers = parse(out.read_text(), tmp_path)["gpu_worker"]
    assert workers["gpu_worker_0"].environment["MODEL_ID"] == "tiny"
    assert workers["gpu_worker_2"].environment["MODEL_ID"] == "fake:delay=0.1,fail=1"
    assert "MODEL_ID" not in workers["gpu_worker_1"].environment  # keeps the environment's MODEL_ID
    assert "; gpu_worker_0: MODEL_ID=tiny" in out.read_text()


@pytest.mark.parametrize("model_ids, message", [
    ("3=tiny", "GPU_MODEL_IDS names 3, which get no worker here (workers: 0, 1)"),
    ("cpu=tiny", "GPU_MODEL_IDS names cpu"),
    ("0:tiny", "expected GPU=MODEL_ID pairs separated by ';'"),
    ("0=tiny;0=sd15", "GPU 0 is given two models"),
])
def test_gpu_model_ids_that_would_leave_a_model_unserved_are_refused(tmp_path, capsys, model_ids, message):
    out = tmp_path / "out.conf"
    assert main(["--output", str(out), "--assume-gpu-count", "2"], {"GPU_MODEL_IDS": model_ids}) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_serve_sh_generates_the_config_before_starting_supervisord():
    script = (REPO / "scripts" / "serve.sh").read_text()
    assert "python -m launcher.supervisor_config --output run/supervisord.conf" in script
    assert "exec supervisord -c run/supervisord.conf" in script
    assert os.access(REPO / "scripts" / "serve.sh", os.X_OK)
    assert shutil.which("supervisord", path=str(BIN)), "supervisord must be installed in the venv"
