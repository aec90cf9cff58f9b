"""Unit tests of the broker's pure core: broker.state, broker.balancing and broker.stats.

No sockets and no sleeping: every call takes ``now`` from a fake clock (plain floats).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.balancing import Balancer, Candidate
from broker.registration import registration_refusal
from broker.state import (
    BrokerPolicy,
    BrokerState,
    Cancelled,
    Registered,
    RegistrationRefused,
    Removal,
    Requeued,
    SenderRefused,
    ToClient,
    ToWorker,
    WorkerRemoved,
)
from broker.stats import build_stats
from gpu_worker.decisions.batcher import BatchKey
from imagegen import protocol
from imagegen.protocol import (
    PROTOCOL_VERSION,
    WORKER_LINK,
    BatchingConfig,
    Disconnect,
    Failure,
    Generate,
    GenerationParams,
    Heartbeat,
    Progress,
    Register,
    Result,
    Welcome,
    WorkerStatus,
)

T0 = 100.0
CLIENT = b"gateway-1"
W1, W2, W3 = b"w1", b"w2", b"w3"


# ------------------------------------------------------------------ message helpers


def reg(name: str = "w1", capacity: int = 4, gpu_id: int = 0, host: str = "host-a", max_batch_size: int = 8,
        max_wait_time: float = 5.0, adaptive: bool = True, pid: int | None = None) -> Register:
    return Register(
        worker_name=name, host=host, gpu_id=gpu_id, pid=1000 + gpu_id if pid is None else pid, model_id="tiny/sd", device=f"cuda:{gpu_id}",
        capacity=capacity,
        batching=BatchingConfig(enable_batching=True, max_batch_size=max_batch_size, max_wait_time=max_wait_time,
                                min_batch_size=1, min_wait_time=0.5, adaptive_batching=adaptive,
                                adaptive_threshold=10),
    )


def gen(request_id: str, deadline_s: float = 600.0) -> Generate:
    return Generate(request_id, GenerationParams("a cat", 512, 512, 25, 7.5, 1, None), deadline_s)


def status(state: str = "ready", queue_depth: int = 0, running: int = 0, max_queue_depth: int = 0,
           total_requests: int = 0, total_batches: int = 0, total_failed: int = 0, sum_wait_ms: float = 0.0,
           sum_generation_ms: float = 0.0) -> WorkerStatus:
    return WorkerStatus(state, queue_depth, running, max_queue_depth, total_requests, total_batches, total_failed,
                        sum_wait_ms, sum_generation_ms)


def hb(**kwargs) -> Heartbeat:
    return Heartbeat(status(**kwargs))


def res(request_id: str, worker: str = "w1", queue_wait_ms: float = 0.0, batch_size: int = 1,
        generation_s: float = 1.0) -> Result:
    return Result(request_id, worker, "host-a", 0, f"{worker}:1", batch_size, queue_wait_ms, generation_s * 1000.0,
                  512, 512, 1)


def state(**policy) -> BrokerState:
    return BrokerState(BrokerPolicy(**policy), epoch="epoch-1")


def sent(actions) -> list:
    """The actions that send a message (ToWorker, ToClient), without the events that only say what happened."""
    return [a for a in actions if isinstance(a, (ToWorker, ToClient))]


def dispatched(actions) -> list[tuple[bytes, str]]:
    """(worker routing id, request id) of every Generate sent to a worker, in order."""
    return [(a.routing_id, a.message.request_id) for a in actions
            if isinstance(a, ToWorker) and isinstance(a.message, Generate)]


def failures(actions) -> list[tuple[str, str]]:
    return [(a.message.request_id, a.message.code) for a in actions
            if isinstance(a, ToClient) and isinstance(a.message, Failure)]


def submit_all(s: BrokerState, ids, now: float = T0) -> list:
    actions = []
    for rid in ids:
        actions += s.submit(CLIENT, gen(rid), now)
    return actions


# ------------------------------------------------------------------ submit and registration


def test_submit_with_no_workers_queues_the_request():
    s = state()
    assert s.submit(CLIENT, gen("r1"), T0) == []
    assert list(s.queue) == ["r1"]
    assert s.counters.requests_received == 1
    assert s.current_queue_depth() == 1 and s.max_queue_depth == 1


def test_resubmitting_a_held_request_is_ignored():
    s = state()
    s.submit(CLIENT, gen("r1"), T0)
    assert s.submit(CLIENT, gen("r1"), T0 + 1) == []
    assert list(s.queue) == ["r1"] and s.counters.requests_received == 1


def test_registration_answers_welcome_and_dispatches_queued_work():
    s = state(heartbeat_interval_s=2.0)
    submit_all(s, ["r1", "r2"])
    actions = sent(s.register(W1, reg(), T0 + 1))
    assert actions[0] == ToWorker(W1, Welcome("epoch-1", 2.0))
    assert dispatched(actions) == [(W1, "r1"), (W1, "r2")]
    assert not s.queue
    assert s.workers[W1].in_flight == {"r1", "r2"}
    assert s.counters.workers_registered == 1


def test_dispatch_sends_the_clients_generate_message_unchanged():
    s = state()
    s.register(W1, reg(), T0)
    message = gen("r1", deadline_s=30.0)
    (action,) = s.submit(CLIENT, message, T0)
    assert action == ToWorker(W1, message)


# ------------------------------------------------------------------ credit


def test_worker_gets_at_most_its_capacity_and_the_rest_stays_queued():
    s = state()
    s.register(W1, reg(capacity=2), T0)
    actions = submit_all(s, ["r1", "r2", "r3", "r4"])
    assert dispatched(actions) == [(W1, "r1"), (W1, "r2")]
    assert list(s.queue) == ["r3", "r4"]


def test_a_result_frees_a_slot_and_the_next_queued_request_goes_out():
    s = state()
    s.register(W1, reg(capacity=2), T0)
    submit_all(s, ["r1", "r2", "r3", "r4"])
    actions = s.result(W1, res("r1"), T0 + 5)
    assert dispatched(actions) == [(W1, "r3")]
    assert list(s.queue) == ["r4"]
    assert s.workers[W1].in_flight == {"r2", "r3"}


def test_a_failure_frees_a_slot_and_is_forwarded_to_the_client():
    s = state()
    s.register(W1, reg(capacity=1), T0)
    submit_all(s, ["r1", "r2"])
    failure = Failure("r1", "generation_failed", "boom")
    actions = s.failure(W1, failure, T0 + 1)
    assert actions[0] == ToClient(CLIENT, failure)
    assert dispatched(actions) == [(W1, "r2")]
    assert s.counters.requests_failed == 1


def test_queue_full_answers_overloaded_and_counts_it():
    s = state(max_queue_size=2)
    submit_all(s, ["r1", "r2"])
    actions = s.submit(CLIENT, gen("r3"), T0)
    assert len(actions) == 1 and isinstance(actions[0], ToClient) and actions[0].client_id == CLIENT
    assert failures(actions) == [("r3", "overloaded")]
    assert s.counters.rejected_overloaded == 1
    assert list(s.queue) == ["r1", "r2"] and "r3" not in s.requests


def test_queue_full_counts_only_waiting_requests_not_dispatched_ones():
    s = state(max_queue_size=1)
    s.register(W1, reg(capacity=2), T0)
    actions = submit_all(s, ["r1", "r2", "r3"])  # two go to the worker, one waits
    assert failures(actions) == []
    assert failures(s.submit(CLIENT, gen("r4"), T0)) == [("r4", "overloaded")]


# ------------------------------------------------------------------ balancing through the state


def test_round_robin_across_three_workers():
    s = state(strategy="round-robin")
    for rid, name in [(W1, "w1"), (W2, "w2"), (W3, "w3")]:
        s.register(rid, reg(name, capacity=10), T0)
    actions = submit_all(s, [f"r{i}" for i in range(7)])
    assert [w for w, _ in dispatched(actions)] == [W1, W2, W3, W1, W2, W3, W1]


def test_round_robin_ignores_load():
    s = state(strategy="round-robin")
    s.register(W1, reg("w1", capacity=10), T0)
    submit_all(s, ["a", "b", "c"])  # all on W1 while it is alone
    s.register(W2, reg("w2", capacity=10), T0)
    actions = submit_all(s, ["d", "e"])
    assert [w for w, _ in dispatched(actions)] == [W2, W1]


def test_queue_depth_picks_the_worker_with_the_fewest_in_flight():
    s = state(strategy="queue-depth")
    s.register(W1, reg("w1", capacity=10), T0)
    submit_all(s, ["a", "b", "c"])
    s.register(W2, reg("w2", capacity=10), T0)
    actions = submit_all(s, ["d", "e", "f"])
    assert [w for w, _ in dispatched(actions)] == [W2, W2, W2]  # W2 catches up to 3 before W1 gets more


def test_queue_depth_breaks_ties_round_robin():
    s = state(strategy="queue-depth")
    s.register(W1, reg("w1", capacity=10), T0)
    s.register(W2, reg("w2", capacity=10), T0)
    actions = submit_all(s, ["a", "b", "c", "d"])
    assert [w for w, _ in dispatched(actions)] == [W1, W2, W1, W2]


def test_draining_worker_gets_no_new_work():
    s = state()
    s.register(W1, reg("w1", capacity=10), T0)
    s.register(W2, reg("w2", capacity=10), T0)
    s.heartbeat(W1, hb(state="draining"), T0 + 1)
    actions = submit_all(s, ["a", "b", "c"], now=T0 + 1)
    assert [w for w, _ in dispatched(actions)] == [W2, W2, W2]


def test_only_worker_draining_leaves_work_queued():
    s = state()
    s.register(W1, reg(), T0)
    s.heartbeat(W1, hb(state="draining"), T0)
    assert s.submit(CLIENT, gen("a"), T0) == []
    assert list(s.queue) == ["a"]


# ------------------------------------------------------------------ Balancer alone


def cand(key, in_flight=0, capacity=4) -> Candidate:
    return Candidate(key, in_flight, capacity)


def test_balancer_unknown_strategy_raises():
    with pytest.raises(ValueError):
        Balancer("least-loaded")


@pytest.mark.parametrize("strategy", ["round-robin", "queue-depth"])
def test_balancer_without_credit_returns_none(strategy):
    b = Balancer(strategy)
    assert b.choose([]) is None
    assert b.choose([cand("a", 4, 4), cand("b", 2, 2)]) is None


def test_candidate_credit():
    assert cand("a", 3, 4).has_credit and not cand("a", 4, 4).has_credit


def test_balancer_round_robin_cycles_in_order():
    b = Balancer("round-robin")
    cs = [cand("a"), cand("b"), cand("c")]
    assert [b.choose(cs) for _ in range(4)] == ["a", "b", "c", "a"]


def test_balancer_round_robin_skips_workers_without_credit():
    b = Balancer("round-robin")
    assert b.choose([cand("a"), cand("b", 4, 4), cand("c")]) == "a"
    assert b.choose([cand("a"), cand("b", 4, 4), cand("c")]) == "c"


def test_balancer_round_robin_restarts_when_the_last_choice_is_gone():
    b = Balancer("round-robin")
    b.choose([cand("x")])
    assert b.choose([cand("a"), cand("b")]) == "a"


def test_balancer_queue_depth_picks_the_least_loaded():
    b = Balancer("queue-depth")
    assert b.choose([cand("a", 3), cand("b", 1), cand("c", 2)]) == "b"


def test_balancer_queue_depth_ignores_a_least_loaded_worker_without_credit():
    b = Balancer("queue-depth")
    assert b.choose([cand("a", 3, 4), cand("b", 1, 1), cand("c", 2, 4)]) == "c"


def test_balancer_queue_depth_tie_goes_to_the_one_after_the_last_chosen():
    b = Balancer("queue-depth")
    cs = [cand("a", 1), cand("b", 1), cand("c", 1)]
    assert b.choose(cs) == "a"
    assert b.choose(cs) == "b"
    assert b.choose(cs) == "c"
    assert b.choose(cs) == "a"


# ------------------------------------------------------------------ results


def test_result_is_forwarded_with_broker_queue_time_added_to_the_workers_wait():
    s = state()
    s.submit(CLIENT, gen("r1"), T0)  # waits 3 s in the broker for a worker
    s.register(W1, reg(), T0 + 3.0)
    actions = s.result(W1, res("r1", queue_wait_ms=250.0), T0 + 10.0)
    assert len(actions) == 1 and isinstance(actions[0], ToClient)
    assert actions[0].client_id == CLIENT
    forwarded = actions[0].message
    assert isinstance(forwarded, Result) and forwarded.request_id == "r1"
    assert forwarded.queue_wait_ms == pytest.approx(3250.0)
    assert forwarded.generation_ms == 1000.0
    assert s.counters.requests_completed == 1
    assert "r1" not in s.requests and s.workers[W1].in_flight == set()


def test_result_dispatched_at_once_adds_no_broker_time():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0 + 1.0)
    (action,) = s.result(W1, res("r1", queue_wait_ms=250.0), T0 + 9.0)
    assert action.message.queue_wait_ms == pytest.approx(250.0)


def test_duplicate_result_is_dropped_and_counted():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.result(W1, res("r1"), T0 + 1)
    assert s.result(W1, res("r1"), T0 + 2) == []
    assert s.counters.duplicate_results == 1
    assert s.counters.requests_completed == 1


def test_result_for_an_unknown_request_is_dropped_and_counted():
    s = state()
    s.register(W1, reg(), T0)
    assert s.result(W1, res("never-sent"), T0) == []
    assert s.counters.duplicate_results == 1


def test_late_result_from_an_expired_worker_is_refused_and_the_new_holder_answers():
    """Once expired, a worker's connection is no worker's: its late answer could as well be a
    stranger's, so it is told to register again and the request's new holder answers."""
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("w1"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.register(W2, reg("w2"), T0 + 4)
    actions = s.expire(T0 + 6)  # W1 silent for 6 s > 5 s: r1 goes to W2
    assert dispatched(actions) == [(W2, "r1")]
    late = s.result(W1, res("r1"), T0 + 6.5)  # W1 finished after all
    assert [(a.routing_id, type(a.message)) for a in late] == [(W1, Disconnect)]
    assert s.workers[W2].in_flight == {"r1"} and "r1" in s.requests
    (answer,) = s.result(W2, res("r1", "w2"), T0 + 7)
    assert isinstance(answer.message, Result) and answer.message.worker_name == "w2"


# ------------------------------------------------------------------ heartbeats and liveness


def test_heartbeat_from_an_unknown_worker_is_answered_with_disconnect():
    s = state()
    actions = s.heartbeat(b"stranger", hb(), T0)
    assert len(actions) == 1
    assert actions[0].routing_id == b"stranger" and isinstance(actions[0].message, Disconnect)
    assert b"stranger" not in s.workers


def test_heartbeat_keeps_a_worker_alive():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg(), T0)
    s.heartbeat(W1, hb(), T0 + 4)
    assert s.expire(T0 + 8) == []
    assert W1 in s.workers


def test_expire_does_not_remove_a_worker_at_exactly_the_timeout():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg(), T0)
    s.expire(T0 + 5.0)
    assert W1 in s.workers
    s.expire(T0 + 5.001)
    assert W1 not in s.workers
    assert s.counters.workers_expired == 1


def test_expire_requeues_in_flight_work_at_the_front_oldest_first():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("w1", capacity=2), T0)
    s.submit(CLIENT, gen("old1"), T0 + 0.2)
    s.submit(CLIENT, gen("old2"), T0 + 0.5)
    s.submit(CLIENT, gen("new1"), T0 + 1.0)  # waits: W1 is full
    assert list(s.queue) == ["new1"]
    assert sent(s.expire(T0 + 6)) == []  # nobody to hand the work to
    assert W1 not in s.workers
    assert list(s.queue) == ["old1", "old2", "new1"]
    assert s.counters.requeued == 2 and s.counters.workers_expired == 1
    actions = s.register(W2, reg("w2", capacity=1), T0 + 7)
    assert dispatched(actions) == [(W2, "old1")]


def test_requests_received_at_the_same_instant_are_requeued_in_submission_order():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("w1", capacity=8), T0)
    ids = [f"same{i}" for i in range(8)]
    submit_all(s, ids, now=T0)
    s.expire(T0 + 6)
    assert list(s.queue) == ids


def test_requeued_request_goes_to_the_surviving_worker():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("w1"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.register(W2, reg("w2"), T0 + 4)
    actions = s.expire(T0 + 6)
    assert dispatched(actions) == [(W2, "r1")]
    assert s.requests["r1"].attempts == 2


def test_request_fails_with_worker_lost_after_max_attempts():
    s = state(heartbeat_interval_s=1.0, liveness=1, max_attempts=2)
    s.register(W1, reg("w1"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.register(W2, reg("w2"), T0 + 1.5)
    assert dispatched(s.expire(T0 + 1.5)) == [(W2, "r1")]  # attempt 2
    actions = sent(s.expire(T0 + 3.0))  # W2 dies too
    assert failures(actions) == [("r1", "worker_lost")]
    assert actions[0].client_id == CLIENT
    assert "r1" not in s.requests and not s.queue
    assert s.counters.requests_failed == 1


def test_disconnect_requeues_what_the_worker_held():
    s = state()
    s.register(W1, reg("w1"), T0)
    submit_all(s, ["a", "b"])
    assert sent(s.disconnect(W1, T0 + 1)) == []
    assert W1 not in s.workers
    assert list(s.queue) == ["a", "b"]
    assert s.requests["a"].worker is None


def test_disconnect_of_an_unknown_worker_does_nothing():
    s = state()
    assert s.disconnect(b"stranger", T0) == []


def test_disconnect_hands_the_work_to_another_worker():
    s = state()
    s.register(W1, reg("w1", capacity=4), T0)
    submit_all(s, ["a", "b"])
    s.register(W2, reg("w2", capacity=4), T0)
    actions = s.disconnect(W1, T0 + 1)
    assert dispatched(actions) == [(W2, "a"), (W2, "b")]


def test_reregistering_under_the_same_name_and_key_retires_the_old_record():
    s = state()
    s.register(W1, reg("gpu0"), T0, key=b"key-of-host-a")
    s.heartbeat(W1, hb(total_requests=10, total_batches=2), T0)
    s.submit(CLIENT, gen("r1"), T0)
    # The restarted worker: new process, new connection, the same CurveZMQ key.
    actions = s.register(W2, reg("gpu0", pid=2000), T0 + 1, key=b"key-of-host-a")
    assert W1 not in s.workers and W2 in s.workers
    assert dispatched(actions) == [(W2, "r1")]
    stats = build_stats(s, T0 + 1)
    assert stats["total_requests"] == 10 and stats["total_batches"] == 2


def test_the_same_process_registering_again_is_not_counted_twice():
    """A worker cut off long enough to expire re-registers from the same process with its
    cumulative counters: the retired copy of those counters must not be added on top."""
    s = state()
    s.register(W1, reg("gpu0", pid=77), T0)
    s.heartbeat(W1, hb(total_requests=10, total_batches=2), T0)
    s.expire(T0 + 60)
    assert build_stats(s, T0 + 60)["total_requests"] == 10
    s.register(W2, reg("gpu0", pid=77), T0 + 61)
    s.heartbeat(W2, hb(total_requests=12, total_batches=3), T0 + 61)
    stats = build_stats(s, T0 + 61)
    assert stats["total_requests"] == 12 and stats["total_batches"] == 3


def test_a_connection_registering_under_a_new_name_replaces_its_old_record():
    s = state()
    s.register(W1, reg("old-name", capacity=1), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.register(W1, reg("new-name", capacity=1), T0 + 1)
    assert [w.info.worker_name for w in s.workers.values()] == ["new-name"]
    assert s.workers[W1].in_flight == {"r1"}  # requeued and handed to the new record


def test_expire_fails_queued_requests_past_their_deadline_even_with_no_workers():
    s = state()
    s.submit(CLIENT, gen("a", deadline_s=10.0), T0)
    s.submit(CLIENT, gen("b", deadline_s=100.0), T0)
    actions = s.expire(T0 + 11)
    assert [(a.message.request_id, a.message.code) for a in actions] == [("a", "deadline_exceeded")]
    assert list(s.queue) == ["b"]
    assert s.counters.deadline_expired == 1


# ------------------------------------------------------------------ deadlines


def test_queued_request_past_its_deadline_fails_at_dispatch_time():
    s = state()
    s.submit(CLIENT, gen("late", deadline_s=10.0), T0)
    s.submit(CLIENT, gen("fine", deadline_s=60.0), T0)
    actions = s.register(W1, reg(), T0 + 11.0)
    assert failures(actions) == [("late", "deadline_exceeded")]
    assert dispatched(actions) == [(W1, "fine")]
    assert s.counters.deadline_expired == 1 and s.counters.requests_failed == 1
    assert "late" not in s.requests


def test_queued_request_at_exactly_its_deadline_is_still_dispatched():
    s = state()
    s.submit(CLIENT, gen("edge", deadline_s=10.0), T0)
    actions = s.register(W1, reg(), T0 + 10.0)
    assert dispatched(actions) == [(W1, "edge")]


def test_the_deadline_handed_to_a_worker_never_rounds_above_the_requests_own():
    """(received_at + deadline_s) - now rounds up at some clock readings (here 86400 + 1.5e-11):
    a worker decodes a deadline above the protocol's 86400 s bound as malformed and drops it."""
    now = 58357.651  # a monotonic clock reading (seconds since boot) at which the sum rounds up
    assert (now + 86_400.0) - now > 86_400.0
    s = state()
    s.register(W1, reg(), now)
    (action,) = s.submit(CLIENT, gen("longest", deadline_s=86_400.0), now)
    assert action.message.deadline_s == 86_400.0
    forwarded, _ = protocol.decode(protocol.encode(WORKER_LINK, action.message), WORKER_LINK)
    assert forwarded == action.message


