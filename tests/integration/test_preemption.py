"""A lone request starts at once; a request that can join it within the window stops it at a step
boundary and both run in one batch (gpu_worker/decisions/preemption.py, the default policy's preemptible start).

Three levels: the stop signal alone (pure, a fake clock), the real (tiny, random-weight) diffusers
pipeline stopping inside its denoising loop, and the worker shell (its event loop, GPU thread and
batcher) with the FAKE backend, which stands in for the GPU's time here, not for the pipeline.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.decisions.policies import AdaptiveBatcher, HoldTuning
from gpu_worker.decisions.preemption import AbandonDecision, BatchPreempted, Preemption
from gpu_worker.model import decoding
from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.model.pipelines import GenerationJob, StepThrottle, load_pipeline
from imagegen.batch_key import BatchKey
from imagegen.protocol import Cancel, Generate, GenerationParams, Result
from tests.support.clock import Clock
from tests.support.offline_worker import close_offline_worker, offline_worker


# ------------------------------------------------------------------ the stop signal


def test_a_stop_requested_before_a_step_raises_there():
    gate = Preemption(open_until_s=1.0, clock=Clock())
    gate.before_step(lambda: None)
    gate.request()
    with pytest.raises(BatchPreempted):
        gate.before_step(lambda: None)
    assert gate.steps_checked == 2


def test_the_gpu_is_waited_for_only_while_a_stop_can_still_come():
    clock, syncs = Clock(), []
    gate = Preemption(open_until_s=0.5, clock=clock)
    gate.before_step(lambda: syncs.append(clock.now))
    clock.now = 0.6  # the window has closed: no arrival can stop the batch any more
    gate.before_step(lambda: syncs.append(clock.now))
    assert syncs == [0.0]


def test_a_stop_requested_while_waiting_for_the_gpu_raises_at_that_step():
    gate = Preemption(open_until_s=1.0, clock=Clock())
    with pytest.raises(BatchPreempted):
        gate.before_step(gate.request)  # the arrival lands while the GPU finishes the step


class FakeMark:
    """A CUDA event's part the throttle uses: recorded, then waited for (a log of both)."""

    def __init__(self, log: list, number: int) -> None:
        self.log, self.number = log, number

    def record(self) -> None:
        self.log.append(("record", self.number))

    def synchronize(self) -> None:
        self.log.append(("wait", self.number))


def test_the_throttle_keeps_one_step_queued_instead_of_draining_the_gpu():
    """Before UNet call k the throttle marks the work queued so far and waits for the mark of call
    k - 1 only: the GPU still has step k - 1 to run while the CPU prepares step k."""
    log: list = []
    marks = iter(range(10))
    throttle = StepThrottle(torch.device("cpu"), new_event=lambda: FakeMark(log, next(marks)))
    for _ in range(3):
        throttle()
    assert log == [("record", 0), ("record", 1), ("wait", 0), ("record", 2), ("wait", 1)]


def test_the_throttle_waits_for_nothing_on_the_cpu():
    throttle = StepThrottle(torch.device("cpu"))  # nothing runs ahead of a CPU pipeline
    throttle()
    throttle()
    assert throttle.previous_mark is None


# ------------------------------------------------------------------ the real pipeline

SETTINGS = BatchKey(64, 64, 4, 7.5)
JOB = [GenerationJob("a lighthouse on a cliff", None, 7)]


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


@pytest.mark.parametrize("requested_at_step", [1, 2])
def test_the_pipeline_stops_before_the_step_that_sees_the_stop(tiny, requested_at_step):
    gate = Preemption(open_until_s=float("inf"), clock=time.monotonic)
    unet, unet_calls = tiny.diffusers_pipeline.unet, []
    forward = unet.forward  # runs only once every pre-hook (the preemption check among them) has passed
    unet.forward = lambda *args, **kwargs: unet_calls.append(1) or forward(*args, **kwargs)
    original_before_step = gate.before_step

    def requesting(synchronize):
        if gate.steps_checked + 1 == requested_at_step:
            gate.request()  # as if the event loop asked while the GPU ran the previous part
        return original_before_step(synchronize)

    gate.before_step = requesting
    try:
        with pytest.raises(BatchPreempted):
            tiny.generate(JOB, SETTINGS, preemption=gate)
    finally:
        del unet.forward
    assert gate.steps_checked == requested_at_step
    # Step 1's check comes after the text encoders and before any UNet call: nothing denoised.
    assert len(unet_calls) == requested_at_step - 1
    assert len(tiny.diffusers_pipeline.unet._forward_pre_hooks) == 0  # the batch's hook is gone


def test_a_preemptible_batch_that_is_not_stopped_makes_the_same_image(tiny):
    gate = Preemption(open_until_s=float("inf"), clock=time.monotonic)
    with_gate = tiny.generate(JOB, SETTINGS, preemption=gate)[0]
    plain = tiny.generate(JOB, SETTINGS)[0]
    assert gate.steps_checked == len(tiny.diffusers_pipeline.scheduler.timesteps)  # every step (PNDM: 4 + 1)
    np.testing.assert_array_equal(np.asarray(with_gate), np.asarray(plain))


def test_a_batch_nobody_wants_any_more_skips_the_rest_of_its_decoding(tiny):
    """Denoising done, the first decode part handed over (once the second's decode is queued), then
    every row abandoned: the third part is not decoded (a large image's decode can outlast a denoising
    step), and the stop says why."""
    gate = Preemption(open_until_s=None, clock=time.monotonic, rows=3, steps=SETTINGS.num_inference_steps)
    tiny.images_per_part = 1
    handed_over = []

    def on_images(first, arrays):
        handed_over.append(first)
        for row in range(3):
            gate.abandon(row)

    try:
        with pytest.raises(BatchPreempted):
            tiny.generate([*JOB, *JOB, *JOB], SETTINGS, on_images=on_images, preemption=gate)
    finally:
        tiny.images_per_part = decoding.IMAGES_PER_PART
    assert handed_over == [0] and gate.decision is AbandonDecision.STOP


