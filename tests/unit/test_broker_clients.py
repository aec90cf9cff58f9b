"""Unit tests of how the broker's pure core treats its clients (gateways) that come and go:
answers kept when they cannot be delivered (broker/unclaimed.py), COLLECT in each state of a
request, CANCEL from any client, PROGRESS passed on with attempt numbers, QUEUED reports and their
rate limit, and a client's silence. No sockets, no sleeping: every call takes ``now``.
"""

from __future__ import annotations

import pytest

from broker.config import BrokerSettings
from broker.state import QUEUED_REPORT_INTERVAL_S, BrokerPolicy, BrokerState, ToClient, ToWorker
from broker.stats import build_stats
from broker.unclaimed import ENTRY_OVERHEAD_BYTES, UnclaimedResults
from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    BatchingConfig,
    Cancel,
    Collect,
    Failure,
    Generate,
    GenerationParams,
    Progress,
    ProtocolError,
    Queued,
    Register,
    Result,
)
from imagegen.settings import SettingsError

T0 = 100.0
G1, G2 = b"gateway-1", b"gateway-2"
W1, W2 = b"w1", b"w2"
UNITS = 512 * 512 * 25 * 2 / 1e6  # work units of one gen() request: megapixels x steps x CFG rows


def reg(name: str = "w1", capacity: int = 1, seconds_per_work_unit: float = 0.0) -> Register:
    return Register(worker_name=name, host="host-a", gpu_id=0, pid=1000, model_id="tiny/sd", device="cuda:0",
                    capacity=capacity,
                    batching=BatchingConfig(enable_batching=True, max_batch_size=8, max_wait_time=5.0,
                                            min_batch_size=1, min_wait_time=0.5, adaptive_batching=True,
                                            adaptive_threshold=10),
                    seconds_per_work_unit=seconds_per_work_unit)


def gen(request_id: str, watch: bool = False, deadline_s: float = 600.0) -> Generate:
    return Generate(request_id, GenerationParams("a cat", 512, 512, 25, 7.5, 1, None), deadline_s, watch=watch)


def res(request_id: str, worker: str = "w1") -> Result:
    return Result(request_id, worker, "host-a", 0, f"{worker}:1", 1, 0.0, 1000.0, 512, 512, 1)


def state(**policy) -> BrokerState:
    return BrokerState(BrokerPolicy(**policy), epoch="epoch-1")


def to_clients(actions) -> list[tuple[bytes, object]]:
    return [(a.client_id, a.message) for a in actions if isinstance(a, ToClient)]


def reports(actions) -> list[tuple[bytes, str, int]]:
    """(client, request id, position) of every QUEUED report among the actions."""
    return [(a.client_id, a.message.request_id, a.message.position) for a in actions
            if isinstance(a, ToClient) and isinstance(a.message, Queued)]


def keep_answer(s: BrokerState, action: ToClient, payload: tuple = (), now: float = T0) -> list[str]:
    """What the shell does with an answer it could not send."""
    return s.keep_unclaimed(action, payload, now)


# ------------------------------------------------------------------ the store of kept answers


def test_kept_answers_are_bounded_by_count_the_oldest_dropped_first():
    store = UnclaimedResults(max_results=2, max_bytes=10**9, ttl_s=60.0)
    assert store.keep("a", G1, res("a"), [b"x"], "", T0) == []
    assert store.keep("b", G1, res("b"), [b"x"], "", T0 + 1) == []
    assert store.keep("c", G1, res("c"), [b"x"], "", T0 + 2) == ["a"]
    assert "a" not in store and "b" in store and "c" in store
    assert store.counters.kept == 3 and store.counters.dropped == 1


def test_kept_answers_are_bounded_by_bytes_and_one_too_large_is_never_kept():
    size = ENTRY_OVERHEAD_BYTES + 1000
    store = UnclaimedResults(max_results=100, max_bytes=2 * size, ttl_s=60.0)
    store.keep("a", G1, res("a"), [b"x" * 1000], "", T0)
    store.keep("b", G1, res("b"), [b"x" * 1000], "", T0 + 1)
    assert store.bytes == 2 * size
    assert store.keep("c", G1, res("c"), [b"x" * 1000], "", T0 + 2) == ["a"]
    assert store.bytes == 2 * size and len(store) == 2
    assert store.keep("huge", G1, res("huge"), [b"x" * 3 * size], "", T0 + 3) == ["huge"]
    assert "huge" not in store and len(store) == 2 and store.counters.dropped == 2


