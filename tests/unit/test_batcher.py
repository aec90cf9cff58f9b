"""Unit tests of gpu_worker.decisions.batcher: the seed's batching rule, driven by a fake clock.

Every Batcher method takes ``now``; the tests pass plain floats, so no test sleeps.
"""

from __future__ import annotations

import pytest

from gpu_worker.decisions.batcher import Batch, BatchKey, Batcher, BatchPolicyConfig, Pending, adaptive_wait_time_s

T0 = 1000.0  # an arbitrary monotonic-clock origin
KEY = BatchKey(512, 512, 25, 7.5)


def make(**overrides) -> Batcher[str]:
    return Batcher(BatchPolicyConfig(**overrides))


def add_many(batcher: Batcher, n: int, key: BatchKey = KEY, now: float = T0, prefix: str = "r") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for rid in ids:
        batcher.add(rid, key, rid, now)
    return ids


def ids_of(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [p.request_id for p in batch.requests]


# ------------------------------------------------------------------ firing rules


def test_full_batch_fires_immediately():
    b = make(max_batch_size=4)
    add_many(b, 4)
    assert b.next_decision_at() == float("-inf")
    assert ids_of(b.next_batch(T0)) == ["r0", "r1", "r2", "r3"]
    assert b.queue_depth == 0


def test_one_short_of_full_does_not_fire_immediately():
    b = make(max_batch_size=4)
    add_many(b, 3)
    assert b.next_batch(T0) is None


def test_lone_request_waits_exactly_max_wait_time():
    b = make(max_batch_size=8, max_wait_time_s=5.0)
    b.add("a", KEY, "a", T0)
    assert b.next_decision_at() == T0 + 5.0
    assert b.next_batch(T0) is None
    assert b.next_batch(T0 + 4.999) is None
    assert ids_of(b.next_batch(T0 + 5.0)) == ["a"]


def test_nothing_queued_means_no_decision_and_no_batch():
    b = make()
    assert b.next_decision_at() is None
    assert b.next_batch(T0) is None
    assert b.queue_depth == 0


def test_window_counts_from_first_arrival_not_last():
    b = make(max_batch_size=8, max_wait_time_s=5.0)
    b.add("a", KEY, "a", T0)
    b.add("b", KEY, "b", T0 + 4.0)
    assert b.next_decision_at() == T0 + 5.0
    assert b.next_batch(T0 + 4.999) is None
    assert ids_of(b.next_batch(T0 + 5.0)) == ["a", "b"]


def test_min_batch_size_makes_a_group_below_it_wait():
    b = make(max_batch_size=8, min_batch_size=3, max_wait_time_s=5.0)
    b.add("a", KEY, None, T0)
    b.add("b", KEY, None, T0)
    assert b.next_batch(T0 + 4.999) is None
    b.add("c", KEY, None, T0 + 4.999)  # reaches min: the normal window (from the first arrival) applies
    assert b.next_decision_at() == T0 + 5.0


def test_group_reaching_min_batch_size_uses_the_adaptive_wait():
    b = make(max_batch_size=32, min_batch_size=3, adaptive_threshold=10)
    add_many(b, 15)  # depth 15 -> adaptive wait 1.625; 15 >= min 3
    assert b.next_decision_at() == pytest.approx(T0 + 1.625)


def _twenty_singletons(min_batch_size: int) -> Batcher:
    b = make(max_batch_size=32, min_batch_size=min_batch_size, adaptive_threshold=10)
    for i in range(20):  # 20 distinct keys: depth 20 -> adaptive wait 0.5 s
        b.add(f"s{i}", BatchKey(512, 512, i + 1, 7.5), None, T0 + i * 0.01)
    return b


def test_groups_below_min_batch_size_ignore_the_shortened_adaptive_wait():
    b = _twenty_singletons(min_batch_size=2)
    assert b.next_decision_at() == T0 + 5.0
    assert b.next_batch(T0 + 0.5) is None
    assert b.next_batch(T0 + 4.999) is None
    assert ids_of(b.next_batch(T0 + 5.0)) == ["s0"]


def test_same_singletons_at_min_batch_size_1_use_the_shortened_adaptive_wait():
    b = _twenty_singletons(min_batch_size=1)
    assert b.next_decision_at() == pytest.approx(T0 + 0.5)
    assert ids_of(b.next_batch(T0 + 0.5)) == ["s0"]


def test_starvation_guard_fires_a_group_below_min_batch_size_at_max_wait_time():
    b = make(max_batch_size=8, min_batch_size=4, max_wait_time_s=5.0)
    b.add("a", KEY, "a", T0)
    assert b.next_decision_at() == T0 + 5.0
    assert b.next_batch(T0 + 4.999) is None
    assert ids_of(b.next_batch(T0 + 5.0)) == ["a"]


# ------------------------------------------------------------------ adaptive wait time


@pytest.mark.parametrize(
    "depth, expected",
    [(0, 5.0), (9, 5.0), (10, 2.75), (15, 1.625), (20, 0.5), (40, 0.5)],
)
def test_adaptive_wait_time_formula(depth, expected):
    config = BatchPolicyConfig(max_wait_time_s=5.0, min_wait_time_s=0.5, adaptive_threshold=10)
    assert adaptive_wait_time_s(depth, config) == pytest.approx(expected)


@pytest.mark.parametrize("depth", [0, 9, 10, 15, 20, 40])
def test_adaptive_disabled_always_waits_max(depth):
    config = BatchPolicyConfig(max_wait_time_s=5.0, min_wait_time_s=0.5, adaptive_threshold=10, adaptive=False)
    assert adaptive_wait_time_s(depth, config) == 5.0


def test_deep_queue_shortens_the_wait_the_batcher_uses():
    b = make(max_batch_size=32, max_wait_time_s=5.0, min_wait_time_s=0.5, adaptive_threshold=10)
    add_many(b, 15)
    assert b.wait_time_s() == pytest.approx(1.625)
    assert b.next_decision_at() == pytest.approx(T0 + 1.625)
    assert b.next_batch(T0 + 1.62) is None
    assert len(b.next_batch(T0 + 1.625)) == 15


def test_queue_depth_counts_all_groups_for_the_adaptive_wait():
    b = make(max_batch_size=32, adaptive_threshold=10)
    b.add("a", KEY, None, T0)
    add_many(b, 14, key=BatchKey(768, 768, 25, 7.5), now=T0 + 1.0)
    # 15 queued in total -> 1.625 s for every group, including KEY's single request.
    assert b.next_decision_at() == pytest.approx(T0 + 1.625)
    assert ids_of(b.next_batch(T0 + 1.625)) == ["a"]


def test_shallow_queue_with_adaptive_off_uses_max_wait():
    b = make(max_batch_size=32, adaptive=False)
    add_many(b, 15)
    assert b.next_decision_at() == T0 + 5.0


# ------------------------------------------------------------------ grouping by key


@pytest.mark.parametrize(
    "other",
    [
        BatchKey(768, 512, 25, 7.5),  # width
        BatchKey(512, 768, 25, 7.5),  # height
        BatchKey(512, 512, 30, 7.5),  # steps
        BatchKey(512, 512, 25, 5.0),  # guidance
    ],
)
def test_incompatible_keys_never_share_a_batch(other):
    b = make(max_batch_size=8)
    b.add("a", KEY, None, T0)
    b.add("b", other, None, T0)
    first = b.next_batch(T0 + 5.0)
    second = b.next_batch(T0 + 5.0)
    assert ids_of(first) == ["a"] and first.key == KEY
    assert ids_of(second) == ["b"] and second.key == other
    assert b.next_batch(T0 + 5.0) is None


def test_each_group_has_its_own_window():
    b = make(max_batch_size=8, max_wait_time_s=5.0)
    other = BatchKey(1024, 1024, 25, 7.5)
    b.add("a", KEY, None, T0)
    b.add("b", other, None, T0 + 2.0)
    assert ids_of(b.next_batch(T0 + 5.0)) == ["a"]
    assert b.next_batch(T0 + 5.0) is None  # b's window ends at T0 + 7
    assert b.next_decision_at() == T0 + 7.0
    assert ids_of(b.next_batch(T0 + 7.0)) == ["b"]


def test_a_full_group_does_not_take_the_other_group_with_it():
    b = make(max_batch_size=2)
    other = BatchKey(1024, 1024, 25, 7.5)
    b.add("o", other, None, T0)
    add_many(b, 2, now=T0 + 1.0)
    assert ids_of(b.next_batch(T0 + 1.0)) == ["r0", "r1"]
    assert b.next_batch(T0 + 1.0) is None
    assert [p.request_id for p in b] == ["o"]


def test_when_several_groups_are_ready_the_oldest_request_goes_first():
    b = make(max_batch_size=8)
    k1, k2, k3 = BatchKey(512, 512, 25, 7.5), BatchKey(768, 768, 25, 7.5), BatchKey(1024, 1024, 25, 7.5)
    b.add("newer", k1, None, T0 + 2.0)  # inserted first, but arrived last
    b.add("oldest", k2, None, T0)
    b.add("middle", k3, None, T0 + 1.0)
    now = T0 + 10.0
    assert [ids_of(b.next_batch(now)) for _ in range(3)] == [["oldest"], ["middle"], ["newer"]]


def test_a_full_young_group_waits_behind_a_ready_older_group():
    b = make(max_batch_size=2)
    old = BatchKey(1024, 1024, 25, 7.5)
    b.add("old", old, None, T0)
    add_many(b, 2, now=T0 + 6.0)  # full, but "old" is ready too and arrived first
    assert ids_of(b.next_batch(T0 + 6.0)) == ["old"]
    assert ids_of(b.next_batch(T0 + 6.0)) == ["r0", "r1"]


# ------------------------------------------------------------------ taking a batch


def test_takes_at_most_max_batch_size_in_fifo_order_and_the_rest_keeps_its_arrival_time():
    b = make(max_batch_size=3, max_wait_time_s=5.0)
    for i in range(5):
        b.add(f"r{i}", KEY, None, T0 + i * 0.1)
    assert ids_of(b.next_batch(T0 + 0.4)) == ["r0", "r1", "r2"]
    remaining = list(b)
    assert [p.request_id for p in remaining] == ["r3", "r4"]
    assert remaining[0].arrived_at == T0 + 0.3
    assert b.queue_depth == 2
    # The remainder's window counts from r3's arrival, not from when the batch was taken.
    assert b.next_decision_at() == pytest.approx(T0 + 0.3 + 5.0)
    assert ids_of(b.next_batch(T0 + 5.3)) == ["r3", "r4"]


def test_max_batch_pixels_caps_large_images_to_one_per_batch():
    b = make(max_batch_size=8, max_batch_pixels=4 * 512 * 512)
    big = BatchKey(1024, 1024, 25, 7.5)
    add_many(b, 3, key=big)
    assert b.max_batch_size_for(big) == 1
    assert b.next_decision_at() == float("-inf")  # a "full" batch of one runs at once
    assert [ids_of(b.next_batch(T0)) for _ in range(3)] == [["r0"], ["r1"], ["r2"]]


def test_max_batch_pixels_lets_small_images_batch_up_to_the_budget():
    b = make(max_batch_size=8, max_batch_pixels=4 * 512 * 512)
    add_many(b, 6)
    assert b.max_batch_size_for(KEY) == 4
    assert ids_of(b.next_batch(T0)) == ["r0", "r1", "r2", "r3"]
    assert b.next_batch(T0) is None  # two left, waiting for their window


def test_max_batch_pixels_never_exceeds_max_batch_size():
    b = make(max_batch_size=2, max_batch_pixels=100 * 512 * 512)
    assert b.max_batch_size_for(KEY) == 2


def test_batching_disabled_runs_one_at_a_time_without_waiting():
    b = make(enable_batching=False, max_batch_size=8, max_wait_time_s=5.0)
    b.add("a", KEY, None, T0)
    b.add("b", KEY, None, T0 + 0.1)
    assert b.wait_time_s() == 0.0
    assert b.next_decision_at() <= T0
    assert ids_of(b.next_batch(T0 + 0.1)) == ["a"]
    assert ids_of(b.next_batch(T0 + 0.1)) == ["b"]
    assert b.next_batch(T0 + 0.1) is None


def test_batching_disabled_is_first_come_first_served_across_keys():
    b = make(enable_batching=False)
    other = BatchKey(1024, 1024, 25, 7.5)
    b.add("first", other, None, T0)
    b.add("second", KEY, None, T0 + 0.1)
    b.add("third", other, None, T0 + 0.2)
    assert [ids_of(b.next_batch(T0 + 1.0)) for _ in range(3)] == [["first"], ["second"], ["third"]]


# ------------------------------------------------------------------ bookkeeping


def test_cancel_removes_a_queued_request():
    b = make(max_batch_size=8)
    add_many(b, 3)
    assert b.cancel("r1") is True
    assert b.queue_depth == 2
    assert ids_of(b.next_batch(T0 + 5.0)) == ["r0", "r2"]


def test_cancel_of_the_last_request_of_a_group_drops_the_group():
    b = make()
    b.add("a", KEY, None, T0)
    assert b.cancel("a") is True
    assert b.next_decision_at() is None
    assert list(b) == []


def test_cancel_unknown_or_already_taken_returns_false():
    b = make(max_batch_size=1)
    assert b.cancel("nope") is False
    b.add("a", KEY, None, T0)
    b.next_batch(T0)
    assert b.cancel("a") is False


def test_duplicate_request_id_raises():
    b = make()
    b.add("a", KEY, None, T0)
    with pytest.raises(ValueError):
        b.add("a", BatchKey(1024, 1024, 25, 7.5), None, T0 + 1.0)
    assert b.queue_depth == 1


def test_a_taken_request_id_can_be_queued_again():
    b = make(max_batch_size=1)
    b.add("a", KEY, None, T0)
    b.next_batch(T0)
    b.add("a", KEY, None, T0 + 1.0)
    assert b.queue_depth == 1


def test_item_is_carried_through_to_the_batch():
    b = make(max_batch_size=1)
    payload = object()
    b.add("a", KEY, payload, T0)
    (pending,) = b.next_batch(T0).requests
    assert pending.item is payload and pending.key == KEY and pending.arrived_at == T0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"min_batch_size": 0},
        {"max_batch_size": 2, "min_batch_size": 3},
        {"min_wait_time_s": -0.1},
        {"max_wait_time_s": 1.0, "min_wait_time_s": 2.0},
        {"adaptive_threshold": 0},
    ],
)
def test_config_validation_rejects(kwargs):
    with pytest.raises(ValueError):
        BatchPolicyConfig(**kwargs)


