"""What the GPU worker knows and decides, as a pure object: no sockets, no asyncio, no torch, no threads.

The worker's shell (gpu_worker/shell/worker.py ``Worker``) tells :class:`WorkerState` what happened, with
``now`` from its one injected clock, and carries out what it answers. That keeps every rule of the
worker testable with a fake clock (tests/unit/test_worker_state.py), as broker/state.py does for the
broker.

It owns the queue (the :class:`gpu_worker.decisions.batcher.BatchPolicy` that forms batches, and the queued
requests' deadlines) and the running batch's bookkeeping (its rows, their deadlines, the rows nobody
waits for any more). Its events:

* :meth:`WorkerState.accept` a GENERATE (a resent id already queued is ignored; an arrival that can
  join a just-started preemptible batch stops it), :meth:`WorkerState.cancel` a CANCEL (a queued
  request is dropped, a running row abandoned), :meth:`WorkerState.forget_queue` (the broker
  no longer counts on what is queued);
* :meth:`WorkerState.expire_queued` and :meth:`WorkerState.expire_running` (a running row only
  ``RUNNING_DEADLINE_GRACE_S`` past its deadline: the broker's CANCEL normally comes first);
* :meth:`WorkerState.start_batch` when the GPU is free, then exactly one of
  :meth:`WorkerState.batch_stopped` (its wanted rows are queued again with their deadlines) or
  :meth:`WorkerState.batch_failed` (``invalid_request`` or ``generation_failed``) or nothing (it
  finished), and always :meth:`WorkerState.end_batch`; :meth:`WorkerState.observe_batch` for a
  finished batch's time (not after an out-of-memory split);
* :meth:`WorkerState.out_of_memory` (the limits come down);
* :meth:`WorkerState.next_wake_at`: when the shell should look again without a new message.

Its actions (:data:`Action`): :class:`Queued`, :class:`RequestPreemption`, :class:`AbandonRow`,
:class:`SendFailure`, :class:`UnlistedSize` (a size SIZES does not list, run eager, refused or snapped)
and :class:`LogNote` (a line the shell writes to its log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Union

from gpu_worker.decisions.batcher import Batch, Batcher, BatchKey, BatchPolicy, BatchPolicyConfig
from gpu_worker.decisions.preemption import AbandonDecision
from gpu_worker.decisions.sizes import SizeRule
from imagegen.protocol import FailureCode, Generate, ImageSize

# A running row past its deadline is dropped this long after it: the broker answers it first (its
# answer says where the request was) and sends CANCEL, which stops it at once; this is the fallback
# when no CANCEL comes (a broker of an older build, a lost message).
RUNNING_DEADLINE_GRACE_S = 1.0
MAX_FAILURE_TEXT_CHARS = 4000  # a pipeline error's text is cut to this in its FAILURE


@dataclass(frozen=True)
class Queued:
    """The request is queued: the shell counts the queue depth and wakes its batch loop."""

    request: Generate


@dataclass(frozen=True)
class RequestPreemption:
    """Stop the running batch at its next step: an arrival can join it (gpu_worker/decisions/preemption.py)."""

    batch_size: int
    since_formed_s: float  # how long after the batch was formed the arrival came


@dataclass(frozen=True)
class AbandonRow:
    """Nobody waits for this row of the running batch any more: tell the batch (Preemption.abandon)."""

    request_id: str
    row: int
    why: str  # "cancelled", "passed its deadline"


@dataclass(frozen=True)
class SendFailure:
    request_id: str
    code: FailureCode
    text: str


@dataclass(frozen=True)
class LogNote:
    """A line for the worker's log; ``fields`` go to its structured (JSON) fields."""

    level: int
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    error: BaseException | None = None  # logged with its traceback


@dataclass(frozen=True)
class UnlistedSize:
    """A request of a size SIZES does not list: ``outcome`` is "eager", "refused" or "snapped" (to
    ``size``). The shell counts it (and notes demand for a size it will warm)."""

    request_id: str
    outcome: str
    size: ImageSize | None = None


Action = Union[Queued, RequestPreemption, AbandonRow, SendFailure, LogNote, UnlistedSize]


@dataclass(frozen=True)
class Requeued:
    """What a stopped batch left: the ids queued again, how many rows were dropped, and why it stopped."""

    request_ids: tuple[str, ...]
    dropped: int
    why: str


@dataclass
class RunningBatch:
    batch: Batch[Generate]
    rows: dict[str, int]  # request id -> its row in the batch
    deadlines: dict[str, float]  # the wanted rows' deadlines (an abandoned row's is removed)
    unwanted: set[str] = field(default_factory=set)  # ids nobody waits for any more
    preemption_requested: bool = False


def failure_code(error: Exception) -> FailureCode:
    """A failed batch's code: the pipeline refused its inputs (ValueError), or generation failed."""
    return FailureCode.INVALID_REQUEST if isinstance(error, ValueError) else FailureCode.GENERATION_FAILED