def test_kept_answers_expire_after_their_time_and_one_kept_again_keeps_its_age():
    store = UnclaimedResults(max_results=100, max_bytes=10**9, ttl_s=60.0)
    store.keep("a", G1, res("a"), [], "", T0)
    store.keep("b", G1, res("b"), [], "", T0 + 30)
    assert store.expire(T0 + 59) == []
    taken = store.take("a")  # a delivery that fails in turn: kept again, as old as it was
    store.keep("a", G1, taken.message, taken.payload, "", T0 + 59.5, kept_at=taken.kept_at)
    assert store.counters.claimed == 0
    assert store.expire(T0 + 60) == ["a"]
    assert store.expire(T0 + 89) == [] and store.expire(T0 + 90) == ["b"]
    assert len(store) == 0 and store.bytes == 0 and store.counters.expired == 2


def test_the_store_can_be_turned_off():
    store = UnclaimedResults(max_results=0, max_bytes=10**9, ttl_s=60.0)
    assert store.keep("a", G1, res("a"), [], "", T0) == ["a"] and len(store) == 0


# ------------------------------------------------------------------ collect


def test_an_undelivered_result_is_kept_and_any_client_collects_it_once():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    (answer,) = [a for a in s.result(W1, res("r1"), T0 + 5) if isinstance(a, ToClient)]
    assert answer.client_id == G1 and answer.keep
    keep_answer(s, answer, (b"png",), T0 + 5)  # gateway-1 is gone
    (collected,) = s.collect(G2, Collect("r1"), T0 + 6)
    assert collected.client_id == G2 and isinstance(collected.message, Result) and collected.payload == (b"png",)
    assert s.unclaimed.counters.claimed == 1
    (again,) = s.collect(G2, Collect("r1"), T0 + 7)  # taken: nothing is left of it
    assert isinstance(again.message, Failure) and again.message.code == "unknown_request" and not again.keep
    assert s.counters.collects == 2 and s.counters.collects_unknown == 1


def test_a_kept_failure_is_collected_like_a_result():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    (answer,) = [a for a in s.failure(W1, Failure("r1", "generation_failed", "boom"), T0 + 1)
                 if isinstance(a, ToClient)]
    keep_answer(s, answer, (), T0 + 1)
    assert to_clients(s.collect(G1, Collect("r1"), T0 + 2)) == [(G1, Failure("r1", "generation_failed", "boom"))]


def test_collecting_a_queued_request_makes_the_asker_its_client_and_tells_it_where_it_waits():
    s = state()
    s.register(W1, reg(capacity=1, seconds_per_work_unit=0.1), T0)
    s.submit(G1, gen("first"), T0)  # at the worker
    s.submit(G1, gen("r1"), T0)  # queued, position 1
    actions = s.collect(G2, Collect("r1"), T0 + 1)
    (report,) = [m for _, m in to_clients(actions)]
    assert report == Queued("r1", 1, 1, round(UNITS * 0.5, 3), pytest.approx(UNITS * 0.5 * 0.1))
    assert s.requests["r1"].client_id == G2
    s.result(W1, res("first"), T0 + 2)  # r1 goes to the worker
    (answer,) = [a for a in s.result(W1, res("r1"), T0 + 3) if isinstance(a, ToClient)]
    assert answer.client_id == G2  # the answer goes to the collector, not to gateway-1


def test_collecting_a_request_at_a_worker_before_its_batch_starts_reports_position_zero():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    assert reports(s.collect(G2, Collect("r1"), T0 + 1)) == [(G2, "r1", 0)]


def test_collecting_a_running_request_answers_its_latest_progress():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    s.progress(W1, Progress("r1", 7, 25, batch_size=3), T0 + 1)
    assert to_clients(s.collect(G2, Collect("r1"), T0 + 2)) == [(G2, Progress("r1", 7, 25, 1, "w1", 3))]
    assert to_clients(s.progress(W1, Progress("r1", 8, 25), T0 + 3)) == [(G2, Progress("r1", 8, 25, 1, "w1"))]


def test_a_resent_generate_for_a_kept_answer_gets_that_answer():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    (answer,) = [a for a in s.result(W1, res("r1"), T0 + 5) if isinstance(a, ToClient)]
    keep_answer(s, answer, (b"png",), T0 + 5)
    (again,) = s.submit(G1, gen("r1"), T0 + 6)
    assert isinstance(again.message, Result) and again.payload == (b"png",)
    assert s.counters.requests_received == 1 and "r1" not in s.requests


def test_an_id_in_use_by_another_clients_request_is_refused_and_never_kept():
    s = state()
    s.submit(G1, gen("r1"), T0)
    (refusal,) = s.submit(G2, gen("r1"), T0)
    assert refusal.message.code == "invalid_request" and not refusal.keep


