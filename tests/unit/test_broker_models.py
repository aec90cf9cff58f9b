"""Several models in one cluster, in the broker's pure core: which model a request goes to
(broker/models.py route_model()), one queue per model (ModelQueues), and BrokerState's routing,
dispatch, fair share, admission and stats per model. No sockets: ``now`` is a plain float."""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.models import ModelQueues, route_model
from broker.state import BrokerPolicy, BrokerState, ToClient, ToWorker
from broker.stats import build_stats
from gateway.metrics import ClusterCollector
from imagegen.protocol import (
    BatchingConfig,
    Failure,
    FailureCode,
    Generate,
    GenerationParams,
    Heartbeat,
    Register,
    Result,
    WorkerStatus,
)

T0 = 100.0
CLIENT = b"gateway-1"
TINY, SDXL = "tiny", "tiny-sdxl"


def reg(name: str, model: str, capacity: int = 4, gpu_id: int = 0, seconds_per_work_unit: float = 0.0) -> Register:
    batching = BatchingConfig(enable_batching=True, max_batch_size=8, max_wait_time=0.1, min_batch_size=1,
                              min_wait_time=0.05, adaptive_batching=True, adaptive_threshold=10)
    return Register(worker_name=name, host="host-a", gpu_id=gpu_id, pid=1000 + gpu_id, model_id=model,
                    device="cpu", capacity=capacity, batching=batching,
                    seconds_per_work_unit=seconds_per_work_unit)


def gen(request_id: str, model: str | None = None, fallback: bool = False, size: int = 512,
        deadline_s: float = 600.0) -> Generate:
    params = GenerationParams("a cat", size, size, 25, 7.5, 1, None, model=model, model_fallback=fallback)
    return Generate(request_id, params, deadline_s)


def res(request_id: str, worker: str) -> Result:
    return Result(request_id, worker, "host-a", 0, f"{worker}:1", 1, 0.0, 1000.0, 512, 512, 1)


def state(**policy) -> BrokerState:
    return BrokerState(BrokerPolicy(**policy), epoch="epoch-1")


def dispatched(actions) -> list[tuple[bytes, str]]:
    return [(a.routing_id, a.message.request_id) for a in actions
            if isinstance(a, ToWorker) and isinstance(a.message, Generate)]


def failures(actions) -> list[Failure]:
    return [a.message for a in actions if isinstance(a, ToClient) and isinstance(a.message, Failure)]


def two_models(capacity: int = 4) -> BrokerState:
    """Worker b"t" serves tiny, worker b"x" serves tiny-sdxl."""
    s = state()
    s.register(b"t", reg("t", TINY, capacity, gpu_id=0), T0)
    s.register(b"x", reg("x", SDXL, capacity, gpu_id=1), T0)
    return s


# ------------------------------------------------------------------ the rule (pure function)


def test_route_model_rules():
    assert route_model(TINY, [TINY, SDXL]).model == TINY
    assert route_model(None, [TINY]).model == TINY
    assert route_model(None, [TINY, TINY]).model == TINY  # two workers, one model
    assert route_model(None, [TINY, SDXL]).refusal is FailureCode.MODEL_REQUIRED
    unknown = route_model("sd15", [TINY, SDXL])
    assert unknown.refusal is FailureCode.UNKNOWN_MODEL and "tiny, tiny-sdxl" in unknown.message
    assert route_model("sd15", []) == route_model("sd15", []) and route_model("sd15", []).model == "sd15"
    assert route_model(None, []).model is None and route_model(None, []).refusal is None
    # The OpenAI route's names ("dall-e-3") fall back to the one model served, not to one of several.
    assert route_model("dall-e-3", [TINY], fallback=True).model == TINY
    assert route_model("dall-e-3", [TINY, SDXL], fallback=True).refusal is FailureCode.UNKNOWN_MODEL
    assert route_model(SDXL, [TINY, SDXL], fallback=True).model == SDXL


def test_the_list_of_models_is_cut_short_to_fit_a_failure():
    models = [f"org/model-{i:04d}-" + "x" * 200 for i in range(100)]
    message = route_model("nope", models).message
    assert len(message) < 4000 and message.endswith("more")


