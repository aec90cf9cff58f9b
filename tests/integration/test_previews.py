"""Live previews through the worker (gpu_worker/shell/worker.py) in this process: a request that asks gets
PREVIEW messages with decodable images at the expected steps, before its RESULT; a batch-mate that did
not ask gets none; with the real tiny pipeline the images come from its latents. And what a preview
costs against a VAE decode on the CPU (bench/previews.py, printed)."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest

from bench import previews as preview_bench
from gpu_worker.decisions.batcher import Batcher, BatchPolicyConfig
from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.model.pipelines import load_pipeline
from imagegen.protocol import Generate, GenerationParams, Preview, Progress, Result
from tests.support.offline_worker import close_offline_worker, offline_worker


def request(index: int, preview: bool, steps: int = 6, side: int = 64) -> Generate:
    params = GenerationParams(f"prompt {index}", side, side, steps, 7.5, index)
    return Generate(f"request-{index}", replace(params, preview=preview), 60.0)


def make_worker(backend, every: int):
    config = BatchPolicyConfig(max_batch_size=4, min_batch_size=2, max_wait_time_s=5.0, min_wait_time_s=0.0)
    worker = offline_worker(backend, config, Batcher(config), capacity=8)
    worker.preview_every_steps = every
    sent: list = []
    worker.link.send = lambda message, payload=(): sent.append((message, list(payload)))
    return worker, sent


async def drive(worker, arrivals, until) -> None:
    worker.loop = asyncio.get_running_loop()
    loop_task = asyncio.create_task(worker._batch_loop())
    for message in arrivals:
        worker._on_message(message)
    deadline = time.monotonic() + 120
    while not until() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    worker.state = "draining"
    worker.arrival.set()
    await asyncio.wait_for(loop_task, 60)
    if worker.delivery_tasks:
        await asyncio.wait(worker.delivery_tasks, timeout=60)


def run(backend, arrivals, every: int, results: int) -> list:
    worker, sent = make_worker(backend, every)
    try:
        asyncio.run(drive(worker, arrivals, lambda: sum(isinstance(m, Result) for m, _ in sent) >= results))
    finally:
        close_offline_worker(worker)
    return sent


def image(payload: list) -> PIL.Image.Image:
    (frame,) = payload
    picture = PIL.Image.open(io.BytesIO(frame))
    picture.load()
    assert picture.format == "JPEG"
    return picture


def previews_of(sent: list, request_id: str) -> list[tuple[int, int, PIL.Image.Image]]:
    return [(m.step, m.steps, image(p)) for m, p in sent if isinstance(m, Preview) and m.request_id == request_id]


def test_the_row_that_asked_gets_previews_at_every_nth_step_before_its_result_and_its_batch_mate_none():
    sent = run(FakeBackend(step_delay_s=0.01), [request(0, preview=True, steps=7), request(1, preview=False, steps=7)],
               every=2, results=2)
    results = [m for m, _ in sent if isinstance(m, Result)]
    assert sorted((r.request_id, r.batch_size) for r in results) == [("request-0", 2), ("request-1", 2)]  # one batch
    got = previews_of(sent, "request-0")
    assert [(step, steps) for step, steps, _ in got] == [(2, 7), (4, 7), (6, 7)]
    assert all(picture.size == (8, 8) for _, _, picture in got)
    assert previews_of(sent, "request-1") == []
    kinds = [(type(m).__name__, m.request_id) for m, _ in sent if isinstance(m, (Preview, Result))]
    assert kinds.index(("Result", "request-0")) > max(i for i, k in enumerate(kinds) if k == ("Preview", "request-0"))


def test_no_row_asked_no_previews():
    sent = run(FakeBackend(), [request(0, preview=False), request(1, preview=False)], every=1, results=2)
    assert not any(isinstance(m, Preview) for m, _ in sent)
    assert any(isinstance(m, Progress) for m, _ in sent)


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny", "cpu")


def test_the_real_tiny_pipelines_previews_come_from_its_latents(tiny):
    sent = run(tiny, [request(0, preview=True, steps=6), request(1, preview=False, steps=6)], every=2, results=2)
    got = previews_of(sent, "request-0")
    assert [step for step, _, _ in got] == [2, 4]
    pictures = [np.asarray(picture).astype(int) for _, _, picture in got]
    assert all(picture.shape == (8, 8, 3) for picture in pictures)  # 64 x 64 image: 1/8 of its side
    assert all(picture.std() > 1 for picture in pictures)  # latents, not a flat stand-in
    assert np.abs(pictures[0] - pictures[1]).mean() > 0.5  # the latents moved between steps
    assert previews_of(sent, "request-1") == []


def test_what_a_preview_costs_against_a_vae_decode_on_the_cpu(tiny, capsys):
    """The figures are printed (pytest -s), not asserted: they depend on the machine."""
    figures = preview_bench.measure_preview(tiny, 512, 4, repeats=5)
    steps = preview_bench.measure_generation(tiny, 64, 2, steps=10, every=5, repeats=2)
    assert steps["preview_steps"] == 1
    with capsys.disabled():
        print(f"\ntiny on the CPU, 4 rows of 512x512 (64x64 latents): preview {figures['preview_ms']:.2f} ms "
              f"(map {figures['map_ms']:.2f} ms), VAE decode {figures['vae_decode_ms']:.1f} ms, "
              f"{figures['decode_over_preview']:.0f}x; 64x64 x2, 10 steps: {steps['gpu_thread_ms_per_preview']:.2f} ms "
              f"per preview step in the generating thread")
    assert figures["preview_ms"] > 0 and figures["vae_decode_ms"] > 0
