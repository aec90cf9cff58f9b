"""The cluster in virtual time: the real broker state and the real batching policies, no sockets.

What runs is the production decision code: :class:`broker.state.BrokerState` (queue, credit,
balancing through :class:`broker.balancing.Balancer`) and, per worker, the batcher that
``BATCH_POLICY`` selects (:func:`gpu_worker.decisions.policies.make_batcher`). Only the GPU is modelled: a
batch takes ``CostModel.batch_s(key, size)`` seconds. The worker shell is mirrored as it is in
gpu_worker/shell/worker.py: ask the batcher for a batch whenever the GPU is free, otherwise sleep until
``next_decision_at()`` or the next arrival; after a batch, report its duration to the batcher
(``observe_batch``, when it has one) and deliver the images in order, ``encode_threads`` PNG
encodings at a time (each result frees one of the worker's credits at the broker when it lands).
A batch the batcher marks preemptible is stopped, as the worker stops it, at its first check
after an arrival for which ``should_preempt`` says so, and its requests go back to the batcher
(``requeue``); it is recorded as stopped. The worker checks before every denoising step, the first
one included: the checks are modelled ``prelude_fraction`` of the batch's time after its start
(the text encoders), then once per step, the steps sharing the rest equally.
Like the worker, it sends the broker a status (its queue and running batch) when a batch starts
and when it ends, which is what the broker's fair-share dispatch reads.

Messages between processes take ``hop_s``. Events at the same instant run in the order they were
scheduled, and a worker decides only after every message that reached it at that instant is in its
queue (as its reader task drains the socket before the batch loop runs).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from broker.state import BrokerPolicy, BrokerState, ToClient, ToWorker
from gpu_worker.decisions import preemption
from gpu_worker.decisions.batcher import Batch, BatchKey, BatchPolicyConfig
from gpu_worker.decisions.policies import STEP, HoldTuning, make_batcher
from gpu_worker.decisions.step_scheduler import StepPlan, StepRequest, StepScheduler, StepTuning
from imagegen.protocol import (
    BatchingConfig,
    Cancel,
    Failure,
    Generate,
    GenerationParams,
    Heartbeat,
    Register,
    Result,
    WorkerStatus,
)
from simulator.costs import CostModel, StepCostModel

CLIENT_ID = b"sim-gateway"
DEADLINE_S = 86_400.0  # the protocol's largest: nothing times out in a simulation


@dataclass(frozen=True)
class ClusterConfig:
    """The simulated cluster: how many GPUs, which policy, and the settings the services read."""

    gpus: int = 1
    policy: str = "default"
    batching: BatchPolicyConfig = field(default_factory=lambda: BatchPolicyConfig(max_batch_size=16))
    tuning: HoldTuning | None = None  # default policy only; None: HoldTuning()
    step_tuning: StepTuning | None = None  # step policy only; None: StepTuning() (max_rows: max batch size)
    capacity: int | None = None  # WORKER_MAX_IN_FLIGHT; None: 2 x max batch size, as the worker does
    strategy: str = "queue-depth"  # GPU_LOAD_BALANCE_STRATEGY
    fair_share: bool = True  # BrokerPolicy.fair_share; False: the broker's dispatch before it
    high_priority_reserve: int = BrokerPolicy.high_priority_reserve  # BROKER_HIGH_PRIORITY_RESERVE
    hop_s: float = 0.0005  # one ZeroMQ message between two processes on a LAN
    encode_s_per_mpixel: float = 0.03  # PNG encoding (compress level 1) of one image on one thread
    encode_threads: int = 8  # PNG_ENCODER_THREADS: a batch's images are encoded this many at a time
    speed_spread: float = 0.0  # GPU i's batches take (1 + speed_spread * i / (gpus - 1)) x the cost model's
    # Share of a batch's time before its first denoising step (text encoders, initial noise): where a
    # preemptible batch is first checked. An estimate, not measured since the text encoders are
    # compiled (eager they took 8.8 ms, 4%, of a 0.22 s SD-1.5 batch of one on the H100:
    # docs/benchmarks/phases-sd15-b1-h100.json). The bursts of --compare stay even with the seed's
    # while the first check comes before a burst's 16th request, 30 ms in: below 1.3% of SDXL's
    # batch of one on the H100 table (2.31 s); at 1.5% that burst's p95 is 10 ms (0.02%) worse.
    prelude_fraction: float = 0.01

    @property
    def worker_capacity(self) -> int:
        return self.capacity or 2 * self.batching.max_batch_size


@dataclass
class RequestRecord:
    request_id: str
    key: BatchKey
    sent_at: float
    on_done: Callable[["RequestRecord"], None] | None = None
    done_at: float | None = None
    failed: str | None = None
    batch_size: int = 0
    started_at: float | None = None  # when the batch that made its image started on the GPU
    priority: str = "normal"  # Generate.priority
    cancel_at: float | None = None  # when the client sends CANCEL (None: never)
    cancelled: bool = False  # the client cancelled it before its answer came
    # Denoising steps the request's row still ran after its CANCEL reached the worker, the step in
    # progress included (None: not running when cancelled).
    steps_after_cancel: int | None = None

    @property
    def wait_s(self) -> float:
        """From the client sending to its image's batch starting: broker queue and worker queue."""
        assert self.started_at is not None
        return self.started_at - self.sent_at

    @property
    def latency_s(self) -> float:
        assert self.done_at is not None
        return self.done_at - self.sent_at


