"""A worker's own counters (pure): what it reports to the broker in heartbeats."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from imagegen.protocol import WorkerStatus


@dataclass
class WorkerCounters:
    """The counting half of :class:`~imagegen.protocol.WorkerStatus`: each field here is the
    WorkerStatus field of the same name, so ``status`` passes them on by name; the rest of
    WorkerStatus (state, queue depth, running, max_batch_size, compile_state, warm_sizes) is the worker's state now."""

    max_queue_depth: int = 0
    total_requests: int = 0
    total_batches: int = 0
    total_failed: int = 0
    sum_wait_ms: float = 0.0
    sum_generation_ms: float = 0.0
    stopped_batches: int = 0
    sum_stopped_ms: float = 0.0
    eager_batches: int = 0  # ran eager: their size was not warm (TORCH_COMPILE)
    eager_images: int = 0
    unlisted_refused: int = 0  # a size SIZES does not list, refused (UNLISTED_SIZE=refuse)
    unlisted_snapped: int = 0  # ... or drawn at the nearest listed size (UNLISTED_SIZE=snap)

    def observe_queue_depth(self, depth: int) -> None:
        self.max_queue_depth = max(self.max_queue_depth, depth)

    def record_batch(self, wait_s: list[float], generation_s: float) -> None:
        """A batch finished: one batch, len(wait_s) requests, each with its own wait."""
        self.total_batches += 1
        self.total_requests += len(wait_s)
        self.sum_wait_ms += sum(wait_s) * 1000.0
        self.sum_generation_ms += generation_s * 1000.0

    def record_eager(self, images: int) -> None:
        """A batch of ``images`` ran eager: its size was not warm."""
        self.eager_batches += 1
        self.eager_images += images

    def record_failed(self, count: int) -> None:
        self.total_failed += count

    def record_stopped(self, ran_s: float) -> None:
        """A preemptible batch was stopped after ``ran_s`` (its requests run again later)."""
        self.stopped_batches += 1
        self.sum_stopped_ms += ran_s * 1000.0

    def status(self, state: str, queue_depth: int, running: int) -> WorkerStatus:
        """These counters with the worker's state now, as sent in heartbeats (max_batch_size is left
        at its default: the worker sets it)."""
        return WorkerStatus(state=state, queue_depth=queue_depth, running=running, **asdict(self))