# ------------------------------------------------------------------ cancel from any client


def test_any_client_cancels_a_queued_or_running_request():
    s = state()
    s.register(W1, reg(capacity=1), T0)
    s.submit(G1, gen("running"), T0)
    s.submit(G1, gen("queued"), T0)
    s.cancel(G2, Cancel("queued"), T0 + 1)
    assert "queued" not in s.requests and not s.queue
    actions = s.cancel(G2, Cancel("running"), T0 + 2)
    assert ToWorker(W1, Cancel("running")) in actions
    assert not s.requests and s.counters.cancelled == 2


def test_a_cancel_drops_a_kept_answer():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    (answer,) = [a for a in s.result(W1, res("r1"), T0 + 5) if isinstance(a, ToClient)]
    keep_answer(s, answer, (b"png",), T0 + 5)
    assert s.cancel(G2, Cancel("r1"), T0 + 6) == []
    assert "r1" not in s.unclaimed and s.unclaimed.counters.cancelled == 1


# ------------------------------------------------------------------ progress and attempts


def test_progress_goes_to_the_client_with_the_attempt_number_which_grows_when_a_worker_is_lost():
    s = state(max_attempts=3)
    s.register(W1, reg("w1"), T0)
    s.submit(G1, gen("r1"), T0)
    assert to_clients(s.progress(W1, Progress("r1", 0, 25, batch_size=2), T0 + 1)) == [
        (G1, Progress("r1", 0, 25, 1, "w1", 2))]
    s.progress(W1, Progress("r1", 5, 25), T0 + 2)
    s.disconnect(W1, T0 + 3)  # requeued: its next attempt starts over
    assert s.requests["r1"].step is None
    s.register(W2, reg("w2"), T0 + 4)
    assert to_clients(s.progress(W2, Progress("r1", 0, 25), T0 + 5)) == [(G1, Progress("r1", 0, 25, 2, "w2"))]
    assert s.counters.progress_forwarded == 3


def test_progress_from_a_worker_that_does_not_hold_the_request_goes_nowhere():
    s = state()
    s.register(W1, reg("w1"), T0)
    s.register(W2, reg("w2"), T0)
    s.submit(G1, gen("r1"), T0)
    holder = next(w for w in s.workers.values() if w.in_flight).routing_id
    other = W2 if holder == W1 else W1
    assert s.progress(other, Progress("r1", 1, 25), T0 + 1) == []


# ------------------------------------------------------------------ queued reports


def test_queued_reports_go_only_to_watching_clients_and_at_most_once_a_second():
    s = state()
    s.register(W1, reg(capacity=1), T0)
    s.submit(G1, gen("running"), T0)
    s.submit(G1, gen("plain"), T0)  # /generate traffic: no reports
    s.submit(G1, gen("a", watch=True), T0)
    s.submit(G1, gen("b", watch=True), T0)
    assert reports(s.queue_reports(T0)) == [(G1, "a", 2), (G1, "b", 3)]
    assert reports(s.queue_reports(T0 + 0.1)) == []  # nothing changed
    s.result(W1, res("running"), T0 + 0.5)  # "plain" goes to the worker: a and b move up
    assert reports(s.queue_reports(T0 + 0.5)) == []  # within a second of their last report
    assert reports(s.queue_reports(T0 + QUEUED_REPORT_INTERVAL_S)) == [(G1, "a", 1), (G1, "b", 2)]
    s.result(W1, res("plain"), T0 + 2)  # "a" goes to the worker: position 0 until its batch starts
    assert reports(s.queue_reports(T0 + 2)) == [(G1, "a", 0), (G1, "b", 1)]
    s.progress(W1, Progress("a", 0, 25), T0 + 3)
    assert reports(s.queue_reports(T0 + 4)) == []  # running: PROGRESS says the rest
    assert s.counters.queued_reports == 6


def test_a_requeued_watched_request_is_reported_queued_again():
    s = state()
    s.register(W1, reg(capacity=1), T0)
    s.submit(G1, gen("a", watch=True), T0)
    assert reports(s.queue_reports(T0)) == [(G1, "a", 0)]
    s.progress(W1, Progress("a", 3, 25), T0 + 1)
    s.disconnect(W1, T0 + 2)
    assert reports(s.queue_reports(T0 + 2)) == [(G1, "a", 1)]