# ------------------------------------------------------------------ stats

SEED_SINGLE_KEYS = {"total_requests", "total_batches", "current_queue_depth", "max_queue_depth", "avg_batch_size",
                    "avg_wait_time_ms", "avg_generation_time_ms", "config"}
SEED_MULTI_KEYS = {"num_gpus", "gpu_ids", "load_balance_strategy", "total_requests", "total_batches",
                   "max_queue_depth", "avg_batch_size", "avg_wait_time_ms", "avg_generation_time_ms",
                   "per_gpu_stats", "config"}
SEED_CONFIG_KEYS = {"max_batch_size", "max_wait_time", "adaptive_batching"}
SEED_PER_GPU_KEYS = {"gpu_id", "current_queue_depth", "total_requests", "total_batches", "avg_batch_size"}


def test_single_gpu_stats_have_the_seed_shape():
    s = state()
    s.register(W1, reg(max_batch_size=8, max_wait_time=5.0, adaptive=True), T0)
    s.heartbeat(W1, hb(total_requests=150, total_batches=23, sum_wait_ms=150 * 2341.0,
                       sum_generation_ms=23 * 38500.0, max_queue_depth=47), T0)
    stats = build_stats(s, T0)
    assert SEED_SINGLE_KEYS <= set(stats)
    assert "per_gpu_stats" not in stats and "gpu_ids" not in stats
    assert SEED_CONFIG_KEYS <= set(stats["config"])
    assert stats["config"]["max_batch_size"] == 8
    assert stats["config"]["max_wait_time"] == 5.0
    assert stats["config"]["adaptive_batching"] is True
    assert stats["total_requests"] == 150 and stats["total_batches"] == 23
    assert stats["avg_batch_size"] == 6.52
    assert stats["avg_wait_time_ms"] == 2341
    assert stats["avg_generation_time_ms"] == 38500