def stop_reason(decision: AbandonDecision | None) -> str:
    """Why a batch stopped, for the log: its unwanted rows' decision, else newcomers joining it."""
    if decision is AbandonDecision.STOP:
        return "no request in it is wanted any more"
    if decision is AbandonDecision.STOP_AND_REQUEUE:
        return "most of it is no longer wanted: its wanted requests restart without the others"
    return "so that newer requests can join it"


class WorkerState:
    """The worker's queue, running batch and decisions. ``batcher``: the batching policy, built with
    ``policy`` (the window rule with ``policy`` when None)."""

    def __init__(self, policy: BatchPolicyConfig, batcher: BatchPolicy[Generate] | None = None,
                 sizes: SizeRule | None = None) -> None:
        self.batcher: BatchPolicy[Generate] = batcher if batcher is not None else Batcher(policy)
        self.sizes = sizes or SizeRule(())  # SIZES and UNLISTED_SIZE; none listed: every size as asked
        self.queued_deadlines: dict[str, float] = {}  # request id -> instant (worker clock) its client gives up
        self.running: RunningBatch | None = None

    # ------------------------------------------------------------------ what the shell reports

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    @property
    def running_batch(self) -> Batch[Generate] | None:
        return self.running.batch if self.running is not None else None

    @property
    def running_size(self) -> int:
        return len(self.running.batch) if self.running is not None else 0

    @property
    def policy(self) -> BatchPolicyConfig:
        """The limits the registration reports: the batcher's own, lowered after an out-of-memory error."""
        return self.batcher.config

    @property
    def max_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    # ------------------------------------------------------------------ messages from the broker

    def accept(self, request: Generate, now: float) -> list[Action]:
        """A GENERATE: queue it with its deadline; a resent id that is already queued is ignored
        (one answer will come). A size SIZES does not list is run as asked, refused or snapped
        (UNLISTED_SIZE)."""
        params = request.params
        decision = self.sizes.decide(params.width, params.height)
        noted: list[Action] = []
        if decision.refusal is not None:
            return [UnlistedSize(request.request_id, "refused"),
                    SendFailure(request.request_id, FailureCode.SIZE_NOT_SERVED, decision.refusal)]
        if decision.size is not None:
            request = replace(request, params=replace(params, width=decision.size.width, height=decision.size.height))
            noted.append(UnlistedSize(request.request_id, "snapped", decision.size))
        elif decision.unlisted:
            noted.append(UnlistedSize(request.request_id, "eager"))
        key = BatchKey.of(request.params)
        try:
            self.batcher.add(request.request_id, key, request, now)
        except ValueError:
            return []
        self.queued_deadlines[request.request_id] = now + request.deadline_s
        return [*noted, Queued(request), *self._preemption_for(key, now)]

    def _preemption_for(self, key: BatchKey, now: float) -> list[Action]:
        """Stop the running batch (once) if the batcher says an arrival of ``key`` should join it."""
        running = self.running
        if (running is None or running.preemption_requested
                or not self.batcher.should_preempt(running.batch, key, now)):
            return []
        running.preemption_requested = True
        return [RequestPreemption(len(running.batch), now - running.batch.formed_at)]

    def cancel(self, request_id: str, now: float) -> list[Action]:
        """A CANCEL: a queued request is dropped; a running row is abandoned; anything else is ignored."""
        if self.batcher.cancel(request_id):
            self.queued_deadlines.pop(request_id, None)
            return [LogNote(logging.INFO, f"request {request_id} cancelled before its batch started",
                            {"request_id": request_id})]
        if self.running is not None and request_id in self.running.rows:
            return self._abandon(request_id, "cancelled")
        return []

    def forget_queue(self, why: str, now: float) -> list[Action]:
        """The broker no longer counts on what is queued (it requeued it, or it restarted)."""
        dropped = self.batcher.clear()
        self.queued_deadlines.clear()
        return [LogNote(logging.WARNING, f"{why}; dropped {dropped} queued requests")]

    # ------------------------------------------------------------------ deadlines

    def expire_queued(self, now: float) -> list[Action]:
        """Queued requests whose client has given up fail with deadline_exceeded: no GPU for them."""
        actions: list[Action] = []
        for request_id in [rid for rid, deadline in self.queued_deadlines.items() if deadline < now]:
            del self.queued_deadlines[request_id]
            if self.batcher.cancel(request_id):
                actions += [
                    LogNote(logging.INFO, f"request {request_id} failed: its deadline passed while it waited "
                            "for a batch", {"request_id": request_id}),
                    SendFailure(request_id, FailureCode.DEADLINE_EXCEEDED,
                                "the request's deadline passed while it waited for a batch"),
                ]
        return actions

    def expire_running(self, now: float) -> list[Action]:
        """Running rows more than RUNNING_DEADLINE_GRACE_S past their deadline: abandoned, and failed
        with deadline_exceeded (nobody waits for them; the broker has answered their client)."""
        if self.running is None:
            return []
        actions: list[Action] = []
        for request_id in [rid for rid, deadline in self.running.deadlines.items()
                           if deadline + RUNNING_DEADLINE_GRACE_S < now]:
            actions += self._abandon(request_id, "passed its deadline")
            actions.append(SendFailure(request_id, FailureCode.DEADLINE_EXCEEDED,
                                       "the request's deadline passed while it was being generated"))
        return actions

    def _abandon(self, request_id: str, why: str) -> list[Action]:
        """Nobody waits for this running row any more: the batch decides at its next step whether to
        stop (gpu_worker.decisions.preemption.abandon_decision); its image is never sent, nor is it requeued."""
        running = self.running
        if running is None or request_id in running.unwanted:
            return []
        running.unwanted.add(request_id)
        running.deadlines.pop(request_id, None)
        return [AbandonRow(request_id, running.rows[request_id], why)]

    def next_wake_at(self, now: float) -> float | None:
        """When the shell should look again without a new message (None: only on a message). While a
        batch runs: when its earliest row expires (expiry is strict: look just after this instant);
        otherwise the batcher's next decision instant."""
        if self.running is None:
            return self.batcher.next_decision_at()
        wake_at = min(self.running.deadlines.values(), default=float("inf")) + RUNNING_DEADLINE_GRACE_S
        return None if wake_at == float("inf") else wake_at

    # ------------------------------------------------------------------ the running batch

    def start_batch(self, now: float) -> Batch[Generate] | None:
        """The batch to run now, if any (call only when the GPU is free); its rows' deadlines move with it."""
        batch = self.batcher.next_batch(now)
        if batch is None:
            return None
        request_ids = [p.request_id for p in batch.requests]
        self.running = RunningBatch(
            batch,
            rows={request_id: row for row, request_id in enumerate(request_ids)},
            deadlines={request_id: self.queued_deadlines.pop(request_id, float("inf")) for request_id in request_ids},
        )
        return batch

    def batch_stopped(self, decision: AbandonDecision | None, now: float) -> Requeued:
        """The running batch stopped at a step boundary (``decision``: why, for its unwanted rows; None:
        newcomers join it). Its wanted requests wait again, with their arrival times and deadlines,
        for the next batch; the rows nobody waits for are dropped (the broker has answered or
        forgotten them). Call end_batch after it."""
        running = self._running_or_raise()
        kept = tuple(p for p in running.batch.requests if p.request_id not in running.unwanted)
        self.batcher.requeue(replace(running.batch, requests=kept))
        for pending in kept:
            self.queued_deadlines[pending.request_id] = running.deadlines[pending.request_id]
        return Requeued(tuple(p.request_id for p in kept), len(running.batch) - len(kept), stop_reason(decision))

    def batch_failed(self, error: Exception, now: float) -> list[Action]:
        """The pipeline raised: every request of the running batch fails with the error's code. Call
        end_batch after it."""
        running = self._running_or_raise()
        code = failure_code(error)
        request_ids = [p.request_id for p in running.batch.requests]
        text = f"{type(error).__name__}: {error}"[:MAX_FAILURE_TEXT_CHARS]
        return [LogNote(logging.ERROR, f"batch of {len(request_ids)} failed ({code.value}); requests "
                        f"{' '.join(request_ids)}", {"request_ids": request_ids}, error=error),
                *(SendFailure(request_id, code, text) for request_id in request_ids)]

    def end_batch(self, now: float) -> frozenset[str]:
        """The GPU is free again; returns the ids of the batch nobody waits for (their images are dropped)."""
        unwanted = frozenset(self.running.unwanted) if self.running is not None else frozenset()
        self.running = None
        return unwanted

    def observe_batch(self, key: BatchKey, size: int, duration_s: float, split_after_oom: bool, now: float) -> None:
        """Teach a learning policy (BATCH_POLICY=default) what a finished batch cost; a batch that was
        split after running out of memory is skipped, since its time is not that of one call of its size."""
        if not split_after_oom:
            self.batcher.observe_batch(key, size, duration_s, now)

    def _running_or_raise(self) -> RunningBatch:
        if self.running is None:
            raise RuntimeError("no batch is running")
        return self.running

    # ------------------------------------------------------------------ GPU memory

    def out_of_memory(self, failed_size: int, succeeded_size: int, key: BatchKey | None, now: float) -> LogNote:
        """A batch of ``failed_size`` (of ``key``, when known) ran out of GPU memory and batches of
        ``succeeded_size`` fitted: never form larger ones again, for images of that size (see
        BatchPolicyConfig.after_out_of_memory); the registration reports the lowered limits."""
        pixels = key.pixels if key is not None else None
        new_size = self.batcher.lower_max_batch_size(succeeded_size, pixels)
        where = f" at {key.width}x{key.height}" if key is not None else ""
        budget = (f" (pixel budget {self.policy.max_batch_pixels}: {key.width}x{key.height} batches of at most "
                  f"{max(1, self.policy.max_batch_pixels // key.pixels)})"
                  if key is not None and self.policy.max_batch_pixels is not None else "")
        return LogNote(logging.WARNING, f"out of GPU memory on a batch of {failed_size}{where}: max batch size "
                       f"lowered to {new_size}{budget}")
