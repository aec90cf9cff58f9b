"""Work nobody waits for stops at the next denoising step; admission refuses what cannot finish in
time; the broker answers a late request itself, saying where it was.

The decisions are pure and run on a fake clock here (gpu_worker.decisions.preemption.abandon_decision,
ProgressLimiter, broker.admission.Admission, broker.state.BrokerState's deadlines); the worker's shell
runs in this process with the FAKE backend standing in for GPU time (tests/support/offline_worker.py).
Real processes: tests/e2e/test_abandoned_work.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.admission import Admission, WorkerSpeed
from broker.state import BrokerPolicy, BrokerState, ToClient, ToWorker
from gpu_worker.decisions.batcher import Batcher, BatchKey, BatchPolicyConfig
from gpu_worker.decisions.cost_model import work_units
from gpu_worker.decisions.preemption import AbandonDecision, BatchPreempted, Preemption, ProgressLimiter, abandon_decision
from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.model.pipelines import seconds_per_work_unit
from imagegen import protocol
from imagegen.protocol import BatchingConfig, Cancel, Failure, Generate, GenerationParams, Progress, Register, Result
from tests.support.clock import Clock
from tests.support.offline_worker import close_offline_worker, offline_worker


# ------------------------------------------------------------------ the abandoned-rows decision


@pytest.mark.parametrize("rows, unwanted, done, total, expected", [
    (1, 1, 0, 50, AbandonDecision.STOP),  # nobody wants the only row
    (4, 4, 49, 50, AbandonDecision.STOP),  # nobody wants any row, even one step before the end
    (4, 0, 10, 50, AbandonDecision.CONTINUE),  # everyone is wanted
    (2, 1, 0, 50, AbandonDecision.STOP_AND_REQUEUE),  # half the batch gone at the start: 50 < 100 row-steps
    (2, 1, 24, 50, AbandonDecision.STOP_AND_REQUEUE),  # 50 < 2 x 26
    (2, 1, 25, 50, AbandonDecision.CONTINUE),  # 50 == 2 x 25: finishing is no dearer
    (10, 9, 40, 50, AbandonDecision.STOP_AND_REQUEUE),  # one wanted row of ten: 50 < 100
    (10, 9, 46, 50, AbandonDecision.CONTINUE),  # nearly done: 50 > 40
    (8, 1, 0, 50, AbandonDecision.STOP_AND_REQUEUE),  # at the start: 350 row-steps to restart < 400 to finish
    (8, 1, 10, 50, AbandonDecision.CONTINUE),  # 350 > 320
])
def test_the_abandoned_rows_decision(rows, unwanted, done, total, expected):
    assert abandon_decision(rows, unwanted, done, total) is expected


def test_a_batch_stops_at_the_step_after_its_only_row_is_abandoned():
    gate = Preemption(None, Clock(), rows=1, steps=10)
    gate.before_step(lambda: None)
    gate.before_step(lambda: None)
    gate.abandon(0)
    with pytest.raises(BatchPreempted):
        gate.before_step(lambda: None)
    assert gate.decision is AbandonDecision.STOP and gate.steps_checked == 3 and gate.steps_done == 2


def test_a_batch_with_one_row_of_two_abandoned_late_runs_on():
    gate = Preemption(None, Clock(), rows=2, steps=10)
    for _ in range(7):
        gate.before_step(lambda: None)
    gate.abandon(1)
    gate.before_step(lambda: None)  # 7 steps done: restarting 1 row for 10 steps costs more than 2 x 3
    assert gate.decision is None and gate.unwanted == {1}


def test_every_batch_waits_for_the_device_before_each_step_not_only_in_the_preemption_window():
    clock, syncs = Clock(), []
    gate = Preemption(None, clock, rows=1, steps=3)  # never preemptible for newcomers
    for _ in range(3):
        gate.before_step(lambda: syncs.append(1))
    assert syncs == [1, 1, 1]


def test_an_abandon_landing_while_the_device_is_waited_for_stops_that_step():
    gate = Preemption(None, Clock(), rows=1, steps=3)
    with pytest.raises(BatchPreempted):
        gate.before_step(lambda: gate.abandon(0))


def test_progress_is_reported_per_step_after_the_first():
    steps: list[int] = []
    gate = Preemption(None, Clock(), rows=1, steps=3, on_step=steps.append)
    for _ in range(3):
        gate.before_step(lambda: None)
    assert steps == [1, 2]  # before steps 2 and 3; the last step's end is the result


def test_the_progress_limiter_lets_one_message_per_interval_per_request_through():
    clock = Clock(100.0)
    limiter = ProgressLimiter(0.5, clock)
    assert limiter.allow("a") and limiter.allow("b")  # each request's first always goes
    clock.now = 100.4
    assert not limiter.allow("a")
    clock.now = 100.5
    assert limiter.allow("a") and not limiter.allow("a")
    limiter.forget("a")
    assert limiter.allow("a")


def test_the_marginal_cost_per_work_unit_leaves_fixed_costs_out():
    # 10 ms of overhead per step plus 1 s per work unit (megapixel x CFG row): 64x64 and 128x128.
    small_px, large_px = 64 * 64, 128 * 128
    small_s, large_s = 0.01 + small_px * 2 / 1e6, 0.01 + large_px * 2 / 1e6
    assert seconds_per_work_unit(small_px, small_s, large_px, large_s) == pytest.approx(1.0)
    # Noise made the large step no slower: half the large size's average, the cheap side.
    assert seconds_per_work_unit(small_px, 0.05, large_px, 0.04) == pytest.approx(0.5 * 0.04 / (large_px * 2 / 1e6))


# ------------------------------------------------------------------ admission


SMALL = BatchKey(512, 512, 25, 7.5)
HUGE = BatchKey(2048, 2048, 150, 7.5)
ONE = [WorkerSpeed("w1")]


def test_nothing_is_refused_before_anything_was_measured():
    admission = Admission()
    assert admission.decide(HUGE, 30.0, 1e9, ONE, now=0.0).code is None


def test_a_request_that_alone_exceeds_its_deadline_is_too_costly_naming_both_figures():
    admission = Admission()
    workers = [WorkerSpeed("w1", registered_s_per_unit=0.5)]
    verdict = admission.decide(HUGE, 30.0, 0.0, workers, now=0.0)
    expected = 0.5 * work_units(HUGE) * 0.5  # the discount halves the measured cost
    assert verdict.code == "too_costly" and verdict.estimate_s == pytest.approx(expected)
    assert f"about {expected:.0f} s" in verdict.message and "30 s" in verdict.message
    assert "fewer steps or a smaller size" in verdict.message
    assert admission.decide(SMALL, 30.0, 0.0, workers, now=0.0).code is None


def test_the_fastest_worker_and_each_workers_cheaper_figure_count():
    admission = Admission()
    admission.observe("slow", SMALL, 1, 100.0, now=0.0)
    admission.observe("fast", SMALL, 4, 4.0, now=0.0)  # a batch of 4 in 4 s: 1 s per image
    workers = [WorkerSpeed("slow", 10.0), WorkerSpeed("fast", 10.0)]
    assert admission.seconds_per_unit(workers, now=1.0) == pytest.approx(1.0 / work_units(SMALL))


def test_a_worker_that_became_slower_is_not_held_to_an_old_figure_for_ever():
    admission = Admission(memory_s=600.0)
    admission.observe("w1", SMALL, 1, 1.0, now=0.0)
    admission.observe("w1", SMALL, 1, 5.0, now=10.0)  # slower, but the fast one is recent: kept
    assert admission.seconds_per_unit(ONE, now=10.0) == pytest.approx(1.0 / work_units(SMALL))
    admission.observe("w1", SMALL, 1, 5.0, now=700.0)  # the fast figure is older than the memory
    assert admission.seconds_per_unit(ONE, now=700.0) == pytest.approx(5.0 / work_units(SMALL))


def test_a_request_that_fits_alone_but_not_behind_the_queue_is_told_when_to_retry():
    admission = Admission()
    workers = [WorkerSpeed("w1", registered_s_per_unit=1.0)]
    own = work_units(SMALL) * 0.5  # 6.55 s
    verdict = admission.decide(SMALL, 30.0, units_ahead=10 * work_units(SMALL), workers=workers, now=0.0)
    assert verdict.code == "overloaded"
    assert verdict.retry_after_s == pytest.approx(-(-(own + 10 * own - 30.0) // 1))
    # Two workers share what is ahead: now it fits.
    two = workers + [WorkerSpeed("w2", registered_s_per_unit=1.0)]
    assert admission.decide(SMALL, 30.0, 3 * work_units(SMALL), two, now=0.0).code is None


# ------------------------------------------------------------------ the broker: late requests and refusals


W1, CLIENT, T0 = b"w1", b"gateway", 1000.0


def reg(name: str = "w1", cost: float = 0.0) -> Register:
    return Register(name, "host", 0, 1, "tiny", "cpu", 4, BatchingConfig(True, 4, 0.05, 1, 0.05, True, 10),
                    seconds_per_work_unit=cost)


def gen(request_id: str, deadline_s: float = 30.0, size: int = 512, steps: int = 25) -> Generate:
    return Generate(request_id, GenerationParams("a cat", size, size, steps, 7.5, 1, None), deadline_s)


def broker(**policy) -> BrokerState:
    return BrokerState(BrokerPolicy(**policy), "epoch")


def test_a_dispatched_request_past_its_deadline_is_answered_and_its_worker_told_to_drop_it():
    s = broker()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.progress(W1, Progress("r1", 7, 25), T0 + 10)
    actions = s.expire_deadlines(T0 + 30.5)
    (answer,) = [a for a in actions if isinstance(a, ToClient)]
    assert answer.message.code == "deadline_exceeded"
    assert "being generated on worker w1 (step 7 of 25)" in answer.message.message
    assert ToWorker(W1, Cancel("r1")) in actions
    assert "r1" not in s.requests and not s.workers[W1].in_flight


def test_a_paused_request_past_its_deadline_is_answered_saying_it_was_paused():
    s = broker()
    s.register(W1, reg(), T0)
    s.submit(CLIENT, gen("r1"), T0)
    s.progress(W1, Progress("r1", 7, 25, paused=True), T0 + 10)
    (answer,) = [a for a in s.expire_deadlines(T0 + 30.5) if isinstance(a, ToClient)]
    assert "while it was paused on worker w1 (step 7 of 25)" in answer.message.message


def test_the_late_answer_says_queued_at_the_worker_or_at_the_broker_or_no_worker():
    s = broker()
    s.submit(CLIENT, gen("lonely"), T0)
    (answer,) = s.expire_deadlines(T0 + 31)
    assert "queued at the broker: no GPU worker is registered" in answer.message.message
    s.register(W1, reg(), T0 + 31)
    s.submit(CLIENT, gen("r1"), T0 + 31)
    (cancel, answer) = s.expire_deadlines(T0 + 62)
    assert cancel == ToWorker(W1, Cancel("r1")) and "still queued at worker w1" in answer.message.message


def test_a_request_the_fastest_worker_could_not_finish_in_time_is_refused_at_once():
    s = broker()
    s.register(W1, reg(cost=0.5), T0)
    (answer,) = s.submit(CLIENT, gen("huge", 30.0, size=2048, steps=150), T0)
    assert answer.message.code == "too_costly" and "about" in answer.message.message
    assert "huge" not in s.requests and s.counters.rejected_too_costly == 1
    assert s.submit(CLIENT, gen("small", 30.0), T0)[0].message.request_id == "small"  # dispatched


def test_a_request_behind_too_much_queued_work_gets_overloaded_with_a_retry_after():
    s = broker()
    s.register(W1, reg(cost=1.0), T0)  # a 512x512 25-step request: about 6.6 s (discounted)
    answers = [s.submit(CLIENT, gen(f"r{i}", 30.0), T0) for i in range(8)]
    refused = [a[0].message for a in answers if a and isinstance(a[0], ToClient)]
    assert refused and all(f.code == "overloaded" and f.retry_after_s >= 1 for f in refused)
    assert s.counters.rejected_behind_queue == len(refused) and len(s.requests) == 8 - len(refused)


def test_cancelled_work_is_not_counted_ahead_of_the_next_arrival_in_the_same_instant():
    """Admission sums the held work at most every UNITS_AHEAD_RECOMPUTE_S: a cancelled request must
    leave that sum at once, or a request sent right after the cancel is refused for it."""
    s = broker()
    s.register(W1, reg(cost=1.0), T0)
    long = Generate("long", GenerationParams("a cat", 512, 512, 150, 7.5, 1, None), 300.0)
    assert s.submit(CLIENT, long, T0) and "long" in s.requests  # dispatched: about 40 s of work
    assert s.submit(CLIENT, gen("behind", 30.0), T0)[0].message.code == "overloaded"
    s.cancel(CLIENT, Cancel("long"), T0)
    assert s.units_ahead(T0, "tiny") == 0.0  # the same instant: no new sum, the cancelled work gone
    accepted = s.submit(CLIENT, gen("next", 30.0), T0)
    assert "next" in s.requests and s.counters.rejected_behind_queue == 1, accepted


def test_a_registration_of_an_older_worker_without_a_cost_still_decodes():
    frames = protocol.encode(protocol.WORKER_LINK, reg())
    header = protocol.unpack_header(frames[2])
    del header["seconds_per_work_unit"]
    frames[2] = protocol.msgpack.packb(header)
    message, _ = protocol.decode(frames, protocol.WORKER_LINK)
    assert message.seconds_per_work_unit == 0.0


# ------------------------------------------------------------------ the worker's shell (FAKE backend for GPU time)


STEP_S = 0.05


def request(index: int, steps: int = 40, deadline_s: float = 60.0) -> Generate:
    return Generate(f"request-{index}", GenerationParams(f"prompt {index}", 64, 64, steps, 7.5, index), deadline_s)


def make_worker(max_batch_size: int = 4, min_batch_size: int = 1):
    config = BatchPolicyConfig(max_batch_size=max_batch_size, min_batch_size=min_batch_size,
                               max_wait_time_s=0.3, min_wait_time_s=0.0)
    backend = FakeBackend(step_delay_s=STEP_S)  # FAKE: stands in for GPU time, not for the pipeline
    worker = offline_worker(backend, config, Batcher(config), capacity=16)
    sent: list = []
    worker.link.send = lambda message, payload=(): sent.append(message)
    return worker, backend, sent


async def drive(worker, sent: list, arrivals: list, until) -> None:
    worker.loop = asyncio.get_running_loop()
    loop_task = asyncio.create_task(worker._batch_loop())
    began = time.monotonic()
    for at_s, message in arrivals:
        await asyncio.sleep(max(0.0, began + at_s - time.monotonic()))
        worker._on_message(message)
    deadline = time.monotonic() + 30
    while not until(sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    worker.state = "draining"
    worker.arrival.set()
    await asyncio.wait_for(loop_task, 30)
    if worker.delivery_tasks:
        await asyncio.wait(worker.delivery_tasks, timeout=30)


def results(sent: list) -> list[Result]:
    return [m for m in sent if isinstance(m, Result)]


def test_a_cancelled_lone_batch_stops_at_its_next_step_and_the_next_request_runs(caplog):
    worker, backend, sent = make_worker()
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            asyncio.run(drive(worker, sent, [(0.0, request(0)), (0.3, request(1, steps=2)), (0.5, Cancel("request-0"))],
                              until=lambda s: len(results(s)) >= 1))
    finally:
        close_offline_worker(worker)
    assert [r.request_id for r in results(sent)] == ["request-1"]
    assert "no request in it is wanted any more" in caplog.text
    stopped_at = worker.counters.sum_stopped_ms / 1000
    assert stopped_at < 40 * STEP_S  # stopped, not run to its end (the order shows it too)


def test_a_running_row_past_its_own_deadline_is_dropped_and_answered(caplog):
    worker, backend, sent = make_worker()
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            asyncio.run(drive(worker, sent, [(0.0, request(0, steps=80, deadline_s=0.5)), (0.1, request(1, steps=2))],
                              until=lambda s: len(results(s)) >= 1))
    finally:
        close_offline_worker(worker)
    late = [m for m in sent if isinstance(m, Failure)]
    assert [(f.request_id, f.code) for f in late] == [("request-0", "deadline_exceeded")]
    assert [r.request_id for r in results(sent)] == ["request-1"]
    assert "passed its deadline while its batch runs" in caplog.text


def test_a_batch_that_lost_one_row_early_restarts_the_other_alone(caplog):
    worker, backend, sent = make_worker(min_batch_size=2)
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            asyncio.run(drive(worker, sent, [(0.0, request(0)), (0.0, request(1)), (0.5, Cancel("request-0"))],
                              until=lambda s: len(results(s)) >= 1))
    finally:
        close_offline_worker(worker)
    assert backend.batch_sizes == [2, 1]
    assert [(r.request_id, r.batch_size) for r in results(sent)] == [("request-1", 1)]
    assert "restart without the others" in caplog.text


def test_a_batch_that_lost_one_row_late_finishes_and_drops_that_rows_image(caplog):
    worker, backend, sent = make_worker(min_batch_size=2)
    try:
        with caplog.at_level("INFO", logger="gpu_worker.shell.worker"):
            asyncio.run(drive(worker, sent, [(0.0, request(0, steps=20)), (0.0, request(1, steps=20)),
                                             (0.8, Cancel("request-0"))],
                              until=lambda s: len(results(s)) >= 1))
    finally:
        close_offline_worker(worker)
    assert backend.batch_sizes == [2]
    assert [(r.request_id, r.batch_size) for r in results(sent)] == [("request-1", 2)]
    assert "1 no longer wanted: images dropped" in caplog.text


def test_progress_goes_at_the_start_and_then_rate_limited():
    worker, backend, sent = make_worker()
    try:
        asyncio.run(drive(worker, sent, [(0.0, request(0, steps=40))], until=lambda s: len(results(s)) >= 1))
    finally:
        close_offline_worker(worker)
    steps = [m.step for m in sent if isinstance(m, Progress)]
    assert steps[0] == 0 and steps == sorted(steps) and all(0 < s < 40 for s in steps[1:])
    # 2 s of steps at most one message per 0.5 s: the start and at most 4 more (none for the last step).
    assert 2 <= len(steps) <= 1 + 2.0 / 0.5 + 1


# ------------------------------------------------------------------ the gateway waits for the broker's own late answer


def test_the_gateway_waits_a_grace_past_its_timeout_for_the_brokers_answer_saying_where_the_request_was():
    import zmq
    import zmq.asyncio

    from gateway.broker_client import BROKER_ANSWER_GRACE_S, BrokerClient, BrokerFailure
    from imagegen.protocol import CLIENT_LINK
    from tests.support.procs import free_port

    port = free_port()

    async def scenario() -> BrokerFailure:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"tcp://127.0.0.1:{port}")
        client = BrokerClient(f"tcp://127.0.0.1:{port}")
        await client.start()
        try:
            asking = asyncio.ensure_future(client.generate("r1", GenerationParams("x", 64, 64, 2, 7.5, 1), 0.2))
            while True:  # the GENERATE (pings are skipped)
                peer, *frames = await router.recv_multipart()
                message, _ = protocol.decode(frames, CLIENT_LINK)
                if isinstance(message, Generate):
                    break
            # The broker answers at the deadline, a little after the gateway's own timer (well within the grace).
            await asyncio.sleep(0.2 + BROKER_ANSWER_GRACE_S / 4)
            late = Failure("r1", "deadline_exceeded", "its deadline passed while it was still queued at worker w1")
            await router.send_multipart([peer, *protocol.encode(CLIENT_LINK, late)])
            with pytest.raises(BrokerFailure) as caught:
                await asking
            return caught.value
        finally:
            await client.close()
            router.close(linger=0)
            ctx.term()

    failure = asyncio.run(scenario())
    assert failure.code == "deadline_exceeded" and "queued at worker w1" in failure.message


def test_admission_sums_the_held_work_once_per_interval_not_once_per_arrival(monkeypatch):
    s = broker(max_queue_size=10_000)
    s.register(W1, reg(cost=1e-9), T0)
    sums = []
    original = s._sum_units_ahead
    monkeypatch.setattr(s, "_sum_units_ahead", lambda *model: sums.append(1) or original(*model))
    for i in range(500):
        s.submit(CLIENT, gen(f"r{i}", 80_000.0), T0)  # one burst, one instant: one sum
    assert len(sums) == 1 and len(s.requests) == 500
    # Arrivals were added in between (admission sums per model: the worker's is "tiny").
    assert s.units_ahead(T0, "tiny") == pytest.approx(s._sum_units_ahead("tiny"), rel=0.01)
    s.submit(CLIENT, gen("later", 80_000.0), T0 + 1.0)
    assert len(sums) == 3  # summed again once the interval passed (and once by the check above)
