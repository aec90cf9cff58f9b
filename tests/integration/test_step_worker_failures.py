"""The step loop (gpu_worker/shell/step_loop.py) when a step runs out of GPU memory or a request cannot
run, on the real tiny pipeline on the CPU, in this process: the worker's link goes nowhere (its messages
are recorded) and the UNet is wrapped to raise torch.OutOfMemoryError for calls above a row count, as a
GPU too small for the batch would. Nothing is lost: every request gets its image, equal to the image the
same requests make on a worker that never ran out of memory; steps then take at most the rows that fit,
and the rows left out are paused (their clients told) until they run. A lone row that does not fit fails
with generation_failed, and the worker serves on. A request whose steps the model's scheduler cannot run
is refused alone (invalid_request), not failed with the rows beside it."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.model.pipelines import load_pipeline
from gpu_worker.model.step_engine import StepEngine
from gpu_worker.shell.step_loop import StepWorker
from gpu_worker.shell.worker import WorkerIdentity
from imagegen.protocol import Failure, Generate, GenerationParams, Progress, Result

pytestmark = pytest.mark.timeout(240)

CONFIG = BatchPolicyConfig(max_batch_size=8, max_wait_time_s=0.01, min_wait_time_s=0.0)
STEPS = 6
# A pixel of one image may differ by this much between batch compositions (the UNet sums a batch
# in another order: tests/integration/test_step_engine.py bounds the latents).
PIXEL_TOLERANCE = 2


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline("tiny", "cpu", "float32")


class TooSmallGpu:
    """The UNet, failing like torch on a GPU out of memory for calls of more than ``fits`` rows."""

    def __init__(self, unet: Any, fits: int) -> None:
        self.unet, self.fits, self.calls = unet, fits, []

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(sample.shape[0])
        if sample.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {sample.shape[0]}")
        return self.unet(sample, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)


def request(seed: int, guidance: float = 7.5) -> Generate:
    return Generate(f"request-{seed}", GenerationParams(f"a lantern {seed}", 64, 64, STEPS, guidance, seed), 200.0)


async def serve(pipeline: Any, requests: list[Generate], fits: int | None,
                pauses: list[tuple[str, bool]] | None = None) -> tuple[list[Any], list[int]]:
    """Run a StepWorker on ``requests`` (sent together) until each is answered; (messages sent, UNet rows
    of each call). ``pauses`` receives the engine's pauses: (row, whether it moved off the device)."""
    engine = StepEngine(pipeline)
    unet = engine.diffusers_pipeline.unet
    gpu = TooSmallGpu(unet, fits if fits is not None else 10 ** 6)
    engine.diffusers_pipeline.unet = gpu
    if pauses is not None:
        pause = engine.pause
        engine.pause = lambda row_id, offload=False: pauses.append((row_id, offload)) or pause(row_id, offload)
    worker = StepWorker(WorkerIdentity("w", "h", 0, "tiny", "cpu"), pipeline, CONFIG, capacity=16,
                        broker_address="tcp://127.0.0.1:9", heartbeat_interval_s=1.0, engine=engine)
    sent: list[Any] = []
    worker.link.send = lambda message, payload=(): sent.append((message, list(payload)))
    worker.loop = asyncio.get_running_loop()
    try:
        for generate in requests:
            worker._accept(generate)
        loop_task = asyncio.create_task(worker._step_loop())

        def answered() -> int:
            return sum(isinstance(message, (Result, Failure)) for message, _ in sent)
        while answered() < len(requests):
            assert not loop_task.done(), loop_task
            await asyncio.sleep(0.02)
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
    finally:
        engine.diffusers_pipeline.unet = unet
        worker.link.sock.close(linger=0)
        worker.link.ctx.term()
        for pool in (worker.gpu_thread, worker.encoder_threads, worker.stripe_threads):
            pool.shutdown()
    return sent, gpu.calls


def pixels(payload: list[bytes]) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(payload[0])).convert("RGB")).astype(int)


def images(sent: list[Any]) -> dict[str, np.ndarray]:
    return {message.request_id: pixels(payload) for message, payload in sent if isinstance(message, Result)}


async def test_a_step_out_of_memory_halves_the_rows_pauses_the_rest_and_every_image_comes(pipeline):
    requests = [request(seed) for seed in range(4)]
    fine, _ = await serve(pipeline, requests, fits=None)
    pauses: list[tuple[str, bool]] = []
    small, calls = await serve(pipeline, requests, fits=4, pauses=pauses)  # guided: two UNet rows each, so two fit
    assert calls[0] == 8 and 4 in calls[1:] and max(calls[1:]) <= 4  # one call too big, then none
    expected, got = images(fine), images(small)
    assert set(got) == {r.request_id for r in requests} and not any(isinstance(m, Failure) for m, _ in small)
    for request_id, picture in expected.items():
        assert np.abs(got[request_id] - picture).max() <= PIXEL_TOLERANCE, request_id
    # The rows left out were told they wait, then ran (their steps kept: no restart from 0 after it).
    paused = {m.request_id for m, _ in small if isinstance(m, Progress) and m.paused}
    assert len(paused) == 2
    # Under that memory pressure they wait off the GPU (on this CPU engine the tensors stay put:
    # tests/integration/test_step_engine_gpu.py moves them on a GPU).
    assert {row_id for row_id, offload in pauses if offload} == paused
    for request_id in paused:
        steps = [m.step for m, _ in small if isinstance(m, Progress) and m.request_id == request_id and not m.paused]
        assert steps == sorted(steps), steps


async def test_a_lone_row_that_does_not_fit_fails_and_the_worker_serves_on(pipeline):
    # Guided, a request takes two UNet rows; unguided, one: only the unguided one fits. Together
    # (three rows) they run out of memory; then the guided one alone does, and fails; the other runs.
    sent, calls = await serve(pipeline, [request(1, guidance=7.5), request(2, guidance=1.0)], fits=1)
    assert calls[:2] == [3, 2] and set(calls[2:]) == {1}
    (failure,) = [m for m, _ in sent if isinstance(m, Failure)]
    assert failure.request_id == "request-1" and failure.code == "generation_failed"
    assert "out of memory" in failure.message
    assert [m.request_id for m, _ in sent if isinstance(m, Result)] == ["request-2"]


async def test_a_request_past_the_schedulers_steps_is_refused_alone_and_the_others_run(pipeline):
    too_long = Generate("request-9", GenerationParams("a lantern 9", 64, 64, 1000, 7.5, 9), 200.0)
    sent, _ = await serve(pipeline, [request(1), too_long, request(2)], fits=None)
    (failure,) = [m for m, _ in sent if isinstance(m, Failure)]
    assert failure.request_id == "request-9" and failure.code == "invalid_request"
    assert "use fewer steps" in failure.message
    assert sorted(m.request_id for m, _ in sent if isinstance(m, Result)) == ["request-1", "request-2"]


async def test_rows_held_for_batch_mates_run_at_the_plans_wake_at_without_another_arrival(pipeline, monkeypatch):
    # Uniform traffic: the scheduler holds an idle GPU's rows for batch-mates as run-to-completion does
    # (StepPlan.wake_at). With the loop's own look-again period out of reach, the rows still run: the
    # loop sleeps until wake_at, not until the next arrival or IDLE_LOOK_S.
    from gpu_worker.shell import step_loop

    monkeypatch.setattr(step_loop, "IDLE_LOOK_S", 3600.0)
    sent, _ = await asyncio.wait_for(serve(pipeline, [request(seed) for seed in range(2)], fits=None), 180)
    assert {m.request_id for m, _ in sent if isinstance(m, Result)} == {"request-0", "request-1"}
