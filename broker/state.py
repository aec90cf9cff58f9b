"""Everything the broker knows and decides, as a pure object: no sockets, no clock, no asyncio.

The socket shell (:mod:`broker.server`) decodes a message, calls one method here with ``now``,
and sends the :class:`ToWorker` / :class:`ToClient` actions it gets back. That keeps every rule
(credit, balancing, liveness, requeueing, overload, stats) testable with a fake clock.

Requests live in one table keyed by request id, in one of two places: the broker's FIFO queue
(waiting for a worker with credit) or assigned to one worker. A worker's *credit* is how many
requests it may hold at once (its ``capacity``, announced at registration): the broker hands
work only to workers below it, so a slow worker is never flooded and the backlog waits here,
bounded by ``max_queue_size``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Union

from broker.balancing import Balancer, Candidate
from imagegen.protocol import (
    Cancel,
    Disconnect,
    Failure,
    FailureCode,
    Generate,
    Heartbeat,
    Message,
    Register,
    Result,
    Welcome,
    WorkerStatus,
)


@dataclass(frozen=True)
class ToWorker:
    routing_id: bytes
    message: Message


@dataclass(frozen=True)
class ToClient:
    client_id: bytes
    message: Message  # a Result is sent with the payload frames the worker sent


Action = Union[ToWorker, ToClient]


@dataclass(frozen=True)
class BrokerPolicy:
    strategy: str = "queue-depth"
    max_queue_size: int = 1000
    heartbeat_interval_s: float = 1.0
    liveness: int = 5  # heartbeats a worker may miss before it is declared dead
    max_attempts: int = 3  # dispatches of one request before it fails with worker_lost

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


_EMPTY_STATUS = WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0)


@dataclass
class WorkerRecord:
    routing_id: bytes
    info: Register
    registered_at: float
    last_seen: float
    status: WorkerStatus = _EMPTY_STATUS
    in_flight: set[str] = field(default_factory=set)
    order: int = 0  # registration order, for stable round-robin

    @property
    def queue_depth(self) -> int:
        """Requests this worker holds that are not in its running batch."""
        return max(0, len(self.in_flight) - self.status.running)

    @property
    def accepting(self) -> bool:
        return self.status.state == "ready"


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


class BrokerState:
    def __init__(self, policy: BrokerPolicy, epoch: str) -> None:
        self.policy = policy
        self.epoch = epoch
        self.balancer = Balancer(policy.strategy)
        self.requests: dict[str, RequestRecord] = {}
        self.queue: deque[str] = deque()  # ids waiting for a worker; the front goes first
        self.workers: dict[bytes, WorkerRecord] = {}
        self.counters = Counters()
        self.max_queue_depth = 0
        # Last counters of each worker process that left, so cluster totals never go backwards.
        # Keyed by (name, pid): a process that comes back re-reports its cumulative counters
        # itself, so its retired entry is dropped then rather than counted twice.
        self.retired: dict[tuple[str, int], WorkerStatus] = {}
        self._registration_order = itertools.count()
        self.draining = False

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
            # Another gateway's request has this id (ids may come from clients' X-Request-ID): refuse
            # it rather than drop it silently or mix the two up.
            text = f"request id {message.request_id!r} is already in use; send a unique X-Request-ID"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.INVALID_REQUEST.value, text))]
        self.counters.requests_received += 1
        if self.draining:
            self.counters.rejected_draining += 1
            text = "the broker is shutting down; retry in a few seconds"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.SHUTTING_DOWN.value, text))]
        if len(self.queue) >= self.policy.max_queue_size:
            self.counters.rejected_overloaded += 1
            text = f"the broker's queue is full ({self.policy.max_queue_size} requests waiting); retry later"
            return [ToClient(client_id, Failure(message.request_id, FailureCode.OVERLOADED.value, text))]
        self.requests[message.request_id] = RequestRecord(client_id, message, now)
        self.queue.append(message.request_id)
        self._observe_depth()
        return self.dispatch(now)

    def cancel(self, client_id: bytes, message: Cancel, now: float) -> list[Action]:
        """The client gave up: forget the request; if a worker holds it, tell the worker to drop it."""
        record = self.requests.get(message.request_id)
        if record is None or record.client_id != client_id:
            return []  # already answered, or not this client's to cancel
        del self.requests[message.request_id]
        self.counters.cancelled += 1
        if record.worker is None:
            self.queue.remove(message.request_id)
            return []
        worker = self.workers.get(record.worker)
        if worker is None:
            return []
        # Free the slot now: if the request is already in a running batch, the worker holds one
        # more than we count until that batch ends (its late result is dropped as a duplicate).
        worker.in_flight.discard(message.request_id)
        return [ToWorker(record.worker, message)] + self.dispatch(now)

    def fail_all(self, code: FailureCode, text: str) -> list[Action]:
        """Answer every request still held with ``code`` (the broker is going away)."""
        self.queue.clear()
        for worker in self.workers.values():
            worker.in_flight.clear()
        return [self._fail(request_id, code, text) for request_id in list(self.requests)]

    def accepting_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.accepting)

    # ------------------------------------------------------------------ worker side

    def register(self, routing_id: bytes, message: Register, now: float) -> list[Action]:
        actions: list[Action] = []
        # A restarted worker comes back under its old name with a new connection, and a connection
        # may re-register under a new name: either way the old record goes, its work requeued.
        for old in [w for w in self.workers.values()
                    if w.info.worker_name == message.worker_name or w.routing_id == routing_id]:
            actions += self._remove_worker(old.routing_id, now, f"{message.worker_name} re-registered")
        self.retired.pop((message.worker_name, message.pid), None)
        self.workers[routing_id] = WorkerRecord(
            routing_id, message, now, now, order=next(self._registration_order)
        )
        self.counters.workers_registered += 1
        actions.append(ToWorker(routing_id, Welcome(self.epoch, self.policy.heartbeat_interval_s)))
        return actions + self.dispatch(now)

    def heartbeat(self, routing_id: bytes, message: Heartbeat, now: float) -> list[Action]:
        worker = self.workers.get(routing_id)
        if worker is None:
            # Unknown sender: we restarted, or expired it. Ask it to register again.
            return [ToWorker(routing_id, Disconnect("unknown worker: register again"))]
        worker.last_seen = now
        worker.status = message.status
        self._observe_depth()
        return self.dispatch(now)

    def result(self, routing_id: bytes, message: Result, now: float) -> list[Action]:
        """A worker finished a request: forward the image to its client (first answer wins)."""
        record = self._finish(routing_id, message.request_id, now)
        if record is None:
            return self.dispatch(now)
        self.counters.requests_completed += 1
        broker_wait_ms = ((record.dispatched_at or record.received_at) - record.received_at) * 1000.0
        forwarded = replace(message, queue_wait_ms=message.queue_wait_ms + broker_wait_ms)
        return [ToClient(record.client_id, forwarded)] + self.dispatch(now)

    def failure(self, routing_id: bytes, message: Failure, now: float) -> list[Action]:
        record = self._finish(routing_id, message.request_id, now)
        if record is None:
            return self.dispatch(now)
        self.counters.requests_failed += 1
        return [ToClient(record.client_id, message)] + self.dispatch(now)

    def disconnect(self, routing_id: bytes, now: float) -> list[Action]:
        """A worker says goodbye; whatever it still held goes back to the front of the queue."""
        if routing_id not in self.workers:
            return []
        return self._remove_worker(routing_id, now, "worker disconnected") + self.dispatch(now)

    def expire(self, now: float) -> list[Action]:
        """Declare dead every worker silent for longer than the liveness window; requeue its work.

        Also fails queued requests past their deadline, wherever they sit in the queue (dispatch
        only looks at its head, and does not run at all while no worker has credit)."""
        actions: list[Action] = self._expire_deadlines(now)
        deadline = now - self.policy.worker_timeout_s
        expired = [w for w in self.workers.values() if w.last_seen < deadline]
        for worker in expired:
            self.counters.workers_expired += 1
            actions += self._remove_worker(worker.routing_id, now, "missed heartbeats")
        # Dispatch whenever a worker went, not only when a request failed: requeued work needs a new home.
        return actions + (self.dispatch(now) if expired else [])

    def _expire_deadlines(self, now: float) -> list[Action]:
        late = [rid for rid in self.queue if self._past_deadline(self.requests[rid], now)]
        for request_id in late:
            self.queue.remove(request_id)
        return [self._fail_late(request_id) for request_id in late]

    def _past_deadline(self, record: RequestRecord, now: float) -> bool:
        return now > record.received_at + record.message.deadline_s

    def _fail_late(self, request_id: str) -> ToClient:
        self.counters.deadline_expired += 1
        return self._fail(request_id, FailureCode.DEADLINE_EXCEEDED,
                          "the request waited in the broker's queue past its deadline")

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> list[Action]:
        """Hand queued requests, oldest first, to workers with credit, as the balancer chooses."""
        actions: list[Action] = []
        while self.queue:
            request_id = self.queue[0]
            record = self.requests[request_id]
            if self._past_deadline(record, now):
                self.queue.popleft()
                actions.append(self._fail_late(request_id))
                continue
            chosen = self.balancer.choose(self._candidates())
            if chosen is None:
                break
            self.queue.popleft()
            worker = self.workers[chosen]
            worker.in_flight.add(request_id)
            record.worker, record.dispatched_at = chosen, now
            record.attempts += 1
            # The worker gets the time left, so it can drop the request before spending GPU on it.
            remaining_s = max(0.0, record.received_at + record.message.deadline_s - now)
            actions.append(ToWorker(chosen, replace(record.message, deadline_s=remaining_s)))
        return actions

    def _candidates(self) -> list[Candidate]:
        ordered = sorted(self.workers.values(), key=lambda w: w.order)
        return [Candidate(w.routing_id, len(w.in_flight), w.info.capacity) for w in ordered if w.accepting]

    # ------------------------------------------------------------------ internals

    def _finish(self, routing_id: bytes, request_id: str, now: float) -> RequestRecord | None:
        """Free the worker's slot and take the request out of the table; None if already answered."""
        worker = self.workers.get(routing_id)
        if worker is not None:
            worker.in_flight.discard(request_id)
            worker.last_seen = now
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
        return ToClient(record.client_id, Failure(request_id, code.value, text))

    def _remove_worker(self, routing_id: bytes, now: float, why: str) -> list[Action]:
        worker = self.workers.pop(routing_id)
        self.retired[(worker.info.worker_name, worker.info.pid)] = worker.status
        actions: list[Action] = []
        # Requeue at the front, oldest first, so they keep their place ahead of newer arrivals.
        # Sorted from self.requests (submission order), not the in_flight set, so ties keep their order.
        held = sorted((rid for rid in self.requests if rid in worker.in_flight),
                      key=lambda rid: self.requests[rid].received_at)
        for request_id in reversed(held):
            record = self.requests[request_id]
            record.worker, record.dispatched_at = None, None
            if record.attempts >= self.policy.max_attempts:
                actions.append(self._fail(request_id, FailureCode.WORKER_LOST,
                                          f"{record.attempts} workers failed to finish it (last: {why})"))
                continue
            self.queue.appendleft(request_id)
            self.counters.requeued += 1
        return actions

    def current_queue_depth(self) -> int:
        """Requests accepted and not yet in a running batch: the broker's queue plus each worker's."""
        return len(self.queue) + sum(w.queue_depth for w in self.workers.values())

    def _observe_depth(self) -> None:
        self.max_queue_depth = max(self.max_queue_depth, self.current_queue_depth())

    def in_progress(self) -> int:
        return len(self.requests)
