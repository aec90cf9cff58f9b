"""The window batching policy (``BATCH_POLICY=window``), as a pure state object: no sockets, no clock, no asyncio, no torch.

The worker's event loop calls :meth:`Batcher.add` when a request arrives, :meth:`Batcher.next_batch`
whenever the GPU is free, and sleeps until :meth:`Batcher.next_decision_at` (or the next arrival).
Every method takes ``now`` (seconds on any monotonic clock), so tests drive it with a fake clock and
a simulator can replay the exact same decisions.

The rule (dynamic-batching.md, "Request Flow" and "Adaptive Wait Time Calculation"):

* Only requests that can share one inference are batched together: same width, height, steps and
  guidance scale (:class:`BatchKey`; one worker serves one model). Each group waits on its own.
* A group runs when it holds ``max_batch_size`` requests, or when it holds at least
  ``min_batch_size`` and its *oldest* request has waited the wait time (the window counts from the
  first arrival, not the last).
* Wait time: ``max_wait_time``, shortened when the queue is deep (adaptive batching)::

      if queue_depth >= adaptive_threshold:
          ratio = min(1.0, queue_depth / (adaptive_threshold * 2))
          wait = max_wait_time - ratio * (max_wait_time - min_wait_time)

  where ``queue_depth`` counts every request waiting in this worker.
* The seed polls every 100 ms; here the loop wakes at the exact instant a decision can change, which
  makes the same decisions without the up-to-100 ms lag.
* Two additions the seed leaves open, so that nothing starves: a group smaller than
  ``min_batch_size`` still runs once its oldest request has waited the full ``max_wait_time``; and
  when several groups are ready, the one whose oldest request arrived first runs first
  (:meth:`Batcher.choose_group`, every policy's rule). Since every group is ready by
  ``max_wait_time`` after its oldest arrival, from then on only batches led by older requests can
  go before a request: its wait is bounded (docs/batching.md, "Choosing among size groups").
* ``enable_batching=False``: one request per inference, first come first served, no waiting.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Iterator, Protocol, TypeVar, runtime_checkable

from imagegen.batch_key import BatchKey  # noqa: F401 - defined there, used and re-exported here

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicyConfig:
    enable_batching: bool = True
    max_batch_size: int = 8
    max_wait_time_s: float = 5.0
    min_batch_size: int = 1
    min_wait_time_s: float = 0.5
    adaptive: bool = True
    adaptive_threshold: int = 10
    # Optional cap on width*height summed over a batch, so large images form smaller batches
    # (the GPU memory a batch needs grows with its pixels). None: only max_batch_size counts.
    max_batch_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.min_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size must not exceed max_batch_size")
        if not 0 <= self.min_wait_time_s <= self.max_wait_time_s:
            raise ValueError("need 0 <= min_wait_time_s <= max_wait_time_s")
        if self.adaptive_threshold < 1:
            raise ValueError("adaptive_threshold must be at least 1")

    def with_max_batch_size(self, size: int) -> "BatchPolicyConfig":
        """The same policy with max_batch_size = size; min_batch_size comes down with it if needed."""
        return replace(self, max_batch_size=size, min_batch_size=min(self.min_batch_size, size))

    def after_out_of_memory(self, succeeded: int, pixels: int | None = None) -> "BatchPolicyConfig":
        """The limits after a batch ran out of GPU memory and ``succeeded`` of its images (each of
        ``pixels``) fitted in one batch. Never raised, never below one image.

        Without a pixel budget the count limit comes down to ``succeeded``. With one (the automatic
        MAX_BATCH_SIZE: a budget of max_batch_size images at the model's native size) the budget comes
        down to ``succeeded * pixels`` and the count limit with it, in native-size images but never
        below ``succeeded``: a batch of large images that ran out of memory leaves smaller images
        their larger batches (a 1024x1024 SD-1.5 batch of 4 that fits allows 16 at 512x512)."""
        succeeded = max(1, succeeded)
        if self.max_batch_pixels is None or pixels is None:
            return self.with_max_batch_size(max(1, min(self.max_batch_size, succeeded)))
        counted_pixels = max(1, self.max_batch_pixels // self.max_batch_size)  # the image the count is for
        budget = min(self.max_batch_pixels, succeeded * pixels)
        count = max(1, min(self.max_batch_size, max(succeeded, budget // counted_pixels)))
        return replace(self.with_max_batch_size(count), max_batch_pixels=budget)


def adaptive_wait_time_s(queue_depth: int, config: BatchPolicyConfig) -> float:
    """The seed's adaptive wait formula: the window shrinks linearly as the queue deepens."""
    if not config.adaptive or queue_depth < config.adaptive_threshold:
        return config.max_wait_time_s
    ratio = min(1.0, queue_depth / (config.adaptive_threshold * 2))
    return config.max_wait_time_s - ratio * (config.max_wait_time_s - config.min_wait_time_s)


@dataclass(frozen=True)
class Pending(Generic[T]):
    request_id: str
    key: BatchKey
    arrived_at: float
    item: T  # whatever the shell needs to run and answer the request


@dataclass(frozen=True)
class Batch(Generic[T]):
    key: BatchKey
    requests: tuple[Pending[T], ...]
    formed_at: float
    # Until this instant a request of the same key may stop this batch at its next step boundary and
    # join it (gpu_worker/decisions/preemption.py); None: the batch runs to the end. Only the default policy
    # sets it (AdaptiveBatcher: a lone request started instead of held).
    preemptible_until: float | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def wait_s(self, request: Pending[T]) -> float:
        return self.formed_at - request.arrived_at


@runtime_checkable
class BatchPolicy(Protocol[T]):
    """Everything the worker asks of a batching policy (gpu_worker/decisions/worker_state.py ``WorkerState``):
    :class:`Batcher` and every policy of gpu_worker/decisions/policies.py implement all of it, so the worker
    calls each method directly. Every method that needs the time takes ``now``."""

    config: BatchPolicyConfig  # the limits of the moment (the worker reports max_batch_size)

    @property
    def queue_depth(self) -> int: ...

    def add(self, request_id: str, key: BatchKey, item: T, now: float) -> None:
        """Queue a request; ValueError if its id is already queued."""

    def cancel(self, request_id: str) -> bool:
        """Drop a queued request; False if it is not queued."""

    def clear(self) -> int:
        """Drop every queued request; returns how many."""

    def requeue(self, batch: Batch[T]) -> None:
        """Queue a stopped batch's requests again, with their arrival times."""

    def next_batch(self, now: float) -> Batch[T] | None:
        """The batch to run now (removed from the queue), or None to keep waiting."""

    def next_decision_at(self) -> float | None:
        """When next_batch's answer can next change without an arrival; None if nothing is queued."""

    def should_preempt(self, running: Batch[T], key: BatchKey, now: float) -> bool:
        """Whether an arrival of ``key`` should stop the running batch so that it can join it."""

    def lower_max_batch_size(self, size: int, pixels: int | None = None) -> int:
        """After an out-of-memory error: ``size`` images of ``pixels`` fitted; returns the new max_batch_size."""

    def observe_batch(self, key: BatchKey, size: int, duration_s: float, now: float) -> None:
        """A batch of ``size`` requests of ``key`` took ``duration_s`` (ended at ``now``)."""


@dataclass
class Batcher(Generic[T]):
    """Pending requests grouped by BatchKey, and the decision of what runs next (a :class:`BatchPolicy`)."""

    config: BatchPolicyConfig
    # Insertion-ordered groups; each group is FIFO.
    _groups: "OrderedDict[BatchKey, deque[Pending[T]]]" = field(default_factory=OrderedDict)
    _ids: set[str] = field(default_factory=set)

    @property
    def queue_depth(self) -> int:
        return len(self._ids)

    def __contains__(self, request_id: object) -> bool:
        """Whether ``request_id`` is queued."""
        return request_id in self._ids

    def add(self, request_id: str, key: BatchKey, item: T, now: float) -> None:
        if request_id in self._ids:
            raise ValueError(f"request {request_id} is already queued")
        self._groups.setdefault(key, deque()).append(Pending(request_id, key, now, item))
        self._ids.add(request_id)

    def cancel(self, request_id: str) -> bool:
        """Drop a queued request (its client went away); False if it is not queued."""
        if request_id not in self._ids:
            return False
        for key, group in self._groups.items():
            for pending in group:
                if pending.request_id == request_id:
                    group.remove(pending)
                    self._ids.discard(request_id)
                    if not group:
                        del self._groups[key]
                    return True
        raise AssertionError("id index and groups disagree")  # unreachable unless the state is corrupt

    def requeue(self, batch: Batch[T]) -> None:
        """Put a stopped batch's requests back at the front of their group, with their arrival times
        (they run again in the next batch, before anything that arrived after them)."""
        if not batch.requests:
            return
        queued = [p.request_id for p in batch.requests if p.request_id in self._ids]
        if queued:
            raise ValueError(f"request {queued[0]} is already queued")
        group = self._groups.setdefault(batch.key, deque())
        self._groups.move_to_end(batch.key, last=False)  # its requests are the oldest queued
        group.extendleft(reversed(batch.requests))
        self._ids.update(p.request_id for p in batch.requests)

    def should_preempt(self, running: Batch[T], key: BatchKey, now: float) -> bool:
        """Whether a request of ``key`` arriving at ``now`` should stop the ``running`` batch so that
        the two run together: the batch is still preemptible and the request could join it."""
        return (running.preemptible_until is not None and now <= running.preemptible_until
                and key == running.key and len(running) < self.max_batch_size_for(key))

    def clear(self) -> int:
        """Drop every queued request (the broker has requeued them elsewhere); returns how many."""
        dropped = len(self._ids)
        self._groups.clear()
        self._ids.clear()
        return dropped

    def lower_max_batch_size(self, size: int, pixels: int | None = None) -> int:
        """After a GPU out-of-memory error: a batch of ``size`` images (of ``pixels`` each, when known)
        is the most that fitted. Lowers the limits (BatchPolicyConfig.after_out_of_memory: never
        raised, never below 1, min_batch_size with them) and returns the new max_batch_size."""
        self.config = self.config.after_out_of_memory(size, pixels)
        return self.config.max_batch_size

    def observe_batch(self, key: BatchKey, size: int, duration_s: float, now: float) -> None:
        """The window rule does not learn from batch times (AdaptiveBatcher does)."""

    def max_batch_size_for(self, key: BatchKey) -> int:
        if not self.config.enable_batching:
            return 1
        size = self.config.max_batch_size
        if self.config.max_batch_pixels is not None:
            size = min(size, max(1, self.config.max_batch_pixels // key.pixels))
        return size

    def wait_time_s(self) -> float:
        """How long the oldest request of a group may wait for batch-mates, at the current depth."""
        if not self.config.enable_batching:
            return 0.0
        return adaptive_wait_time_s(self.queue_depth, self.config)

    def ready_at(self, group: deque[Pending[T]]) -> float:
        """The instant this group may run if the GPU is free (it runs at once if already full).

        The one rule a subclass policy replaces (gpu_worker/decisions/policies.py)."""
        oldest = group[0].arrived_at
        if len(group) >= self.max_batch_size_for(group[0].key):
            return float("-inf")
        if len(group) >= self.config.min_batch_size:
            return oldest + self.wait_time_s()
        return oldest + self.config.max_wait_time_s  # starvation guard for groups below min size

    def _ready_groups(self, now: float) -> Iterator[deque[Pending[T]]]:
        return (g for g in self._groups.values() if self.ready_at(g) <= now)

    def choose_group(self, ready: list[deque[Pending[T]]], now: float) -> deque[Pending[T]]:
        """Of the groups that may run now (at least one), the one that runs: the one whose oldest
        request arrived first, full or not, so a stream that keeps one size's batches full cannot
        hold back a request of another size once its group may run."""
        return min(ready, key=lambda g: g[0].arrived_at)

    def next_batch(self, now: float) -> Batch[T] | None:
        """The batch to run now, removed from the queue; None if every group should keep waiting.

        Call it only when the GPU is free: a batch formed early would only wait anyway, and
        requests that arrive meanwhile could have joined it."""
        ready = list(self._ready_groups(now))
        if not ready:
            return None
        group = self.choose_group(ready, now)
        key = group[0].key
        taken = tuple(group.popleft() for _ in range(min(len(group), self.max_batch_size_for(key))))
        if not group:
            del self._groups[key]
        self._ids.difference_update(p.request_id for p in taken)
        return Batch(key, taken, now)

    def next_decision_at(self) -> float | None:
        """When next_batch's answer can next change without a new arrival; None if nothing is queued."""
        if not self._groups:
            return None
        return min(self.ready_at(g) for g in self._groups.values())

    def __iter__(self) -> Iterator[Pending[T]]:
        for group in self._groups.values():
            yield from group