def test_model_queues_keep_one_fifo_per_model_and_the_order_across_them():
    q = ModelQueues()
    q.append(TINY, "a")
    q.append(SDXL, "b")
    q.append(TINY, "c")
    q.appendleft(SDXL, "requeued")  # in front of everything queued before
    assert list(q) == ["requeued", "a", "b", "c"] and len(q) == 4 and "c" in q
    assert (q.head(TINY), q.head(SDXL), q.depth(TINY), q.position("c")) == ("a", "requeued", 2, 2)
    assert q.models() == [SDXL, TINY]  # the model whose first request goes first, first
    q.append(None, "unnamed")
    q.place("unnamed", SDXL)
    assert q.waiting(SDXL) == ["requeued", "b", "unnamed"] and list(q)[-1] == "unnamed"
    assert q.popleft(TINY) == "a" and list(q) == ["requeued", "b", "c", "unnamed"]
    q.remove("b")
    with pytest.raises(ValueError):
        q.remove("b")
    assert list(q) == ["requeued", "c", "unnamed"]


# ------------------------------------------------------------------ BrokerState


def test_each_request_goes_only_to_workers_of_its_model():
    s = two_models()
    actions = []
    for i in range(3):
        actions += s.submit(CLIENT, gen(f"x{i}", SDXL), T0)
        actions += s.submit(CLIENT, gen(f"t{i}", TINY), T0)
    assert dispatched(actions) == [(b"x", "x0"), (b"t", "t0"), (b"x", "x1"), (b"t", "t1"), (b"x", "x2"),
                                   (b"t", "t2")]
    assert s.requests["x0"].model == SDXL and s.requests["t0"].model == TINY


def test_a_model_no_worker_serves_is_refused_listing_the_models_served():
    s = two_models()
    actions = s.submit(CLIENT, gen("r1", "sd15"), T0)
    (failure,) = failures(actions)
    assert failure.code == "unknown_model" and "'sd15'" in failure.message
    assert "tiny, tiny-sdxl" in failure.message
    assert "r1" not in s.requests and not s.queue and s.counters.rejected_model == 1


def test_no_model_named_while_several_are_served_is_refused_listing_them():
    s = two_models()
    (failure,) = failures(s.submit(CLIENT, gen("r1"), T0))
    assert failure.code == "model_required" and "tiny, tiny-sdxl" in failure.message
    assert s.counters.rejected_model == 1 and s.counters.requests_failed == 0


def test_a_busy_models_queue_does_not_hold_back_another_models_idle_worker():
    s = two_models(capacity=1)
    for i in range(5):
        s.submit(CLIENT, gen(f"t{i}", TINY), T0)  # t0 goes to the tiny worker, t1..t4 wait
    assert list(s.queue) == ["t1", "t2", "t3", "t4"]
    actions = s.submit(CLIENT, gen("x0", SDXL), T0 + 1)
    assert dispatched(actions) == [(b"x", "x0")]
    assert list(s.queue) == ["t1", "t2", "t3", "t4"]  # the tiny requests keep their order
    # The tiny worker answers: the oldest tiny request goes next, never to the sdxl worker.
    assert dispatched(s.result(b"t", res("t0", "t"), T0 + 2)) == [(b"t", "t1")]
    assert dispatched(s.result(b"x", res("x0", "x"), T0 + 2)) == []


def test_one_model_behaves_as_before_whether_requests_name_it_or_not():
    def run(name_the_model: bool) -> list:
        s = state()
        s.register(b"w1", reg("w1", TINY, capacity=2), T0)
        s.register(b"w2", reg("w2", TINY, capacity=2, gpu_id=1), T0)
        log = []
        for i in range(8):
            log += s.submit(CLIENT, gen(f"r{i}", TINY if name_the_model and i % 2 else None), T0 + i * 0.01)
        for i in range(4):
            holder = s.requests[f"r{i}"].worker
            log += s.result(holder, res(f"r{i}", holder.decode()), T0 + 1 + i)
        return [(a.routing_id, a.message.request_id) for a in log if isinstance(a, ToWorker)]

    assert run(True) == run(False)


def test_requests_accepted_before_any_worker_go_to_the_first_model_served():
    s = state()
    s.submit(CLIENT, gen("unnamed"), T0)
    s.submit(CLIENT, gen("named", SDXL), T0)
    s.submit(CLIENT, gen("openai", "dall-e-3", fallback=True), T0)
    assert list(s.queue) == ["unnamed", "named", "openai"]
    actions = s.register(b"t", reg("t", TINY, capacity=8), T0 + 1)
    assert dispatched(actions) == [(b"t", "unnamed"), (b"t", "openai")]
    assert list(s.queue) == ["named"]  # waits for a worker of its own model
    assert "no worker serving model 'tiny-sdxl' is registered" in s.where("named")
    assert dispatched(s.register(b"x", reg("x", SDXL, gpu_id=1), T0 + 2)) == [(b"x", "named")]


