"""Everything the broker knows and decides, as a pure object: no sockets, no clock, no asyncio.

The socket shell (:mod:`broker.server`) decodes a message, calls one method here with ``now``,
and sends the :class:`ToWorker` / :class:`ToClient` actions it gets back. That keeps every rule
(credit, balancing, liveness, requeueing, overload, stats) testable with a fake clock.

Requests live in one table keyed by request id, in one of two places: the broker's FIFO queue
(waiting for a worker with credit) or assigned to one worker. A worker's *credit* is how many
requests it may hold at once (its ``capacity``, announced at registration): the broker hands
work only to workers below it, so a slow worker is never flooded and the backlog waits here,
bounded by ``max_queue_size``.

While requests wait here for credit, a *fair share* caps what each worker may take
(:meth:`BrokerState.fair_share`): the backlog is spread over all workers instead of going to
whichever frees credit first (docs/scheduling.md, "Dispatch across GPUs").
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Union

from broker.balancing import Balancer, Candidate
from gpu_worker.batcher import BatchKey
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
    fair_share: bool = True  # spread a backlog over the workers (see dispatch); False: greedy, as before

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

class BatchTimes:
    """The latest batch duration the workers reported (Result.generation_ms) per BatchKey, as
    (seconds, batch size); the oldest keys are forgotten beyond ``max_keys``."""

    def __init__(self, max_keys: int = 256) -> None:
        self.max_keys = max_keys
        self._latest: dict[BatchKey, tuple[float, int]] = {}

    def observe(self, key: BatchKey, seconds: float, size: int) -> None:
        self._latest.pop(key, None)
        self._latest[key] = (seconds, size)
        if len(self._latest) > self.max_keys:
            del self._latest[next(iter(self._latest))]

    def estimate_s(self, key: BatchKey, size: int) -> float | None:
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
        self.batch_times = BatchTimes()
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
        previous = worker.status
        if message.status.running == 0:
            worker.batch_started_at, worker.running_key = None, None
        elif (previous.running == 0 or worker.batch_started_at is None
              or message.status.total_batches != previous.total_batches):  # a new batch started
            keys = {BatchKey.of(self.requests[rid].message.params) for rid in worker.in_flight if rid in self.requests}
            worker.batch_started_at, worker.running_key = now, keys.pop() if len(keys) == 1 else None
        worker.status = message.status
        worker.sent_since_status = 0
        self._observe_depth()
        return self.dispatch(now)

    def result(self, routing_id: bytes, message: Result, now: float) -> list[Action]:
        """A worker finished a request: forward the image to its client (first answer wins)."""
        record = self._finish(routing_id, message.request_id, now)
        if record is None:
            return self.dispatch(now)
        self.counters.requests_completed += 1
        if message.generation_ms > 0:
            self.batch_times.observe(BatchKey.of(record.message.params), message.generation_ms / 1000.0,
                                     message.batch_size)
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
        """Hand queued requests, oldest first, to workers with credit, as the balancer chooses.

        **Fair share.** While requests wait here for credit (a backlog), a worker may take one only
        while its unfinished work (:meth:`unfinished`) is below its fair share of all unfinished
        work, this queue's included (:meth:`fair_share`). Without it the backlog goes to
        whichever worker frees credit first: workers that finish a batch together return its images
        over a fraction of a second, and the first to return them queued most of an extra batch
        (4 GPUs, a burst of 200: 40 each at once, then the 40 left over went 16/8/8/8 in the
        simulator, and on four H100s one GPU's third batch ran ~19 s, instead of 10 each). Without
        a backlog the balancer alone decides, as before; with one worker the share never binds."""
        actions: list[Action] = []
        while self.queue:
            request_id = self.queue[0]
            record = self.requests[request_id]
            if self._past_deadline(record, now):
                self.queue.popleft()
                actions.append(self._fail_late(request_id))
                continue
            chosen = self.balancer.choose(self._candidates(now))
            if chosen is None:
                break
            self.queue.popleft()
            worker = self.workers[chosen]
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
            actions.append(ToWorker(chosen, replace(record.message, deadline_s=remaining_s)))
        return actions

    def _candidates(self, now: float) -> list[Candidate]:
        ordered = [w for w in sorted(self.workers.values(), key=lambda w: w.order) if w.accepting]
        share = self.fair_share(now, ordered)
        return [Candidate(w.routing_id, len(w.in_flight), w.info.capacity,
                          over_share=share is not None and self.unfinished(w, now) >= share)
                for w in ordered]

    def fair_share(self, now: float, workers: list[WorkerRecord] | None = None) -> int | None:
        """A worker holding this many unfinished requests or more may take no other now; None: no cap.

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
        if not self.policy.fair_share or not self.queue:
            return None
        if workers is None:
            workers = [w for w in self.workers.values() if w.accepting]
        if len(workers) < 2 or self.requests[self.queue[0]].received_at >= now:
            return None
        total = len(self.queue) + sum(self.unfinished(w, now) for w in workers)
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
            expected_s = self.batch_times.estimate_s(worker.running_key, running)
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