@dataclass(frozen=True)
class BatchRecord:
    worker: int
    key: BatchKey
    size: int
    started_at: float
    duration_s: float  # GPU time it took (a stopped batch: until it stopped)
    stopped: bool = False  # preempted: its requests ran again in a later batch


class Simulation:
    """One run: schedule submissions (``submit``), then ``run()``; read ``requests`` and ``batches``."""

    def __init__(self, cluster: ClusterConfig, costs: CostModel) -> None:
        self.cluster = cluster
        self.costs = costs
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.broker = BrokerState(BrokerPolicy(strategy=cluster.strategy, max_queue_size=10**9,
                                               fair_share=cluster.fair_share,
                                               high_priority_reserve=cluster.high_priority_reserve), epoch="sim")
        self.requests: dict[str, RequestRecord] = {}
        self.batches: list[BatchRecord] = []
        worker_class = SimStepWorker if cluster.policy == STEP else SimWorker
        self.workers = [worker_class(self, i) for i in range(cluster.gpus)]
        self._by_routing_id = {w.routing_id: w for w in self.workers}
        for worker in self.workers:
            self.apply(self.broker.register(worker.routing_id, worker.registration(), self.now))

    # ------------------------------------------------------------------ event loop

    def at(self, time_s: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (max(time_s, self.now), next(self._seq), fn, args))

    def run(self, max_events: int = 50_000_000) -> None:
        for _ in range(max_events):
            if not self._events:
                return
            self.now, _, fn, args = heapq.heappop(self._events)
            fn(*args)
        raise RuntimeError("simulation did not finish: too many events")

    # ------------------------------------------------------------------ clients and broker

    def submit(self, key: BatchKey, at_s: float,
               on_done: Callable[[RequestRecord], None] | None = None, priority: str = "normal",
               cancel_after_s: float | None = None) -> RequestRecord:
        """A client sends one request at ``at_s``; ``on_done`` runs when its answer arrives. With
        ``cancel_after_s`` the client sends CANCEL that long after sending, unless answered by then."""
        record = RequestRecord(f"r{len(self.requests)}", key, at_s, on_done, priority=priority)
        self.requests[record.request_id] = record
        self.at(at_s + self.cluster.hop_s, self._broker_receives, record)
        if cancel_after_s is not None:
            record.cancel_at = at_s + cancel_after_s
            self.at(record.cancel_at, self._client_cancels, record)
        return record

    def _client_cancels(self, record: RequestRecord) -> None:
        if record.done_at is not None:
            return  # answered first: nothing to cancel
        record.cancelled = True
        self.at(self.now + self.cluster.hop_s, self._broker_cancels, record)

    def _broker_cancels(self, record: RequestRecord) -> None:
        self.apply(self.broker.cancel(CLIENT_ID, Cancel(record.request_id), self.now))

    def _broker_receives(self, record: RequestRecord) -> None:
        key = record.key
        params = GenerationParams("a simulated prompt", key.width, key.height, key.num_inference_steps,
                                  key.guidance_scale, 0)
        self.apply(self.broker.submit(CLIENT_ID, Generate(record.request_id, params, DEADLINE_S,
                                                          priority=record.priority), self.now))

    def apply(self, actions: list[Any]) -> None:
        """Deliver the broker's actions: messages to workers and answers to the client, one hop later."""
        for action in actions:
            if isinstance(action, ToWorker) and isinstance(action.message, Generate):
                self.at(self.now + self.cluster.hop_s, self._by_routing_id[action.routing_id].receive,
                        action.message)
            elif isinstance(action, ToWorker) and isinstance(action.message, Cancel):
                self.at(self.now + self.cluster.hop_s, self._by_routing_id[action.routing_id].receive_cancel,
                        action.message.request_id)
            elif isinstance(action, ToClient) and isinstance(action.message, (Result, Failure)):
                self.at(self.now + self.cluster.hop_s, self._client_receives, action.message)

    def _client_receives(self, message: Result | Failure) -> None:
        record = self.requests[message.request_id]
        if record.cancelled:
            return  # the client stopped waiting (the broker answers a cancelled request no more)
        record.done_at = self.now
        if isinstance(message, Failure):
            record.failed = message.code
        else:
            record.batch_size = message.batch_size
        if record.on_done is not None:
            record.on_done(record)