def test_the_estimated_start_is_the_work_ahead_at_the_fastest_speed_over_the_workers():
    s = state()
    s.register(W1, reg("w1", capacity=1, seconds_per_work_unit=0.2), T0)
    s.register(W2, reg("w2", capacity=1, seconds_per_work_unit=0.1), T0)
    for rid in ("x", "y"):
        s.submit(G1, gen(rid), T0)  # one on each worker, nothing reported: half their units left
    s.submit(G1, gen("q1"), T0)
    s.submit(G1, gen("q2", watch=True), T0)
    (report,) = [a.message for a in s.queue_reports(T0) if isinstance(a, ToClient)]
    ahead = UNITS * 0.5 * 2 + UNITS  # the workers' unfinished halves, and q1
    assert (report.position, report.waiting, report.ahead_units) == (2, 2, round(ahead, 3))
    assert report.estimated_start_s == pytest.approx(ahead * 0.1 / 2)


def test_no_estimate_before_any_worker_measured_its_speed():
    s = state()
    s.submit(G1, gen("a", watch=True), T0)
    (report,) = [a.message for a in s.queue_reports(T0) if isinstance(a, ToClient)]
    assert report.position == 1 and report.estimated_start_s is None


# ------------------------------------------------------------------ silent clients, stats, settings


def test_a_client_that_pings_and_falls_silent_is_treated_as_gone_one_that_never_pinged_never():
    s = state(client_silence_s=5.0)
    s.heard_from(G1, T0, pinged=True)
    s.heard_from(G2, T0)  # sends requests, never pings
    assert not s.client_silent(G1, T0 + 5)
    assert s.client_silent(G1, T0 + 5.1)
    assert not s.client_silent(G2, T0 + 100)
    s.heard_from(G1, T0 + 6)  # any message counts once it has pinged
    assert not s.client_silent(G1, T0 + 10)


def test_stats_count_kept_answers_and_collects():
    s = state()
    s.register(W1, reg(), T0)
    s.submit(G1, gen("r1"), T0)
    (answer,) = [a for a in s.result(W1, res("r1"), T0 + 5) if isinstance(a, ToClient)]
    keep_answer(s, answer, (b"x" * 100,), T0 + 5)
    broker = build_stats(s, T0 + 5)["broker"]
    assert (broker["unclaimed_results"], broker["unclaimed_result_bytes"]) == (1, ENTRY_OVERHEAD_BYTES + 100)
    s.collect(G2, Collect("r1"), T0 + 6)
    s.collect(G2, Collect("nope"), T0 + 6)
    broker = build_stats(s, T0 + 6)["broker"]
    assert (broker["unclaimed_results"], broker["unclaimed_kept"], broker["unclaimed_claimed"]) == (0, 1, 1)
    assert (broker["collects"], broker["collects_unknown"]) == (2, 1)


def test_kept_answers_may_not_take_more_than_half_the_memory_limit():
    BrokerSettings(memory_limit_bytes=1024**3, unclaimed_result_bytes=512 * 1024**2).validate()
    with pytest.raises(SettingsError, match="BROKER_UNCLAIMED_RESULT_BYTES"):
        BrokerSettings(memory_limit_bytes=1024**3, unclaimed_result_bytes=512 * 1024**2 + 1).validate()
    BrokerSettings(memory_limit_bytes=0, unclaimed_result_bytes=10 * 1024**3).validate()  # no limit


def test_a_lower_memory_limit_alone_lowers_the_kept_answers_default_instead_of_refusing_to_start():
    BrokerSettings(memory_limit_bytes=256 * 1024**2).validate()
    assert BrokerSettings(memory_limit_bytes=256 * 1024**2).unclaimed_bytes() == 64 * 1024**2
    assert BrokerSettings().unclaimed_bytes() == 256 * 1024**2  # a quarter of 2 GiB is more: capped
    assert BrokerSettings(memory_limit_bytes=0).unclaimed_bytes() == 256 * 1024**2


# ------------------------------------------------------------------ the client link's new messages


@pytest.mark.parametrize("message", [
    Progress("r1", 3, 25, 2, "w1", 4),
    Queued("r1", 3, 10, 12.5, 4.25),
    Queued("r1", 0),
    Collect("r1"),
    Generate("r1", GenerationParams("a cat", 512, 512, 25, 7.5, 1, None), 60.0, watch=True),
])
def test_the_client_link_carries_progress_queued_and_collect(message):
    assert protocol.decode(protocol.encode(CLIENT_LINK, message), CLIENT_LINK)[0] == message


def test_an_attempt_number_out_of_bounds_is_refused():
    frames = protocol.encode(CLIENT_LINK, Progress("r1", 3, 25, protocol.MAX_ATTEMPTS + 1))
    with pytest.raises(ProtocolError, match="attempt"):
        protocol.decode(frames, CLIENT_LINK)
