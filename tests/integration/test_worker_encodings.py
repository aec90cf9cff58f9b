"""gpu_worker.shell.worker.BatchEncodings: a batch's PNGs start as its images are handed over, once each."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from gpu_worker.shell.worker import BatchEncodings


def image(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, dtype=np.uint8)


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture
def pools():
    with ThreadPoolExecutor(2) as encoder, ThreadPoolExecutor(2) as stripes:
        yield encoder, stripes


def test_parts_from_the_gpu_thread_are_encoded_once_each_in_order(pools) -> None:
    async def scenario() -> list[bytes]:
        encodings = BatchEncodings(*pools)

        def gpu_thread() -> None:  # as ImagePipeline.generate calls on_images
            encodings.on_images_in_gpu_thread(0, [image(10), image(11)])
            encodings.on_images_in_gpu_thread(1, [image(99), image(12)])  # index 1 again (OOM retry)

        thread = threading.Thread(target=gpu_thread)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        assert sorted(encodings.pngs) == [0, 1, 2]  # started by the GPU thread itself, no event-loop turn
        encodings.encode(0, [image(0), image(0), image(0), image(13)])  # the returned list: only 3 is new
        return [await encodings.png(index) for index in range(4)]

    pngs = asyncio.run(scenario())
    assert [int(decoded(png)[0, 0, 0]) for png in pngs] == [10, 11, 12, 13]


def test_nothing_is_encoded_after_the_batch_failed() -> None:
    started = threading.Event()
    release = threading.Event()

    def busy() -> None:
        started.set()
        release.wait(10)

    with ThreadPoolExecutor(1) as encoder, ThreadPoolExecutor(1) as stripes:
        blocker = encoder.submit(busy)  # the encoder thread is busy: image 0 waits in the queue
        started.wait(10)
        encodings = BatchEncodings(encoder, stripes)
        encodings.encode(0, [image(1)])
        encodings.cancel()
        encodings.encode(1, [image(2)])
        release.set()
        blocker.result(10)
    assert list(encodings.pngs) == [0] and encodings.pngs[0].cancelled()