def test_stats_with_no_workers_have_the_single_gpu_shape_and_zero_averages():
    stats = build_stats(state(), T0)
    assert SEED_SINGLE_KEYS <= set(stats)
    assert stats["total_requests"] == 0 and stats["avg_batch_size"] == 0.0 and stats["avg_wait_time_ms"] == 0
    assert SEED_CONFIG_KEYS <= set(stats["config"])


def test_multi_gpu_stats_have_the_seed_shape():
    s = state(strategy="round-robin")
    s.register(W2, reg("w-b", gpu_id=1), T0)
    s.register(W1, reg("w-a", gpu_id=0), T0)
    s.heartbeat(W1, hb(total_requests=150, total_batches=23), T0)
    s.heartbeat(W2, hb(total_requests=148, total_batches=23), T0)
    stats = build_stats(s, T0)
    assert SEED_MULTI_KEYS <= set(stats)
    assert stats["num_gpus"] == 2
    assert stats["gpu_ids"] == [0, 1]
    assert stats["load_balance_strategy"] == "round-robin"
    assert SEED_CONFIG_KEYS <= set(stats["config"])
    per_gpu = stats["per_gpu_stats"]
    assert isinstance(per_gpu, list) and len(per_gpu) == 2
    for entry in per_gpu:
        assert SEED_PER_GPU_KEYS <= set(entry)
    assert [(e["gpu_id"], e["total_requests"], e["total_batches"], e["avg_batch_size"]) for e in per_gpu] == [
        (0, 150, 23, 6.52), (1, 148, 23, 6.43)]
    assert stats["total_requests"] == 298 and stats["total_batches"] == 46
    assert stats["avg_batch_size"] == 6.48