def test_requests_queued_for_a_model_keep_their_place_when_its_worker_dies():
    s = two_models(capacity=1)
    for i in range(3):
        s.submit(CLIENT, gen(f"x{i}", SDXL), T0)
    actions = s.disconnect(b"x", T0 + 1)
    assert dispatched(actions) == [] and list(s.queue) == ["x0", "x1", "x2"]  # x0 back in front
    assert dispatched(s.register(b"x2", reg("x2", SDXL, capacity=1, gpu_id=2), T0 + 2)) == [(b"x2", "x0")]


def test_fair_share_compares_only_workers_of_the_same_model():
    s = state()
    s.register(b"a1", reg("a1", TINY, capacity=10, gpu_id=0), T0)
    s.register(b"a2", reg("a2", TINY, capacity=10, gpu_id=1), T0)
    s.register(b"b1", reg("b1", SDXL, capacity=10, gpu_id=2), T0)
    for i in range(24):
        s.submit(CLIENT, gen(f"t{i:02d}", TINY), T0)
    assert len(s.queue) == 4 and len(s.workers[b"b1"].in_flight) == 0
    s.heartbeat(b"a1", Heartbeat(WorkerStatus("ready", 0, 0, 0, 10, 1, 0, 0.0, 0.0)), T0 + 1)  # its 10 are done
    s.heartbeat(b"a2", Heartbeat(WorkerStatus("ready", 0, 10, 0, 0, 1, 0, 0.0, 0.0)), T0 + 1)  # running 10
    # 4 queued + a2's 10 over the two tiny workers: 7 each. The idle sdxl worker does not count
    # (over all three workers it would be 5, and the first tiny worker would take less of the backlog).
    assert s.fair_share(T0 + 1, model=TINY) == 7
    assert s.fair_share(T0 + 1, model=SDXL) is None


def test_admission_judges_a_request_by_the_workers_of_its_model():
    s = state()
    s.register(b"fast", reg("fast", TINY, seconds_per_work_unit=1e-6), T0)
    s.register(b"slow", reg("slow", SDXL, seconds_per_work_unit=10.0, gpu_id=1), T0)
    (refused,) = failures(s.submit(CLIENT, gen("x1", SDXL, deadline_s=30.0), T0))
    assert refused.code == "too_costly"  # the tiny worker's speed says nothing about sdxl's
    assert dispatched(s.submit(CLIENT, gen("t1", TINY, deadline_s=30.0), T0)) == [(b"fast", "t1")]


def test_the_result_names_the_model_that_made_it():
    s = two_models()
    s.submit(CLIENT, gen("x1", SDXL), T0)
    (forwarded,) = [a.message for a in s.result(b"x", res("x1", "x"), T0 + 1) if isinstance(a, ToClient)]
    assert forwarded.model == SDXL


def test_stats_and_metrics_show_each_models_workers_and_queue():
    s = two_models(capacity=1)
    for i in range(3):
        s.submit(CLIENT, gen(f"t{i}", TINY), T0)
    s.heartbeat(b"x", Heartbeat(WorkerStatus("draining", 0, 0, 0, 0, 0, 0, 0.0, 0.0)), T0)
    s.submit(CLIENT, gen("missing-worker", "sd15"), T0)  # refused: not listed
    stats = build_stats(s, T0 + 1)
    assert stats["models"] == {
        TINY: {"workers": 1, "accepting_workers": 1, "broker_queue_depth": 2, "current_queue_depth": 3},
        SDXL: {"workers": 1, "accepting_workers": 0, "broker_queue_depth": 0, "current_queue_depth": 0},
    }
    assert stats["broker"]["rejected_model"] == 1 and stats["broker"]["queue_depth"] == 2
    samples = {(sample.name, tuple(sample.labels.values())): sample.value
               for m in ClusterCollector(stats).collect() for sample in m.samples}
    assert samples[("imagegen_model_broker_queue_depth", (TINY,))] == 2
    assert samples[("imagegen_model_accepting_workers", (SDXL,))] == 0
    assert samples[("imagegen_broker_requests_total", ("rejected_model",))] == 1
    assert "models" in build_stats(state(), T0)  # the one-worker shape has it too


def test_a_one_model_cluster_lists_its_model():
    s = state()
    s.register(b"w1", reg("w1", TINY), T0)
    assert build_stats(s, T0)["models"] == {
        TINY: {"workers": 1, "accepting_workers": 1, "broker_queue_depth": 0, "current_queue_depth": 0}}
