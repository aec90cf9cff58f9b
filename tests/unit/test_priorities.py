"""Priorities with aging and fair shares between owners: the pure rules (broker/priorities.py) and the
broker's queue order built on them (BrokerState with a fake clock)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from broker.models import ModelQueues
from broker.priorities import FairShares, Waiting, effective_rank, is_plain, pick
from broker.state import BrokerPolicy, BrokerState
from broker.stats import build_stats
from imagegen.protocol import Queued
from tests.unit.test_broker_state import CLIENT, T0, W1, dispatched, gen, reg, res

# ------------------------------------------------------------------ the pure rules


def w(request_id: str, priority: str = "normal", owner: str = "", share: float = 1.0, at: float = 0.0) -> Waiting:
    return Waiting(request_id, priority, owner, share, at)


def no_usage(owner: str) -> float:
    return 0.0


def test_effective_rank_climbs_one_class_per_aging_period_and_stops_at_high():
    assert effective_rank("low", 0.0, 60.0) == 2
    assert effective_rank("low", 59.9, 60.0) == 2
    assert effective_rank("low", 60.0, 60.0) == 1
    assert effective_rank("low", 120.0, 60.0) == 0
    assert effective_rank("low", 1e6, 60.0) == 0
    assert effective_rank("normal", 60.0, 60.0) == 0
    assert effective_rank("low", 1e6, 0.0) == 2  # 0: no aging
    assert effective_rank("urgent", 0.0, 60.0) == 1  # unknown: as normal


def test_plain_requests_go_in_queue_order():
    assert pick([w("a"), w("b"), w("c")], 10.0, 60.0, no_usage) == "a"
    assert pick([], 10.0, 60.0, no_usage) is None
    assert is_plain("normal", "") and not is_plain("high", "") and not is_plain("normal", "key-1")


def test_a_high_request_goes_before_older_normal_ones():
    assert pick([w("n1"), w("n2"), w("h", "high"), w("n3")], 1.0, 60.0, no_usage) == "h"


def test_a_low_request_waits_behind_normal_ones_until_it_has_aged():
    waiting = [w("low", "low", at=0.0), w("n-new", at=50.0)]
    assert pick(waiting, 55.0, 60.0, no_usage) == "n-new"
    # Waited PRIORITY_AGING_S: it ranks with normal ones, and being older goes before the newer one.
    assert pick(waiting, 60.0, 60.0, no_usage) == "low"


def test_without_aging_a_low_request_stays_behind():
    assert pick([w("low", "low", at=0.0), w("n", at=1e5)], 1e6, 0.0, no_usage) == "n"


def test_the_owner_furthest_below_its_share_goes_next():
    waiting = [w("a1", owner="a"), w("a2", owner="a"), w("b1", owner="b")]
    usage = {"a": 10.0, "b": 2.0}
    assert pick(waiting, 1.0, 60.0, usage.get) == "b1"
    usage = {"a": 1.0, "b": 2.0}
    assert pick(waiting, 1.0, 60.0, usage.get) == "a1"
    # b's share is 4: its 2.0 GPU-seconds count as 0.5 against a's 1.0.
    waiting = [w("a1", owner="a"), w("b1", owner="b", share=4.0)]
    assert pick(waiting, 1.0, 60.0, usage.get) == "b1"


def test_equal_owners_go_in_queue_order():
    waiting = [w("b1", owner="b"), w("a1", owner="a")]
    assert pick(waiting, 1.0, 60.0, no_usage) == "b1"


def test_priority_comes_before_the_fair_share():
    waiting = [w("b1", owner="b"), w("a-high", "high", owner="a")]
    assert pick(waiting, 1.0, 60.0, {"a": 100.0, "b": 0.0}.get) == "a-high"


def test_fair_shares_decay_by_half_every_half_life_and_totals_do_not():
    shares = FairShares(half_life_s=10.0)
    shares.charge("a", 4.0, 0.0)
    assert shares.recent("a", 10.0) == pytest.approx(2.0)
    shares.charge("a", 1.0, 10.0)
    assert shares.recent("a", 20.0) == pytest.approx(1.5)
    assert shares.total("a") == pytest.approx(5.0)
    assert shares.recent("nobody", 5.0) == 0.0
    with pytest.raises(ValueError):
        FairShares(half_life_s=0.0)


def test_fair_shares_forget_the_owner_charged_longest_ago_beyond_the_bound():
    shares = FairShares(max_owners=2)
    shares.charge("a", 1.0, 0.0)
    shares.charge("b", 1.0, 1.0)
    shares.charge("a", 1.0, 2.0)
    shares.charge("c", 1.0, 3.0)
    assert shares.owners() == ["a", "c"]


def test_model_queues_keep_each_group_in_queue_order_through_every_change():
    queues = ModelQueues()
    queues.append(None, "r1", group=("high", "a"))
    queues.append(None, "r2")
    queues.append(None, "r3", group=("high", "a"))
    queues.appendleft(None, "r0")
    assert queues.has_ranked(None)
    assert queues.group_heads(None) == ["r0", "r1"]
    queues.place("r1", "m")
    queues.place("r3", "m")
    queues.place("r2", "m")
    assert queues.has_ranked("m") and not queues.has_ranked(None)
    assert queues.group_heads("m") == ["r1", "r2"] and queues.waiting("m") == ["r1", "r2", "r3"]
    queues.remove("r1")
    assert queues.group_heads("m") == ["r2", "r3"]
    queues.remove("r3")
    assert not queues.has_ranked("m") and queues.group_heads("m") == ["r2"]
    queues.appendleft("m", "r4", group=("low", ""))
    queues.clear()
    assert not queues.has_ranked("m") and queues.group_heads("m") == []


# ------------------------------------------------------------------ the broker's queue order


def pgen(request_id: str, priority: str = "normal", owner: str = "", share: float = 1.0):
    return replace(gen(request_id), priority=priority, owner=owner, share=share)


def one_slot_broker(**policy) -> BrokerState:
    """A broker with one worker that holds one request at a time, busy with request "busy". No place
    is reserved for high requests unless ``policy`` says so: the queue's order is under test."""
    policy.setdefault("high_priority_reserve", 0)
    s = BrokerState(BrokerPolicy(**policy), epoch="epoch-1")
    s.register(W1, reg("w1", capacity=1), T0)
    assert dispatched(s.submit(CLIENT, pgen("busy"), T0)) == [(W1, "busy")]
    return s