def test_per_gpu_current_queue_depth_is_held_minus_running():
    s = state(strategy="round-robin")
    s.register(W1, reg("w1", gpu_id=0, capacity=10), T0)
    s.register(W2, reg("w2", gpu_id=1, capacity=10), T0)
    submit_all(s, [f"r{i}" for i in range(6)])  # 3 each
    s.heartbeat(W1, hb(running=2), T0)
    submit_all(s, ["q1", "q2"])  # W1 has 3 in flight, W2 3: tie-break sends one to each
    stats = build_stats(s, T0)
    depths = {e["gpu_id"]: e["current_queue_depth"] for e in stats["per_gpu_stats"]}
    assert depths == {0: 4 - 2, 1: 4}
    assert stats["current_queue_depth"] == 6


def test_current_queue_depth_counts_broker_queue_and_worker_queues():
    s = state()
    s.register(W1, reg(capacity=2), T0)
    submit_all(s, ["a", "b", "c"])
    s.heartbeat(W1, hb(running=1), T0)
    stats = build_stats(s, T0)
    assert stats["current_queue_depth"] == 1 + (2 - 1)
    assert stats["max_queue_depth"] == 3


def test_expired_workers_counters_stay_in_the_totals():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("w1", gpu_id=0), T0)
    s.register(W2, reg("w2", gpu_id=1), T0)
    s.heartbeat(W1, hb(total_requests=100, total_batches=10, sum_wait_ms=1000.0, sum_generation_ms=5000.0), T0)
    s.heartbeat(W2, hb(total_requests=50, total_batches=13, sum_wait_ms=500.0, sum_generation_ms=6500.0), T0 + 4)
    s.expire(T0 + 6)  # W1 is gone
    assert list(s.workers) == [W2]
    stats = build_stats(s, T0 + 6)
    assert stats["total_requests"] == 150 and stats["total_batches"] == 23
    assert stats["avg_batch_size"] == 6.52
    assert stats["avg_wait_time_ms"] == 10  # 1500 ms / 150 requests
    assert stats["avg_generation_time_ms"] == 500  # 11500 ms / 23 batches


def test_stats_broker_section_reports_counters():
    s = state(max_queue_size=1)
    submit_all(s, ["a", "b"])
    stats = build_stats(s, T0, {"malformed_client_messages": 3})
    assert stats["broker"]["rejected_overloaded"] == 1
    assert stats["broker"]["requests_received"] == 2
    assert stats["broker"]["malformed_client_messages"] == 3


