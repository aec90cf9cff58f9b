"""Everything the broker knows and decides, as a pure object: no sockets, no clock, no asyncio.

The socket shell (:mod:`broker.server`) decodes a message, calls one method here with ``now``,
and sends the :class:`ToWorker` / :class:`ToClient` actions it gets back; the events among them
(:data:`Event`: a worker removed and why, a request requeued or cancelled, a registration refused)
say what happened, for its log. That keeps every rule (admission of workers, credit, balancing,
liveness, requeueing, overload, stats) testable with a fake clock.

Requests live in one table keyed by request id, in one of two places: the broker's queue
(waiting for a worker with credit; one FIFO per model, :class:`broker.models.ModelQueues`) or
assigned to one worker. A worker's *credit* is how many
requests it may hold at once (its ``capacity``, announced at registration): the broker hands
work only to workers below it, so a slow worker is never flooded and the backlog waits here,
bounded by ``max_queue_size``.

While requests wait here for credit, a *fair share* caps what each worker may take
(:meth:`BrokerState.fair_share`): the backlog is spread over all workers instead of going to
whichever frees credit first (docs/scheduling.md, "Dispatch across GPUs").

With several models in the cluster (each worker serves the model it registered with) every rule
that compares or counts workers works within one model's group: a request goes only to workers of
its model (:func:`broker.models.route_model` decides which, at submit), each model has its own
FIFO, balancer, fair share and admission, and a model whose workers are busy never holds back
another's. With one model that is one group, exactly as before.

A request's answer and reports go to its *client*: the gateway connection that sent it, or the
latest that collected it (:meth:`BrokerState.collect`). An answer the shell cannot deliver is kept
(:meth:`BrokerState.keep_unclaimed`, :mod:`broker.unclaimed`) for any gateway to collect by id.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Hashable, Mapping, Union

from broker.admission import Admission, WorkerSpeed
from broker.balancing import Balancer, Candidate
from broker.models import ModelQueues, route_model
from broker.priorities import (DEFAULT_AGING_S, DEFAULT_HALF_LIFE_S, DEFAULT_HIGH_PRIORITY_RESERVE, FairShares,
                               Waiting, class_counters, effective_rank, known_priority, pick, queue_group)
from broker.registration import key_admits, registration_refusal
from broker.unclaimed import Kept, UnclaimedResults
from imagegen.batch_key import BatchKey, work_units
from imagegen.protocol import (
    MAX_ATTEMPTS,
    MAX_DEADLINE_S,
    Cancel,
    Collect,
    Disconnect,
    Failure,
    FailureCode,
    Generate,
    Heartbeat,
    ImageSize,
    Message,
    Preview,
    Progress,
    Queued,
    Register,
    Result,
    Welcome,
    WorkerStatus,
)


# Admission sums the work held at most this often (broker clock seconds); arrivals in between add theirs.
UNITS_AHEAD_RECOMPUTE_S = 0.1
# A watched request's QUEUED report is sent at most this often (when its position changed).
QUEUED_REPORT_INTERVAL_S = 1.0
# A client that pinged and has not been heard from for this long is forgotten (its record only).
CLIENT_MEMORY_S = 3600.0


@dataclass(frozen=True)
class ToWorker:
    routing_id: bytes
    message: Message
    # The worker's name, for the broker's log line only (set on a dispatched GENERATE).
    worker_name: str = field(default="", compare=False)


@dataclass(frozen=True)
class ToClient:
    client_id: bytes
    message: Message  # a Result is sent with the payload frames the worker sent, unless ``payload`` says
    label: str = ""  # the request's label (its client's X-Request-ID), for the broker's log line only
    # A Result or Failure that cannot be delivered is kept for a COLLECT (broker/unclaimed.py) unless
    # this is False (an answer about an id that is not the request's own: unknown_request, id in use).
    keep: bool = field(default=True, compare=False)
    # Set for an answer sent from the unclaimed store: its payload, and when it was first kept.
    payload: tuple = field(default=(), compare=False)
    kept_at: float | None = field(default=None, compare=False)


# What happened, for the broker's log only: nothing is sent for these. They come back among the
# ToWorker / ToClient actions, in the order things happened, so the shell logs without reading
# the state's tables.

class Removal(Enum):
    """Why the broker let go of a worker (and took back the requests it held)."""

    MISSED_HEARTBEATS = "missed_heartbeats"
    NO_PROGRESS = "no_progress"  # it heartbeats, but held requests past the progress deadline: stuck
    LEFT = "left"  # it said goodbye (DISCONNECT)
    KEY_REVOKED = "key_revoked"  # its key left the authorized-keys folder, or no longer admits its name
    KEY_CHANGED = "key_changed"  # its connection id spoke under another key
    UNREACHABLE = "unreachable"  # a message to it could not be sent
    REGISTERED_AGAIN = "registered_again"  # its connection, or another with its name, registered


@dataclass(frozen=True)
class WorkerRemoved:
    worker_name: str
    why: Removal
    reason: str = ""  # the worker's own words, when it left


@dataclass(frozen=True)
class Requeued:
    """A request taken back from a removed worker, to the front of the queue."""

    request_id: str
    label: str
    worker_name: str  # the worker it was taken from
    why: Removal


@dataclass(frozen=True)
class Cancelled:
    """A request its client stopped waiting for, and where it was then."""

    request_id: str
    label: str
    worker_name: str | None  # None: it was queued here
    step: int | None = None  # its worker's latest PROGRESS: step ``step`` of ``steps``
    steps: int | None = None


@dataclass(frozen=True)
class Registered:
    info: Register


@dataclass(frozen=True)
class RegistrationRefused:
    worker_name: str
    reason: str  # also sent to the connection in a DISCONNECT


@dataclass(frozen=True)
class SenderRefused:
    """A worker message from a connection that may not speak for a worker."""

    message_type: str
    sender: str  # its worker's name, or the connection id (hex) when none is registered on it
    wrong_key: bool  # True: a registered worker's connection id, under another key


Event = Union[WorkerRemoved, Requeued, Cancelled, Registered, RegistrationRefused, SenderRefused]
Action = Union[ToWorker, ToClient, Event]


@dataclass(frozen=True)
class BrokerPolicy:
    strategy: str = "queue-depth"
    max_queue_size: int = 1000
    heartbeat_interval_s: float = 1.0
    liveness: int = 5  # heartbeats a worker may miss before it is declared dead
    max_attempts: int = 3  # dispatches of one request before it fails with worker_lost
    fair_share: bool = True  # spread a backlog over the workers (see dispatch); False: greedy, as before
    # A worker holding requests that sends no PROGRESS, RESULT or FAILURE for this long is stuck
    # (it heartbeats, so liveness alone never catches it): removed like a dead one. 0: never.
    progress_timeout_s: float = 120.0
    # Answers nobody could take (broker/unclaimed.py): at most this many, this many payload bytes,
    # each this long (BROKER_UNCLAIMED_RESULTS, _BYTES, _TTL_S).
    unclaimed_results: int = 1000
    unclaimed_bytes: int = 256 * 1024 * 1024
    unclaimed_ttl_s: float = 600.0
    # A client that pings (every gateway does, each second) and has sent nothing for this long is
    # treated as gone: its answers are kept instead of sent, its reports dropped, until it speaks.
    client_silence_s: float = 5.0
    # Priorities and fair shares between owners (broker/priorities.py): a request gains one class
    # for every this many seconds it waits (PRIORITY_AGING_S; 0: never), and owners' GPU-seconds
    # halve every this many (FAIR_SHARE_HALF_LIFE_S).
    priority_aging_s: float = DEFAULT_AGING_S
    fair_share_half_life_s: float = DEFAULT_HALF_LIFE_S
    # Places a worker takes beyond its capacity for high-priority requests alone
    # (BROKER_HIGH_PRIORITY_RESERVE): a high request does not wait in the broker's queue while
    # normal and low ones fill every worker's places; the worker's own scheduler then runs it first.
    high_priority_reserve: int = DEFAULT_HIGH_PRIORITY_RESERVE

    @property
    def worker_timeout_s(self) -> float:
        return self.heartbeat_interval_s * self.liveness


@dataclass
class RequestRecord:
    client_id: bytes
    message: Generate
    received_at: float
    attempts: int = 0
    worker: bytes | None = None  # routing id of the worker holding it
    dispatched_at: float | None = None
    step: int | None = None  # its worker's latest PROGRESS: denoising step ``step`` of ``steps``
    steps: int | None = None
    # The model it goes to (broker/models.py route_model()); None: accepted while no worker was
    # registered, it is routed when one is (BrokerState._place_unnamed).
    model: str | None = None
    # Its client gets QUEUED reports (Generate.watch, or it was collected): the position last
    # reported (0: at a worker, its batch not started) and when.
    watch: bool = False
    reported_position: int | None = None
    reported_at: float | None = None
    batch_size: int = 0  # the rows of its running batch, by its worker's latest PROGRESS (0: not said)
    paused: bool = False  # its row waits at ``step`` while better-priority rows run (its latest PROGRESS)


_EMPTY_STATUS = WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0)


def _units_left(record: RequestRecord) -> float:
    """Work units of a request held and not finished: in full while queued, the part left by its
    latest PROGRESS once dispatched, half when a worker holds it and has reported nothing yet (it
    may be running)."""
    units = work_units(BatchKey.of(record.message.params))
    if record.worker is None:
        return units
    if record.step is not None and record.steps:
        return units * max(0.0, 1.0 - record.step / record.steps)
    return units * 0.5


class BatchTimes:
    """The latest batch duration the workers reported (Result.generation_ms) per key, as
    (seconds, batch size); the oldest keys are forgotten beyond ``max_keys``. The broker's keys are
    (model, BatchKey): one size of image costs another time on another model."""

    def __init__(self, max_keys: int = 256) -> None:
        self.max_keys = max_keys
        self._latest: dict[Hashable, tuple[float, int]] = {}

    def observe(self, key: Hashable, seconds: float, size: int) -> None:
        self._latest.pop(key, None)
        self._latest[key] = (seconds, size)
        if len(self._latest) > self.max_keys:
            del self._latest[next(iter(self._latest))]

    def estimate_s(self, key: Hashable, size: int) -> float | None:
        """Seconds for a batch of ``size`` of ``key``: the latest one's, scaled by size; None if unknown."""
        latest = self._latest.get(key)
        return None if latest is None else latest[0] * size / latest[1]


