"""Live previews with real processes: a broker and a worker, and the gateway's broker link (BrokerClient)
in this process. A request with ``preview`` gets its previews through the broker, as PreviewReports
to its ``on_event``, at the steps PREVIEW_EVERY_STEPS says and before its answer; a batch-mate without
gets none. With the FAKE backend (flat stand-ins) and with the real tiny pipeline on the CPU, whose
previews come from its latents.

No test asserts a duration: each waits for what must happen."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import PIL.Image
import pytest

from gateway.broker_client import BrokerClient, PreviewReport
from imagegen.protocol import GenerationParams, Preview, Progress

pytestmark = pytest.mark.timeout(300)


def params(seed: int, steps: int, preview: bool) -> GenerationParams:
    return GenerationParams(prompt=f"request {seed}", width=64, height=64, num_inference_steps=steps,
                            guidance_scale=7.5, seed=seed, preview=preview)


def decoded(report: PreviewReport) -> np.ndarray:
    picture = PIL.Image.open(io.BytesIO(report.image))
    picture.load()
    assert picture.format == "JPEG" and picture.mode == "RGB"
    return np.asarray(picture).astype(int)


async def batch_of_two(cluster, steps: int) -> tuple[list, list, BrokerClient]:
    """One request with previews and one without, sent together (they share a batch); their events."""
    client = BrokerClient(cluster.env["BROKER_CLIENT_ADDRESS"])
    await client.start()
    try:
        for _ in range(600):
            if client.broker.workers == 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the worker did not register\n{cluster.logs()}")
        with_previews: list = []
        without: list = []
        answers = await asyncio.gather(
            client.generate("asks", params(1, steps, True), 240, on_event=with_previews.append),
            client.generate("does-not", params(2, steps, False), 240, on_event=without.append))
        with_previews.append(answers[0][0])
        without.append(answers[1][0])
        assert answers[0][0].batch_size == 2 == answers[1][0].batch_size, cluster.logs()  # one batch
        stats = await client.stats(10.0)
        return with_previews, without, stats
    finally:
        await client.close()


@pytest.fixture
def fake_cluster(make_cluster):
    c = make_cluster(MODEL_ID="fake:step_delay=0.05", PREVIEW_EVERY_STEPS="3", MAX_BATCH_WAIT_TIME="0.5",
                     MIN_BATCH_SIZE="2", BATCH_POLICY="window")
    c.start("broker", "broker")
    c.start_worker(0)
    return c


async def test_previews_reach_the_client_that_asked_at_every_nth_step_and_no_batch_mate(fake_cluster):
    events, others, stats = await batch_of_two(fake_cluster, steps=10)
    previews = [e for e in events if isinstance(e, Preview)]
    assert all(isinstance(e, PreviewReport) for e in previews)
    assert [(p.request_id, p.step, p.steps) for p in previews] == [("asks", 3, 10), ("asks", 6, 10), ("asks", 9, 10)]
    assert all(decoded(p).shape == (8, 8, 3) for p in previews)
    assert events.index(previews[-1]) < len(events) - 1  # before its answer
    assert any(isinstance(e, Progress) for e in others) and not any(isinstance(e, Preview) for e in others)
    assert stats["broker"]["previews_forwarded"] == 3


@pytest.fixture
def tiny_cluster(make_cluster):
    c = make_cluster(MODEL_ID="tiny", DEVICE="cpu", PREVIEW_EVERY_STEPS="2", MAX_BATCH_WAIT_TIME="2",
                     MIN_BATCH_SIZE="2", BATCH_POLICY="window", WORKER_WARMUP="false")
    c.start("broker", "broker")
    c.start_worker(0)
    return c


async def test_the_real_tiny_pipeline_sends_previews_of_its_latents(tiny_cluster):
    events, others, _ = await batch_of_two(tiny_cluster, steps=6)
    previews = [e for e in events if isinstance(e, PreviewReport)]
    assert [p.step for p in previews] == [2, 4]
    pictures = [decoded(p) for p in previews]
    assert all(picture.shape == (8, 8, 3) for picture in pictures)  # 64 x 64: 1/8 of the side
    assert all(picture.std() > 1 for picture in pictures)  # latents, not a flat stand-in
    assert not any(isinstance(e, Preview) for e in others)
