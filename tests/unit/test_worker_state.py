"""Unit tests of gpu_worker.decisions.worker_state: the GPU worker's decisions, on a fake clock.

No asyncio, no torch, no sockets: every method takes ``now`` (plain floats here) and returns what
the shell (gpu_worker/shell/worker.py) would do. The shell with a fake backend: tests/integration/test_preemption.py,
tests/integration/test_abandoned_work.py.
"""

from __future__ import annotations

import logging

import pytest

from gpu_worker.decisions.batcher import Batcher, BatchKey, BatchPolicy, BatchPolicyConfig
from gpu_worker.decisions.policies import AdaptiveBatcher, HoldTuning
from gpu_worker.decisions.preemption import AbandonDecision
from gpu_worker.decisions.worker_state import (
    RUNNING_DEADLINE_GRACE_S,
    AbandonRow,
    LogNote,
    Queued,
    RequestPreemption,
    SendFailure,
    WorkerState,
    failure_code,
)
from imagegen.protocol import FailureCode, Generate, GenerationParams

T0 = 1000.0
DEADLINE_S = 30.0


def request(index: int, deadline_s: float = DEADLINE_S, width: int = 64) -> Generate:
    return Generate(f"request-{index}", GenerationParams(f"prompt {index}", width, width, 4, 7.5, index), deadline_s)


def window_state(**limits) -> WorkerState:
    """The window rule with no wait: a queued group runs as soon as the GPU is free."""
    config = BatchPolicyConfig(**{"max_batch_size": 8, "max_wait_time_s": 0.0, "min_wait_time_s": 0.0, **limits})
    return WorkerState(config, Batcher(config))


def running_state(*requests: Generate, at: float = T0) -> WorkerState:
    """A state whose batch of ``requests`` (queued at ``at``) has just started."""
    state = window_state()
    for message in requests:
        state.accept(message, at)
    assert state.start_batch(at) is not None
    return state


def failures(actions: list) -> list[tuple[str, FailureCode]]:
    return [(a.request_id, a.code) for a in actions if isinstance(a, SendFailure)]


# ------------------------------------------------------------------ accept

def test_an_accepted_request_is_queued_with_its_deadline():
    state = window_state()
    message = request(0)
    assert state.accept(message, T0) == [Queued(message)]
    assert state.queue_depth == 1 and state.queued_deadlines == {"request-0": T0 + DEADLINE_S}


def test_a_resent_request_already_queued_is_ignored_and_keeps_its_first_deadline():
    state = window_state()
    state.accept(request(0), T0)
    assert state.accept(request(0, deadline_s=5.0), T0 + 1.0) == []
    assert state.queue_depth == 1 and state.queued_deadlines["request-0"] == T0 + DEADLINE_S


def test_an_arrival_that_can_join_a_preemptible_batch_stops_it_once():
    config = BatchPolicyConfig(max_batch_size=8)
    state = WorkerState(config, AdaptiveBatcher(config=config, tuning=HoldTuning(coalesce_gap_s=0.3)))
    state.accept(request(0), T0)
    batch = state.start_batch(T0)
    assert batch is not None and batch.preemptible_until == pytest.approx(T0 + 0.3)
    assert state.accept(request(1), T0 + 0.05) == [Queued(request(1)), RequestPreemption(1, pytest.approx(0.05))]
    assert state.accept(request(2), T0 + 0.06) == [Queued(request(2))]  # already asked to stop
    assert state.accept(request(3, width=128), T0 + 0.07) == [Queued(request(3, width=128))]  # cannot join


# ------------------------------------------------------------------ cancel

def test_a_cancelled_queued_request_leaves_the_queue_and_its_deadline():
    state = window_state()
    state.accept(request(0), T0)
    (note,) = state.cancel("request-0", T0 + 1.0)
    assert isinstance(note, LogNote) and "cancelled before its batch started" in note.text
    assert state.queue_depth == 0 and state.queued_deadlines == {}
    assert state.start_batch(T0 + 2.0) is None