@dataclass
class WorkerRecord:
    routing_id: bytes
    info: Register
    registered_at: float
    last_seen: float
    status: WorkerStatus = _EMPTY_STATUS
    in_flight: set[str] = field(default_factory=set)
    order: int = 0  # registration order, for stable round-robin
    # For the fair share (BrokerState.unfinished): what was sent since the last status, when that
    # status announced the running batch, and the batch's key if everything the worker held then
    # had one key (None: several, or no running batch).
    sent_since_status: int = 0
    batch_started_at: float | None = None
    running_key: BatchKey | None = None
    key: bytes | None = None  # the CurveZMQ public key it registered with (None: no authentication)
    # The last sign that it works on what it holds (PROGRESS, RESULT, FAILURE; or the moment it
    # was handed its first request while holding none): the progress deadline counts from here.
    last_progress: float = 0.0
    # Whether ``status`` is one the worker sent (a heartbeat came), not the empty one it starts with.
    reported: bool = False

    @property
    def queue_depth(self) -> int:
        """Requests this worker holds that are not in its running batch."""
        return max(0, len(self.in_flight) - self.status.running)

    @property
    def accepting(self) -> bool:
        return self.status.state == "ready"

    @property
    def warm_sizes(self) -> tuple[ImageSize, ...]:
        """The sizes it runs compiled without compiling: its latest heartbeat's, or before its first
        heartbeat those it registered with."""
        return self.status.warm_sizes if self.reported else self.info.warm_sizes

    @property
    def compile_state(self) -> str:
        """Its torch.compile state, one of SIZE_STATES (WorkerStatus.compile_state): its latest
        heartbeat's, or before its first heartbeat what its registration implies: every listed size
        warm: warm; some: warming; none listed, or none warm: off (a worker that compiles warms a
        size before it registers; one that lists sizes with none warm runs every size alike)."""
        if self.reported:
            return self.status.compile_state
        if not self.info.sizes or not self.info.warm_sizes:
            return "off"
        return "warm" if set(self.info.sizes) <= set(self.info.warm_sizes) else "warming"

    def has_warm(self, size: ImageSize) -> bool:
        """Whether a request of ``size`` runs compiled here without compiling; every size does on a
        worker that does not compile (compile state off, or no sizes listed), since all run alike."""
        if self.compile_state == "off" or not self.info.sizes:
            return True
        return size in self.warm_sizes


@dataclass
class Counters:
    requests_received: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    rejected_overloaded: int = 0
    deadline_expired: int = 0
    requeued: int = 0
    duplicate_results: int = 0
    workers_registered: int = 0
    workers_expired: int = 0
    cancelled: int = 0
    rejected_draining: int = 0
    rejected_too_costly: int = 0  # could not finish within its deadline even alone (broker/admission.py)
    rejected_behind_queue: int = 0  # could, but not behind the work already queued: 503 with Retry-After
    registrations_refused: int = 0  # a name held by a live worker, claimed by another connection
    unregistered_messages: int = 0  # worker messages from a connection that is no registered worker
    wrong_key_messages: int = 0  # from a worker's connection id, but not under the key it registered with
    unassigned_answers: int = 0  # RESULT/FAILURE/PROGRESS for a request held by another worker or queued
    workers_stuck: int = 0  # held requests past the progress deadline: removed, their work requeued
    rejected_model: int = 0  # named a model no worker serves, or none while several are served (400)
    collects: int = 0  # COLLECT messages received
    collects_unknown: int = 0  # ... for an id the broker held nothing for (unknown_request)
    progress_forwarded: int = 0  # worker PROGRESS messages passed on to the request's client
    previews_forwarded: int = 0  # worker PREVIEW messages passed on to the request's client
    queued_reports: int = 0  # QUEUED reports sent