def test_config_defaults_match_the_seed():
    c = BatchPolicyConfig()
    assert (c.enable_batching, c.max_batch_size, c.max_wait_time_s, c.adaptive, c.adaptive_threshold) == (
        True, 8, 5.0, True, 10)


def test_batch_wait_s_is_formation_time_minus_arrival():
    b = make(max_batch_size=8)
    b.add("a", KEY, None, T0)
    b.add("b", KEY, None, T0 + 3.0)
    batch = b.next_batch(T0 + 5.0)
    assert batch.formed_at == T0 + 5.0
    assert [batch.wait_s(p) for p in batch.requests] == pytest.approx([5.0, 2.0])
    assert len(batch) == 2


def test_batch_wait_s_of_a_standalone_batch():
    p = Pending("x", KEY, 10.0, None)
    assert Batch(KEY, (p,), 12.5).wait_s(p) == 2.5


def test_clear_drops_every_queued_request():
    batcher = Batcher(BatchPolicyConfig())
    batcher.add("a", BatchKey(64, 64, 4, 7.5), None, 0.0)
    batcher.add("b", BatchKey(128, 64, 4, 7.5), None, 0.0)
    assert batcher.clear() == 2
    assert batcher.queue_depth == 0 and batcher.next_decision_at() is None and batcher.next_batch(99.0) is None
