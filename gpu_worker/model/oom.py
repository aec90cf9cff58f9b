"""Surviving GPU out-of-memory errors: split the batch in halves and retry.

:class:`OomSplittingBackend` wraps any backend with ``generate(jobs, settings, on_images) -> list[image]``
(gpu_worker.model.pipelines.ImagePipeline, gpu_worker.model.fake_backend.FakeBackend). When a batch raises an
out-of-memory error it is split in two halves (the first half gets the extra job when the size is
odd) and each half is generated on its own, recursively, so every job still gets its image, in the
original order, and no request fails because of its batch-mates. Only a single job that runs out of
memory on its own makes the call raise (the OOM error itself).

Within one call, a size known to fail is not tried again: once a batch of n has run out of memory,
any sub-batch of n or more is split without trying it (an OOM can cost a whole denoising loop when
it strikes in the VAE decode). With ``fake:oom_above=2`` a batch of 7 runs as
7 (OOM) -> 4 (OOM) -> 2, 2 -> 3 (OOM) -> 2, 1.

Each call that had to split reports ``on_oom(failed_size, succeeded_size)`` once, where
``failed_size`` is the size of the batch given to generate (the size that ran out of memory) and
``succeeded_size`` the largest sub-batch that then completed (7 and 2 above). A worker lowers its
maximum batch size to ``succeeded_size``. The report is made even when the call finally raises, as
long as some sub-batch completed; it is not made when nothing completed (there is no size to lower
to). The callback runs in the thread that calls generate (the worker's GPU thread, not its event
loop thread), so it must be thread-safe: hand the numbers to the loop with
``loop.call_soon_threadsafe``. An exception raised by the callback is logged and swallowed: it
never costs the images.

Pure: no asyncio, no sockets. torch is only used to recognise the error and to empty CUDA's cache.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

# torch.OutOfMemoryError appeared in torch 2.5; torch.cuda.OutOfMemoryError (the same class since
# then) is older.
OUT_OF_MEMORY_ERROR: type[RuntimeError] = getattr(torch, "OutOfMemoryError",
                                                  torch.cuda.OutOfMemoryError)

OnOom = Callable[[int, int], None]
# on_images(first_index, images): images[i] is image first_index + i of the batch (gpu_worker.model.decoding)
OnImages = Callable[[int, Sequence[Any]], None]


def _shifted(on_images: OnImages | None, offset: int) -> OnImages | None:
    """on_images for a sub-batch that starts at ``offset`` in the whole batch."""
    if on_images is None or offset == 0:
        return on_images
    return lambda first, images: on_images(offset + first, images)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError, and for any RuntimeError whose message says "out of
    memory" (some backends and older code paths raise a plain RuntimeError)."""
    if isinstance(exc, OUT_OF_MEMORY_ERROR):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Give CUDA's cached blocks back after an OOM, so the retry starts from a clean allocator.

    gc.collect first: the failed attempt's tensors can still be held by reference cycles (frames
    of the traceback). Nothing happens without CUDA. Never raises.
    """
    try:
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - cleaning up must not turn an OOM into another error
        log.debug("could not empty the CUDA cache", exc_info=True)


@dataclass
class _CallState:
    smallest_failed: int | None = None  # smallest size that ran out of memory in this call
    largest_succeeded: int = 0          # largest sub-batch that completed in this call (0: none)
    ooms: int = 0
    # gpu_worker.decisions.preemption.Preemption of the call, passed to the first attempt only: a batch that
    # had to be split is past any preemption window.
    preemption: Any = None


class OomSplittingBackend:
    """A backend whose generate splits and retries a batch that runs out of memory.

    inner: the wrapped backend. on_oom: optional ``on_oom(failed_size, succeeded_size)``, called
    from the generating thread (must be thread-safe; see the module docstring). Every attribute
    the wrapper does not define (model_id, architecture, device, dtype, native_size,
    per_image_memory_bytes, ...) is the inner backend's, so the worker can treat the wrapper as
    the pipeline; only ``generate`` splits. ``oom_errors`` counts the OOM errors that led to a split,
    ``oom_splits`` the generate calls that had to split (both only written by the generating
    thread).
    """

    def __init__(self, inner: Any, on_oom: OnOom | None = None) -> None:
        self.inner = inner
        self.on_oom = on_oom
        self.oom_errors = 0
        self.oom_splits = 0

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper itself. Read inner through __dict__ so a
        # half-built instance (copy, pickle) raises AttributeError instead of recursing.
        try:
            inner = self.__dict__["inner"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"OomSplittingBackend({self.inner!r})"

    def generate(self, jobs: Sequence[Any], settings: Any, on_images: OnImages | None = None,
                 preemption: Any = None) -> list[Any]:
        """The inner backend's images for ``jobs``, in order, splitting on out-of-memory errors.

        ``on_images(first_index, images)`` is passed on with each sub-batch's indices shifted to
        the whole batch's; images handed over before a sub-batch ran out of memory come again when
        it is retried in halves (the same images: a job's image does not depend on its batch).
        Raises what the inner backend raises, except OOM errors of batches of two or more jobs;
        an OOM of a single job is re-raised as it is. ``preemption`` (gpu_worker.decisions.preemption) goes to
        the first attempt only, and only when given (BatchPreempted passes through).
        """
        jobs = list(jobs)
        state = _CallState(preemption=preemption)
        try:
            return self._generate(jobs, settings, state, on_images, 0)
        finally:
            if state.ooms:
                self.oom_splits += 1
                if state.largest_succeeded:
                    self._report(len(jobs), state.largest_succeeded)
                log.warning("out of memory %d time(s) on a batch of %d: largest sub-batch that "
                            "completed %d, smallest that ran out of memory %s", state.ooms,
                            len(jobs), state.largest_succeeded, state.smallest_failed)

    def _generate(self, jobs: list[Any], settings: Any, state: _CallState, on_images: OnImages | None,
                  offset: int) -> list[Any]:
        size = len(jobs)
        known_to_fail = state.smallest_failed is not None and size >= state.smallest_failed
        if size < 2 or not known_to_fail:
            try:
                preemption, state.preemption = state.preemption, None
                extra = () if preemption is None else (preemption,)  # inner backends may not take it
                images = list(self.inner.generate(jobs, settings, _shifted(on_images, offset), *extra))
            except Exception as exc:
                if not is_out_of_memory(exc) or size < 2:
                    raise
                self.oom_errors += 1
                state.ooms += 1
                state.smallest_failed = min(size, state.smallest_failed or size)
                log.info("out of memory on a sub-batch of %d; splitting it: %s", size, exc)
                # The retry happens after this block: `exc` (and the frames its traceback holds,
                # with their tensors) is released when the except block ends.
            else:
                state.largest_succeeded = max(state.largest_succeeded, size)
                return images
            release_cached_memory()
        half = (size + 1) // 2
        return (self._generate(jobs[:half], settings, state, on_images, offset)
                + self._generate(jobs[half:], settings, state, on_images, offset + half))

    def _report(self, failed_size: int, succeeded_size: int) -> None:
        if self.on_oom is None:
            return
        try:
            self.on_oom(failed_size, succeeded_size)
        except Exception:  # noqa: BLE001 - a broken callback must not cost the images
            log.exception("on_oom callback failed")