def test_a_cancelled_running_row_is_abandoned_once_and_its_deadline_forgotten():
    state = running_state(request(0), request(1), request(2))
    assert state.cancel("request-1", T0 + 1.0) == [AbandonRow("request-1", 1, "cancelled")]
    assert state.cancel("request-1", T0 + 1.5) == []  # already abandoned
    assert state.queue_depth == 0  # nothing went back to the queue
    # Its deadline no longer wakes the shell, nor fails it later.
    assert state.expire_running(T0 + DEADLINE_S + RUNNING_DEADLINE_GRACE_S + 1.0) == [
        AbandonRow("request-0", 0, "passed its deadline"),
        SendFailure("request-0", FailureCode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while it was being generated"),
        AbandonRow("request-2", 2, "passed its deadline"),
        SendFailure("request-2", FailureCode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while it was being generated"),
    ]
    assert state.end_batch(T0 + 40.0) == {"request-0", "request-1", "request-2"}


def test_a_cancel_for_a_request_the_worker_does_not_hold_does_nothing():
    state = running_state(request(0))
    assert state.cancel("request-9", T0) == []


# ------------------------------------------------------------------ deadlines

def test_a_queued_request_fails_once_its_deadline_has_passed_and_not_before():
    state = window_state(max_wait_time_s=60.0, min_batch_size=2, min_wait_time_s=0.0)
    state.accept(request(0, deadline_s=5.0), T0)
    assert state.expire_queued(T0 + 5.0) == []  # at the instant: not yet past
    actions = state.expire_queued(T0 + 5.001)
    assert failures(actions) == [("request-0", FailureCode.DEADLINE_EXCEEDED)]
    assert any(isinstance(a, LogNote) and "waited for a batch" in a.text for a in actions)
    assert state.queue_depth == 0 and state.queued_deadlines == {}
    assert state.expire_queued(T0 + 10.0) == []  # answered once


def test_a_running_row_is_dropped_only_after_its_deadline_and_the_grace():
    state = running_state(request(0, deadline_s=5.0), request(1))
    expires_at = T0 + 5.0 + RUNNING_DEADLINE_GRACE_S
    assert state.next_wake_at(T0) == expires_at
    assert state.expire_running(T0 + 5.5) == []  # past the deadline, within the grace
    assert state.expire_running(expires_at) == []  # strictly after
    actions = state.expire_running(expires_at + 0.001)
    assert actions == [AbandonRow("request-0", 0, "passed its deadline"),
                       SendFailure("request-0", FailureCode.DEADLINE_EXCEEDED,
                                   "the request's deadline passed while it was being generated")]
    assert state.expire_running(expires_at + 1.0) == []
    assert state.next_wake_at(expires_at) == T0 + DEADLINE_S + RUNNING_DEADLINE_GRACE_S  # the other row's


def test_the_shell_wakes_for_the_batcher_when_nothing_runs():
    state = window_state(max_wait_time_s=2.0, min_batch_size=2, min_wait_time_s=0.0)
    assert state.next_wake_at(T0) is None
    state.accept(request(0), T0)
    assert state.next_wake_at(T0) == T0 + 2.0  # the starvation guard of a group below min size


# ------------------------------------------------------------------ a stopped batch

def test_a_stopped_batch_requeues_its_wanted_rows_with_their_deadlines_and_drops_the_others():
    state = window_state()
    state.accept(request(0, deadline_s=10.0), T0)
    state.accept(request(1, deadline_s=20.0), T0 + 0.5)
    state.accept(request(2, deadline_s=30.0), T0 + 1.0)
    state.start_batch(T0 + 1.0)
    state.cancel("request-1", T0 + 2.0)
    requeued = state.batch_stopped(AbandonDecision.STOP_AND_REQUEUE, T0 + 2.5)
    assert requeued.request_ids == ("request-0", "request-2") and requeued.dropped == 1
    assert requeued.why == "most of it is no longer wanted: its wanted requests restart without the others"
    assert state.end_batch(T0 + 2.5) == {"request-1"}
    assert state.queued_deadlines == {"request-0": T0 + 10.0, "request-2": T0 + 31.0}
    again = state.start_batch(T0 + 3.0)
    assert again is not None
    assert [(p.request_id, p.arrived_at) for p in again.requests] == [("request-0", T0), ("request-2", T0 + 1.0)]
    assert state.running is not None and state.running.deadlines == {"request-0": T0 + 10.0, "request-2": T0 + 31.0}


@pytest.mark.parametrize("decision, why", [
    (None, "so that newer requests can join it"),
    (AbandonDecision.STOP, "no request in it is wanted any more"),
])
def test_why_a_batch_stopped(decision, why):
    state = running_state(request(0))
    if decision is AbandonDecision.STOP:
        state.cancel("request-0", T0)
    requeued = state.batch_stopped(decision, T0 + 0.1)
    assert requeued.why == why
    assert requeued.request_ids == (() if decision is AbandonDecision.STOP else ("request-0",))


# ------------------------------------------------------------------ a failed batch

@pytest.mark.parametrize("error, code", [
    (ValueError("height must be a multiple of 8"), FailureCode.INVALID_REQUEST),
    (RuntimeError("CUDA error: an illegal memory access"), FailureCode.GENERATION_FAILED),
    (KeyError("unet"), FailureCode.GENERATION_FAILED),
])
def test_a_failed_batch_fails_every_row_with_its_errors_code(error, code):
    assert failure_code(error) is code
    state = running_state(request(0), request(1))
    actions = state.batch_failed(error, T0 + 1.0)
    assert failures(actions) == [("request-0", code), ("request-1", code)]
    text = f"{type(error).__name__}: {error}"
    assert all(a.text == text for a in actions if isinstance(a, SendFailure))
    (note,) = [a for a in actions if isinstance(a, LogNote)]
    assert note.level == logging.ERROR and note.error is error and code.value in note.text


def test_a_failure_text_is_cut_to_what_a_message_carries():
    state = running_state(request(0))
    (failure,) = [a for a in state.batch_failed(RuntimeError("x" * 10_000), T0) if isinstance(a, SendFailure)]
    assert len(failure.text) == 4000


# ------------------------------------------------------------------ out of memory, batch times

def test_out_of_memory_lowers_the_batchers_limit_and_what_the_registration_reports():
    state = window_state(max_batch_size=8)
    note = state.out_of_memory(8, 3, BatchKey(64, 64, 4, 7.5), T0)
    assert state.max_batch_size == 3 and state.batcher.config.max_batch_size == 3
    assert state.policy.max_batch_size == 3
    assert note.level == logging.WARNING and note.text == (
        "out of GPU memory on a batch of 8 at 64x64: max batch size lowered to 3")
    state.out_of_memory(3, 5, None, T0)  # a larger report never raises it
    assert state.max_batch_size == 3


class RecordingBatcher(Batcher):
    """The window rule, recording the batch times it is taught."""

    def __init__(self, config: BatchPolicyConfig) -> None:
        super().__init__(config)
        self.observed: list[tuple[BatchKey, int, float, float]] = []

    def observe_batch(self, key: BatchKey, size: int, duration_s: float, now: float) -> None:
        self.observed.append((key, size, duration_s, now))


def test_a_batch_time_is_taught_to_the_policy_unless_the_batch_was_split_after_running_out_of_memory():
    config = BatchPolicyConfig()
    batcher = RecordingBatcher(config)
    state = WorkerState(config, batcher)
    key = BatchKey(64, 64, 4, 7.5)
    state.observe_batch(key, 4, 0.8, split_after_oom=True, now=T0)
    assert batcher.observed == []
    state.observe_batch(key, 4, 0.8, split_after_oom=False, now=T0 + 1.0)
    assert batcher.observed == [(key, 4, 0.8, T0 + 1.0)]


def test_the_running_batch_is_reported_until_it_ends():
    state = running_state(request(0), request(1))
    assert state.running_size == 2 and state.running_batch is not None
    assert state.end_batch(T0 + 1.0) == frozenset()
    assert state.running_size == 0 and state.running_batch is None and state.expire_running(T0 + 99.0) == []


def test_the_default_batcher_is_the_window_rule_and_every_batcher_is_a_batch_policy():
    state = WorkerState(BatchPolicyConfig())
    assert type(state.batcher) is Batcher and isinstance(state.batcher, BatchPolicy)
