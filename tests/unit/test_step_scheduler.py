"""The step policy (gpu_worker/decisions/step_scheduler.py) with a fake clock: no torch, no asyncio."""

from __future__ import annotations

import pytest

from gpu_worker.decisions.policies import STEP, make_batcher
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.decisions.step_scheduler import StepRequest, StepScheduler, StepTuning
from imagegen.batch_key import BatchKey
from simulator import costs as cost_models

KEY = BatchKey(1024, 1024, 25, 5.0)
SHAPE = (1024, 1024)


def scheduler(**tuning) -> StepScheduler:
    """Step costs of SDXL on the H200 table: batch 2 costs what batch 1 does, then near-linear."""
    sched = StepScheduler(StepTuning(**{"max_rows": 16, **tuning}))
    model = cost_models.StepCostModel(cost_models.SDXL_H200)
    for rows in range(1, 33):
        sched.observe_step(SHAPE, rows, model.step_s(SHAPE, max(1, rows // 2), rows))
    return sched


def req(rid: str, key: BatchKey = KEY, priority: str = "normal") -> StepRequest:
    return StepRequest(rid, key, None, priority)


def run_steps(sched: StepScheduler, now: float, n: int, step_s: float = 0.1) -> float:
    for _ in range(n):
        plan = sched.plan(now)
        sched.decoded(plan.decode)
        now += step_s
        sched.step_done(plan.advance, step_s, now)
    return now


def test_a_lone_request_is_encoded_at_once_then_stepped_and_decoded_after_its_last_step():
    sched = scheduler()
    sched.add(req("a"), 0.0)
    plan = sched.plan(0.0)
    assert plan.admit == ("a",) and plan.advance == () and not plan.idle  # its prompt first
    plan = sched.plan(0.01)
    assert plan.advance == ("a",) and plan.admit == () and plan.shape == SHAPE
    now = run_steps(sched, 0.01, 25)
    plan = sched.plan(now)
    assert plan.decode == ("a",) and plan.advance == ()


def test_rows_of_different_steps_and_guidance_share_a_step():
    sched = scheduler()
    for rid, key in (("a", KEY), ("b", BatchKey(1024, 1024, 10, 5.0)), ("c", BatchKey(1024, 1024, 50, 7.5))):
        sched.add(req(rid, key), 0.0)
    assert set(sched.plan(0.0).admit) == {"a", "b", "c"}
    assert set(sched.plan(0.01).advance) == {"a", "b", "c"}


def test_a_burst_landing_while_its_first_row_is_encoded_joins_before_the_first_step():
    sched = scheduler()
    sched.add(req("a"), 0.0)
    assert sched.plan(0.0).admit == ("a",)
    for i in range(15):
        sched.add(req(f"b{i}"), 0.002 * (i + 1))
    plan = sched.plan(0.03)
    assert len(plan.admit) == 15 and plan.advance == ()
    plan = sched.plan(0.1)
    assert len(plan.advance) == 16 and plan.admit == ()


def test_a_burst_landing_just_after_the_first_step_joins_at_the_next_boundary():
    sched = scheduler()
    sched.add(req("a"), 0.0)
    sched.plan(0.0)
    sched.plan(0.001)
    sched.add(req("b"), 0.015)  # within 20 ms of a: the same burst
    sched.step_done(("a",), 0.08, 0.08)
    plan = sched.plan(0.08)
    assert set(plan.advance) == {"a", "b"} and plan.admit == ("b",)


@pytest.mark.parametrize("uniform_as_batches", [True, False])
def test_under_a_backlog_a_newcomer_waits_for_the_cohort_instead_of_slowing_it(uniform_as_batches):
    sched = scheduler(uniform_as_batches=uniform_as_batches)  # rule 0, or the merge gain (rule 2)
    for i in range(8):
        sched.add(req(f"a{i}"), 0.0)
    sched.plan(0.0)
    now = run_steps(sched, 0.0, 5)
    sched.add(req("late"), now)
    sched.add(req("later", BatchKey(768, 768, 25, 5.0)), now)  # another shape waits too
    assert "late" not in sched.plan(now).advance


def test_a_cancelled_row_is_left_out_of_the_very_next_step():
    sched = scheduler()
    for rid in ("a", "b", "c"):
        sched.add(req(rid), 0.0)
    now = run_steps(sched, 0.0, 3)
    assert sched.cancel("b", now)
    plan = sched.plan(now)
    assert ("b", "cancelled") in plan.drop and "b" not in plan.advance and set(plan.advance) == {"a", "c"}
    assert not sched.cancel("b", now)  # forgotten


def test_a_row_past_its_deadline_is_dropped():
    sched = scheduler()
    sched.add(StepRequest("a", KEY, None, "normal", "", deadline_at=1.0), 0.0)
    sched.plan(0.0)
    assert ("a", "deadline") in sched.plan(1.5).drop


def test_a_high_priority_arrival_pauses_lower_rows_and_they_resume_after():
    sched = scheduler()
    for i in range(8):
        sched.add(req(f"n{i}"), 0.0)
    now = run_steps(sched, 0.0, 3)
    sched.add(req("vip", priority="high"), now)
    plan = sched.plan(now)
    assert "vip" in plan.advance and len(plan.advance) <= 2  # plus at most a free rider
    assert len(plan.pause) >= 7
    now = run_steps(sched, now, 26)
    plan = sched.plan(now)
    assert {f"n{i}" for i in range(8)} & set(plan.advance)  # the paused rows resume


def test_a_step_out_of_memory_halves_its_shape_and_the_rows_left_out_pause_then_finish():
    sched = scheduler()
    for i in range(8):
        sched.add(req(f"a{i}"), 0.0)
    assert sched.plan(0.0).idle  # held 20 ms for more of the burst, as run-to-completion holds it
    sched.plan(0.02)
    plan = sched.plan(0.03)
    assert len(plan.advance) == 8
    assert sched.out_of_memory(plan.advance) == 4  # the step did not happen: no step_done
    plan = sched.plan(0.04)
    assert plan.advance == ("a0", "a1", "a2", "a3") and set(plan.pause) == {"a4", "a5", "a6", "a7"}
    assert sched.max_rows(SHAPE) == 4 and sched.max_rows((768, 768)) == 16  # other shapes keep their limit
    assert sched.out_of_memory(plan.advance) == 2
    plan = sched.plan(0.05)
    assert plan.advance == ("a0", "a1") and set(plan.pause) == {"a2", "a3"}
    # From then on every row still gets its 25 steps, two at a time, and nothing runs above the limit.
    finished: set[str] = set()
    now = 0.05
    for _ in range(200):
        assert len(plan.advance) <= 2
        finished.update(plan.decode)
        sched.decoded(plan.decode)
        if plan.idle:
            break
        now += 0.1
        sched.step_done(plan.advance, 0.1, now)
        plan = sched.plan(now)
    assert finished == {f"a{i}" for i in range(8)}
    assert not sched.rows


def test_a_lone_row_out_of_memory_cannot_be_split():
    sched = scheduler()
    sched.add(req("a"), 0.0)
    sched.plan(0.0)
    plan = sched.plan(0.01)
    assert sched.out_of_memory(plan.advance) is None and sched.max_rows(SHAPE) == 16


def test_aging_lifts_a_low_row_to_normal_but_never_above():
    sched = scheduler(aging_lones=1.0)
    sched.add(req("low", priority="low"), 0.0)
    row = sched.rows["low"]
    lone_s = sched.aging_period_s(KEY)
    assert sched.rank(row, 0.0)[0] == 2
    assert sched.rank(row, 1.01 * lone_s)[0] == 1
    assert sched.rank(row, 100 * lone_s)[0] == 1  # a high arrival still goes first


def test_an_old_low_row_runs_before_a_newer_normal_one():
    sched = scheduler(aging_lones=1.0)
    sched.add(req("low", priority="low"), 0.0)
    sched.add(req("normal", BatchKey(768, 768, 25, 5.0)), 100.0)
    assert sched.plan(100.0).admit == ("low",)


def test_the_merge_gain_counts_the_summed_completion_time():
    sched = scheduler()
    for i in range(4):
        sched.add(req(f"a{i}"), 0.0)
    sched.plan(0.0)
    cohort = [sched.rows[f"a{i}"] for i in range(4)]
    sched.add(req("n"), 0.0)
    gain = sched._merge_gain(cohort, [sched.rows["n"]])
    assert gain is not None and gain < 0  # near-linear steps: joining costs the cohort more than it saves


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_the_merge_gain_weighs_the_seconds_of_rows_already_late(power):
    """A short newcomer behind long rows lowers the summed latency whether or not those rows are late;
    raised to the power 2, the seconds it costs rows that have waited 20 s outweigh what it saves."""
    gains = {}
    for age in (0.0, 20.0):
        sched = scheduler(latency_power=power)
        for i in range(4):
            sched.add(req(f"a{i}", BatchKey(1024, 1024, 50, 5.0)), 100.0 - age)
            sched.rows[f"a{i}"].steps_done = 10
        sched.add(req("n", BatchKey(1024, 1024, 10, 5.0)), 100.0)
        cohort = [sched.rows[f"a{i}"] for i in range(4)]
        gains[age] = sched._merge_gain(cohort, [sched.rows["n"]], (), 100.0)
    assert gains[0.0] > 0
    assert (gains[20.0] > 0) if power == 1.0 else (gains[20.0] < 0)


def test_uniform_traffic_holds_a_group_for_batch_mates_as_run_to_completion_does():
    sched = scheduler()
    sched.add(req("a"), 0.0)
    sched.add(req("b"), 0.0)
    plan = sched.plan(0.0)
    assert plan.idle and plan.wake_at == pytest.approx(0.02)  # run-to-completion's coalescing hold
    assert set(sched.plan(0.02).admit) == {"a", "b"}


@pytest.mark.parametrize("other_key_seen", [False, True])
def test_uniform_traffic_keeps_a_running_cohort_as_its_batch(other_key_seen):
    """A newcomer of the same key waits for the cohort to end, as for run-to-completion's next batch,
    although joining a lone row is free on these costs; once another key arrived among the latest
    requests the step rules apply and it joins."""
    sched = scheduler()
    if other_key_seen:
        sched.add(req("x", BatchKey(1024, 1024, 10, 5.0)), 0.0)
        now = run_steps(sched, 0.0, 14)
        assert not sched.plan(now).advance and not sched.rows  # x decoded, nothing held
    else:
        now = 0.0
    sched.add(req("a"), now)
    now = run_steps(sched, now, 6)
    sched.add(req("b"), now)
    assert ("b" in sched.plan(now).advance) is other_key_seen


def test_step_is_not_a_batcher_and_the_worker_runs_it_in_its_step_loop():
    from gpu_worker.config import WorkerSettings
    from imagegen import settings as settings_lib

    with pytest.raises(ValueError, match="step-level engine"):
        make_batcher(STEP, BatchPolicyConfig())
    assert settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "step"}).batch_policy == STEP