# ------------------------------------------------------------------ fair share of a backlog

W4 = b"w4"
FOUR = [W1, W2, W3, W4]


def batch_res(request_id: str, worker: bytes, size: int, seconds: float) -> Result:
    """One result of ``worker``'s batch of ``size`` that took ``seconds``."""
    return res(request_id, worker.decode(), batch_size=size, generation_s=seconds)


def four_workers_with_a_backlog(**policy) -> tuple[BrokerState, dict[bytes, list[str]]]:
    """Four equal workers of capacity 4 (batches of 2) and a burst of 20 at T0: each takes 4, 4 wait
    here. Every worker starts its first batch at once (its status says so)."""
    s = state(**policy)
    for i, routing_id in enumerate(FOUR):
        s.register(routing_id, reg(f"w{i + 1}", capacity=4, gpu_id=i, max_batch_size=2), T0)
    submit_all(s, [f"r{i:02d}" for i in range(20)])
    assert len(s.queue) == 4
    for routing_id in FOUR:
        s.heartbeat(routing_id, hb(running=2, queue_depth=2), T0 + 0.1)
    return s, {w: sorted(s.workers[w].in_flight) for w in FOUR}


def next_batch_starts(s: BrokerState, worker: bytes, now: float) -> None:
    """The worker's statuses as a batch ends and the next (its last 2 queued) starts."""
    s.heartbeat(worker, hb(running=0, queue_depth=2, total_batches=1), now)
    s.heartbeat(worker, hb(running=2, queue_depth=0, total_batches=1), now)


def test_fair_share_spreads_the_tail_of_a_burst_over_every_worker():
    """All four finish their first batch together; its images come back worker after worker. Before,
    the first two workers to return theirs took the 4 waiting requests (2 + 2, a whole extra batch
    each); with the fair share each worker gets 1 (unfinished 12 / 4 workers = 3 each)."""
    for fair_share, expected in ((True, FOUR), (False, [W1, W1, W2, W2])):
        s, held = four_workers_with_a_backlog(fair_share=fair_share)
        for worker in FOUR:
            next_batch_starts(s, worker, T0 + 10.1)
        got = []
        for k, worker in enumerate(FOUR):
            for request_id in held[worker][:2]:
                got += dispatched(s.result(worker, batch_res(request_id, worker, 2, 10.0), T0 + 10.3 + 0.01 * k))
        assert [w for w, _ in got] == expected, fair_share
        assert not s.queue


def test_fair_share_holds_the_backlog_for_a_worker_about_to_free_credit():
    """W1 frees 2 credits first but is at its share after 1: the other request waits for W2 to free one."""
    s, held = four_workers_with_a_backlog()
    for worker in FOUR:
        next_batch_starts(s, worker, T0 + 10.1)
    actions = []
    for request_id in held[W1][:2]:
        actions += s.result(W1, batch_res(request_id, W1, 2, 10.0), T0 + 10.3)
    assert [w for w, _ in dispatched(actions)] == [W1]
    assert len(s.queue) == 3 and len(s.workers[W1].in_flight) == 3  # a free slot, held back
    assert s.fair_share(T0 + 10.3) == 3 and s.unfinished(s.workers[W1], T0 + 10.3) == 3
    assert dispatched(s.result(W2, batch_res(held[W2][0], W2, 2, 10.0), T0 + 10.31)) == [(W2, "r17")]  # r16 went to W1


def test_fair_share_counts_a_batch_about_to_end_as_nearly_done():
    """W1 ends its first batch first. The others' first batches started with W1's and a batch of
    that key takes 10 s (W1's results say so): at T0 + 10.3 they are as good as done, so each of
    them holds only its 2 queued requests and W1 may take 1, not the 2 its results free."""
    s, held = four_workers_with_a_backlog()
    next_batch_starts(s, W1, T0 + 10.1)
    actions = []
    for request_id in held[W1][:2]:
        actions += s.result(W1, batch_res(request_id, W1, 2, 10.0), T0 + 10.3)
    assert [w for w, _ in dispatched(actions)] == [W1]
    assert [s.unfinished(s.workers[w], T0 + 10.3) for w in FOUR] == [3, 2, 2, 2]
    # Counting their running batches in full (4 each), W1 would have taken both.
    greedy, _ = four_workers_with_a_backlog(fair_share=False)
    next_batch_starts(greedy, W1, T0 + 10.1)
    actions = []
    for request_id in held[W1][:2]:
        actions += greedy.result(W1, batch_res(request_id, W1, 2, 10.0), T0 + 10.3)
    assert [w for w, _ in dispatched(actions)] == [W1, W1]


def test_a_running_batch_counts_in_full_until_a_batch_of_its_key_has_finished():
    s, _ = four_workers_with_a_backlog()
    assert s.unfinished(s.workers[W2], T0 + 50.0) == 4  # no batch time known yet
    s.batch_times.observe(("tiny/sd", BatchKey(512, 512, 25, 7.5)), 10.0, 2)  # batch times are per model
    assert s.unfinished(s.workers[W2], T0 + 5.1) == 3  # half of the batch of 2 left, rounded up
    assert s.unfinished(s.workers[W2], T0 + 50.0) == 2  # only its queue


def test_fair_share_gives_a_small_workers_share_to_the_others():
    """Water-filling: W1 can hold 2, so the level of the other two is (20 - 2) / 2 = 9, not 20 / 3."""
    s = state()
    s.register(W1, reg("w1", capacity=2, gpu_id=0), T0)
    s.register(W2, reg("w2", capacity=10, gpu_id=1), T0)
    s.register(W3, reg("w3", capacity=10, gpu_id=2), T0)
    submit_all(s, [f"r{i:02d}" for i in range(30)])
    assert [len(s.workers[w].in_flight) for w in (W1, W2, W3)] == [2, 10, 10] and len(s.queue) == 8
    s.heartbeat(W2, hb(running=0, total_batches=1), T0 + 20)  # finished its 10; images on their way
    s.heartbeat(W1, hb(running=2), T0 + 20)  # W1 and W3 have just started a batch
    s.heartbeat(W3, hb(running=10), T0 + 20)
    assert s.fair_share(T0 + 20) == 9
    got = []
    for request_id in sorted(s.workers[W2].in_flight):
        got += dispatched(s.result(W2, batch_res(request_id, W2, 10, 20.0), T0 + 20.5))
    assert [w for w, _ in got] == [W2] * 8  # W3 is busy with its 10, W1 is full


def test_fair_share_never_binds_with_one_worker():
    """One worker: the same actions, step for step, with the fair share on and off."""
    def scenario(fair_share: bool) -> list:
        s = state(fair_share=fair_share)
        s.register(W1, reg(capacity=4, max_batch_size=2), T0)
        log = submit_all(s, [f"r{i}" for i in range(10)])
        for step in range(5):
            now = T0 + 10 * step
            log += s.heartbeat(W1, hb(running=2, queue_depth=2, total_batches=step), now + 0.1)
            assert s.fair_share(now + 0.2) is None
            for request_id in sorted(s.workers[W1].in_flight)[:2]:
                log += s.result(W1, batch_res(request_id, W1, 2, 10.0), now + 10.0)
        return log

    assert scenario(True) == scenario(False)