def finish(s: BrokerState, request_id: str, now: float, generation_s: float = 1.0) -> list[str]:
    """The worker answers ``request_id``: the ids dispatched in return."""
    return [rid for _, rid in dispatched(s.result(W1, res(request_id, generation_s=generation_s), now))]


def test_a_high_request_queued_behind_normal_ones_is_dispatched_first():
    s = one_slot_broker()
    for rid in ("n1", "n2", "n3"):
        s.submit(CLIENT, pgen(rid), T0 + 1)
    s.submit(CLIENT, pgen("h", "high"), T0 + 2)
    assert finish(s, "busy", T0 + 3) == ["h"]
    assert finish(s, "h", T0 + 4) == ["n1"]
    assert finish(s, "n1", T0 + 5) == ["n2"]


def test_a_high_request_takes_a_reserved_place_when_every_place_is_held():
    s = one_slot_broker(high_priority_reserve=1)
    assert dispatched(s.submit(CLIENT, pgen("n1"), T0 + 1)) == []  # normal: waits for the one place
    assert dispatched(s.submit(CLIENT, pgen("h1", "high"), T0 + 2)) == [(W1, "h1")]  # the reserve
    assert dispatched(s.submit(CLIENT, pgen("h2", "high"), T0 + 3)) == []  # the reserve is used
    assert finish(s, "busy", T0 + 4) == ["h2"]  # then the queue's order: high first
    assert finish(s, "h1", T0 + 5) == []  # h2 holds the one place: the reserve is not the normal's
    assert finish(s, "h2", T0 + 6) == ["n1"]


def test_a_normal_request_aged_to_high_does_not_take_a_reserved_place():
    s = one_slot_broker(high_priority_reserve=1, priority_aging_s=1.0)
    s.submit(CLIENT, pgen("n1"), T0)
    s.submit(CLIENT, pgen("low", "low"), T0)
    assert dispatched(s.dispatch(T0 + 100)) == []  # both aged to the high class; neither was sent as high
    assert dispatched(s.submit(CLIENT, pgen("h1", "high"), T0 + 100)) == [(W1, "h1")]


def test_a_low_request_is_not_starved_by_a_stream_of_normal_ones():
    s = one_slot_broker(priority_aging_s=30.0)
    s.submit(CLIENT, pgen("low", "low"), T0)
    order, running, now = [], "busy", T0
    for index in range(10):  # a normal request arrives every 10 s, and each runs 10 s
        now += 10.0
        s.submit(CLIENT, pgen(f"n{index}"), now)
        dispatched_now = finish(s, running, now)
        order += dispatched_now
        running = dispatched_now[0]
    assert "low" in order
    # At T0+30 it has waited PRIORITY_AGING_S: it ranks as normal, and goes before n2, which came then.
    assert order[:3] == ["n0", "n1", "low"]