def test_a_batch_with_a_wanted_row_decodes_all_of_it(tiny):
    gate = Preemption(open_until_s=None, clock=time.monotonic, rows=2, steps=SETTINGS.num_inference_steps)
    tiny.images_per_part = 1
    try:
        images = tiny.generate([*JOB, *JOB], SETTINGS, on_images=lambda first, arrays: gate.abandon(0),
                               preemption=gate)
    finally:
        tiny.images_per_part = decoding.IMAGES_PER_PART
    assert len(images) == 2 and gate.decision is None


# ------------------------------------------------------------------ the worker shell

STEP_S = 0.1  # the fake backend's delay, slept in equal steps when the batch is preemptible
STEPS = 4
WINDOW_S = 0.3  # the preemptible window (the coalescing gap), widened so that a loaded CI machine's jitter fits


def generate(index: int) -> Generate:
    return Generate(f"request-{index}", GenerationParams(f"prompt {index}", 64, 64, STEPS, 7.5, index), 60.0)


def make_worker():
    config = BatchPolicyConfig(max_batch_size=8)
    batcher = AdaptiveBatcher(config=config, tuning=HoldTuning(coalesce_gap_s=WINDOW_S, coalesce_fraction=1.0,
                                                               break_even=False))
    backend = FakeBackend(delay_s=STEP_S * STEPS)  # FAKE: stands in for GPU time, not for the pipeline
    worker = offline_worker(backend, config, batcher, capacity=16)
    sent: list = []
    worker.link.send = lambda message, payload=(): sent.append(message)
    return worker, backend, sent


async def run_worker(worker, sent: list, arrivals: list[tuple[float, Generate | Cancel]], results: int) -> list[Result]:
    worker.loop = asyncio.get_running_loop()
    loop_task = asyncio.create_task(worker._batch_loop())
    began = time.monotonic()
    for at_s, message in arrivals:
        await asyncio.sleep(max(0.0, began + at_s - time.monotonic()))
        worker._on_message(message)  # as the broker link hands messages over
    deadline = time.monotonic() + 10
    while sum(isinstance(m, Result) for m in sent) < results and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    worker.state = "draining"
    worker.arrival.set()
    await asyncio.wait_for(loop_task, 10)
    if worker.delivery_tasks:
        await asyncio.wait(worker.delivery_tasks, timeout=10)
    return [m for m in sent if isinstance(m, Result)]


def test_a_lone_request_starts_at_once():
    worker, backend, sent = make_worker()
    try:
        (result,) = asyncio.run(run_worker(worker, sent, [(0.0, generate(0))], results=1))
    finally:
        close_offline_worker(worker)
    assert result.queue_wait_ms < 0.25 * WINDOW_S * 1000  # no coalescing hold (it would be 300 ms here)
    assert backend.batch_sizes == [1] and worker.counters.stopped_batches == 0


def test_a_request_arriving_in_the_window_stops_the_lone_batch_and_both_run_together(caplog):
    worker, backend, sent = make_worker()
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            results = asyncio.run(run_worker(worker, sent, [(0.0, generate(0)), (0.05, generate(1))], results=2))
    finally:
        close_offline_worker(worker)
    assert backend.batch_sizes == [1, 2]  # the lone batch started, was stopped, then both ran
    assert worker.counters.stopped_batches == 1 and worker.counters.status("ready", 0, 0).stopped_batches == 1
    # It ran until the newcomer came (a stop cannot come sooner); how much later depends on the machine.
    assert worker.counters.sum_stopped_ms / 1000 >= 0.05
    assert {r.request_id for r in results} == {"request-0", "request-1"}
    assert {(r.batch_size, r.batch_id) for r in results} == {(2, "w:2")}
    assert "stopped after" in caplog.text and "go back to the queue" in caplog.text
    first = next(r for r in results if r.request_id == "request-0")
    # Its wait counts from its own arrival: the stopped step, then the pair's coalescing hold.
    assert first.queue_wait_ms >= (0.05 + WINDOW_S) * 1000 * 0.9


def test_a_request_arriving_after_the_window_waits_for_the_running_batch():
    worker, backend, sent = make_worker()
    try:
        results = asyncio.run(run_worker(worker, sent, [(0.0, generate(0)), (WINDOW_S + 0.05, generate(1))],
                                         results=2))
    finally:
        close_offline_worker(worker)
    assert backend.batch_sizes == [1, 1] and worker.counters.stopped_batches == 0
    assert sorted(r.batch_size for r in results) == [1, 1]


def test_a_request_cancelled_while_its_lone_batch_ran_is_not_queued_again_when_the_batch_stops(caplog):
    worker, backend, sent = make_worker()
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            results = asyncio.run(run_worker(worker, sent, [(0.0, generate(0)), (0.02, Cancel("request-0")),
                                                            (0.05, generate(1))], results=1))
    finally:
        close_offline_worker(worker)
    assert [r.request_id for r in results] == ["request-1"]
    assert backend.batch_sizes == [1, 1]  # the stopped lone batch, then the newcomer alone
    assert "(1 cancelled meanwhile)" in caplog.text
    assert worker.decisions.queue_depth == 0 and "request-0" not in worker.decisions.queued_deadlines