class SimWorker:
    """One GPU worker: the real batcher, a modelled GPU, and the worker shell's loop."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.routing_id = b"sim-worker-%d" % index
        self.batcher = make_batcher(sim.cluster.policy, sim.cluster.batching, sim.cluster.tuning)
        self.batches_done = 0
        self.requests_done = 0
        self.speed = 1.0 + sim.cluster.speed_spread * index / max(1, sim.cluster.gpus - 1)
        self._wake_token = 0
        self._decision_pending = False
        self._running: tuple[Batch[Generate], float, float] | None = None  # batch, started at, duration
        self._batch_token = 0  # a stopped batch's scheduled end is ignored
        self._stopping = False
        self._unwanted: set[str] = set()  # rows of the running batch cancelled since it started
        self._steps_at_cancel: dict[str, int] = {}  # such a row -> steps its batch had completed then
        self._abandon_check_pending = False

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def running(self) -> int:
        """Requests in the batch on the GPU now."""
        return len(self._running[0]) if self._running is not None else 0

    def registration(self) -> Register:
        config = self.sim.cluster.batching
        batching = BatchingConfig(config.enable_batching, config.max_batch_size, config.max_wait_time_s,
                                  config.min_batch_size, config.min_wait_time_s, config.adaptive,
                                  config.adaptive_threshold)
        return Register(f"sim-gpu{self.index}", "sim", self.index, self.index + 1, self.sim.costs.name,
                        "sim", self.sim.cluster.worker_capacity, batching)

    def receive(self, message: Generate) -> None:
        key = BatchKey.of(message.params)
        self.batcher.add(message.request_id, key, message, self.sim.now)
        self._maybe_preempt(key)
        if not self._decision_pending:  # decide once every message of this instant is queued
            self._decision_pending = True
            self.sim.at(self.sim.now, self._decide)

    def receive_cancel(self, request_id: str) -> None:
        """As the worker (WorkerState.cancel): a queued request is dropped; a running row is abandoned,
        and at the batch's next step boundary preemption.abandon_decision says whether it stops."""
        if self.batcher.cancel(request_id):
            return
        if self._running is None or request_id not in {p.request_id for p in self._running[0].requests}:
            return
        self._unwanted.add(request_id)
        batch, started_at, duration_s = self._running
        self._steps_at_cancel[request_id] = self._steps_done(started_at, duration_s, batch.key.num_inference_steps,
                                                             math.floor)
        if not self._abandon_check_pending:
            self._abandon_check_pending = True
            self.sim.at(self._next_check_at(started_at, duration_s, batch.key.num_inference_steps),
                        self._abandon_check, self._batch_token)

    def _steps_done(self, started_at: float, duration_s: float, steps: int, rounding: Any = round) -> int:
        """Denoising steps the running batch has completed by now (``round``: at a check instant)."""
        prelude_s = self.sim.cluster.prelude_fraction * duration_s
        step_s = (duration_s - prelude_s) / max(1, steps)
        return max(0, min(steps, rounding((self.sim.now - started_at - prelude_s) / step_s)))

    def _abandon_check(self, token: int) -> None:
        self._abandon_check_pending = False
        if token != self._batch_token or self._running is None:
            return
        batch, started_at, duration_s = self._running
        steps = batch.key.num_inference_steps
        done = self._steps_done(started_at, duration_s, steps)
        unwanted = [p for p in batch.requests if p.request_id in self._unwanted]
        decision = preemption.abandon_decision(len(batch), len(unwanted), done, steps)
        if decision is preemption.AbandonDecision.CONTINUE:
            for pending in unwanted:  # it runs to the end of the batch
                record = self.sim.requests[pending.request_id]
                record.steps_after_cancel = steps - self._steps_at_cancel.get(pending.request_id, done)
            return
        for pending in unwanted:
            record = self.sim.requests[pending.request_id]
            record.steps_after_cancel = done - self._steps_at_cancel.get(pending.request_id, done)
        self.sim.batches.append(BatchRecord(self.index, batch.key, len(batch), started_at,
                                            self.sim.now - started_at, stopped=True))
        wanted = tuple(p for p in batch.requests if p.request_id not in self._unwanted)
        self._end_batch()
        if wanted:
            self.batcher.requeue(replace(batch, requests=wanted))
        self._send_status()
        self._decide()

    def _decide(self) -> None:
        self._decision_pending = False
        if self.busy:
            return  # the batch loop is waiting for the GPU; it asks again when the batch ends
        now = self.sim.now
        batch = self.batcher.next_batch(now)
        if batch is not None:
            self._start(batch)
            return
        wake_at = self.batcher.next_decision_at()
        self._wake_token += 1
        if wake_at is not None:
            if wake_at <= now:
                raise AssertionError(f"{type(self.batcher).__name__}: decision due at {wake_at} but no batch at {now}")
            self.sim.at(wake_at, self._wake, self._wake_token)

    def _wake(self, token: int) -> None:
        if token == self._wake_token and not self.busy:  # a newer decision superseded this sleep
            self._decide()

    def _maybe_preempt(self, key: BatchKey) -> None:
        """As the worker: an arrival that should join the running batch stops it at its next step end."""
        if self._running is None or self._stopping:
            return
        batch, started_at, duration_s = self._running
        if not self.batcher.should_preempt(batch, key, self.sim.now):
            return
        self._stopping = True
        self.sim.at(self._next_check_at(started_at, duration_s, batch.key.num_inference_steps), self._stop,
                    self._batch_token)

    def _next_check_at(self, started_at: float, duration_s: float, steps: int) -> float:
        """The first instant, from now, at which the running batch looks whether to stop."""
        prelude_s = self.sim.cluster.prelude_fraction * duration_s
        step_s = (duration_s - prelude_s) / max(1, steps)
        first_check_at = started_at + prelude_s
        if self.sim.now <= first_check_at:
            return first_check_at
        return first_check_at + math.ceil((self.sim.now - first_check_at) / step_s) * step_s

    def _stop(self, token: int) -> None:
        if token != self._batch_token or self._running is None:
            return
        batch, started_at, _ = self._running
        self.sim.batches.append(BatchRecord(self.index, batch.key, len(batch), started_at,
                                            self.sim.now - started_at, stopped=True))
        self._end_batch()
        self.batcher.requeue(batch)
        self._send_status()
        self._decide()

    def _start(self, batch: Batch[Generate]) -> None:
        duration_s = self.sim.costs.batch_s(batch.key, len(batch)) * self.speed
        self._batch_token += 1
        self._running = (batch, self.sim.now, duration_s)
        self._send_status()
        self.sim.at(self.sim.now + duration_s, self._finish, self._batch_token)

    def _end_batch(self) -> None:
        self._running = None
        self._stopping = False
        self._batch_token += 1
        self._unwanted = set()
        self._steps_at_cancel = {}

    def _finish(self, token: int) -> None:
        if token != self._batch_token or self._running is None:
            return  # stopped earlier (preempted)
        batch, started_at, duration_s = self._running
        self.sim.batches.append(BatchRecord(self.index, batch.key, len(batch), started_at, duration_s))
        for pending in batch.requests:
            self.sim.requests[pending.request_id].started_at = started_at
        unwanted = self._unwanted
        self._end_batch()
        self.batches_done += 1
        self.requests_done += len(batch)
        self.batcher.observe_batch(batch.key, len(batch), duration_s, self.sim.now)
        self._send_status()
        # Encoded `encode_threads` at a time and sent in batch order: result i leaves when its
        # round of encodings ends.
        encode_s = self.sim.cluster.encode_s_per_mpixel * batch.key.pixels / 1e6
        threads = max(1, self.sim.cluster.encode_threads)
        for i, pending in enumerate(p for p in batch.requests if p.request_id not in unwanted):
            self.sim.at(self.sim.now + (i // threads + 1) * encode_s + self.sim.cluster.hop_s,
                        self._result_reaches_broker, batch, pending.request_id, duration_s)
        self._decide()

    def _send_status(self) -> None:
        """The status the worker sends when a batch starts or ends (its heartbeat's content)."""
        status = WorkerStatus("ready", self.batcher.queue_depth, self.running, 0, self.requests_done,
                              self.batches_done, 0, 0.0, 0.0, self.sim.cluster.batching.max_batch_size)
        self.sim.at(self.sim.now + self.sim.cluster.hop_s, self._status_reaches_broker, status)

    def _status_reaches_broker(self, status: WorkerStatus) -> None:
        self.sim.apply(self.sim.broker.heartbeat(self.routing_id, Heartbeat(status), self.sim.now))

    def _result_reaches_broker(self, batch: Batch[Generate], request_id: str, duration_s: float) -> None:
        pending = next(p for p in batch.requests if p.request_id == request_id)
        key = batch.key
        result = Result(request_id, f"sim-gpu{self.index}", "sim", self.index, "sim-batch", len(batch),
                        batch.wait_s(pending) * 1000.0, duration_s * 1000.0, key.width, key.height, 0)
        self.sim.apply(self.sim.broker.result(self.routing_id, result, self.sim.now))


class SimStepWorker:
    """One GPU worker under ``BATCH_POLICY=step``: the real :class:`StepScheduler`, a modelled GPU
    that runs one step boundary at a time, and the loop a step-level worker shell runs.

    At each boundary, when the GPU is free: ``plan(now)``; the GPU decodes the plan's finished
    rows, encodes its newcomers' prompts and runs one denoising step of its rows, costed by
    :class:`simulator.costs.StepCostModel` (a cohort of one key run start to end costs exactly the
    table's batch time); then ``step_done``, and the decoded rows' PNGs are encoded and sent as the
    batch worker sends them. The scheduler knows the per-step costs of every row count of a shape
    from the first request of that shape on (as a worker would from its warm-up), and learns from
    every step after. A CANCEL reaching the worker goes to ``cancel``; the row is left out of the
    next boundary. An idle plan with ``wake_at`` (rows held for batch-mates) is planned again then,
    unless an arrival comes first. ``Simulation.batches`` gets one record per step (size: rows
    advanced), so a run's ``avg_batch_size`` is rows per step and ``batches`` the steps run; a
    boundary that only decodes or encodes is recorded as stopped (GPU time, no step)."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.routing_id = b"sim-worker-%d" % index
        cluster = sim.cluster
        self.scheduler: StepScheduler[Generate] = StepScheduler(
            replace(cluster.step_tuning or StepTuning(), max_rows=cluster.batching.max_batch_size))
        self.step_costs = StepCostModel(sim.costs, prelude_fraction=cluster.prelude_fraction)
        self.speed = 1.0 + cluster.speed_spread * index / max(1, cluster.gpus - 1)
        self.batches_done = 0
        self.requests_done = 0
        self._shapes: set[tuple[int, int]] = set()
        self._busy = False
        self._decision_pending = False
        self._advancing: tuple[str, ...] = ()
        self._members: tuple[str, ...] = ()
        self._cancelled: set[str] = set()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def running(self) -> int:
        return len(self._advancing)

    def registration(self) -> Register:
        return SimWorker.registration(self)  # type: ignore[arg-type]

    def receive(self, message: Generate) -> None:
        key = BatchKey.of(message.params)
        shape = (key.width, key.height)
        if shape not in self._shapes:
            self._shapes.add(shape)
            for rows in range(1, 2 * self.scheduler.tuning.max_rows + 1):
                images = max(1, rows // 2)
                self.scheduler.observe_step(shape, rows, self.step_costs.step_s(shape, images, rows) * self.speed)
        self.scheduler.add(StepRequest(message.request_id, key, message, message.priority, message.owner), self.sim.now)
        self._soon()

    def receive_cancel(self, request_id: str) -> None:
        if self.scheduler.cancel(request_id, self.sim.now):
            self._cancelled.add(request_id)
            record = self.sim.requests[request_id]
            record.steps_after_cancel = 1 if request_id in self._advancing else 0
            self._soon()

    def _soon(self) -> None:
        if not self._decision_pending:  # decide once every message of this instant is queued
            self._decision_pending = True
            self.sim.at(self.sim.now, self._decide)

    def _decide(self) -> None:
        self._decision_pending = False
        if self._busy:
            return
        now = self.sim.now
        plan = self.scheduler.plan(now)
        for request_id, _why in plan.drop:
            self._cancelled.discard(request_id)
        for request_id in plan.advance:  # never: a cancelled row is dropped at the next boundary
            if request_id in self._cancelled:
                record = self.sim.requests[request_id]
                record.steps_after_cancel = (record.steps_after_cancel or 0) + 1
        if plan.idle:
            self._advancing = ()
            if self._members:
                self._members = ()
                self._send_status()
            if plan.wake_at is not None:  # rows held for batch-mates, as run-to-completion holds them
                self.sim.at(plan.wake_at, self._soon)
            return
        rows = self.scheduler.rows
        decode_s = sum(self.step_costs.decode_s(key, n)
                       for key, n in _count_keys(rows[i].key for i in plan.decode).items())
        encode_s = sum(self.step_costs.encode_s(key, n)
                       for key, n in _count_keys(rows[i].key for i in plan.admit).items())
        keys = [rows[i].key for i in plan.advance]
        steps = {k.num_inference_steps for k in keys}
        step_s = 0.0
        if keys:
            step_s = self.step_costs.step_s((keys[0].width, keys[0].height), len(keys),
                                            sum(2 if k.guidance_scale > 1.0 else 1 for k in keys),
                                            steps.pop() if len(steps) == 1 else None)
        decode_s, encode_s, step_s = decode_s * self.speed, encode_s * self.speed, step_s * self.speed
        for request_id in plan.admit:
            self.sim.requests[request_id].started_at = now
        members = tuple(sorted(self.scheduler.cohort))
        self._advancing = plan.advance
        self._busy = True
        if members != self._members:
            self._members = members
            self._send_status()
        decoded = [(i, rows[i].request.item) for i in plan.decode]
        self.sim.at(now + decode_s, self._send_results, decoded, len(plan.advance))
        self.sim.at(now + decode_s + encode_s + step_s, self._boundary_done, plan, step_s, decode_s + encode_s + step_s,
                    now)

    def _boundary_done(self, plan: StepPlan, step_s: float, total_s: float, started_at: float) -> None:
        self._busy = False
        if plan.advance:
            key = self.scheduler.rows[plan.advance[0]].key
            self.sim.batches.append(BatchRecord(self.index, key, len(plan.advance), started_at, total_s))
            self.scheduler.step_done(plan.advance, step_s, self.sim.now)
        else:
            key = BatchKey(0, 0, 0, 0.0)
            self.sim.batches.append(BatchRecord(self.index, key, 0, started_at, total_s, stopped=True))
        self.scheduler.decoded(plan.decode)
        self._advancing = ()
        self._decide()

    def _send_results(self, decoded: list[tuple[str, Generate]], rows: int) -> None:
        if not decoded:
            return
        self.batches_done += 1
        self.requests_done += len(decoded)
        threads = max(1, self.sim.cluster.encode_threads)
        for i, (request_id, message) in enumerate(decoded):
            key = BatchKey.of(message.params)
            encode_s = self.sim.cluster.encode_s_per_mpixel * key.pixels / 1e6
            self.sim.at(self.sim.now + (i // threads + 1) * encode_s + self.sim.cluster.hop_s,
                        self._result_reaches_broker, request_id, key, rows)

    def _send_status(self) -> None:
        status = WorkerStatus("ready", self.scheduler.queue_depth - len(self._members), len(self._members), 0,
                              self.requests_done, self.batches_done, 0, 0.0, 0.0,
                              self.sim.cluster.batching.max_batch_size)
        self.sim.at(self.sim.now + self.sim.cluster.hop_s, self._status_reaches_broker, status)

    def _status_reaches_broker(self, status: WorkerStatus) -> None:
        self.sim.apply(self.sim.broker.heartbeat(self.routing_id, Heartbeat(status), self.sim.now))

    def _result_reaches_broker(self, request_id: str, key: BatchKey, rows: int) -> None:
        record = self.sim.requests[request_id]
        wait_ms = ((record.started_at or self.sim.now) - record.sent_at) * 1000.0
        result = Result(request_id, f"sim-gpu{self.index}", "sim", self.index, "sim-step", max(1, rows),
                        wait_ms, (self.sim.now - (record.started_at or self.sim.now)) * 1000.0,
                        key.width, key.height, 0)
        self.sim.apply(self.sim.broker.result(self.routing_id, result, self.sim.now))


def _count_keys(keys: Any) -> dict[BatchKey, int]:
    counts: dict[BatchKey, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return counts