class BrokerState:
    def __init__(self, policy: BrokerPolicy, epoch: str) -> None:
        self.policy = policy
        self.epoch = epoch
        Balancer(policy.strategy)  # an unknown strategy fails here, not at the first dispatch
        self._balancers: dict[str | None, Balancer] = {}  # one per model: its round-robin is its own
        self.requests: dict[str, RequestRecord] = {}
        self.queue = ModelQueues()  # ids waiting for a worker, one FIFO per model; each front goes first
        self.workers: dict[bytes, WorkerRecord] = {}
        self.counters = Counters()
        self.max_queue_depth = 0
        # Last counters of each worker process that left, so cluster totals never go backwards.
        # Keyed by (name, pid): a process that comes back re-reports its cumulative counters
        # itself, so its retired entry is dropped then rather than counted twice.
        self.retired: dict[tuple[str, int], WorkerStatus] = {}
        self._registration_order = itertools.count()
        self.batch_times = BatchTimes()
        self.admission = Admission()  # refuses at once what could not finish in time (broker/admission.py)
        # Per model (None: every request): (when summed, work units held); see units_ahead.
        self._units_ahead: dict[str | None, tuple[float, float]] = {}
        self.draining = False
        # Answers that could not be delivered, kept for a COLLECT (broker/unclaimed.py).
        self.unclaimed = UnclaimedResults(policy.unclaimed_results, policy.unclaimed_bytes, policy.unclaimed_ttl_s)
        self._watched: set[str] = set()  # ids of requests whose client gets QUEUED reports
        self._pinged: dict[bytes, float] = {}  # client -> when last heard, for clients that ping
        # GPU-seconds per owner, and figures per priority, for the order of the queue and for /stats.
        self.fair_shares = FairShares(policy.fair_share_half_life_s)
        self.priority_counters = class_counters()

    def begin_drain(self) -> None:
        """Refuse new requests from now on; those already accepted still run to the end."""
        self.draining = True

    @property
    def drained(self) -> bool:
        return not self.requests

    # ------------------------------------------------------------------ client side

    def submit(self, client_id: bytes, message: Generate, now: float) -> list[Action]:
        """A gateway asks for an image: queue it (then dispatch) or refuse it when the queue is full."""
        held = self.requests.get(message.request_id)
        if held is not None and held.client_id == client_id:
            return []  # a resend of a request we already hold; its answer will come once
        if held is not None:
            # Gateways make request ids (uuid4) and never take them from clients, so this is a gateway's
            # bug: refuse the newcomer rather than drop it silently or hand it the other's image.
            text = f"request id {message.request_id!r} is already in use by another gateway's request"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.INVALID_REQUEST.value, text),
                             message.label, keep=False)]
        if message.request_id in self.unclaimed:  # a resend of one answered while its gateway was away
            return [self._from_store(self.unclaimed.take(message.request_id), client_id)]
        self.counters.requests_received += 1
        if self.draining:
            self.counters.rejected_draining += 1
            text = "the broker is shutting down; retry in a few seconds"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.SHUTTING_DOWN.value, text))]
        route = route_model(message.params.model, self.served_models(), message.params.model_fallback)
        if route.refusal is not None:
            self.counters.rejected_model += 1
            return [ToClient(client_id, Failure(message.request_id, route.refusal.value, route.message),
                             message.label)]
        if len(self.queue) >= self.policy.max_queue_size:
            self.counters.rejected_overloaded += 1
            text = f"the broker's queue is full ({self.policy.max_queue_size} requests waiting); retry later"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.OVERLOADED.value, text))]
        refusal = self._admission_refusal(message, route.model, now)
        if refusal is not None:
            return [ToClient(client_id, refusal, message.label)]
        self.requests[message.request_id] = RequestRecord(client_id, message, now, model=route.model,
                                                          watch=message.watch)
        self.queue.append(route.model, message.request_id, group=queue_group(message))
        self.priority_counters[known_priority(message.priority)].received += 1
        if message.owner:
            self.fair_shares.set_share(message.owner, message.share, now)
        self._observe_depth()
        if message.watch:
            self._watched.add(message.request_id)  # its first QUEUED report: queue_reports' next round
        return self.dispatch(now)

    def served_models(self) -> list[str]:
        """The models the registered workers serve (draining ones included: their model comes back)."""
        return sorted({w.info.model_id for w in self.workers.values()})

    def _workers_of(self, model: str | None) -> list[WorkerRecord]:
        """The registered workers serving ``model``, in registration order."""
        return [w for w in sorted(self.workers.values(), key=lambda w: w.order) if w.info.model_id == model]

    def _admission_refusal(self, message: Generate, model: str | None, now: float) -> Failure | None:
        """A request that could not finish within its deadline, alone or behind the work already
        here for its model, is refused at once rather than accepted and left to time out
        (broker/admission.py); only its model's workers count, the fastest and the work spread."""
        workers = [WorkerSpeed(w.info.worker_name, w.info.seconds_per_work_unit)
                   for w in self.workers.values() if w.accepting and w.info.model_id == model]
        if self.admission.seconds_per_unit(workers, now) is None:
            return None  # nothing measured: never refused (and the held work need not be summed)
        key = BatchKey.of(message.params)
        verdict = self.admission.decide(key, message.deadline_s, self.units_ahead(now, model), workers, now)
        if verdict.code is None:
            at, units = self._units_ahead[model]
            self._units_ahead[model] = (at, units + work_units(key))  # accepted: ahead of the next one
            return None
        if verdict.code == FailureCode.TOO_COSTLY.value:
            self.counters.rejected_too_costly += 1
        else:
            self.counters.rejected_behind_queue += 1
        return Failure(message.request_id, verdict.code, verdict.message, verdict.retry_after_s)

    def units_ahead(self, now: float, model: str | None = None) -> float:
        """Work units (gpu_worker.decisions.cost_model.work_units) of every request for ``model``
        (None: of every request) held and not finished: in
        full while queued, the part left by its latest PROGRESS once dispatched, half when a worker
        holds it and has reported nothing yet (it may be running). Summed at most every
        UNITS_AHEAD_RECOMPUTE_S, accepted requests added in between: summing at every arrival made a
        burst of 5000 cost 19 s of broker time (quadratic)."""
        at, units = self._units_ahead.get(model, (-math.inf, 0.0))
        if not 0 <= now - at <= UNITS_AHEAD_RECOMPUTE_S:
            units = self._sum_units_ahead(model)
            self._units_ahead[model] = (now, units)
        return units

    def _sum_units_ahead(self, model: str | None = None) -> float:
        return sum(_units_left(record) for record in self.requests.values()
                   if model is None or record.model == model)

    def cancel(self, client_id: bytes, message: Cancel, now: float) -> list[Action]:
        """Nobody waits for the request any more: forget it; if a worker holds it, tell the worker to drop it.

        A request belongs to its id, not to the gateway connection that sent it: ids are made by the
        gateways (122 random bits) and never shown to other clients, so any gateway may cancel one
        (a restarted gateway, or another one serving the same client)."""
        record = self.requests.get(message.request_id)
        if record is None:
            self.unclaimed.discard(message.request_id)  # answered, and kept for nobody now
            return []  # already answered
        del self.requests[message.request_id]
        # Its work leaves the held work admission sums (units_ahead) now, not at the next interval:
        # a client that cancels a long request and sends another at once must not be refused for it.
        self._units_ahead.clear()
        self.counters.cancelled += 1
        label = record.message.label
        if record.worker is None:
            self.queue.remove(message.request_id)
            return [Cancelled(message.request_id, label, None)]
        cancelled = Cancelled(message.request_id, label, self._worker_name(record.worker), record.step, record.steps)
        worker = self.workers.get(record.worker)
        if worker is None:
            return [cancelled]
        # Free the slot now: if the request is already in a running batch, the worker holds one
        # more than we count until that batch ends (its late result is dropped as a duplicate).
        worker.in_flight.discard(message.request_id)
        return [cancelled, ToWorker(record.worker, message)] + self.dispatch(now)

    def fail_all(self, code: FailureCode, text: str) -> list[Action]:
        """Answer every request still held with ``code`` (the broker is going away), and tell the
        workers holding them to drop them."""
        cancels: list[Action] = [ToWorker(record.worker, Cancel(request_id))
                                 for request_id, record in self.requests.items()
                                 if record.worker is not None and record.worker in self.workers]
        self.queue.clear()
        for worker in self.workers.values():
            worker.in_flight.clear()
        return [self._fail(request_id, code, text) for request_id in list(self.requests)] + cancels

    def accepting_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.accepting)

    def worker_ids(self) -> list[bytes]:
        """The connections of the registered workers (the broker's heartbeat goes to each)."""
        return list(self.workers)

    def holds_request(self, request_id: str) -> bool:
        """Whether ``request_id`` is one accepted here and not answered yet."""
        return request_id in self.requests

    # ------------------------------------------------------------------ clients that come and go

    def collect(self, client_id: bytes, message: Collect, now: float) -> list[Action]:
        """Any gateway asks for a request by id (a restarted gateway, or another one sharing its jobs).

        A kept answer (:meth:`keep_unclaimed`) is sent to it now and forgotten. A request still
        queued or at a worker gets ``client_id`` as its client from now on (its answer, PROGRESS and
        QUEUED reports go there; the previous client hears nothing more of it) and is watched; the
        asker hears where it is now: a QUEUED, or the latest PROGRESS. Anything else is answered
        with ``unknown_request``."""
        self.counters.collects += 1
        request_id = message.request_id
        kept = self.unclaimed.take(request_id)
        if kept is not None:
            return [self._from_store(kept, client_id)]
        record = self.requests.get(request_id)
        if record is None:
            self.counters.collects_unknown += 1
            text = (f"the broker holds no request {request_id!r} and no answer for it: its answer was delivered "
                    f"already, or kept and then dropped (BROKER_UNCLAIMED_RESULT_TTL_S, BROKER_UNCLAIMED_RESULTS, "
                    f"BROKER_UNCLAIMED_RESULT_BYTES), or the broker restarted since it was sent")
            return [ToClient(client_id, Failure(request_id, FailureCode.UNKNOWN_REQUEST.value, text), keep=False)]
        record.client_id = client_id
        record.watch = True
        self._watched.add(request_id)
        if record.step is not None:
            return [ToClient(client_id, self._progress_of(record), record.message.label)]
        record.reported_position = None  # the new client has heard nothing yet
        return self._queued_reports(now, [request_id], force=True)

    def queue_reports(self, now: float) -> list[Action]:
        """QUEUED reports for the watched requests whose position changed since their last report
        (queued here: 1, 2, ...; at a worker, its batch not started: 0), at most one per request
        every QUEUED_REPORT_INTERVAL_S. The shell calls it a few times a second."""
        if not self._watched:
            return []
        return self._queued_reports(now, list(self._watched))

    def _queued_reports(self, now: float, request_ids: list[str], force: bool = False) -> list[Action]:
        """QUEUED reports for those of ``request_ids`` that are due (``force``: due now)."""
        due: dict[str, RequestRecord] = {}
        for request_id in request_ids:
            record = self.requests.get(request_id)
            if record is None or not record.watch:
                self._watched.discard(request_id)  # answered, cancelled or failed
            elif record.step is None and (force or record.reported_at is None
                                          or now - record.reported_at >= QUEUED_REPORT_INTERVAL_S):
                due[request_id] = record
        if not due:
            return []
        actions: list[Action] = []
        for request_id, record in due.items():
            if record.worker is not None and record.reported_position != 0:
                actions.append(self._report(record, Queued(request_id, 0), now))
        waiting = {rid for rid, record in due.items() if record.worker is None and rid in self.queue}
        for model in {self.queue.model_of(rid) for rid in waiting}:
            actions += self._queued_in(model, waiting, now, force)
        return actions

    def _queued_in(self, model: str | None, due: set[str], now: float, force: bool) -> list[Action]:
        """QUEUED reports for the ``due`` requests waiting in ``model``'s queue whose position
        changed (``force``: every one), with the work ahead of each and the estimated start. With
        priorities among them, positions follow the priority classes after aging (broker/priorities.py
        effective_rank(), then queue order); the fair share between owners is left out."""
        queue = self.queue.waiting(model)
        if self.queue.has_ranked(model):
            aging_s = self.policy.priority_aging_s
            queue.sort(key=lambda rid: effective_rank(self.requests[rid].message.priority,
                                                      now - self.requests[rid].received_at, aging_s))
        workers = [w for w in self._workers_of(model) if w.accepting] if model is not None else []
        speeds = [WorkerSpeed(w.info.worker_name, w.info.seconds_per_work_unit) for w in workers]
        per_unit = self.admission.seconds_per_unit(speeds, now) if speeds else None
        ahead = sum(_units_left(record) for record in self.requests.values()
                    if record.worker is not None and record.model == model)
        actions: list[Action] = []
        left = len(due)
        for position, request_id in enumerate(queue, 1):
            record = self.requests[request_id]
            if request_id in due:
                left -= 1
                if force or record.reported_position != position:
                    start_s = None if per_unit is None else min(MAX_DEADLINE_S, ahead * per_unit / len(workers))
                    report = Queued(request_id, position, len(queue), round(ahead, 3), start_s)
                    actions.append(self._report(record, report, now))
                if not left:
                    break
            ahead += _units_left(record)
        return actions

    def _report(self, record: RequestRecord, report: Queued, now: float) -> ToClient:
        record.reported_position, record.reported_at = report.position, now
        self.counters.queued_reports += 1
        return ToClient(record.client_id, report, record.message.label)

    def heard_from(self, client_id: bytes, now: float, pinged: bool = False) -> None:
        """A client sent something (``pinged``: a PING; from then on its silence counts, see
        :meth:`client_silent`). Answers kept while it was away stay kept: a gateway that was away
        collects what it still waits for (gateway/broker_client.py), and one restarted with the
        same GATEWAY_ID waits for nothing it sent before."""
        if pinged or client_id in self._pinged:
            self._pinged[client_id] = now

    def client_silent(self, client_id: bytes, now: float) -> bool:
        """Whether a client that pings has sent nothing for ``client_silence_s``: it is gone (or
        stalled), so its answers are kept rather than sent into a connection nobody reads. A client
        that never pinged is never silent: only a failed send tells that it is gone."""
        heard = self._pinged.get(client_id)
        return heard is not None and now - heard > self.policy.client_silence_s

    def keep_unclaimed(self, action: ToClient, payload: tuple, now: float) -> list[str]:
        """An answer (RESULT or FAILURE) that could not be delivered to its client: kept for a
        COLLECT, within the store's bounds; returns the ids of the answers dropped to make room."""
        return self.unclaimed.keep(action.message.request_id, action.client_id, action.message, payload,
                                   action.label, now, action.kept_at)

    def expire_unclaimed(self, now: float) -> list[str]:
        """Drop the kept answers past their time (and forget clients long silent); returns their ids."""
        for client_id in [c for c, heard in self._pinged.items() if now - heard > CLIENT_MEMORY_S]:
            del self._pinged[client_id]
        return self.unclaimed.expire(now)

    def _from_store(self, kept: Kept, client_id: bytes) -> ToClient:
        return ToClient(client_id, kept.message, kept.label, payload=kept.payload, kept_at=kept.kept_at)

    # ------------------------------------------------------------------ worker side

    def register(self, routing_id: bytes, message: Register, now: float, key: bytes | None = None,
                 authorized_keys: Mapping[bytes, str] | None = None) -> list[Action]:
        """A worker joins on connection ``routing_id`` (under CurveZMQ, with public key ``key``,
        which ``authorized_keys``, the authorized-keys folder's public key -> name stem, must admit
        for the name it claims: broker/registration.py; None: no authentication).

        A name held by a live worker on another connection is never taken by a registration: that
        would let anyone who reaches the port evict a worker and receive its requests. Another
        connection gets the name only once the holder's record has expired (it missed its
        heartbeats: a restarted worker retries until then) or when it proves the holder's key; a
        worker that left with DISCONNECT freed its name at once. A connection may re-register,
        also under a new name; its old record goes, its work requeued."""
        refusal = registration_refusal(message, key, authorized_keys)
        holder = next((w for w in self.workers.values()
                       if w.info.worker_name == message.worker_name and w.routing_id != routing_id), None)
        if refusal is None and holder is not None and not self._may_take_over(holder, key, now):
            refusal = (f"worker name {message.worker_name!r} belongs to a live worker (heard from "
                       f"{now - holder.last_seen:.1f}s ago); a restarted worker is admitted once the old one misses "
                       f"its heartbeats ({self.policy.worker_timeout_s:g}s), so retry then; a different worker "
                       f"needs its own WORKER_NAME")
        if refusal is not None:
            self.counters.registrations_refused += 1
            return [RegistrationRefused(message.worker_name, refusal), ToWorker(routing_id, Disconnect(refusal))]
        actions: list[Action] = []
        for old in [w for w in (holder, self.workers.get(routing_id)) if w is not None]:
            actions += self._remove_worker(old.routing_id, now, Removal.REGISTERED_AGAIN,
                                           f"{message.worker_name} re-registered")
        self.retired.pop((message.worker_name, message.pid), None)
        self.workers[routing_id] = WorkerRecord(
            routing_id, message, now, now, order=next(self._registration_order), key=key, last_progress=now
        )
        self.counters.workers_registered += 1
        actions.append(Registered(message))
        actions.append(ToWorker(routing_id, Welcome(self.epoch, self.policy.heartbeat_interval_s)))
        return actions + self.dispatch(now)

    def _may_take_over(self, holder: WorkerRecord, key: bytes | None, now: float) -> bool:
        return now - holder.last_seen > self.policy.worker_timeout_s or (key is not None and key == holder.key)

    def check_sender(self, routing_id: bytes, key: bytes | None, message: Message, now: float) -> list[Action] | None:
        """None if ``message`` (not a REGISTER) from connection ``routing_id``, which carries ``key``,
        may be handled as its worker's; else the actions that refuse it (a :class:`SenderRefused` first).

        Only a registered worker's connection speaks for it: anything else is told to register
        again (a DISCONNECT is just dropped). Under CurveZMQ the key must also be the one the worker
        registered with: another key on that connection id means the worker's connection is gone
        and someone else holds its id, so the worker is removed (its work requeued) before it can
        be sent another prompt."""
        worker = self.workers.get(routing_id)
        message_type = type(message).__name__
        if worker is None:
            self.counters.unregistered_messages += 1
            refused: list[Action] = [SenderRefused(message_type, self._worker_name(routing_id), wrong_key=False)]
            return refused if isinstance(message, Disconnect) else refused + [
                ToWorker(routing_id, Disconnect("unknown worker: register again"))]
        if worker.key != key:
            self.counters.wrong_key_messages += 1
            actions = [SenderRefused(message_type, worker.info.worker_name, wrong_key=True)]
            actions += self._remove_worker(routing_id, now, Removal.KEY_CHANGED, "its connection changed key")
            actions += self.dispatch(now)
            return actions + [ToWorker(routing_id, Disconnect(
                "this connection's key is not the one its worker registered with: register again"))]
        return None

    def _holds(self, worker: WorkerRecord, request_id: str) -> bool:
        """Whether ``worker`` may speak for ``request_id``. A request held by another worker, or
        queued, is not its to answer: dropped and counted (a stranger must never answer for
        another). One it no longer holds and nobody does (answered, cancelled) is a late duplicate."""
        if request_id in worker.in_flight:
            return True
        if request_id in self.requests:
            self.counters.unassigned_answers += 1
        return False

    def heartbeat(self, routing_id: bytes, message: Heartbeat, now: float) -> list[Action]:
        worker = self.workers.get(routing_id)
        if worker is None:
            # Unknown sender: we restarted, or expired it. Ask it to register again.
            return [ToWorker(routing_id, Disconnect("unknown worker: register again"))]
        worker.last_seen = now
        previous = worker.status
        if message.status.running == 0:
            worker.batch_started_at, worker.running_key = None, None
        elif (previous.running == 0 or worker.batch_started_at is None
              or message.status.total_batches != previous.total_batches):  # a new batch started
            keys = {BatchKey.of(self.requests[rid].message.params) for rid in worker.in_flight if rid in self.requests}
            worker.batch_started_at, worker.running_key = now, keys.pop() if len(keys) == 1 else None
        worker.status, worker.reported = message.status, True
        worker.sent_since_status = 0
        self._observe_depth()
        return self.dispatch(now)

    def result(self, routing_id: bytes, message: Result, now: float) -> list[Action]:
        """A worker finished a request: forward the image to its client (first answer wins)."""
        record, instead = self._answered(routing_id, message.request_id, now)
        if record is None:
            return instead
        self.counters.requests_completed += 1
        model = self.workers[routing_id].info.model_id
        # Its part of its batch's GPU time, charged to its owner (the fair share, and /stats).
        self.fair_shares.charge(record.message.owner, message.generation_ms / 1000.0 / message.batch_size, now)
        if message.generation_ms > 0:
            self.batch_times.observe((model, BatchKey.of(record.message.params)), message.generation_ms / 1000.0,
                                     message.batch_size)
            self.admission.observe(message.worker_name, BatchKey.of(record.message.params), message.batch_size,
                                   message.generation_ms / 1000.0, now)
        broker_wait_ms = ((record.dispatched_at or record.received_at) - record.received_at) * 1000.0
        forwarded = replace(message, queue_wait_ms=message.queue_wait_ms + broker_wait_ms, model=model)
        return [ToClient(record.client_id, forwarded, record.message.label)] + self.dispatch(now)

    def failure(self, routing_id: bytes, message: Failure, now: float) -> list[Action]:
        record, instead = self._answered(routing_id, message.request_id, now)
        if record is None:
            return instead
        self.counters.requests_failed += 1
        return [ToClient(record.client_id, message, record.message.label)] + self.dispatch(now)

    def _answered(self, routing_id: bytes, request_id: str, now: float) -> tuple[RequestRecord | None, list[Action]]:
        """The record a worker's RESULT or FAILURE answers, taken out of the table; or None and what to
        do instead: a connection that is no worker is told to register, an answer for a request the
        sender does not hold is dropped (counted as a duplicate when nobody holds it any more)."""
        worker = self.workers.get(routing_id)
        if worker is None:
            return None, [ToWorker(routing_id, Disconnect("unknown worker: register again"))]
        if not self._holds(worker, request_id):
            if request_id not in self.requests:
                self.counters.duplicate_results += 1  # answered or cancelled already
            return None, []
        record = self._finish(routing_id, request_id, now)
        return record, ([] if record is not None else self.dispatch(now))

    def progress(self, routing_id: bytes, message: Progress, now: float) -> list[Action]:
        """A running request of this worker reached a denoising step: the worker is not stuck."""
        record, refusal = self._running_request(routing_id, message.request_id, now)
        if record is None:
            return refusal
        record.step, record.steps, record.batch_size = message.step, message.steps, message.batch_size
        record.paused = message.paused
        # Its client sees the attempt (a request taken back from a worker that died starts again from
        # step 0 under the next number) and the worker.
        self.counters.progress_forwarded += 1
        return [ToClient(record.client_id, self._progress_of(record), record.message.label)]

    def _running_request(self, routing_id: bytes, request_id: str,
                         now: float) -> tuple[RequestRecord | None, list[Action]]:
        """The record of ``request_id`` when the worker at ``routing_id`` holds it (that worker is then
        seen working: its progress deadline starts again); else None and what to answer (an unknown
        worker is told to register again; another's request is ignored)."""
        worker = self.workers.get(routing_id)
        if worker is None:
            return None, [ToWorker(routing_id, Disconnect("unknown worker: register again"))]
        if not self._holds(worker, request_id):
            return None, []
        worker.last_progress = worker.last_seen = now
        return self.requests[request_id], []

    def preview(self, routing_id: bytes, message: Preview, now: float) -> list[Action]:
        """A running request's preview (gpu_worker/model/previews.py): a sign of progress too; passed
        on as it is to the request's client (the shell sends the worker's payload frame along)."""
        record, refusal = self._running_request(routing_id, message.request_id, now)
        if record is None:
            return refusal
        self.counters.previews_forwarded += 1
        return [ToClient(record.client_id, message, record.message.label)]

    def _progress_of(self, record: RequestRecord) -> Progress:
        """The request's latest PROGRESS as its client gets it (its worker has sent one)."""
        worker_name = self._worker_name(record.worker) if record.worker is not None else ""
        return Progress(record.message.request_id, record.step or 0, record.steps or 1,
                        min(MAX_ATTEMPTS, max(1, record.attempts)), worker_name, record.batch_size,
                        record.paused)

    def disconnect(self, routing_id: bytes, now: float, why: Removal = Removal.LEFT, reason: str = "") -> list[Action]:
        """A worker goes: it said goodbye (``reason``: its words), or the shell found it gone (``why``);
        whatever it still held goes back to the front of the queue."""
        if routing_id not in self.workers:
            return []
        return self._remove_worker(routing_id, now, why, "worker disconnected", reason) + self.dispatch(now)

    def revoke_keys(self, authorized_keys: Mapping[bytes, str], now: float) -> list[Action]:
        """Check every worker's key against the authorized keys as the shell read them now
        (``authorized_keys``: public key -> name stem): a worker whose key no longer admits its name
        (broker/registration.py) is removed, its requests requeued, and told why. Workers registered
        without a key (no CurveZMQ) are never revoked."""
        revoked = [w.routing_id for w in self.workers.values()
                   if w.key is not None and not key_admits(authorized_keys, w.key, w.info.worker_name)]
        actions: list[Action] = []
        for routing_id in revoked:
            actions += self._remove_worker(routing_id, now, Removal.KEY_REVOKED, "worker disconnected")
            actions += self.dispatch(now)
            actions.append(ToWorker(routing_id, Disconnect("this worker's key is no longer authorized")))
        return actions

    def expire(self, now: float) -> list[Action]:
        """Declare dead every worker silent for longer than the liveness window; requeue its work.

        Also fails queued requests past their deadline, wherever they sit in the queue (dispatch
        only looks at its head, and does not run at all while no worker has credit)."""
        actions: list[Action] = self._expire_deadlines(now)
        deadline = now - self.policy.worker_timeout_s
        expired = [w for w in self.workers.values() if w.last_seen < deadline]
        for worker in expired:
            self.counters.workers_expired += 1
            actions += self._remove_worker(worker.routing_id, now, Removal.MISSED_HEARTBEATS, "missed heartbeats")
        # Heartbeats only show that a worker's process is there, not that it works: one that holds
        # requests and reports no progress on them (a hung GPU, or a peer that takes work and never
        # answers) would keep them until their deadlines. It is removed like a dead one and told so.
        stuck = self.stuck_workers(now)
        for worker in stuck:
            self.counters.workers_stuck += 1
            actions += self._remove_worker(worker.routing_id, now, Removal.NO_PROGRESS, "made no progress")
            actions.append(ToWorker(worker.routing_id, Disconnect(
                f"no progress on the requests it held for {self.policy.progress_timeout_s:g}s: "
                f"declared stuck, its requests went to other workers")))
        expired += stuck
        # Dispatch whenever a worker went, not only when a request failed: requeued work needs a new home.
        return actions + (self.dispatch(now) if expired else [])

    def stuck_workers(self, now: float) -> list[WorkerRecord]:
        """Workers holding requests with no PROGRESS, RESULT or FAILURE for longer than the policy's
        progress_timeout_s (0: never stuck)."""
        timeout_s = self.policy.progress_timeout_s
        if timeout_s <= 0:
            return []
        return [w for w in self.workers.values() if w.in_flight and now - w.last_progress > timeout_s]

    def expire_deadlines(self, now: float) -> list[Action]:
        """Answer every request past its deadline, queued here or held by a worker (the broker's
        deadline timer calls it often, so the client hears where its request was before the gateway's
        own timer gives up); a worker holding one is told to drop it (CANCEL: it stops the request at
        its next denoising step) and its credit goes to the next request."""
        return self._expire_deadlines(now)

    def _expire_deadlines(self, now: float) -> list[Action]:
        late = [rid for rid in self.queue if self._past_deadline(self.requests[rid], now)]
        actions: list[Action] = []
        for request_id in late:
            text = self.where(request_id)
            self.queue.remove(request_id)
            actions.append(self._fail_late(request_id, text))
        held = [rid for rid, record in self.requests.items()
                if record.worker is not None and self._past_deadline(record, now)]
        for request_id in held:
            record = self.requests[request_id]
            text = self.where(request_id)
            worker = self.workers.get(record.worker)
            if worker is not None:
                worker.in_flight.discard(request_id)
                actions.append(ToWorker(record.worker, Cancel(request_id)))
            actions.append(self._fail_late(request_id, text))
        return actions + (self.dispatch(now) if held else [])

    def where(self, request_id: str) -> str:
        """Where a request is, for the message that tells its client it ran out of time."""
        record = self.requests[request_id]
        deadline = f"its deadline ({record.message.deadline_s:g} s, REQUEST_TIMEOUT_S) passed"
        if record.worker is None:
            if not self.workers:
                return f"{deadline} while it was queued at the broker: no GPU worker is registered"
            workers = self._workers_of(record.model)
            if not workers:
                return (f"{deadline} while it was queued at the broker: no worker serving model "
                        f"{record.model!r} is registered")
            position = self.queue.position(request_id) if request_id in self.queue else 1
            busy = "all busy" if any(w.accepting for w in workers) else "none accepting work"
            serving = f" serving {record.model}" if len(self.served_models()) > 1 else ""
            return (f"{deadline} while it was still queued at the broker (position {position} of "
                    f"{self.queue.depth(record.model)}; {len(workers)} workers{serving}, {busy})")
        name = self._worker_name(record.worker)
        if record.step is None:
            return f"{deadline} while it was still queued at worker {name}"
        doing = "paused on" if record.paused else "being generated on"
        return f"{deadline} while it was {doing} worker {name} (step {record.step} of {record.steps})"

    def _past_deadline(self, record: RequestRecord, now: float) -> bool:
        return now > record.received_at + record.message.deadline_s

    def _fail_late(self, request_id: str, text: str | None = None) -> ToClient:
        self.counters.deadline_expired += 1
        return self._fail(request_id, FailureCode.DEADLINE_EXCEEDED, text or self.where(request_id))

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> list[Action]:
        """Hand queued requests, oldest first, to workers of their model with credit, as that model's
        balancer chooses. Each model is dispatched on its own: requests for a model whose workers
        have no credit stay queued while those for another model go to its idle workers.

        **Fair share.** While requests wait here for credit (a backlog), a worker may take one only
        while its unfinished work (:meth:`unfinished`) is below its fair share of all unfinished
        work, this queue's included (:meth:`fair_share`). Without it the backlog goes to
        whichever worker frees credit first: workers that finish a batch together return its images
        over a fraction of a second, and the first to return them queued most of an extra batch
        (4 GPUs, a burst of 200: 40 each at once, then the 40 left over went 16/8/8/8 in the
        simulator, and on four H100s one GPU's third batch ran ~19 s, instead of 10 each). Without
        a backlog the balancer alone decides, as before; with one worker the share never binds."""
        actions = self._place_unnamed()
        for model in self.queue.models():
            actions += self._dispatch_model(model, now)
        return actions

    def _place_unnamed(self) -> list[Action]:
        """Requests accepted while no worker was registered that named no model (or one to fall back
        from) are routed once a model is served, as they would have been on arrival: each keeps its
        place in the queue, or is refused (model_required) when several models are served."""
        if not self.queue.depth(None) or not self.workers:
            return []
        served = self.served_models()
        actions: list[Action] = []
        for request_id in self.queue.waiting(None):
            record = self.requests[request_id]
            route = route_model(record.message.params.model, served, record.message.params.model_fallback)
            if route.refusal is None:
                record.model = route.model
                self.queue.place(request_id, route.model)
                continue
            self.queue.remove(request_id)
            del self.requests[request_id]
            self.counters.rejected_model += 1
            failure = Failure(request_id, route.refusal.value, route.message)
            actions.append(ToClient(record.client_id, failure, record.message.label))
        return actions

    def _dispatch_model(self, model: str | None, now: float) -> list[Action]:
        """Hand ``model``'s queued requests, oldest first, to its workers with credit."""
        actions: list[Action] = []
        balancer = self._balancers.setdefault(model, Balancer(self.policy.strategy))
        while self.queue.depth(model):
            reserve = False  # whether this request may take a worker's high-priority reserve
            if self.queue.has_ranked(model):
                # Priorities or owners among the waiting: broker/priorities.py chooses, once a worker has credit
                # (or, for a high request only, a place of its reserve).
                if any(c.has_credit for c in self._candidates(model, now)):
                    request_id = self._next_ranked(model, now)
                elif any(c.has_credit for c in self._candidates(model, now, reserve=True)):
                    request_id, reserve = self._next_ranked(model, now, high_only=True), True
                    if request_id is None:
                        break
                else:
                    break
            else:
                request_id = self.queue.head(model)
            record = self.requests[request_id]
            if self._past_deadline(record, now):
                self.queue.remove(request_id)
                actions.append(self._fail_late(request_id))
                continue
            params = record.message.params
            chosen = balancer.choose(self._candidates(model, now, ImageSize(params.width, params.height), reserve))
            if chosen is None:
                break
            self.queue.remove(request_id)
            if record.attempts == 0:
                counters = self.priority_counters[known_priority(record.message.priority)]
                counters.dispatched += 1
                counters.queue_wait_s += max(0.0, now - record.received_at)
            worker = self.workers[chosen]
            if not worker.in_flight:
                worker.last_progress = now  # the progress deadline counts from its first request
            worker.in_flight.add(request_id)
            worker.sent_since_status += 1
            record.worker, record.dispatched_at = chosen, now
            record.attempts += 1
            # The worker gets the time left, so it can drop the request before spending GPU on it.
            # Clamped to the request's own deadline: (received_at + deadline_s) - now can round a
            # hair above deadline_s, and the worker refuses a deadline above the protocol's bound
            # (86400 s) as malformed, so the request would sit there unanswered until its deadline.
            remaining_s = min(record.message.deadline_s,
                              max(0.0, record.received_at + record.message.deadline_s - now))
            actions.append(ToWorker(chosen, replace(record.message, deadline_s=remaining_s), worker.info.worker_name))
        return actions

    def _next_ranked(self, model: str | None, now: float, high_only: bool = False) -> str | None:
        """The next of ``model``'s queued requests by priority (with aging) and then fair share between
        owners (broker/priorities.py pick). An owner's usage: its decayed GPU-seconds, plus an estimate
        for its requests held by workers and not finished (the latest per-image time of their kind,
        else of any result, else 1 s each)."""
        in_flight: dict[str, float] = {}
        heads = [(request_id, self.requests[request_id]) for request_id in self.queue.group_heads(model)]
        if high_only:  # only a request sent as high may take a reserved place (None: none waits)
            heads = [(request_id, record) for request_id, record in heads if record.message.priority == "high"]
            if not heads:
                return None
        for worker in self.workers.values():
            for request_id in worker.in_flight:
                record = self.requests.get(request_id)
                if record is None or not record.message.owner:
                    continue
                key = (worker.info.model_id, BatchKey.of(record.message.params))
                estimate = self.batch_times.estimate_s(key, 1) or self.fair_shares.latest_image_s or 1.0
                owner = record.message.owner
                in_flight[owner] = in_flight.get(owner, 0.0) + estimate
        # Each group's first (the longest-waiting of its priority and owner) is all pick() needs.
        waiting = [Waiting(request_id, record.message.priority, record.message.owner, record.message.share,
                           record.received_at) for request_id, record in heads]
        chosen = pick(waiting, now, self.policy.priority_aging_s,
                      lambda owner: self.fair_shares.recent(owner, now) + in_flight.get(owner, 0.0))
        assert chosen is not None
        return chosen

    def _candidates(self, model: str | None, now: float, size: ImageSize | None = None,
                    reserve: bool = False) -> list[Candidate]:
        """``model``'s accepting workers as the balancer sees them; those with ``size`` warm are
        preferred (None: all are), so a request goes where it runs compiled without compiling when
        such a worker has credit, and else where the balancer would send it anyway (it runs eager
        there, or after the worker's warm-up: the worker decides)."""
        if model is None:
            return []  # named no model and none is served yet: it waits (see _place_unnamed)
        ordered = [w for w in self._workers_of(model) if w.accepting]
        if reserve:  # a high request's places beyond capacity; the backlog's spread does not apply to them
            return [Candidate(w.routing_id, len(w.in_flight), w.info.capacity + self.policy.high_priority_reserve,
                              preferred=size is None or w.has_warm(size)) for w in ordered]
        share = self.fair_share(now, ordered, model)
        return [Candidate(w.routing_id, len(w.in_flight), w.info.capacity,
                          over_share=share is not None and self.unfinished(w, now) >= share,
                          preferred=size is None or w.has_warm(size))
                for w in ordered]

    def fair_share(self, now: float, workers: list[WorkerRecord] | None = None,
                   model: str | None = None) -> int | None:
        """A worker holding this many unfinished requests or more may take no other now; None: no cap.

        Within one model's group: ``workers`` serve ``model``, and only its queue counts (None: the
        whole queue and every accepting worker, one group, as with one model).

        None unless the policy asks for it, two workers or more accept work, and there is a backlog:
        the request at the head of the queue has waited (it arrived before ``now``, or was
        requeued), so requests are waiting for credit rather than being handed out as they come.
        Then: the smallest level L at which the workers, each holding min(L, its capacity), could
        hold all the unfinished work (``total``: the queue plus every worker's ``unfinished``), or
        None if even full workers could not. With equal capacities L = ceil(total / workers). A
        worker below L always exists (the workers hold less than ``total`` between them while
        anything is queued), so the cap only redirects a request, or keeps it queued until a worker
        under its share has credit again (its images are back). A worker at or over its share is
        busy with that much work, so no GPU idles for it."""
        queued = len(self.queue) if model is None else self.queue.depth(model)
        if not self.policy.fair_share or not queued:
            return None
        if workers is None:
            workers = [w for w in self.workers.values()
                       if w.accepting and (model is None or w.info.model_id == model)]
        head = next(iter(self.queue)) if model is None else self.queue.head(model)
        if len(workers) < 2 or self.requests[head].received_at >= now:
            return None
        total = queued + sum(self.unfinished(w, now) for w in workers)
        capacities = sorted(w.info.capacity for w in workers)
        if total >= sum(capacities):
            return None
        # Water-filling: below the level L, a worker of capacity c holds min(L, c).
        remaining, left = total, len(capacities)
        for capacity in capacities:
            level = -(-remaining // left)  # ceil: the level if every worker left can reach it
            if level <= capacity:
                return max(1, level)
            remaining -= capacity
            left -= 1
        return None

    def unfinished(self, worker: WorkerRecord, now: float) -> int:
        """Requests ``worker`` holds that its GPU has not finished, as far as the broker can tell: its
        running batch and queue by its latest status, plus what was sent to it since; never more
        than it holds. Unlike ``in_flight`` this leaves out images already generated and still being
        encoded and sent back, which hold credit for a moment but no GPU time.

        The running batch counts in proportion to its expected time left (rounded up): the time
        since the status that announced it, against the latest duration of a batch of its key
        (:class:`BatchTimes`), scaled to its size. In full when that is unknown: before the first
        batch of the key has finished, or when the worker held several keys as the batch started.
        So GPUs that finish a batch a little apart still share the backlog: the first to finish
        does not count the others' nearly finished batches as a whole batch of work each."""
        running = worker.status.running
        if running and worker.running_key is not None and worker.batch_started_at is not None:
            expected_s = self.batch_times.estimate_s((worker.info.model_id, worker.running_key), running)
            if expected_s:
                left = 1.0 - (now - worker.batch_started_at) / expected_s
                running = math.ceil(running * min(1.0, max(0.0, left)))
        reported = running + worker.status.queue_depth + worker.sent_since_status
        return min(len(worker.in_flight), reported)

    # ------------------------------------------------------------------ internals

    def _finish(self, routing_id: bytes, request_id: str, now: float) -> RequestRecord | None:
        """Free the worker's slot and take the request out of the table; None if already answered."""
        worker = self.workers.get(routing_id)
        if worker is not None:
            worker.in_flight.discard(request_id)
            worker.last_seen = worker.last_progress = now
        record = self.requests.pop(request_id, None)
        if record is None:
            self.counters.duplicate_results += 1
            return None
        if record.worker is not None and record.worker != routing_id and record.worker in self.workers:
            self.workers[record.worker].in_flight.discard(request_id)  # answered elsewhere first
        if record.worker is None and request_id in self.queue:
            self.queue.remove(request_id)  # requeued, but its first worker answered after all
        return record

    def _fail(self, request_id: str, code: FailureCode, text: str) -> ToClient:
        record = self.requests.pop(request_id)
        self.counters.requests_failed += 1
        return ToClient(record.client_id, Failure(request_id, code.value, text), record.message.label)

    def _remove_worker(self, routing_id: bytes, now: float, why: Removal, lost_text: str,
                       reason: str = "") -> list[Action]:
        """Forget the worker and requeue what it held, at the front; a request already dispatched
        ``max_attempts`` times fails with worker_lost instead, ``lost_text`` saying how its last
        worker went."""
        worker = self.workers.pop(routing_id)
        name = worker.info.worker_name
        self.retired[(name, worker.info.pid)] = worker.status
        actions: list[Action] = [WorkerRemoved(name, why, reason)]
        # Requeue at the front, oldest first, so they keep their place ahead of newer arrivals.
        # Sorted from self.requests (submission order), not the in_flight set, so ties keep their order.
        held = sorted((rid for rid in self.requests if rid in worker.in_flight),
                      key=lambda rid: self.requests[rid].received_at)
        for request_id in reversed(held):
            record = self.requests[request_id]
            record.worker, record.dispatched_at = None, None
            record.step = record.steps = record.reported_position = None  # its next attempt starts over
            record.paused = False
            if record.attempts >= self.policy.max_attempts:
                actions.append(self._fail(request_id, FailureCode.WORKER_LOST,
                                          f"{record.attempts} workers failed to finish it (last: {lost_text})"))
                continue
            self.queue.appendleft(record.model, request_id, group=queue_group(record.message))
            self.counters.requeued += 1
            actions.append(Requeued(request_id, record.message.label, name, why))
        return actions

    def _worker_name(self, routing_id: bytes) -> str:
        """The registered worker's name, or the connection id (hex) for the log when none is."""
        worker = self.workers.get(routing_id)
        return worker.info.worker_name if worker is not None else routing_id.hex()[:8]

    def current_queue_depth(self) -> int:
        """Requests accepted and not yet in a running batch: the broker's queue plus each worker's."""
        return len(self.queue) + sum(w.queue_depth for w in self.workers.values())

    def _observe_depth(self) -> None:
        self.max_queue_depth = max(self.max_queue_depth, self.current_queue_depth())

    def in_progress(self) -> int:
        return len(self.requests)
