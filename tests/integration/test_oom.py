"""Tests of gpu_worker.model.oom (split-and-retry on out-of-memory) and Batcher.lower_max_batch_size.

The backend that runs out of memory is the FAKE one (gpu_worker.model.fake_backend, no model) or small
scripted stand-ins defined here: these test the splitting logic, not the real pipeline.
"""

from __future__ import annotations

import threading

import pytest
import torch

from gpu_worker.decisions.batcher import Batcher, BatchKey, BatchPolicyConfig
from gpu_worker.model import oom
from gpu_worker.model.fake_backend import FakeBackend, parse_fake_model_id
from gpu_worker.model.oom import OUT_OF_MEMORY_ERROR, OomSplittingBackend, is_out_of_memory
from gpu_worker.model.pipelines import GenerationJob, auto_max_batch_size
from tests.support.images import pixels

SETTINGS = BatchKey(64, 64, 2, 7.5)


def jobs(n: int) -> list[GenerationJob]:
    return [GenerationJob(f"prompt {i}", None if i % 2 else f"neg {i}", 1000 + i) for i in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: list[str] = []

    def __call__(self, failed_size: int, succeeded_size: int) -> None:
        self.calls.append((failed_size, succeeded_size))
        self.threads.append(threading.current_thread().name)


class Scripted:
    """Raises ``error_for(jobs)`` when it returns an exception, else returns one token per job."""

    def __init__(self, error_for) -> None:
        self.error_for = error_for
        self.batches: list[list[str]] = []

    def generate(self, jobs, settings, on_images=None):
        self.batches.append([job.prompt for job in jobs])
        tokens = [job.prompt for job in jobs]
        if on_images is not None:  # like the real pipeline: the first image goes before the decode fails
            on_images(0, tokens[:1])
        error = self.error_for(jobs)
        if error is not None:
            raise error
        if on_images is not None:
            on_images(1, tokens[1:])
        return tokens


# ------------------------------------------------------------------ recognising OOM


def test_is_out_of_memory():
    assert is_out_of_memory(OUT_OF_MEMORY_ERROR("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend Out Of Memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("fake failure"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a RuntimeError
    assert not is_out_of_memory(MemoryError())


# ------------------------------------------------------------------ splitting


@pytest.mark.parametrize("n", [3, 4, 5, 7, 8, 16])
def test_batch_above_limit_is_split_and_equals_each_job_alone(n):
    recorder = Recorder()
    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"), on_oom=recorder)
    images = backend.generate(jobs(n), SETTINGS)
    alone = [FakeBackend().generate([job], SETTINGS)[0] for job in jobs(n)]
    assert len(images) == n
    assert [pixels(i) for i in images] == [pixels(i) for i in alone]
    assert recorder.calls == [(n, 2)]
    assert backend.oom_splits == 1


def test_seven_with_oom_above_two_runs_the_documented_sequence():
    fake = parse_fake_model_id("fake:oom_above=2")
    recorder = Recorder()
    backend = OomSplittingBackend(fake, on_oom=recorder)
    images = backend.generate(jobs(7), SETTINGS)
    assert len(images) == 7
    # 7 OOM -> 4 OOM -> 2, 2 -> 3 OOM (3 < 4, so tried) -> 2, 1
    assert fake.batch_sizes == [7, 4, 2, 2, 3, 2, 1]
    assert recorder.calls == [(7, 2)]
    assert backend.oom_errors == 3


def test_sizes_known_to_fail_are_not_tried_again():
    fake = parse_fake_model_id("fake:oom_above=1")
    backend = OomSplittingBackend(fake, on_oom=Recorder())
    backend.generate(jobs(8), SETTINGS)
    # 8 OOM -> 4 OOM -> 2 OOM -> 1, 1; every later sub-batch of 2 or 4 is split without a try.
    assert fake.batch_sizes == [8, 4, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    assert backend.oom_errors == 3


def test_order_is_kept_with_a_scripted_backend():
    inner = Scripted(lambda js: OUT_OF_MEMORY_ERROR("oom") if len(js) > 3 else None)
    recorder = Recorder()
    backend = OomSplittingBackend(inner, on_oom=recorder)
    expected = [job.prompt for job in jobs(11)]
    assert backend.generate(jobs(11), SETTINGS) == expected
    assert recorder.calls == [(11, 3)]


def test_images_handed_over_early_carry_their_index_in_the_whole_batch():
    inner = Scripted(lambda js: OUT_OF_MEMORY_ERROR("oom") if len(js) > 3 else None)
    backend = OomSplittingBackend(inner)
    handed_over: list[tuple[int, str]] = []
    expected = [job.prompt for job in jobs(11)]
    images = backend.generate(jobs(11), SETTINGS, on_images=lambda first, tokens: handed_over.extend(
        enumerate(tokens, first)))
    assert images == expected
    assert all(expected[index] == token for index, token in handed_over)
    assert {index for index, _ in handed_over} == set(range(11))
    # before each out of memory (11, 6, 5), the failed sub-batch's first image had been handed over
    assert len(handed_over) == 11 + 3


def test_no_oom_means_one_call_and_no_report():
    fake = parse_fake_model_id("fake:oom_above=8")
    recorder = Recorder()
    backend = OomSplittingBackend(fake, on_oom=recorder)
    assert len(backend.generate(jobs(8), SETTINGS)) == 8
    assert fake.batch_sizes == [8]
    assert recorder.calls == []
    assert backend.oom_errors == backend.oom_splits == 0


def test_plain_runtime_error_saying_out_of_memory_is_split_too():
    inner = Scripted(lambda js: RuntimeError("CUDA error: out of memory") if len(js) > 1 else None)
    recorder = Recorder()
    backend = OomSplittingBackend(inner, on_oom=recorder)
    assert backend.generate(jobs(3), SETTINGS) == [job.prompt for job in jobs(3)]
    assert recorder.calls == [(3, 1)]


def test_single_job_oom_reraises_without_report():
    fake = parse_fake_model_id("fake:oom_above=0")
    recorder = Recorder()
    backend = OomSplittingBackend(fake, on_oom=recorder)
    with pytest.raises(OUT_OF_MEMORY_ERROR):
        backend.generate(jobs(1), SETTINGS)
    assert fake.batch_sizes == [1]
    assert recorder.calls == []


def test_batch_where_even_one_job_ooms_reraises_and_reports_nothing_without_success():
    fake = parse_fake_model_id("fake:oom_above=0")
    recorder = Recorder()
    backend = OomSplittingBackend(fake, on_oom=recorder)
    with pytest.raises(OUT_OF_MEMORY_ERROR):
        backend.generate(jobs(4), SETTINGS)
    assert fake.batch_sizes == [4, 2, 1]  # the first single job that fails ends the call
    assert recorder.calls == []  # nothing completed: no size to lower to


def test_one_job_too_big_alone_fails_the_call_but_reports_what_completed():
    # "prompt 3" runs out of memory even alone; the others fit in pairs.
    def error_for(js):
        if any(job.prompt == "prompt 3" for job in js) or len(js) > 2:
            return OUT_OF_MEMORY_ERROR("oom")
        return None

    recorder = Recorder()
    backend = OomSplittingBackend(Scripted(error_for), on_oom=recorder)
    with pytest.raises(OUT_OF_MEMORY_ERROR):
        backend.generate(jobs(4), SETTINGS)
    assert recorder.calls == [(4, 2)]


def test_non_oom_errors_propagate_without_splitting():
    fake = parse_fake_model_id("fake:fail=1")
    recorder = Recorder()
    backend = OomSplittingBackend(fake, on_oom=recorder)
    with pytest.raises(RuntimeError, match="^fake failure$"):
        backend.generate(jobs(5), SETTINGS)
    assert fake.batch_sizes == [5]
    assert recorder.calls == []


def test_value_errors_propagate_without_splitting():
    inner = Scripted(lambda js: ValueError("width must be a multiple of 8"))
    backend = OomSplittingBackend(inner, on_oom=Recorder())
    with pytest.raises(ValueError):
        backend.generate(jobs(4), SETTINGS)
    assert len(inner.batches) == 1


def test_non_oom_error_in_a_half_propagates():
    def error_for(js):
        if len(js) > 2:
            return OUT_OF_MEMORY_ERROR("oom")
        if js[0].prompt == "prompt 2":
            return RuntimeError("device-side assert")
        return None

    backend = OomSplittingBackend(Scripted(error_for), on_oom=Recorder())
    with pytest.raises(RuntimeError, match="device-side assert"):
        backend.generate(jobs(4), SETTINGS)


def test_callback_errors_are_swallowed():
    def broken(failed_size: int, succeeded_size: int) -> None:
        raise RuntimeError("callback bug")

    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"), on_oom=broken)
    assert len(backend.generate(jobs(5), SETTINGS)) == 5


def test_without_callback():
    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"))
    assert len(backend.generate(jobs(5), SETTINGS)) == 5
    assert backend.oom_splits == 1


def test_callback_runs_in_the_generating_thread():
    from concurrent.futures import ThreadPoolExecutor

    recorder = Recorder()
    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"), on_oom=recorder)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu") as pool:
        pool.submit(backend.generate, jobs(3), SETTINGS).result()
    assert recorder.calls == [(3, 2)]
    assert recorder.threads[0].startswith("gpu")


def test_cuda_cache_is_emptied_between_tries_when_cuda_is_available(monkeypatch):
    emptied: list[int] = []
    monkeypatch.setattr(oom.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(oom.torch.cuda, "empty_cache", lambda: emptied.append(1))
    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"), on_oom=Recorder())
    backend.generate(jobs(7), SETTINGS)
    assert len(emptied) == 3  # once after each OOM


def test_cuda_cache_is_left_alone_without_cuda(monkeypatch):
    emptied: list[int] = []
    monkeypatch.setattr(oom.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(oom.torch.cuda, "empty_cache", lambda: emptied.append(1))
    OomSplittingBackend(parse_fake_model_id("fake:oom_above=2")).generate(jobs(7), SETTINGS)
    assert emptied == []


def test_attributes_are_delegated():
    fake = parse_fake_model_id("fake:delay=0")
    backend = OomSplittingBackend(fake)
    assert backend.inner is fake
    assert backend.model_id == "fake:delay=0"
    assert backend.architecture == "fake"
    assert backend.device == torch.device("cpu")
    assert backend.dtype == torch.float32
    assert backend.native_size == 64
    assert backend.per_image_memory_bytes(64, 64) == fake.per_image_memory_bytes(64, 64)
    with pytest.raises(AttributeError):
        backend.no_such_attribute  # noqa: B018
    assert "FakeBackend" in repr(backend)


def test_wrapping_works_with_the_main_wiring_pattern():
    # What gpu_worker/__main__ is meant to do: a fake id gives the fake, wrapped.
    backend = OomSplittingBackend(parse_fake_model_id("fake:oom_above=2"))

    # The fake has no architecture known to the memory model, but it gives per_image_memory_bytes
    # itself, and on the CPU (no free GPU memory) the CPU default applies.
    assert auto_max_batch_size(backend, None, 64, 64) == 4
    assert auto_max_batch_size(backend, 10**6, 64, 64) >= 1


# ------------------------------------------------------------------ Batcher.lower_max_batch_size

KEY = BatchKey(64, 64, 2, 7.5)


def test_lower_max_batch_size_lowers_and_returns_the_new_max():
    batcher: Batcher[str] = Batcher(BatchPolicyConfig(max_batch_size=8, min_batch_size=1))
    assert batcher.lower_max_batch_size(2) == 2
    assert batcher.config.max_batch_size == 2
    assert batcher.config.min_batch_size == 1
    assert batcher.max_batch_size_for(KEY) == 2


def test_lower_max_batch_size_never_raises_the_max():
    batcher: Batcher[str] = Batcher(BatchPolicyConfig(max_batch_size=4))
    assert batcher.lower_max_batch_size(16) == 4
    assert batcher.config.max_batch_size == 4


@pytest.mark.parametrize("size", [0, -3])
def test_lower_max_batch_size_never_goes_below_one(size):
    batcher: Batcher[str] = Batcher(BatchPolicyConfig(max_batch_size=4, min_batch_size=2))
    assert batcher.lower_max_batch_size(size) == 1
    assert (batcher.config.max_batch_size, batcher.config.min_batch_size) == (1, 1)


def test_lower_max_batch_size_lowers_min_batch_size_with_it():
    batcher: Batcher[str] = Batcher(BatchPolicyConfig(max_batch_size=8, min_batch_size=4))
    assert batcher.lower_max_batch_size(3) == 3
    assert (batcher.config.max_batch_size, batcher.config.min_batch_size) == (3, 3)
    assert batcher.lower_max_batch_size(5) == 3  # a later, larger report changes nothing
    assert (batcher.config.max_batch_size, batcher.config.min_batch_size) == (3, 3)


NATIVE = BatchKey(512, 512, 25, 7.5)
LARGE = BatchKey(1024, 1024, 25, 7.5)
SMALL = BatchKey(64, 64, 25, 7.5)


def budgeted(max_batch_size: int = 64) -> Batcher[str]:
    """As the automatic MAX_BATCH_SIZE configures it on a GPU: a pixel budget of that many native-size images."""
    return Batcher(BatchPolicyConfig(max_batch_size=max_batch_size, max_batch_pixels=max_batch_size * NATIVE.pixels))


def test_an_out_of_memory_batch_of_large_images_leaves_smaller_images_their_larger_batches():
    batcher = budgeted()
    assert batcher.max_batch_size_for(LARGE) == 16  # the budget: 64 images at 512x512
    assert batcher.lower_max_batch_size(4, LARGE.pixels) == 16  # 4 at 1024x1024 fit: 16 at 512x512
    assert batcher.config.max_batch_pixels == 4 * LARGE.pixels
    assert (batcher.max_batch_size_for(LARGE), batcher.max_batch_size_for(NATIVE)) == (4, 16)


def test_an_out_of_memory_batch_at_the_native_size_lowers_the_count_as_before():
    batcher = budgeted()
    assert batcher.lower_max_batch_size(20, NATIVE.pixels) == 20
    assert (batcher.max_batch_size_for(NATIVE), batcher.max_batch_size_for(LARGE)) == (20, 5)


def test_an_out_of_memory_batch_of_small_images_keeps_the_count_that_fitted():
    batcher = budgeted()
    assert batcher.lower_max_batch_size(2, SMALL.pixels) == 2  # not 2 * 64^2 // 512^2 = 0
    assert batcher.max_batch_size_for(SMALL) == 2
    assert batcher.max_batch_size_for(NATIVE) == 1  # what fitted says nothing more about 512x512


def test_limits_lowered_by_a_pixel_budget_are_never_raised():
    batcher = budgeted()
    batcher.lower_max_batch_size(4, LARGE.pixels)
    assert batcher.lower_max_batch_size(8, LARGE.pixels) == 16  # a later, larger report changes nothing
    assert batcher.config.max_batch_pixels == 4 * LARGE.pixels
    # Nothing fitted: one 1024x1024 image at a time, four at 512x512 (the same pixels).
    assert batcher.lower_max_batch_size(0, LARGE.pixels) == 4
    assert (batcher.max_batch_size_for(LARGE), batcher.max_batch_size_for(NATIVE)) == (1, 4)


def test_the_worker_lowers_its_limits_for_the_batch_that_ran_out_of_memory(caplog):
    from tests.support.offline_worker import close_offline_worker, offline_worker

    config = BatchPolicyConfig(max_batch_size=64, max_batch_pixels=64 * NATIVE.pixels)
    worker = offline_worker(FakeBackend(), config, Batcher(config), capacity=128)
    try:
        with caplog.at_level("WARNING"):
            worker.lower_max_batch_size(8, 4, LARGE)
        assert worker.decisions.batcher.config == worker.decisions.policy
        assert (worker.decisions.policy.max_batch_size, worker.decisions.policy.max_batch_pixels) == (
            16, 4 * LARGE.pixels)
        assert "batch of 8 at 1024x1024: max batch size lowered to 16" in caplog.text
        assert "1024x1024 batches of at most 4" in caplog.text
    finally:
        close_offline_worker(worker)


def test_lower_max_batch_size_keeps_every_other_setting():
    config = BatchPolicyConfig(enable_batching=True, max_batch_size=8, max_wait_time_s=2.0,
                               min_batch_size=2, min_wait_time_s=0.25, adaptive=False,
                               adaptive_threshold=5, max_batch_pixels=8 * 64 * 64)
    batcher: Batcher[str] = Batcher(config)
    batcher.lower_max_batch_size(4)
    new = batcher.config
    assert (new.enable_batching, new.max_wait_time_s, new.min_batch_size, new.min_wait_time_s,
            new.adaptive, new.adaptive_threshold, new.max_batch_pixels) == (
        True, 2.0, 2, 0.25, False, 5, 8 * 64 * 64)
    assert config.max_batch_size == 8  # the old config object is untouched (frozen)


def test_lower_max_batch_size_applies_to_queued_requests():
    batcher: Batcher[str] = Batcher(BatchPolicyConfig(max_batch_size=8, max_wait_time_s=1.0))
    for i in range(7):
        batcher.add(f"r{i}", KEY, f"r{i}", 0.0)
    assert batcher.next_batch(0.0) is None  # 7 < 8: waits
    batcher.lower_max_batch_size(2)
    sizes = []
    while (batch := batcher.next_batch(0.0)) is not None:
        sizes.append(len(batch))
    assert sizes == [2, 2, 2]  # full batches of the new max run at once
    assert batcher.queue_depth == 1
    last = batcher.next_batch(1.0)
    assert last is not None and len(last) == 1
