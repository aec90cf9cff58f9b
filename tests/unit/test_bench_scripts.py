"""The GPU benchmarks' (bench/) pure parts, in this process: the raw half's pauses and timing on a fake
clock, reading the GPU through NVML (faked), the service held against the raw batch of its size,
and every committed summary row. The benchmarks run as commands: tests/e2e/test_bench_scripts.py."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.support.paths import REPO


class FakeMachine:
    """A clock that only the idle (``sleep``) and the calls move, and what happened, in order: the
    raw half's pause and timing loop run on it, so no figure depends on the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.events: list[tuple] = []
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.events.append(("idle", seconds))
        self.now += seconds

    def ready(self):
        """A call, readied untimed (as the preemptible variant's WorkerCall is made), that takes
        0.01 s more each time (the 1st 0.01 s, the 2nd 0.02 s, ...) and returns its number."""
        self.calls += 1
        number = self.calls
        self.events.append(("ready", number))
        self.now += 7.0  # readying is outside the timing too

        def call() -> int:
            self.events.append(("call", number))
            self.now += 0.01 * number
            return number
        return call


def bench_gpu_module():
    from bench import gpu

    return gpu


def test_the_raw_pause_idles_the_gpu_outside_the_timing():
    """Each timed call comes after its pause of idle, and neither the idle nor the readying of the
    call is in its seconds (timed by an injected clock that only the pause and the calls move)."""
    machine = FakeMachine()
    seconds, last = bench_gpu_module().timed_after_pauses(machine.ready, [0.5], 3, machine.clock, machine.sleep)
    assert machine.events == [("idle", 0.5), ("ready", 1), ("call", 1), ("idle", 0.5), ("ready", 2), ("call", 2),
                              ("idle", 0.5), ("ready", 3), ("call", 3)]
    assert seconds == {0.5: [pytest.approx(0.01), pytest.approx(0.02), pytest.approx(0.03)]}
    assert last == 3  # the last call's own result (the preemptible row's worker_call)


def test_several_raw_pauses_are_interleaved_call_by_call():
    """--pause-s 0,0.3 --repeats 2: pause 0, call, pause 0.3, call, then again; each call's seconds
    under its own pause, none of the idle in them."""
    machine = FakeMachine()
    seconds, last = bench_gpu_module().timed_after_pauses(machine.ready, [0.0, 0.3], 2, machine.clock, machine.sleep)
    assert [event for event in machine.events if event[0] != "ready"] == [
        ("idle", 0.0), ("call", 1), ("idle", 0.3), ("call", 2), ("idle", 0.0), ("call", 3), ("idle", 0.3), ("call", 4)]
    assert seconds == {0.0: [pytest.approx(0.01), pytest.approx(0.03)],
                       0.3: [pytest.approx(0.02), pytest.approx(0.04)]}
    assert last == 4


def test_the_gpu_is_read_through_nvml(monkeypatch):
    """bench.gpu.NvmlReader reads NVML's SM clock, temperature and power (milliwatts) of the GPU, and
    shuts NVML down again; the sampler keeps NVML open for its run, its first reading taken before
    the run; without NVML both say None. A fake pynvml stands in for the driver."""
    import types

    from bench.gpu import GpuSampler, NvmlReader

    calls = []
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetClockInfo=lambda handle, clock: {("gpu0", 1): 1980}[(handle, clock)],
        nvmlDeviceGetTemperature=lambda handle, sensor: {("gpu0", 0): 61}[(handle, sensor)],
        nvmlDeviceGetPowerUsage=lambda handle: {"gpu0": 412345}[handle])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader()
    assert reader.read() == {"sm_clock_mhz": 1980, "temperature_c": 61, "power_w": 412.3}
    reader.close()
    assert calls == ["init", "shutdown"]

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    # The sampler opens NVML once for all its readings, and closes it when the run ends.
    calls.clear()
    with GpuSampler(interval_s=0.001) as sampler:
        assert sampler.first == {"sm_clock_mhz": 1980, "temperature_c": 61, "power_w": 412.3}  # before the run
        while len(sampler.samples) < 3:
            time.sleep(0.001)
    assert calls == ["init", "shutdown"]
    assert sampler.summary()["sm_clock_mhz_min"] == 1980

    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    assert NvmlReader().read() is None
    with GpuSampler(interval_s=0.001) as no_gpu:
        pass
    assert no_gpu.summary() is None and no_gpu.first is None