def test_fair_share_needs_a_backlog():
    """A request handed out as it arrives is the balancer's alone; one that waited is capped."""
    s, _ = four_workers_with_a_backlog()
    assert s.fair_share(T0) is None  # the queue's head arrived at T0: no backlog yet at T0
    assert s.fair_share(T0 + 0.2) is None  # a backlog, but more than the workers can hold: no cap
    for worker in FOUR:
        next_batch_starts(s, worker, T0 + 10.1)
    assert s.fair_share(T0 + 10.2) == 3
    assert state().fair_share(T0) is None


def test_batch_times_keep_the_latest_per_key_and_forget_the_oldest_key():
    from broker.state import BatchTimes

    times = BatchTimes(max_keys=2)
    times.observe(("a",), 10.0, 2)
    times.observe(("a",), 8.0, 2)
    assert times.estimate_s(("a",), 4) == 16.0 and times.estimate_s(("b",), 1) is None
    times.observe(("b",), 1.0, 1)
    times.observe(("c",), 1.0, 1)
    assert times.estimate_s(("a",), 2) is None and times.estimate_s(("c",), 2) == 2.0


def test_balancer_skips_a_worker_over_its_share():
    b = Balancer("queue-depth")
    assert not Candidate("a", 0, 4, over_share=True).has_credit
    assert b.choose([Candidate("a", 0, 4, over_share=True), Candidate("b", 3, 4)]) == "b"
    assert b.choose([Candidate("a", 0, 4, over_share=True)]) is None


# ------------------------------------------------------------------ who may speak for a worker


def test_a_live_workers_name_is_not_taken_by_another_connection():
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("gpu0"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    actions = sent(s.register(W2, reg("gpu0", pid=666), T0 + 4.9))  # an intruder, or a restart too early
    assert [(a.routing_id, type(a.message)) for a in actions] == [(W2, Disconnect)]
    assert "live worker" in actions[0].message.reason and "WORKER_NAME" in actions[0].message.reason
    assert set(s.workers) == {W1} and s.workers[W1].in_flight == {"r1"}
    assert s.counters.registrations_refused == 1
    assert dispatched(s.submit(CLIENT, gen("r2"), T0 + 4.9)) == [(W1, "r2")]


def test_a_different_key_does_not_take_a_live_workers_name():
    s = state()
    s.register(W1, reg("gpu0"), T0, key=b"key-a")
    actions = sent(s.register(W2, reg("gpu0"), T0 + 1, key=b"key-b"))
    assert isinstance(actions[0].message, Disconnect) and set(s.workers) == {W1}
    actions = sent(s.register(W2, reg("gpu0"), T0 + 1, key=None))
    assert isinstance(actions[0].message, Disconnect) and set(s.workers) == {W1}


def test_a_restarted_worker_is_admitted_once_the_old_record_has_expired():
    """SIGKILLed and restarted at once: refused while its old record lives, admitted (its old
    requests requeued to it) once that record missed its heartbeats, with or without expire() first."""
    s = state(heartbeat_interval_s=1.0, liveness=5)
    s.register(W1, reg("gpu0", pid=1), T0)
    s.submit(CLIENT, gen("r1"), T0)
    assert isinstance(sent(s.register(W2, reg("gpu0", pid=2), T0 + 1))[0].message, Disconnect)
    actions = s.register(W2, reg("gpu0", pid=2), T0 + 5.5)  # the link's retry; W1 silent 5.5 s > 5 s
    assert W1 not in s.workers and W2 in s.workers
    assert dispatched(actions) == [(W2, "r1")]


def test_a_worker_that_said_goodbye_frees_its_name_at_once():
    s = state()
    s.register(W1, reg("gpu0", pid=1), T0)
    s.disconnect(W1, T0 + 0.1)
    actions = sent(s.register(W2, reg("gpu0", pid=2), T0 + 0.2))
    assert isinstance(actions[0].message, Welcome) and set(s.workers) == {W2}


def test_messages_from_a_connection_that_is_no_worker_are_refused():
    s = state()
    s.register(W1, reg("w1"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    for message in (hb(), res("r1"), Failure("r1", "internal", "x"), Progress("r1", 1, 2)):
        actions = sent(s.check_sender(b"stranger", None, message, T0))
        assert [(a.routing_id, type(a.message)) for a in actions] == [(b"stranger", Disconnect)]
        # and the state's own entry points refuse it too
        handler = {Heartbeat: s.heartbeat, Result: s.result, Failure: s.failure, Progress: s.progress}[type(message)]
        actions = handler(b"stranger", message, T0)
        assert [(a.routing_id, type(a.message)) for a in actions] == [(b"stranger", Disconnect)]
    assert sent(s.check_sender(b"stranger", None, Disconnect("bye"), T0)) == []  # a goodbye is just dropped
    assert s.check_sender(W1, None, hb(), T0) is None
    assert s.counters.unregistered_messages == 5
    assert s.workers[W1].in_flight == {"r1"} and s.counters.requests_completed == 0


def test_a_worker_cannot_answer_for_a_request_another_worker_holds():
    s = state()
    s.register(W1, reg("w1", capacity=1), T0)
    s.register(W2, reg("w2", capacity=1), T0)
    actions = submit_all(s, ["a", "b"])
    holder = dict((rid, wid) for wid, rid in dispatched(actions))
    other = W2 if holder["a"] == W1 else W1
    assert s.result(other, res("a"), T0 + 1) == []
    assert s.failure(other, Failure("a", "internal", "forged"), T0 + 1) == []
    assert s.progress(other, Progress("a", 1, 2), T0 + 1) == []
    assert s.counters.unassigned_answers == 3
    assert "a" in s.requests and s.requests["a"].step is None
    assert s.counters.requests_completed == 0 and s.counters.requests_failed == 0
    (answer,) = s.result(holder["a"], res("a"), T0 + 2)
    assert isinstance(answer, ToClient) and isinstance(answer.message, Result)


def test_a_message_under_another_key_than_the_workers_removes_the_worker():
    """Under CurveZMQ a worker's connection id used by another key means the worker's connection
    is gone and someone else holds its id: the worker goes (its work requeued), nobody is answered."""
    s = state()
    s.register(W1, reg("w1"), T0, key=b"key-a")
    s.register(W2, reg("w2"), T0, key=b"key-b")
    submit_all(s, ["a"])
    holder = next(w for w in s.workers.values() if w.in_flight)
    other = W2 if holder.routing_id == W1 else W1
    actions = s.check_sender(holder.routing_id, b"key-intruder", res("a"), T0 + 1)
    assert holder.routing_id not in s.workers and s.counters.wrong_key_messages == 1
    assert dispatched(actions) == [(other, "a")]
    assert (holder.routing_id, Disconnect) in [(a.routing_id, type(a.message)) for a in sent(actions)]
    assert s.check_sender(other, s.workers[other].key, hb(), T0 + 1) is None


# ------------------------------------------------------------------ progress deadline


def test_progress_is_recorded_on_the_request_and_passed_on_to_its_client():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0)
    assert s.progress(W1, Progress("r1", 3, 25), T0 + 1) == [ToClient(CLIENT, Progress("r1", 3, 25, 1, "w1"))]
    assert (s.requests["r1"].step, s.requests["r1"].steps) == (3, 25)


def test_a_paused_row_is_passed_on_as_paused_until_its_next_progress():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.progress(W1, Progress("r1", 3, 25, batch_size=2), T0 + 1)
    paused = s.progress(W1, Progress("r1", 3, 25, paused=True), T0 + 2)
    assert paused == [ToClient(CLIENT, Progress("r1", 3, 25, 1, "w1", 0, paused=True))]
    assert s.requests["r1"].paused
    # A gateway collecting the request now hears where it is: paused.
    assert s.progress(W1, Progress("r1", 4, 25, batch_size=1), T0 + 3) == [
        ToClient(CLIENT, Progress("r1", 4, 25, 1, "w1", 1))]
    assert not s.requests["r1"].paused


def test_a_worker_holding_requests_without_progress_is_declared_stuck_and_its_work_requeued():
    s = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=60.0)
    s.register(W1, reg("w1", capacity=2), T0)
    submit_all(s, ["a", "b"], now=T0 + 10)  # the deadline counts from its first request, not registration
    for t in range(11, 71):
        s.heartbeat(W1, hb(running=2), T0 + t)  # alive, but no word on its requests
        assert s.expire(T0 + t) == [], t
    s.register(W2, reg("w2", capacity=2), T0 + 70.5)
    actions = s.expire(T0 + 70.5)  # 60.5 s since W1 got its first request
    assert W1 not in s.workers and s.counters.workers_stuck == 1 and s.counters.workers_expired == 0
    assert dispatched(actions) == [(W2, "a"), (W2, "b")]
    told = [a for a in sent(actions) if a.routing_id == W1]
    assert len(told) == 1 and isinstance(told[0].message, Disconnect) and "stuck" in told[0].message.reason


def test_progress_results_and_failures_keep_a_slow_worker_from_being_stuck():
    s = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=60.0)
    s.register(W1, reg("w1", capacity=4), T0)
    submit_all(s, ["a", "b", "c"], now=T0)
    s.heartbeat(W1, hb(running=3), T0 + 1)
    for t in range(30, 300, 30):  # one long batch: a step every 30 s
        s.progress(W1, Progress("a", t // 30, 100), T0 + t)
        s.heartbeat(W1, hb(running=3), T0 + t)
        assert s.expire(T0 + t) == [] and W1 in s.workers
    s.result(W1, res("a"), T0 + 350)
    s.failure(W1, Failure("b", "internal", "x"), T0 + 400)
    for t in range(400, 461):
        s.heartbeat(W1, hb(running=1), T0 + t)
        assert s.expire(T0 + t) == [] and W1 in s.workers
    s.heartbeat(W1, hb(running=1), T0 + 461)
    s.expire(T0 + 461)
    assert W1 not in s.workers and s.counters.workers_stuck == 1  # 61 s since its last answer
    assert s.counters.workers_expired == 0


def test_an_idle_worker_is_never_stuck_and_the_deadline_can_be_turned_off():
    s = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=60.0)
    s.register(W1, reg("w1"), T0)
    for t in range(1, 200):
        s.heartbeat(W1, hb(), T0 + t)
    assert s.expire(T0 + 200) == [] and W1 in s.workers
    off = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=0)
    off.register(W1, reg("w1"), T0)
    off.submit(CLIENT, gen("r1", deadline_s=5000.0), T0)  # within its deadline: a late one is answered and cancelled
    off.heartbeat(W1, hb(running=1), T0 + 1000)
    assert off.expire(T0 + 1000) == [] and W1 in off.workers


