"""Tests of gpu_worker.model.fake_backend: the FAKE image backend (no model) used by serving-layer tests.

These check the fake itself (MODEL_ID parsing, image size, determinism, fault injection); nothing
here says anything about the real pipeline, which tests/integration/test_pipelines.py covers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.model import fake_backend
from gpu_worker.model.fake_backend import FakeBackend, is_fake_model_id, parse_fake_model_id
from gpu_worker.model.oom import OUT_OF_MEMORY_ERROR
from gpu_worker.model.pipelines import GenerationJob
from imagegen.batch_key import BatchKey
from tests.support.images import pixels

SETTINGS = BatchKey(64, 64, 2, 7.5)


def jobs(n: int, prompt: str = "p") -> list[GenerationJob]:
    return [GenerationJob(f"{prompt}{i}", None, i) for i in range(n)]


# ------------------------------------------------------------------ MODEL_ID parsing


@pytest.mark.parametrize("model_id", ["tiny", "sd15", "sdxl", "org/fake", "fakes", "fake-model",
                                      "./fake", "", "FAKE"])
def test_non_fake_ids_give_none(model_id):
    assert not is_fake_model_id(model_id)
    assert parse_fake_model_id(model_id) is None


def test_plain_fake_is_instant_and_never_fails():
    backend = parse_fake_model_id("fake")
    assert isinstance(backend, FakeBackend)
    assert (backend.delay_s, backend.oom_above, backend.fail) == (0.0, None, False)
    assert backend.model_id == "fake"


@pytest.mark.parametrize("model_id, delay_s, oom_above, fail", [
    ("fake:delay=0.5", 0.5, None, False),
    ("fake:oom_above=2", 0.0, 2, False),
    ("fake:oom_above=0", 0.0, 0, False),
    ("fake:delay=0.2,oom_above=2", 0.2, 2, False),
    ("fake:oom_above=3, delay=1", 1.0, 3, False),
    ("fake:fail=1", 0.0, None, True),
    ("fake:fail=0", 0.0, None, False),
    ("fake:fail=true,delay=0", 0.0, None, True),
])
def test_fake_ids_parse(model_id, delay_s, oom_above, fail):
    backend = parse_fake_model_id(model_id)
    assert isinstance(backend, FakeBackend)
    assert (backend.delay_s, backend.oom_above, backend.fail) == (delay_s, oom_above, fail)
    assert backend.model_id == model_id


@pytest.mark.parametrize("model_id, fragment", [
    ("fake:delay=abc", "delay must be a number"),
    ("fake:delay=-1", "delay must be a finite number >= 0"),
    ("fake:delay=nan", "delay must be a finite number >= 0"),
    ("fake:delay=inf", "delay must be a finite number >= 0"),
    ("fake:oom_above=1.5", "oom_above must be an integer"),
    ("fake:oom_above=-1", "oom_above must be >= 0"),
    ("fake:fail=maybe", "fail must be 1 or 0"),
    ("fake:speed=2", "unknown option 'speed'"),
    ("fake:delay", "is not key=value"),
    ("fake:delay=", "is not key=value"),
    ("fake:", "is not key=value"),
    ("fake:delay=1,", "is not key=value"),
    ("fake:delay=1,delay=2", "given twice"),
    ("fake:cell=0", "cell must be >= 1"),
    ("fake:cell=2.5", "cell must be an integer"),
])
def test_bad_fake_ids_raise_value_error(model_id, fragment):
    with pytest.raises(ValueError, match="bad fake MODEL_ID") as info:
        parse_fake_model_id(model_id)
    assert fragment in str(info.value)
    assert repr(model_id) in str(info.value)


def test_cell_sets_the_images_grain():
    """cell=1 draws one random colour per pixel, so its PNGs are as large as a random-weight model's
    (what the serving path's benchmarks need); the default 8-pixel cells compress well."""
    from gpu_worker.model import png

    settings = BatchKey(256, 256, 2, 7.5)
    noise = parse_fake_model_id("fake:cell=1")
    assert (noise.cell_px, FakeBackend().cell_px) == (1, 8)
    fine, coarse = noise.generate(jobs(1), settings)[0], FakeBackend().generate(jobs(1), settings)[0]
    assert fine.size == coarse.size == (256, 256)
    fine_pixels = np.asarray(fine)
    assert (fine_pixels[:, 1:] != fine_pixels[:, :-1]).any(axis=2).mean() > 0.9  # neighbours differ
    assert len(png.encode_png(fine)) > 0.9 * 256 * 256 * 3 > 10 * len(png.encode_png(coarse))


# ------------------------------------------------------------------ the surface the worker uses


def test_pipeline_surface():
    backend = FakeBackend()
    assert backend.architecture == "fake"
    assert backend.device == torch.device("cpu")
    assert backend.dtype == torch.float32
    assert backend.native_size == 64
    assert backend.per_image_memory_bytes(64, 64) > 0
    assert backend.per_image_memory_bytes(128, 128) == 4 * backend.per_image_memory_bytes(64, 64)
    with pytest.raises(ValueError):
        backend.per_image_memory_bytes(0, 64)
    assert "FakeBackend" in repr(backend)


@pytest.mark.parametrize("width, height", [(64, 64), (512, 512), (96, 40), (1024, 768)])
def test_images_are_rgb_of_the_requested_size(width, height):
    images = FakeBackend().generate(jobs(3), BatchKey(width, height, 2, 7.5))
    assert len(images) == 3
    for image in images:
        assert image.mode == "RGB"
        assert image.size == (width, height)


def test_images_are_deterministic_across_instances_and_batches():
    first = FakeBackend().generate(jobs(4), SETTINGS)
    again = FakeBackend().generate(jobs(4), SETTINGS)
    alone = [FakeBackend().generate([job], SETTINGS)[0] for job in jobs(4)]
    reversed_batch = FakeBackend().generate(list(reversed(jobs(4))), SETTINGS)[::-1]
    for images in (again, alone, reversed_batch):
        assert [pixels(i) for i in images] == [pixels(i) for i in first]


def test_images_differ_per_seed_prompt_and_negative_prompt():
    variants = [
        GenerationJob("a cat", None, 1),
        GenerationJob("a cat", None, 2),
        GenerationJob("a dog", None, 1),
        GenerationJob("a cat", "blurry", 1),
    ]
    images = FakeBackend().generate(variants, SETTINGS)
    assert len({pixels(i) for i in images}) == len(variants)


def test_images_are_not_flat():
    image = FakeBackend().generate(jobs(1), SETTINGS)[0]
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 8


def test_bad_batches_raise_value_error():
    backend = FakeBackend()
    with pytest.raises(ValueError, match="at least one job"):
        backend.generate([], SETTINGS)
    with pytest.raises(ValueError, match="width"):
        backend.generate(jobs(1), BatchKey(60, 64, 2, 7.5))
    with pytest.raises(ValueError, match="num_inference_steps"):
        backend.generate(jobs(1), BatchKey(64, 64, 0, 7.5))


# ------------------------------------------------------------------ fault injection


def test_oom_above_raises_torch_out_of_memory_for_big_batches_only():
    backend = parse_fake_model_id("fake:oom_above=2")
    assert len(backend.generate(jobs(1), SETTINGS)) == 1
    assert len(backend.generate(jobs(2), SETTINGS)) == 2
    with pytest.raises(OUT_OF_MEMORY_ERROR, match="out of memory") as info:
        backend.generate(jobs(3), SETTINGS)
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)
    assert isinstance(info.value, RuntimeError)
    assert backend.batch_sizes == [1, 2, 3]