def test_without_aging_the_same_low_request_waits_behind_every_normal_one():
    s = one_slot_broker(priority_aging_s=0.0)
    s.submit(CLIENT, pgen("low", "low"), T0)
    order, running, now = [], "busy", T0
    for index in range(10):
        now += 10.0
        s.submit(CLIENT, pgen(f"n{index}"), now)
        running = finish(s, running, now)[0]
        order.append(running)
    assert "low" not in order


def test_owners_share_the_gpu_time_while_both_wait():
    s = one_slot_broker()
    for index in range(6):
        s.submit(CLIENT, pgen(f"a{index}", owner="key-a"), T0 + 1)
    for index in range(3):
        s.submit(CLIENT, pgen(f"b{index}", owner="key-b"), T0 + 2)
    order, running, now = [], "busy", T0 + 3
    for _ in range(6):
        running = finish(s, running, now)[0]
        order.append(running)
        now += 1.0
    # Equal shares, equal costs: they alternate although a's were all queued first.
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_larger_share_gets_more_of_the_gpu_time():
    s = one_slot_broker()
    for index in range(8):
        s.submit(CLIENT, pgen(f"a{index}", owner="key-a"), T0 + 1)
        s.submit(CLIENT, pgen(f"b{index}", owner="key-b", share=3.0), T0 + 1)
    order, running, now = [], "busy", T0 + 2
    for _ in range(8):
        running = finish(s, running, now)[0]
        order.append(running)
        now += 1.0
    assert sum(rid.startswith("b") for rid in order) == 6


def test_plain_requests_keep_first_in_first_out_order():
    s = one_slot_broker()
    for rid in ("r1", "r2", "r3"):
        s.submit(CLIENT, gen(rid), T0 + 1)
    assert [finish(s, rid, T0 + 2)[0] for rid in ("busy", "r1")] == ["r1", "r2"]


def test_stats_show_per_priority_figures_and_owners_gpu_seconds():
    s = one_slot_broker()
    s.submit(CLIENT, pgen("h", "high", owner="key-a", share=2.0), T0 + 1)
    s.submit(CLIENT, pgen("l", "low", owner="key-b"), T0 + 1)
    finish(s, "busy", T0 + 3)  # h waited 2 s
    finish(s, "h", T0 + 4, generation_s=3.0)
    stats = build_stats(s, T0 + 4)
    assert stats["priorities"]["high"] == {"queued": 0, "requests": 1, "dispatched": 1,
                                           "queue_wait_seconds": 2.0, "avg_queue_wait_ms": 2000}
    assert stats["priorities"]["low"]["dispatched"] == 1 and stats["priorities"]["normal"]["requests"] == 1
    owners = stats["fair_share"]["owners"]
    assert owners["key-a"]["gpu_seconds"] == 3.0 and owners["key-a"]["share"] == 2.0
    assert owners["key-b"] == {"gpu_seconds": 0.0, "recent_gpu_seconds": 0.0, "share": 1.0, "queued": 0}
    assert "" not in owners


def test_the_first_of_each_group_is_all_pick_needs_to_see():
    """The broker hands pick() only each (priority, owner) group's first request (ModelQueues
    group_heads()); with arrival times in queue order that chooses as a look at every request would."""
    rng = random.Random(7)
    for _ in range(500):
        queues, waiting, at = ModelQueues(), [], 0.0
        for index in range(rng.randint(1, 30)):
            at += rng.choice((0.0, 1.0, 20.0, 70.0))
            entry = w(f"r{index}", rng.choice(("high", "normal", "low")), rng.choice(("", "a", "b")),
                      rng.choice((1.0, 2.0)), at)
            waiting.append(entry)
            queues.append(None, entry.request_id, group=(entry.priority, entry.owner))
        usage = {"": rng.random(), "a": rng.random(), "b": rng.random()}
        by_id = {entry.request_id: entry for entry in waiting}
        heads = [by_id[request_id] for request_id in queues.group_heads(None)]
        now = at + rng.choice((0.0, 30.0, 100.0))
        assert pick(heads, now, 60.0, usage.get) == pick(waiting, now, 60.0, usage.get)


def test_queued_reports_count_the_requests_of_better_classes_ahead():
    s = one_slot_broker()
    for rid in ("n1", "n2"):
        s.submit(CLIENT, replace(pgen(rid), watch=True), T0 + 1)
    s.submit(CLIENT, replace(pgen("h", "high"), watch=True), T0 + 2)
    reports = {a.message.request_id: a.message.position for a in s.queue_reports(T0 + 3)
               if isinstance(a.message, Queued)}
    assert reports == {"h": 1, "n1": 2, "n2": 3}