def test_progress_from_another_worker_does_not_keep_a_stuck_one_alive():
    s = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=60.0)
    s.register(W1, reg("w1", capacity=1), T0)
    s.submit(CLIENT, gen("a"), T0)
    s.register(W2, reg("w2", capacity=1), T0)
    for t in range(10, 61, 10):
        s.progress(W2, Progress("a", 1, 2), T0 + t)  # not W2's request
        s.progress(W1, Progress("never-sent", 1, 2), T0 + t)  # not a request W1 holds
        s.heartbeat(W1, hb(running=1), T0 + t)
        s.heartbeat(W2, hb(), T0 + t)
    s.expire(T0 + 61)
    assert W1 not in s.workers and s.workers[W2].in_flight == {"a"}


def test_failing_everything_at_shutdown_answers_each_client_and_cancels_each_held_request():
    s = state()
    s.register(W1, reg("w1", capacity=1), T0)
    s.submit(b"g", gen("held"), T0)
    s.submit(b"g", gen("queued"), T0)
    actions = s.fail_all(protocol.FailureCode.SHUTTING_DOWN, "bye")
    assert sorted(a.message.request_id for a in actions if isinstance(a, ToClient)) == ["held", "queued"]
    cancels = [(a.routing_id, a.message.request_id) for a in actions
               if isinstance(a, ToWorker) and isinstance(a.message, protocol.Cancel)]
    assert cancels == [(W1, "held")] and not s.requests


# ------------------------------------------------------------------ what happened, for the broker's log


def events(actions, kind) -> list:
    return [a for a in actions if isinstance(a, kind)]


def test_a_worker_that_leaves_is_reported_before_each_request_taken_back_from_it():
    s = state()
    s.register(W1, reg("gpu0", capacity=2), T0)
    s.submit(CLIENT, replace(gen("a"), label="client-a"), T0)
    s.submit(CLIENT, gen("b"), T0 + 0.1)
    actions = s.disconnect(W1, T0 + 1, Removal.LEFT, "worker shutting down")
    assert actions[0] == WorkerRemoved("gpu0", Removal.LEFT, "worker shutting down")
    assert sorted(events(actions, Requeued), key=lambda e: e.request_id) == [
        Requeued("a", "client-a", "gpu0", Removal.LEFT), Requeued("b", "", "gpu0", Removal.LEFT)]


def test_a_worker_the_shell_could_not_reach_is_reported_unreachable():
    s = state()
    s.register(W1, reg("gpu0"), T0)
    s.submit(CLIENT, gen("a"), T0)
    actions = s.disconnect(W1, T0 + 1, Removal.UNREACHABLE)
    assert events(actions, WorkerRemoved) == [WorkerRemoved("gpu0", Removal.UNREACHABLE)]
    assert events(actions, Requeued) == [Requeued("a", "", "gpu0", Removal.UNREACHABLE)]