def test_torch_oom_classes_are_one():
    if hasattr(torch, "OutOfMemoryError"):
        assert torch.OutOfMemoryError is torch.cuda.OutOfMemoryError
        assert OUT_OF_MEMORY_ERROR is torch.OutOfMemoryError


def test_oom_above_zero_fails_even_one_image():
    with pytest.raises(OUT_OF_MEMORY_ERROR):
        parse_fake_model_id("fake:oom_above=0").generate(jobs(1), SETTINGS)


def test_fail_raises_runtime_error_every_call():
    backend = parse_fake_model_id("fake:fail=1")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="^fake failure$"):
            backend.generate(jobs(1), SETTINGS)


class RecordedSleeps:
    """Stands in for the fake backend's ``time``: a clock that only its sleeps move, and the sleeps
    in order, so the tests see what it slept whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def sleeps(monkeypatch) -> RecordedSleeps:
    recorded = RecordedSleeps()
    monkeypatch.setattr(fake_backend, "time", recorded)
    return recorded


def test_delay_sleeps_once_per_batch(sleeps):
    backend = parse_fake_model_id("fake:delay=0.05")
    backend.generate(jobs(4), SETTINGS)
    assert sleeps.slept == [0.05]


def test_failures_do_not_wait_for_the_delay(sleeps):
    backend = parse_fake_model_id("fake:delay=5,oom_above=1")
    with pytest.raises(OUT_OF_MEMORY_ERROR):
        backend.generate(jobs(2), SETTINGS)
    assert sleeps.slept == []
