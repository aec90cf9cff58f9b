"""Unit tests of gpu_worker.decisions.policies (the default batching policy) and gpu_worker.decisions.cost_model.

Every method takes ``now``; the tests pass plain floats (a fake clock), so no test sleeps.
"""

from __future__ import annotations

import random

import pytest

from gpu_worker.decisions.batcher import Batch, Batcher, BatchKey, BatchPolicy, BatchPolicyConfig
from gpu_worker.decisions.cost_model import OnlineCostModel, SizeTable, work_units
from gpu_worker.decisions.policies import POLICY_NAMES, AdaptiveBatcher, HoldTuning, make_batcher

T0 = 1000.0
KEY = BatchKey(1024, 1024, 25, 5.0)
OTHER = BatchKey(512, 512, 25, 5.0)
GAP = HoldTuning().coalesce_gap_s


def make(tuning: HoldTuning | None = None, **overrides) -> AdaptiveBatcher[str]:
    config = BatchPolicyConfig(**{"max_batch_size": 8, **overrides})
    return AdaptiveBatcher(config=config, tuning=tuning or HoldTuning())


def ids_of(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [p.request_id for p in batch.requests]


def learn(b: AdaptiveBatcher, costs: dict[int, float], key: BatchKey = KEY) -> None:
    for size, seconds in costs.items():
        b.observe_batch(key, size, seconds, T0)


# launch-bound small batches, as SDXL on an H200 (docs/benchmarks.md): batch 2 costs about batch 1
SDXL_LIKE = {1: 2.0, 2: 2.05, 3: 2.95, 4: 3.9}
# no saving from batching at all
PROPORTIONAL = {1: 1.0, 2: 2.0, 3: 3.0}


# ------------------------------------------------------------------ a lone request, bursts


def test_lone_request_on_an_idle_gpu_starts_at_once_preemptible_until_its_hold_would_end():
    b = make(max_wait_time_s=5.0)
    b.add("a", KEY, "a", T0)
    assert b.next_decision_at() == pytest.approx(T0)
    batch = b.next_batch(T0 + 0.001)
    assert ids_of(batch) == ["a"] and batch.preemptible_until == pytest.approx(T0 + GAP)


def test_without_preemption_a_lone_request_waits_only_the_coalescing_gap():
    b = make(HoldTuning(preempt=False), max_wait_time_s=5.0)
    b.add("a", KEY, "a", T0)
    assert b.next_decision_at() == pytest.approx(T0 + GAP)
    assert b.next_batch(T0 + GAP * 0.99) is None
    batch = b.next_batch(T0 + GAP)
    assert ids_of(batch) == ["a"] and batch.preemptible_until is None


def test_coalescing_gap_shrinks_to_a_fraction_of_the_learned_batch1_time():
    b = make(HoldTuning(preempt=False))
    learn(b, {1: 0.25})  # a fast model: 2% of 0.25 s is 5 ms, less than the 20 ms default gap
    b.add("a", KEY, "a", T0)
    assert b.next_decision_at() == pytest.approx(T0 + 0.005)
    preempting = make()
    learn(preempting, {1: 0.25})
    preempting.add("a", KEY, "a", T0)
    # A preemptible start costs the lone request nothing: its window is the whole gap, uncapped.
    assert preempting.next_batch(T0).preemptible_until == pytest.approx(T0 + GAP)


def test_a_request_of_the_same_key_within_the_window_stops_the_lone_batch_and_joins_it():
    b = make()
    b.add("a", KEY, "a", T0)
    running = b.next_batch(T0)
    b.add("b", KEY, "b", T0 + 0.004)
    assert b.should_preempt(running, KEY, T0 + 0.004)
    b.requeue(running)  # the worker stopped it at a step boundary
    assert b.queue_depth == 2
    assert b.next_batch(T0 + 0.004 + GAP * 0.99) is None  # a group of two: the burst's coalescing hold
    merged = b.next_batch(T0 + 0.004 + GAP)
    assert ids_of(merged) == ["a", "b"] and merged.preemptible_until is None
    assert merged.wait_s(merged.requests[0]) == pytest.approx(0.004 + GAP)  # its wait counts from its arrival


def test_only_a_compatible_request_within_the_window_preempts():
    b = make(max_batch_size=8)
    b.add("a", KEY, "a", T0)
    running = b.next_batch(T0)
    assert not b.should_preempt(running, OTHER, T0 + 0.001)  # cannot share the inference
    assert not b.should_preempt(running, KEY, T0 + GAP * 1.01)  # too late: the batch is well under way
    single = make(max_batch_size=1)
    single.add("a", KEY, "a", T0)
    batch = single.next_batch(T0)
    assert batch.preemptible_until is None and not single.should_preempt(batch, KEY, T0)  # full already


def test_a_requeued_batch_goes_before_later_arrivals_and_groups():
    b = make()
    b.add("a", KEY, "a", T0)
    running = b.next_batch(T0)
    b.add("o", OTHER, "o", T0 + 0.001)
    b.add("b", KEY, "b", T0 + 0.002)
    b.requeue(running)
    assert [p.request_id for p in b] == ["a", "b", "o"]
    assert ids_of(b.next_batch(T0 + 1.0)) == ["a", "b"]
    b.requeue(Batch(KEY, (), T0))  # a stopped batch whose requests were all cancelled: nothing to queue
    assert b.queue_depth == 1 and [p.request_id for p in b] == ["o"]
    still_queued = next(iter(b))
    with pytest.raises(ValueError, match="already queued"):
        b.requeue(Batch(OTHER, (still_queued,), T0))
    assert b.queue_depth == 1  # unchanged by the refused requeue


def test_no_preemptible_start_when_the_hold_has_passed_or_for_the_seed_policy():
    b = make()
    b.add("a", KEY, "a", T0)
    assert b.next_batch(T0 + 1.0).preemptible_until is None  # waited behind another batch: nothing to stop for
    seed = Batcher(BatchPolicyConfig(max_batch_size=8, max_wait_time_s=0.0, min_wait_time_s=0.0))
    seed.add("a", KEY, "a", T0)
    batch = seed.next_batch(T0)
    assert batch.preemptible_until is None and not seed.should_preempt(batch, KEY, T0)
    unbatched = make(enable_batching=False)
    unbatched.add("a", KEY, "a", T0)
    assert unbatched.next_batch(T0).preemptible_until is None


def test_burst_arrivals_extend_the_hold_from_the_newest_arrival():
    b = make()
    for i, at in enumerate([T0, T0 + 0.010, T0 + 0.015]):
        b.add(f"r{i}", KEY, None, at)
    assert b.next_batch(T0 + 0.015 + GAP * 0.99) is None
    assert b.next_decision_at() == pytest.approx(T0 + 0.015 + GAP)
    assert ids_of(b.next_batch(T0 + 0.015 + GAP)) == ["r0", "r1", "r2"]


def test_hold_never_exceeds_max_wait_time_from_the_oldest_request():
    b = make(max_wait_time_s=0.05, min_wait_time_s=0.0, max_batch_size=100)
    for i in range(10):  # arrivals keep coming every 10 ms, each would extend the hold
        b.add(f"r{i}", KEY, None, T0 + 0.01 * i)
    assert b.next_decision_at() == pytest.approx(T0 + 0.05)
    assert len(b.next_batch(T0 + 0.05)) == 10


def test_full_group_runs_at_once():
    b = make(max_batch_size=4)
    for i in range(4):
        b.add(f"r{i}", KEY, None, T0)
    assert b.next_decision_at() == float("-inf")
    assert ids_of(b.next_batch(T0)) == ["r0", "r1", "r2", "r3"]
    assert b.queue_depth == 0


def test_a_batch_takes_at_most_max_batch_size_and_the_rest_stays():
    b = make(max_batch_size=4)
    for i in range(6):
        b.add(f"r{i}", KEY, None, T0)
    assert ids_of(b.next_batch(T0)) == ["r0", "r1", "r2", "r3"]
    assert b.queue_depth == 2
    assert b.next_batch(T0) is None  # two left: they get their own (short) hold
    assert ids_of(b.next_batch(T0 + GAP)) == ["r4", "r5"]


def test_without_coalescing_a_request_runs_the_moment_the_gpu_is_free():
    b = make(HoldTuning(coalesce=False, break_even=False))
    b.add("a", KEY, None, T0)
    assert ids_of(b.next_batch(T0)) == ["a"]


# ------------------------------------------------------------------ the break-even hold


def _with_gaps(b: AdaptiveBatcher, gap_s: float, n: int = 6) -> float:
    """Arrivals ``gap_s`` apart, each run at once in a batch of 1 (so the GPU is idle again);
    returns the time of the last one, which stays queued."""
    at = T0
    for i in range(n):
        b.add(f"h{i}", KEY, None, at)
        if i < n - 1:
            assert b.next_batch(at + 10.0) is not None
            at += gap_s
    return at


def test_break_even_wait_follows_the_cost_model():
    b = make()
    learn(b, SDXL_LIKE)
    # w < t(1) - t(2) + t(1)/2 = 2.0 - 2.05 + 1.0
    assert b.break_even_wait_s(KEY, 1) == pytest.approx(0.95)
    # w < t(2) - t(3) + t(1)/3: negative, a third request is never worth waiting for
    assert b.break_even_wait_s(KEY, 2) < 0


def test_frequent_arrivals_and_launch_bound_costs_hold_an_idle_gpu_for_a_batch_mate():
    b = make()
    learn(b, SDXL_LIKE)
    last = _with_gaps(b, 0.5)  # mean gap 0.5 s: hold = min(B, 2B - g) = min(0.95, 1.4)
    assert b.next_decision_at() == pytest.approx(last + 0.95)
    assert b.next_batch(last + 0.9) is None
    b.add("mate", KEY, None, last + 0.9)  # the mate came: two queued, nothing more worth waiting for
    assert ids_of(b.next_batch(last + 0.9 + GAP)) == ["h5", "mate"]


def test_the_hold_shortens_as_arrivals_get_sparser():
    b = make()
    learn(b, SDXL_LIKE)
    last = _with_gaps(b, 1.5)  # hold = 2B - g = 1.9 - 1.5 = 0.4
    assert b.next_decision_at() == pytest.approx(last + 0.4)


def test_sparse_arrivals_get_no_break_even_hold():
    b = make()
    learn(b, SDXL_LIKE)
    last = _with_gaps(b, 5.0)  # a mate would come too late to pay (2B - g < 0)
    assert b.next_decision_at() == pytest.approx(last)  # no hold: it starts at once (preemptible)


def test_no_hold_when_the_cost_model_shows_batching_saves_nothing():
    b = make()
    learn(b, PROPORTIONAL)
    last = _with_gaps(b, 0.01)
    assert b.break_even_wait_s(KEY, 1) < 0
    assert b.next_decision_at() == pytest.approx(last)  # no hold: it starts at once (preemptible)


def test_no_break_even_hold_before_costs_are_known():
    b = make()
    last = _with_gaps(b, 0.01)
    assert b.break_even_wait_s(KEY, 1) == 0.0
    assert b.next_decision_at() == pytest.approx(last)  # no hold: it starts at once (preemptible)


def test_break_even_hold_can_be_switched_off():
    b = make(HoldTuning(break_even=False))
    learn(b, SDXL_LIKE)
    last = _with_gaps(b, 0.5)
    assert b.next_decision_at() == pytest.approx(last)  # no hold: it starts at once (preemptible)


# ------------------------------------------------------------------ groups, limits, settings


def test_incompatible_keys_never_share_a_batch_and_the_oldest_group_runs_first():
    b = make()
    b.add("o1", OTHER, None, T0)
    b.add("k1", KEY, None, T0 + 0.001)
    b.add("o2", OTHER, None, T0 + 0.002)
    first, second = b.next_batch(T0 + 1), b.next_batch(T0 + 1)
    assert (first.key, ids_of(first)) == (OTHER, ["o1", "o2"])
    assert (second.key, ids_of(second)) == (KEY, ["k1"])


BUCKET = BatchKey(1152, 896, 25, 5.0)  # an SDXL aspect-ratio bucket: a size group of its own


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_full_batch_of_another_size_does_not_jump_a_request_that_has_waited_out_its_window(name):
    b = make_batcher(name, BatchPolicyConfig(max_batch_size=4, max_wait_time_s=5.0))
    b.add("lone", BUCKET, None, T0)
    for i in range(4):
        b.add(f"k{i}", KEY, None, T0 + 1.0 + 0.001 * i)  # a full batch, ready at once, but newer
    assert ids_of(b.next_batch(T0 + 5.0)) == ["lone"]
    assert ids_of(b.next_batch(T0 + 5.0)) == ["k0", "k1", "k2", "k3"]


def _serve_stream_and_one_bucket_request(name: str, batches: int = 12, lone_in_batch: int = 3):
    """One GPU, SDXL-like costs: a stream of 1024x1024 requests that fills every batch of 16 (16
    arrive, evenly spread, during each full batch), and one 1152x896 request that arrives halfway
    through batch ``lone_in_batch``. Returns the lone request's arrival, the start and requests of
    every batch, and the stream's batch time."""
    costs = {1: 2.02, 16: 14.65}  # seconds per batch of 1 and of 16 (sdxl-h200)
    full_s = costs[16]
    gap = full_s / 16
    arrivals = [(T0 + i * gap, KEY, f"k{i}") for i in range(16 * batches)]
    lone_at = T0 + (lone_in_batch - 0.5) * full_s
    arrivals = sorted(arrivals + [(lone_at, BUCKET, "lone")], key=lambda arrival: arrival[0])
    b = make_batcher(name, BatchPolicyConfig(max_batch_size=16, max_wait_time_s=5.0))
    for i in range(16):  # the stream is already flowing: a first full batch is queued at T0
        b.add(f"pre{i}", KEY, None, T0 - full_s + i * gap)
    now, started = T0, []
    while arrivals or b.queue_depth:
        while arrivals and arrivals[0][0] <= now:
            at, key, request_id = arrivals.pop(0)
            b.add(request_id, key, None, at)
        batch = b.next_batch(now)
        if batch is None:
            wake = b.next_decision_at()
            now = min(wake if wake is not None else float("inf"), arrivals[0][0] if arrivals else float("inf"))
            continue
        duration_s = costs[16] if len(batch) == 16 else costs[1] * len(batch)
        started.append((now, batch))
        now += duration_s
        b.observe_batch(batch.key, len(batch), duration_s, now)
    return lone_at, started, full_s


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_steady_stream_of_full_batches_cannot_starve_a_lone_request_of_another_size(name):
    """The rule for choosing among size groups (docs/batching.md): once a group may run (at the latest
    MAX_BATCH_WAIT_TIME after its oldest request arrived), only batches led by requests older than
    its oldest go before it. Here: the batch running when the lone request arrives, then one more
    batch of the stream (it holds the requests that arrived before the lone one), then the lone one."""
    lone_at, started, full_s = _serve_stream_and_one_bucket_request(name)
    (lone_start, _), = [(at, batch) for at, batch in started if batch.key == BUCKET]
    ahead = [batch for at, batch in started if lone_at <= at < lone_start]
    assert len(ahead) == 1 and ahead[0].key == KEY and len(ahead[0]) == 16
    assert min(p.arrived_at for p in ahead[0].requests) < lone_at  # led by a request older than it
    assert lone_start - lone_at <= 5.0 + 2 * full_s  # the bound: its window, the running batch and one more
    assert all(len(batch) == 16 for _, batch in started if batch.key == KEY)  # the stream filled every batch


def test_a_held_group_does_not_block_a_ready_one():
    b = make(HoldTuning(preempt=False))
    b.add("old", OTHER, None, T0)
    b.add("new", KEY, None, T0 + 1.0)
    assert ids_of(b.next_batch(T0 + 1.0)) == ["old"]
    assert b.next_batch(T0 + 1.0) is None


def test_max_batch_pixels_makes_large_images_form_smaller_batches():
    b = make(max_batch_size=8, max_batch_pixels=2 * 1024 * 1024)
    for i in range(3):
        b.add(f"r{i}", KEY, None, T0)
    assert b.max_batch_size_for(KEY) == 2 and b.max_batch_size_for(OTHER) == 8
    assert ids_of(b.next_batch(T0)) == ["r0", "r1"]


def test_group_below_min_batch_size_waits_max_wait_time():
    b = make(min_batch_size=3, max_wait_time_s=5.0)
    b.add("a", KEY, None, T0)
    assert b.next_decision_at() == T0 + 5.0
    assert b.next_batch(T0 + 4.99) is None
    b.add("b", KEY, None, T0 + 1.0)
    b.add("c", KEY, None, T0 + 1.0)  # min reached: the ordinary hold applies
    assert b.next_decision_at() == pytest.approx(T0 + 1.0 + GAP)


def test_batching_disabled_runs_one_request_at_a_time_without_waiting():
    b = make(enable_batching=False)
    b.add("a", KEY, None, T0)
    b.add("b", KEY, None, T0)
    assert ids_of(b.next_batch(T0)) == ["a"]
    assert ids_of(b.next_batch(T0)) == ["b"]


def test_cancel_clear_and_duplicates():
    b = make()
    b.add("a", KEY, None, T0)
    b.add("b", KEY, None, T0)
    with pytest.raises(ValueError):
        b.add("a", KEY, None, T0)
    assert b.cancel("a") and not b.cancel("a") and not b.cancel("zzz")
    assert b.queue_depth == 1 and [p.request_id for p in b] == ["b"]
    assert b.clear() == 1 and b.queue_depth == 0
    assert b.next_decision_at() is None and b.next_batch(T0 + 100) is None


def test_cancelling_the_last_request_of_a_group_removes_the_group():
    b = make()
    b.add("a", KEY, None, T0)
    b.cancel("a")
    assert b.next_decision_at() is None


def test_lower_max_batch_size_after_out_of_memory():
    b = make(max_batch_size=8, min_batch_size=6)
    assert b.lower_max_batch_size(4) == 4
    assert b.config.max_batch_size == 4 and b.config.min_batch_size == 4
    assert b.lower_max_batch_size(16) == 4  # never raised
    assert b.lower_max_batch_size(0) == 1


def test_make_batcher_selects_the_policy():
    config = BatchPolicyConfig()
    assert type(make_batcher("window", config)) is Batcher
    assert type(make_batcher("seed", config)) is Batcher  # the window rule's earlier name still works
    assert type(make_batcher("default", config)) is AdaptiveBatcher
    with pytest.raises(ValueError, match="window"):
        make_batcher("fastest", config)


def test_the_decision_instant_always_yields_a_batch():
    """The worker sleeps until next_decision_at(): at that instant, with no arrival in between,
    next_batch must answer with a batch (or the loop would spin or stall)."""
    rng = random.Random(7)
    b = make(max_batch_size=4, max_wait_time_s=1.0)
    learn(b, SDXL_LIKE)
    now, served = T0, 0
    for i in range(300):
        now += rng.expovariate(2.0)
        b.add(f"r{i}", rng.choice([KEY, OTHER]), None, now)
        while b.queue_depth and rng.random() < 0.5:
            wake = b.next_decision_at()
            assert wake is not None
            now = max(now, wake)
            batch = b.next_batch(now)
            assert batch is not None, f"no batch at the decision instant {wake}"
            served += len(batch)
    assert served + b.queue_depth == 300


# ------------------------------------------------------------------ the online cost model


def test_size_table_interpolates_and_extrapolates_proportionally():
    table = SizeTable(alpha=1.0)
    table.observe(2, 2.0)
    table.observe(6, 4.0)
    assert table.estimate(4) == pytest.approx(3.0)
    assert table.estimate(1) == pytest.approx(1.0)  # proportional below the smallest size seen
    assert table.estimate(12) == pytest.approx(8.0)  # and above the largest
    assert SizeTable(alpha=1.0).estimate(3) is None


def test_cost_model_averages_observations():
    model = OnlineCostModel(alpha=0.5)
    model.observe(KEY, 4, 4.0)
    model.observe(KEY, 4, 2.0)
    assert model.estimate_s(KEY, 4) == pytest.approx(3.0)
    model.observe(KEY, 4, -1.0)  # a failed batch says nothing
    assert model.estimate_s(KEY, 4) == pytest.approx(3.0)


def test_an_unseen_key_borrows_other_keys_costs_scaled_by_work():
    model = OnlineCostModel(alpha=1.0)
    model.observe(KEY, 2, 4.0)
    assert not model.knows(OTHER)
    assert model.estimate_s(OTHER, 2) == pytest.approx(4.0 * work_units(OTHER) / work_units(KEY))
    assert OnlineCostModel().estimate_s(KEY, 1) is None


def test_work_units_count_pixels_steps_and_cfg_rows():
    assert work_units(BatchKey(512, 512, 20, 1.0)) * 2 == work_units(BatchKey(512, 512, 20, 7.5))
    assert work_units(BatchKey(1024, 1024, 25, 5.0)) == 4 * work_units(BatchKey(512, 512, 25, 5.0))


def test_batch_policy_setting_defaults_to_run_to_completion_and_rejects_unknown_names():
    from gpu_worker.config import WorkerSettings
    from imagegen import settings as settings_lib

    assert settings_lib.load(WorkerSettings, [], {}).batch_policy == "run-to-completion"
    assert settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "default"}).batch_policy == "run-to-completion"
    assert settings_lib.load(WorkerSettings, ["--batch-policy", "window"], {}).batch_policy == "window"
    assert settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "seed"}).batch_policy == "window"  # an alias
    with pytest.raises(settings_lib.SettingsError, match="BATCH_POLICY"):
        settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "fastest"})


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_implements_the_whole_batch_policy_interface(name):
    batcher = make_batcher(name, BatchPolicyConfig(max_batch_size=4))
    assert isinstance(batcher, BatchPolicy)  # the worker calls every method directly
    batcher.observe_batch(KEY, 1, 0.5, T0)  # the window rule ignores it; the default learns from it
    assert batcher.config.max_batch_size == 4