def test_expiry_tells_a_silent_worker_from_a_stuck_one():
    s = state(heartbeat_interval_s=1.0, liveness=5, progress_timeout_s=60.0)
    s.register(W1, reg("silent", capacity=1), T0)
    s.submit(CLIENT, gen("a"), T0)
    s.register(W2, reg("stuck", capacity=1), T0)
    s.submit(CLIENT, gen("b"), T0)
    assert s.workers[W1].in_flight == {"a"} and s.workers[W2].in_flight == {"b"}
    removed, requeued = [], []
    for t in range(1, 62):
        s.heartbeat(W2, hb(running=1), T0 + t)  # alive, never a word on its request
        if t < 5:
            s.heartbeat(W1, hb(running=1), T0 + t)
        actions = s.expire(T0 + t)
        removed += [(t, e) for e in events(actions, WorkerRemoved)]
        requeued += [(t, e) for e in events(actions, Requeued)]
    assert removed == [(10, WorkerRemoved("silent", Removal.MISSED_HEARTBEATS)),  # silent since T0 + 4
                       (61, WorkerRemoved("stuck", Removal.NO_PROGRESS))]  # 61 s since it got "b"
    assert requeued == [(10, Requeued("a", "", "silent", Removal.MISSED_HEARTBEATS)),
                        (61, Requeued("b", "", "stuck", Removal.NO_PROGRESS))]


def test_a_request_failed_after_its_last_attempt_is_not_reported_requeued():
    s = state(heartbeat_interval_s=1.0, liveness=1, max_attempts=1)
    s.register(W1, reg("w1"), T0)
    s.submit(CLIENT, gen("r1"), T0)
    actions = s.expire(T0 + 1.5)
    assert events(actions, WorkerRemoved) == [WorkerRemoved("w1", Removal.MISSED_HEARTBEATS)]
    assert events(actions, Requeued) == [] and failures(actions) == [("r1", "worker_lost")]


def test_a_registration_reports_the_requests_it_takes_back_from_the_old_record():
    s = state()
    s.register(W1, reg("gpu0"), T0, key=b"key-a")
    s.submit(CLIENT, gen("r1"), T0)
    actions = s.register(W2, reg("gpu0", pid=2000), T0 + 1, key=b"key-a")
    assert actions[:2] == [WorkerRemoved("gpu0", Removal.REGISTERED_AGAIN),
                           Requeued("r1", "", "gpu0", Removal.REGISTERED_AGAIN)]
    assert events(actions, Registered) == [Registered(reg("gpu0", pid=2000))]


def test_a_refused_registration_is_counted_and_says_why():
    s = state()
    s.register(W1, reg("gpu0"), T0)
    actions = s.register(W2, reg("gpu0", pid=666), T0 + 1)  # a live worker's name
    [refused] = events(actions, RegistrationRefused)
    assert refused.worker_name == "gpu0" and "live worker" in refused.reason
    assert sent(actions) == [ToWorker(W2, Disconnect(refused.reason))] and not events(actions, Registered)
    old = replace(reg("w2"), protocol_version=PROTOCOL_VERSION + 1)
    [refused] = events(s.register(W2, old, T0 + 1), RegistrationRefused)
    assert f"protocol version {PROTOCOL_VERSION + 1} is not {PROTOCOL_VERSION}" in refused.reason
    assert s.counters.registrations_refused == 2 and set(s.workers) == {W1}


def test_a_key_registers_only_the_names_its_key_file_admits():
    authorized = {b"key-a": "gpu-host-1"}
    s = state()
    for name in ("gpu-host-1", "gpu-host-1-gpu0"):
        assert events(s.register(W1, reg(name), T0, key=b"key-a", authorized_keys=authorized), Registered)
    actions = s.register(W2, reg("gpu-host-2-gpu0"), T0, key=b"key-a", authorized_keys=authorized)
    assert events(actions, RegistrationRefused) == [RegistrationRefused(
        "gpu-host-2-gpu0", "key 'gpu-host-1' may not register as 'gpu-host-2-gpu0': "
                           "name the worker after its key file (NAME or NAME-...)")]
    [refused] = events(s.register(W2, reg("gpu-host-9"), T0, key=b"key-z", authorized_keys=authorized),
                       RegistrationRefused)
    assert refused.reason.startswith("key 'key-z' may not register")
    assert s.counters.registrations_refused == 2 and set(s.workers) == {W1}
    assert registration_refusal(reg("anything"), None, None) is None  # no authentication: any name


def test_a_worker_whose_key_was_revoked_is_removed_and_told():
    s = state()
    s.register(W1, reg("gpu-host-1-gpu0"), T0, key=b"key-a")
    s.register(W2, reg("gpu-host-2-gpu0"), T0, key=b"key-b")
    s.register(W3, reg("local"), T0)  # no key: not under CurveZMQ, never revoked
    s.submit(CLIENT, gen("r1"), T0)
    holder = next(w for w in s.workers.values() if w.in_flight)
    assert s.revoke_keys({b"key-a": "gpu-host-1", b"key-b": "gpu-host-2"}, T0 + 1) == []
    actions = s.revoke_keys({b"key-b": "gpu-host-2"}, T0 + 1)
    assert set(s.workers) == {W2, W3}
    assert events(actions, WorkerRemoved) == [WorkerRemoved("gpu-host-1-gpu0", Removal.KEY_REVOKED)]
    assert (W1, Disconnect("this worker's key is no longer authorized")) in [
        (a.routing_id, a.message) for a in sent(actions)]
    if holder.routing_id == W1:
        assert events(actions, Requeued) == [Requeued("r1", "", "gpu-host-1-gpu0", Removal.KEY_REVOKED)]


def test_a_cancel_reports_where_the_request_was():
    s = state()
    s.register(W1, reg("gpu0", capacity=1), T0)
    s.submit(CLIENT, replace(gen("held"), label="lbl"), T0)
    s.submit(CLIENT, gen("queued"), T0)
    s.progress(W1, Progress("held", 3, 25), T0 + 1)
    assert events(s.cancel(CLIENT, protocol.Cancel("queued"), T0 + 2), Cancelled) == [Cancelled("queued", "", None)]
    actions = s.cancel(CLIENT, protocol.Cancel("held"), T0 + 2)
    assert actions[0] == Cancelled("held", "lbl", "gpu0", 3, 25)
    assert sent(actions) == [ToWorker(W1, protocol.Cancel("held"))]
    assert s.cancel(CLIENT, protocol.Cancel("held"), T0 + 3) == []  # already gone: nothing happened


def test_a_refused_sender_is_reported_with_the_worker_it_claims_to_be():
    s = state()
    s.register(W1, reg("gpu0"), T0, key=b"key-a")
    assert events(s.check_sender(b"\x01\x02", None, hb(), T0), SenderRefused) == [
        SenderRefused("Heartbeat", "0102", wrong_key=False)]
    actions = s.check_sender(W1, b"key-intruder", hb(), T0)
    assert actions[:2] == [SenderRefused("Heartbeat", "gpu0", wrong_key=True),
                           WorkerRemoved("gpu0", Removal.KEY_CHANGED)]


def test_a_dispatch_names_its_worker_for_the_log():
    s = state()
    s.register(W1, reg("gpu0"), T0)
    [dispatch] = s.submit(CLIENT, gen("r1"), T0)
    assert dispatch.worker_name == "gpu0"