def test_the_gpu_sampler_reports_the_clock_range_of_a_run(monkeypatch):
    """bench.gpu.GpuSampler reads the GPU in a thread until the run ends: the lowest and highest SM
    clock, the hottest and most power-hungry reading; nothing at all without a GPU."""
    import threading

    from bench.gpu import GpuSampler

    readings = iter([{"sm_clock_mhz": 1980, "temperature_c": 50, "power_w": 120.0},
                     {"sm_clock_mhz": 1755, "temperature_c": 66, "power_w": 690.5},
                     {"sm_clock_mhz": 1890, "temperature_c": 64, "power_w": 400.0}])
    three_read = threading.Event()

    def read():
        reading = next(readings, None)
        if reading is None:
            three_read.set()
            return {"sm_clock_mhz": 1900, "temperature_c": 60, "power_w": 300.0}
        return reading

    with GpuSampler(interval_s=0.001, read=read) as sampler:
        assert three_read.wait(5)
    assert sampler.first == {"sm_clock_mhz": 1980, "temperature_c": 50, "power_w": 120.0}
    summary = sampler.summary()
    assert summary["samples"] >= 4
    assert {k: v for k, v in summary.items() if k != "samples"} == {
        "sm_clock_mhz_min": 1755, "sm_clock_mhz_max": 1980, "temperature_c_max": 66, "power_w_max": 690.5}
    with GpuSampler(interval_s=0.001, read=lambda: None) as no_gpu:
        pass
    assert no_gpu.summary() is None


def test_the_service_is_held_against_the_raw_batch_of_its_own_size():
    from bench.gpu import raw_batch_like

    raw_rows = {1: {}, 16: {}, 50: {}}
    assert raw_batch_like(raw_rows, 50.0) == 50
    assert raw_batch_like(raw_rows, 16.67) == 16  # a burst of 50 in batches of 17, 17 and 16
    assert raw_batch_like({1: {}}, 50.0) is None  # batch 1 says nothing about a batch of 50
    assert raw_batch_like({1: {}, 32: {}}, 50.0) is None
    assert raw_batch_like(raw_rows, None) is None and raw_batch_like({}, 50.0) is None


def test_the_summary_takes_the_raw_batches_of_what_torch_compile_applies(monkeypatch):
    from argparse import Namespace

    from bench.gpu import summary_row

    def rows(seconds_per_size):
        return {size: {"seconds": s, "images_per_s": size / s, "peak_above_weights_gib": None}
                for size, s in seconds_per_size.items()}

    args = Namespace(card="cpu", model="sd15", size=512, steps=25, settings={})
    raw = {"variants": {"compiled": rows({1: 0.66, 50: 5.9}), "graphs": rows({1: 0.22}),
                        "encoders": rows({1: 0.205, 50: 5.8})}}
    summary = summary_row(args, raw, None)
    assert summary["raw_variant"] == "encoders" and summary["batch_size"] == 50
    assert summary["raw_images_per_s"] == 50 / 5.8 and summary["raw_batch1_s"] == 0.205
    raw["variants"].pop("encoders")
    assert summary_row(args, raw, None)["raw_variant"] == "compiled"  # files measured before "encoders"


def test_the_service_falls_back_to_the_compiled_raw_batch_of_its_size(monkeypatch):
    """A raw run cut off before "encoders" timed the service's batch size: the ratio uses "compiled"'s
    row of that size and says so; with neither, no ratio."""
    from argparse import Namespace

    from bench.gpu import summary_row

    args = Namespace(card="cpu", model="sdxl", size=1024, steps=25, settings={})
    raw = {"variants": {"compiled": {1: {"seconds": 1.3, "images_per_s": 0.77, "peak_above_weights_gib": None},
                                     25: {"seconds": 18.94, "images_per_s": 1.32, "peak_above_weights_gib": None}},
                        "encoders": {1: {"seconds": 0.858, "images_per_s": 1.165, "peak_above_weights_gib": None}}}}
    service = {"rows": [{"mode": "burst50", "duration_s": 37.9, "service_images_per_s": 1.3184,
                         "avg_batch_size": 25.0, "latency_max_s": 31.0}]}
    summary = summary_row(args, raw, service)
    assert summary["raw_variant"] == "encoders" and summary["raw_batch1_s"] == 0.858
    assert (summary["service_over_raw"], summary["service_over_raw_batch_size"],
            summary["service_over_raw_variant"]) == (round(1.3184 / 1.32, 3), 25, "compiled")
    raw["variants"]["compiled"].pop(25)
    assert "service_over_raw" not in summary_row(args, raw, service)


@pytest.mark.parametrize("card_file", sorted((REPO / "docs" / "benchmarks").glob("summary-*.json")),
                         ids=lambda path: path.name)
def test_every_committed_summary_row_has_the_promised_fields(card_file):
    """docs/benchmarks' summary files: one row per model and setting, with the fields the GPU-speed
    issue promises (null where a row's sources did not measure one), all rows of the file's card."""
    promised = ("card", "model", "resolution", "steps", "batch_size", "raw_images_per_s",
                "service_images_per_s", "raw_batch1_s", "lone_latency_s", "burst50_s", "gpus")
    rows = json.loads(card_file.read_text())["rows"]
    assert rows
    for row in rows:
        assert not [field for field in promised if field not in row], row
        assert row["model"] in ("sdxl", "sd15") and row["gpus"] >= 1
    card_word = card_file.stem.removeprefix("summary-").upper()  # summary-h200.json: every row an H200
    assert all(card_word in row["card"] for row in rows)
