"""Which GPUs a host serves: the pure resolution rule (fake inputs) and the NVML probe (fake pynvml)."""

from __future__ import annotations

import sys
import types

import pytest

from launcher.gpus import GpuSelectionError, nvml_device_count, resolve_gpu_ids, visible_gpu_ids


@pytest.mark.parametrize("gpu_ids, cuda_visible, count, expected", [
    (None, None, 4, [0, 1, 2, 3]),  # unset: every GPU NVML counts
    ("", None, 2, [0, 1]),  # blank is unset
    ("  ", None, 2, [0, 1]),
    ("0,2", None, 4, [0, 2]),  # a subset, in the order given
    ("2, 0", None, 4, [2, 0]),
    (None, "1,3", 4, [1, 3]),  # CUDA_VISIBLE_DEVICES limits the candidates (physical ids)
    ("3", "1,3", 4, [3]),
    (None, "", 4, []),  # "" hides every GPU, as for CUDA: one CPU worker
    (None, "-1", 4, []),
    (None, "0,-1,2", 4, [0]),  # as CUDA does, a negative entry ends the list
    (None, None, 0, []),  # no driver: one CPU worker
    (None, "0", 0, []),  # no driver: CUDA_VISIBLE_DEVICES does not matter
    ("cpu", None, 8, []),  # a CPU worker on a GPU host, on request
    ("CPU", "0,1", 8, []),
])
def test_resolve_gpu_ids(gpu_ids, cuda_visible, count, expected):
    assert resolve_gpu_ids(gpu_ids, cuda_visible, count) == expected


@pytest.mark.parametrize("gpu_ids, cuda_visible, count, message", [
    ("4", None, 4, "GPU_IDS='4' names GPU 4, but this host's GPUs are 0,1,2,3"),
    ("0", "1,3", 4, "GPU_IDS='0' names GPU 0, but CUDA_VISIBLE_DEVICES='1,3' leaves 1,3"),
    ("0", None, 0, "GPU_IDS='0' names GPU 0, but this host's GPUs are none"),
    ("0,0", None, 2, "lists GPU 0 more than once"),
    ("one", None, 2, "'one' is not a GPU index"),
    (None, "GPU-8f3a2c1e", 2, "GPU UUIDs and MIG devices are not supported"),
    (None, "5", 2, "CUDA_VISIBLE_DEVICES='5' names GPU 5, but this host has 2 GPU(s) (ids 0,1)"),
])
def test_bad_selections_are_refused_naming_the_variable(gpu_ids, cuda_visible, count, message):
    with pytest.raises(GpuSelectionError) as caught:
        resolve_gpu_ids(gpu_ids, cuda_visible, count)
    assert message in str(caught.value)


def test_visible_gpu_ids_without_cuda_visible_devices_is_every_gpu():
    assert visible_gpu_ids(None, 3) == [0, 1, 2]


def _fake_pynvml(monkeypatch, count: int | None = None, init_fails: bool = False, count_fails: bool = False):
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    class NVMLError(Exception):
        pass

    def init():
        calls.append("init")
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def get_count():
        if count_fails:
            raise NVMLError("Unknown Error")
        return count

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = get_count
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return calls


def test_nvml_probe_counts_gpus_and_shuts_nvml_down(monkeypatch):
    calls = _fake_pynvml(monkeypatch, count=8)
    assert nvml_device_count() == 8
    assert calls == ["init", "shutdown"]


@pytest.mark.parametrize("how", [{"init_fails": True}, {"count_fails": True}])
def test_nvml_probe_answers_zero_instead_of_raising(monkeypatch, how):
    _fake_pynvml(monkeypatch, count=8, **how)
    assert nvml_device_count() == 0


def test_nvml_probe_without_nvidia_ml_py_is_zero(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert nvml_device_count() == 0


def test_nvml_probe_on_this_machine_never_raises():
    assert nvml_device_count() >= 0
