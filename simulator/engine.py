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
from dataclasses import dataclass, field
from typing import Any, Callable

from broker.state import BrokerPolicy, BrokerState, ToClient, ToWorker
from gpu_worker.decisions.batcher import Batch, BatchKey, BatchPolicyConfig
from gpu_worker.decisions.policies import HoldTuning, make_batcher
from imagegen.protocol import (
    BatchingConfig,
    Failure,
    Generate,
    GenerationParams,
    Heartbeat,
    Register,
    Result,
    WorkerStatus,
)
from simulator.costs import CostModel

CLIENT_ID = b"sim-gateway"
DEADLINE_S = 86_400.0  # the protocol's largest: nothing times out in a simulation


@dataclass(frozen=True)
class ClusterConfig:
    """The simulated cluster: how many GPUs, which policy, and the settings the services read."""

    gpus: int = 1
    policy: str = "default"
    batching: BatchPolicyConfig = field(default_factory=lambda: BatchPolicyConfig(max_batch_size=16))
    tuning: HoldTuning | None = None  # default policy only; None: HoldTuning()
    capacity: int | None = None  # WORKER_MAX_IN_FLIGHT; None: 2 x max batch size, as the worker does
    strategy: str = "queue-depth"  # GPU_LOAD_BALANCE_STRATEGY
    fair_share: bool = True  # BrokerPolicy.fair_share; False: the broker's dispatch before it
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
                                               fair_share=cluster.fair_share), epoch="sim")
        self.requests: dict[str, RequestRecord] = {}
        self.batches: list[BatchRecord] = []
        self.workers = [SimWorker(self, i) for i in range(cluster.gpus)]
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
               on_done: Callable[[RequestRecord], None] | None = None) -> RequestRecord:
        """A client sends one request at ``at_s``; ``on_done`` runs when its answer arrives."""
        record = RequestRecord(f"r{len(self.requests)}", key, at_s, on_done)
        self.requests[record.request_id] = record
        self.at(at_s + self.cluster.hop_s, self._broker_receives, record)
        return record

    def _broker_receives(self, record: RequestRecord) -> None:
        key = record.key
        params = GenerationParams("a simulated prompt", key.width, key.height, key.num_inference_steps,
                                  key.guidance_scale, 0)
        self.apply(self.broker.submit(CLIENT_ID, Generate(record.request_id, params, DEADLINE_S), self.now))

    def apply(self, actions: list[Any]) -> None:
        """Deliver the broker's actions: messages to workers and answers to the client, one hop later."""
        for action in actions:
            if isinstance(action, ToWorker) and isinstance(action.message, Generate):
                self.at(self.now + self.cluster.hop_s, self._by_routing_id[action.routing_id].receive,
                        action.message)
            elif isinstance(action, ToClient) and isinstance(action.message, (Result, Failure)):
                self.at(self.now + self.cluster.hop_s, self._client_receives, action.message)

    def _client_receives(self, message: Result | Failure) -> None:
        record = self.requests[message.request_id]
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

    def _finish(self, token: int) -> None:
        if token != self._batch_token or self._running is None:
            return  # stopped earlier (preempted)
        batch, started_at, duration_s = self._running
        self.sim.batches.append(BatchRecord(self.index, batch.key, len(batch), started_at, duration_s))
        for pending in batch.requests:
            self.sim.requests[pending.request_id].started_at = started_at
        self._end_batch()
        self.batches_done += 1
        self.requests_done += len(batch)
        self.batcher.observe_batch(batch.key, len(batch), duration_s, self.sim.now)
        self._send_status()
        # Encoded `encode_threads` at a time and sent in batch order: result i leaves when its
        # round of encodings ends.
        encode_s = self.sim.cluster.encode_s_per_mpixel * batch.key.pixels / 1e6
        threads = max(1, self.sim.cluster.encode_threads)
        for i, pending in enumerate(batch.requests):
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
