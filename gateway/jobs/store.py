"""The job store: job records, each job's event log and the webhook outbox, in one place.

One interface, :class:`JobStore`, two implementations with the same behaviour (the tests are written
once and run against both, tests/support/job_store_contract.py):

* :class:`SqliteJobStore` (``JOB_STORE=sqlite``, the default): one file, ``STATE_DIR/jobs.sqlite3``,
  in WAL journal mode, for one gateway. A committed change survives the gateway's crash or restart
  (``synchronous=NORMAL``: a power cut may lose the last moments, never corrupt the file).
* :class:`RedisJobStore` (``JOB_STORE=redis``, ``JOB_STORE_URL``): redis-py against one Redis
  server (not Redis Cluster: the scripts touch keys they compute), so several gateways share jobs.
  What survives a restart of Redis itself is Redis's persistence (AOF or RDB), its operator's choice.

:func:`open_job_store` picks one from the gateway's settings.

Calling it
----------
Every method blocks (disk or network I/O): from asyncio, call it in a thread
(``await asyncio.to_thread(store.get, job_id, owner)``). Both stores are safe for that: the SQLite
store shares one connection (``check_same_thread=False``) behind a lock, each change in one
``BEGIN IMMEDIATE`` transaction; the Redis store makes each change in one Lua script, atomic on the
server, through redis-py's thread-safe connection pool. An unreachable store raises
:class:`JobStoreUnavailable` (the route answers 503); a bad argument raises ``ValueError``.

Jobs (:class:`Job`)
-------------------
``new_job(owner, request, now, ...)`` makes a record: a random URL-safe id (128 bits), status
``queued``, ``body_hash`` over everything that defines the job (request, webhook, webhook_events,
preview). ``owner`` is the API key's name, "" when keys are off.

* ``create(job)`` stores it and returns it. With ``job.idempotency_key`` set, a job of the same owner
  with the same key and the same ``body_hash`` is returned instead (its id differs from
  ``job.id``: nothing new was stored); the same key with another body raises
  :class:`IdempotencyConflict` (the route answers 409). Keys belong to their owner: another owner's
  equal key is another key.
* ``get(job_id, owner)``: the job, or None when there is none or it is another owner's (the route
  answers 404 either way, revealing nothing). ``load(job_id)`` skips the owner check: for the
  gateway's own bookkeeping (results arriving from the broker), never for an id a client sent.
* ``update(job_id, **changes)``: a partial update of the fields in :data:`UPDATABLE` (status,
  timestamps, progress, batch_size, worker, queue_position, estimated_start_at, attempt, result,
  error), returning the
  job as it now is. **Terminal states are final**: once a job is succeeded, failed or cancelled, an
  update is *ignored* (nothing changes) and returns None, as it does for an unknown id, so a result
  that arrives after a cancel cannot overwrite it. A terminal status needs ``finished_at``.
* ``unfinished(limit)``: queued, running and paused jobs (for a gateway that starts again to collect them).

Events (:class:`Event`)
-----------------------
``append_event(job_id, type, data, at=...)`` adds an event of one of :data:`EVENT_TYPES` (the SSE
event names) with the next id of that job (1, 2, 3...: the SSE ``id``, resumable with
``Last-Event-ID``), and returns it; ``events_after(job_id, last_event_id)`` lists the later ones in
order. After a terminal event (succeeded, failed, cancelled) the log is closed: further events are
ignored (None). **Bound**: a job keeps at most ``max_events`` (:data:`DEFAULT_MAX_EVENTS`, 256) of
the frequent events, :data:`TRIMMED_EVENTS` (queued position changes, progress, preview); beyond
it the oldest of them are dropped. The rest (started, restarted, the terminal event) are never
dropped; there is one per start or restart and one terminal, so a job's log stays near
``max_events``. A reader resuming past a dropped event simply gets the newer ones.

Webhook outbox (:class:`Delivery`)
----------------------------------
* ``enqueue(job_id, event, now)``: a delivery of ``event`` to the job's webhook, due at ``now``;
  None when the job has no webhook (which events are wanted is the caller's choice:
  :func:`gateway.jobs.webhooks.record_event` appends and enqueues by the job's filter). Its id
  (``msg_<job id>.<event id>``) is the ``webhook-id`` of every attempt, for the receiver's
  deduplication. **Coalescing**: a delivery of one of :data:`TRIMMED_EVENTS` replaces the job's
  pending delivery of the same type that is not being sent right now, keeping its attempt count
  and schedule, so a receiver that lags gets the latest progress rather than a backlog, and its
  backoff holds. Terminal events (and started, restarted) are never coalesced or dropped.
  Deliveries are not ordered: a receiver orders a job's events by ``event_id`` in the payload.
* ``claim_due(now, limit, lease_s)``: up to ``limit`` deliveries due by ``now``, oldest first, each
  leased for ``lease_s`` seconds (not due again meanwhile, so gateways sharing a store do not send
  the same one at once; one whose sender died is sent again when the lease ends: at least once).
* ``mark_delivered(id)``, ``mark_retry(id, next_attempt_at, attempts)``, ``mark_given_up(id)``:
  the outcome of an attempt. Delivered and given-up deliveries leave the outbox.

Retention
---------
``purge(now, max_age_s)`` deletes jobs that finished more than ``max_age_s`` seconds before
``now``, with their events, their deliveries and their idempotency keys, and returns how many. Jobs
not finished are never purged.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# The SSE event names; a terminal event has a terminal status's name.
EVENT_TYPES = ("queued", "started", "progress", "preview", "restarted", "paused", "resumed", "succeeded", "failed",
               "cancelled")
TERMINAL_EVENTS = TERMINAL_STATUSES
# Frequent events: the log keeps the newest max_events of them, the outbox the latest pending one.
TRIMMED_EVENTS = frozenset({"queued", "progress", "preview"})
DEFAULT_MAX_EVENTS = 256
DEFAULT_LEASE_S = 60.0
SQLITE_FILE = "jobs.sqlite3"
PURGE_BATCH = 500  # jobs deleted per transaction or script, so a large purge never blocks for long

T = TypeVar("T")


class JobStoreError(Exception):
    """Base of the store's own errors."""


class IdempotencyConflict(JobStoreError):
    """The idempotency key was used before, by the same owner, with a different body (HTTP 409)."""

    def __init__(self, key: str, existing_id: str) -> None:
        super().__init__(f"the Idempotency-Key {key!r} was already used with a different request body "
                         f"(job {existing_id}); send the same body to get that job again, or use a new key")
        self.key = key
        self.existing_id = existing_id


class JobStoreUnavailable(JobStoreError):
    """The store could not be reached or written (Redis down, SQLite file locked or unwritable): HTTP 503."""


@dataclass(frozen=True)
class Job:
    """One job. Timestamps are Unix seconds; ``request`` is the request body (JSON)."""

    id: str
    owner: str
    request: dict
    created_at: float
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict | None = None          # {"step": n, "steps": m}
    batch_size: int | None = None
    worker: str | None = None
    queue_position: int | None = None
    attempt: int = 1                      # 2 after the first restart (preemption, a worker lost)
    result: dict | None = None            # image_url and the timings /generate answers with
    error: dict | None = None             # {"code", "message"}
    idempotency_key: str | None = None
    body_hash: str = ""
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] | None = None  # the job's filter as given (webhooks.py reads it)
    preview: bool = False
    request_id: str | None = None         # the service-made id of its request at the broker (collect, cancel)
    gateway: str | None = None            # the GATEWAY_ID of the gateway that runs it (several share Redis)
    estimated_start_at: float | None = None  # while queued: when the broker expects it to start

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        if self.webhook_events is not None:
            document["webhook_events"] = list(self.webhook_events)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Job":
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in document.items() if name in known}
        if values.get("webhook_events") is not None:
            values["webhook_events"] = tuple(values["webhook_events"])
        return cls(**values)


# What update() may change; the rest is fixed at creation.
UPDATABLE = frozenset({"status", "started_at", "finished_at", "progress", "batch_size", "worker",
                       "queue_position", "estimated_start_at", "attempt", "result", "error"})


@dataclass(frozen=True)
class Event:
    """One event of a job's log; ``id`` increases per job from 1 (the SSE event id)."""

    job_id: str
    id: int
    type: str
    data: dict
    at: float


@dataclass(frozen=True)
class Delivery:
    """One event on its way to a job's webhook. ``id`` is the ``webhook-id`` of every attempt;
    ``attempts`` counts the attempts made before this one."""

    id: str
    job_id: str
    event_id: int
    type: str
    data: dict
    at: float
    url: str
    attempts: int
    next_attempt_at: float


def body_hash(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces): equal for equal JSON."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def new_job_id() -> str:
    return secrets.token_urlsafe(16)


def new_job(owner: str, request: dict, now: float, *, webhook_url: str | None = None,
            webhook_events: tuple[str, ...] | list[str] | None = None, preview: bool = False,
            idempotency_key: str | None = None) -> Job:
    """A queued job with a fresh id; ``body_hash`` covers the request and the webhook options."""
    events = tuple(webhook_events) if webhook_events is not None else None
    digest = body_hash({"request": request, "webhook": webhook_url,
                        "webhook_events": list(events) if events is not None else None, "preview": preview})
    return Job(id=new_job_id(), owner=owner, request=request, created_at=now, idempotency_key=idempotency_key,
               body_hash=digest, webhook_url=webhook_url, webhook_events=events, preview=preview)


def delivery_id(job_id: str, event_id: int) -> str:
    return f"msg_{job_id}.{event_id}"


def check_changes(changes: Mapping[str, Any]) -> None:
    """Refuse an update that names a field update() may not change, an unknown status, or a terminal
    status without finished_at."""
    unknown = sorted(set(changes) - UPDATABLE)
    if unknown:
        raise ValueError(f"update() cannot change {unknown}; it changes {sorted(UPDATABLE)}")
    status = changes.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    if status in TERMINAL_STATUSES and changes.get("finished_at") is None:
        raise ValueError(f"a job set to {status} needs finished_at")


def check_new(job: Job) -> None:
    if job.finished:
        raise ValueError(f"create() takes a queued or running job, not a {job.status} one")


def check_event_type(event_type: str) -> None:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type {event_type!r} is not one of {EVENT_TYPES}")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class JobStore(abc.ABC):
    """The interface both stores implement; the module docstring says what each method does."""

    max_events: int = DEFAULT_MAX_EVENTS

    @abc.abstractmethod
    def create(self, job: Job) -> Job:
        """Store ``job``, or return the owner's job with the same idempotency key and body
        (IdempotencyConflict for another body)."""

    @abc.abstractmethod
    def load(self, job_id: str) -> Job | None:
        """The job whatever its owner (the gateway's own bookkeeping only)."""

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job if ``owner`` made it; None otherwise (unknown or another owner's)."""
        job = self.load(job_id)
        return job if job is not None and job.owner == owner else None

    @abc.abstractmethod
    def update(self, job_id: str, **changes: Any) -> Job | None:
        """Apply a partial update; None (nothing changed) for an unknown or finished job."""

    @abc.abstractmethod
    def unfinished(self, limit: int = 10000) -> list[Job]:
        """Up to ``limit`` queued or running jobs."""

    @abc.abstractmethod
    def append_event(self, job_id: str, type: str, data: dict | None = None, *,
                     at: float | None = None) -> Event | None:
        """Add an event with the job's next event id; None for an unknown job or a closed log."""

    @abc.abstractmethod
    def events_after(self, job_id: str, last_event_id: int = 0, limit: int | None = None) -> list[Event]:
        """The job's kept events with an id above ``last_event_id``, in order."""

    @abc.abstractmethod
    def enqueue(self, job_id: str, event: Event, now: float) -> Delivery | None:
        """Queue ``event`` for the job's webhook (None without one), coalescing frequent events."""

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[Delivery]:
        """Up to ``limit`` due deliveries, oldest first, each leased for ``lease_s``."""

    @abc.abstractmethod
    def mark_delivered(self, delivery_id: str) -> None:
        """The receiver took it (2xx): it leaves the outbox."""

    @abc.abstractmethod
    def mark_retry(self, delivery_id: str, next_attempt_at: float, attempts: int) -> None:
        """Try again at ``next_attempt_at``; ``attempts`` made so far. Nothing if it left the outbox."""

    @abc.abstractmethod
    def mark_given_up(self, delivery_id: str) -> None:
        """No more attempts: it leaves the outbox (the sender counts it)."""

    @abc.abstractmethod
    def pending_deliveries(self, job_id: str) -> list[Delivery]:
        """The job's deliveries still in the outbox, by event id."""

    @abc.abstractmethod
    def purge(self, now: float, max_age_s: float) -> int:
        """Delete jobs finished before ``now - max_age_s`` with everything of theirs; how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the store is not used afterwards."""


def open_job_store(settings: Any) -> JobStore:
    """The store the gateway's settings choose: JOB_STORE=sqlite (STATE_DIR/jobs.sqlite3) or redis
    (JOB_STORE_URL)."""
    if settings.job_store == "redis":
        return RedisJobStore(str(settings.job_store_url))
    return SqliteJobStore(Path(settings.state_dir) / SQLITE_FILE)


def _translating(errors: tuple[type[BaseException], ...], what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Raise JobStoreUnavailable, naming the store, for the driver's errors of reaching or writing it."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except errors as exc:
                raise JobStoreUnavailable(f"the job store ({what} {self.where}) failed: {exc}") from exc
        return wrapped

    return decorate


# ---------------------------------------------------------------------------------------------
# SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    idempotency_key TEXT,
    doc TEXT NOT NULL,                      -- the Job as JSON
    event_seq INTEGER NOT NULL DEFAULT 0,   -- the last event id given
    events_closed INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (created_at) WHERE finished_at IS NULL;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    type TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    at REAL NOT NULL,
    url TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    leased_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_by_job ON outbox (job_id, type);
"""

_TRIMMED_SQL = "(" + ",".join(f"'{name}'" for name in sorted(TRIMMED_EVENTS)) + ")"
_SQLITE_ERRORS = (sqlite3.OperationalError, sqlite3.DatabaseError)


class SqliteJobStore(JobStore):
    """The store in one SQLite file (WAL journal mode), made with mode 0600 if it does not exist."""

    def __init__(self, path: str | os.PathLike, *, max_events: int = DEFAULT_MAX_EVENTS,
                 busy_timeout_s: float = 5.0) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.path = Path(path)
        self.where = str(self.path)
        self.max_events = max_events
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # prompts are private
            # Autocommit mode: every change is one explicit BEGIN IMMEDIATE ... COMMIT (_transaction).
            self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreUnavailable(f"cannot open the job store {self.path}: {exc}; check that STATE_DIR "
                                      "exists and is writable by the gateway") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JobStoreUnavailable(f"{self.path}: SQLite cannot use WAL journal mode there (it answered "
                                          f"{mode!r}); put STATE_DIR on a local file system")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise JobStoreUnavailable(f"cannot use the job store {self.path}: {exc}; move the file away to "
                                      "start with an empty store") from exc
        except JobStoreUnavailable:
            self._db.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def create(self, job: Job) -> Job:
        check_new(job)
        with self._transaction() as db:
            if job.idempotency_key is not None:
                row = db.execute("SELECT doc FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                 (job.owner, job.idempotency_key)).fetchone()
                if row is not None:
                    existing = Job.from_json(json.loads(row[0]))
                    if existing.body_hash != job.body_hash:
                        raise IdempotencyConflict(job.idempotency_key, existing.id)
                    return existing
            try:
                db.execute("INSERT INTO jobs (id, owner, status, created_at, finished_at, idempotency_key, doc) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (job.id, job.owner, job.status, job.created_at, job.finished_at, job.idempotency_key,
                            _dumps(job.to_json())))
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"a job with id {job.id!r} already exists") from exc
        return job

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def load(self, job_id: str) -> Job | None:
        with self._reading() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_json(json.loads(row[0])) if row is not None else None

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def update(self, job_id: str, **changes: Any) -> Job | None:
        check_changes(changes)
        with self._transaction() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_json(json.loads(row[0]))
            if job.finished:
                return None  # terminal states are final: the update is ignored
            job = replace(job, **changes)
            db.execute("UPDATE jobs SET status = ?, finished_at = ?, doc = ? WHERE id = ?",
                       (job.status, job.finished_at if job.finished else None, _dumps(job.to_json()), job_id))
        return job

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def unfinished(self, limit: int = 10000) -> list[Job]:
        with self._reading() as db:
            rows = db.execute("SELECT doc FROM jobs WHERE finished_at IS NULL ORDER BY created_at LIMIT ?",
                              (limit,)).fetchall()
        return [Job.from_json(json.loads(row[0])) for row in rows]

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def append_event(self, job_id: str, type: str, data: dict | None = None, *,
                     at: float | None = None) -> Event | None:
        check_event_type(type)
        data = {} if data is None else data
        at = time.time() if at is None else at
        with self._transaction() as db:
            row = db.execute("SELECT event_seq, events_closed FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1]:
                return None
            event_id = row[0] + 1
            db.execute("UPDATE jobs SET event_seq = ?, events_closed = ? WHERE id = ?",
                       (event_id, int(type in TERMINAL_EVENTS), job_id))
            db.execute("INSERT INTO events (job_id, id, type, at, data) VALUES (?, ?, ?, ?, ?)",
                       (job_id, event_id, type, at, _dumps(data)))
            if type in TRIMMED_EVENTS:
                kept = db.execute(f"SELECT count(*) FROM events WHERE job_id = ? AND type IN {_TRIMMED_SQL}",
                                  (job_id,)).fetchone()[0]
                if kept > self.max_events:
                    db.execute(f"DELETE FROM events WHERE job_id = ? AND id IN (SELECT id FROM events "
                               f"WHERE job_id = ? AND type IN {_TRIMMED_SQL} ORDER BY id LIMIT ?)",
                               (job_id, job_id, kept - self.max_events))
        return Event(job_id, event_id, type, data, at)

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def events_after(self, job_id: str, last_event_id: int = 0, limit: int | None = None) -> list[Event]:
        with self._reading() as db:
            rows = db.execute("SELECT id, type, at, data FROM events WHERE job_id = ? AND id > ? ORDER BY id "
                              "LIMIT ?", (job_id, last_event_id, -1 if limit is None else limit)).fetchall()
        return [Event(job_id, row[0], row[1], json.loads(row[3]), row[2]) for row in rows]

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def enqueue(self, job_id: str, event: Event, now: float) -> Delivery | None:
        with self._transaction() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            url = json.loads(row[0]).get("webhook_url") if row is not None else None
            if url is None:
                return None
            attempts, next_attempt_at = 0, now
            if event.type in TRIMMED_EVENTS:
                replaced = db.execute("SELECT id, attempts, next_attempt_at FROM outbox "
                                      "WHERE job_id = ? AND type = ? AND leased_until <= ?",
                                      (job_id, event.type, now)).fetchall()
                for old_id, old_attempts, old_next in replaced:
                    attempts, next_attempt_at = max(attempts, old_attempts), max(next_attempt_at, old_next)
                    db.execute("DELETE FROM outbox WHERE id = ?", (old_id,))
            delivery = Delivery(delivery_id(job_id, event.id), job_id, event.id, event.type, event.data, event.at,
                                url, attempts, next_attempt_at)
            db.execute("INSERT OR REPLACE INTO outbox (id, job_id, event_id, type, data, at, url, attempts, "
                       "next_attempt_at, leased_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                       (delivery.id, job_id, event.id, event.type, _dumps(event.data), event.at, url, attempts,
                        next_attempt_at))
        return delivery

    _DELIVERY_COLUMNS = "id, job_id, event_id, type, data, at, url, attempts, next_attempt_at"

    @staticmethod
    def _delivery(row: tuple) -> Delivery:
        return Delivery(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7], row[8])

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def claim_due(self, now: float, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[Delivery]:
        lease_until = now + lease_s
        with self._transaction() as db:
            rows = db.execute(f"SELECT {self._DELIVERY_COLUMNS} FROM outbox WHERE next_attempt_at <= ? "
                              "ORDER BY next_attempt_at, id LIMIT ?", (now, limit)).fetchall()
            db.executemany("UPDATE outbox SET next_attempt_at = ?, leased_until = ? WHERE id = ?",
                           [(lease_until, lease_until, row[0]) for row in rows])
        return [replace(self._delivery(row), next_attempt_at=lease_until) for row in rows]

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def mark_delivered(self, delivery_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (delivery_id,))

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def mark_retry(self, delivery_id: str, next_attempt_at: float, attempts: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET next_attempt_at = ?, attempts = ?, leased_until = 0 WHERE id = ?",
                       (next_attempt_at, attempts, delivery_id))

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def mark_given_up(self, delivery_id: str) -> None:
        self.mark_delivered(delivery_id)

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def pending_deliveries(self, job_id: str) -> list[Delivery]:
        with self._reading() as db:
            rows = db.execute(f"SELECT {self._DELIVERY_COLUMNS} FROM outbox WHERE job_id = ? ORDER BY event_id",
                              (job_id,)).fetchall()
        return [self._delivery(row) for row in rows]

    @_translating(_SQLITE_ERRORS, "SQLite file")
    def purge(self, now: float, max_age_s: float) -> int:
        cutoff, purged = now - max_age_s, 0
        while True:
            with self._transaction() as db:
                ids = [row[0] for row in db.execute(
                    "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?",
                    (cutoff, PURGE_BATCH))]
                for table, column in (("events", "job_id"), ("outbox", "job_id"), ("jobs", "id")):
                    db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(job_id,) for job_id in ids])
            purged += len(ids)
            if len(ids) < PURGE_BATCH:
                return purged

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------
# Redis
#
# Keys, under a prefix (default "imagegen:jobs:"):
#   job:<id>             hash: each Job field as JSON text, plus _seq (last event id), _closed
#                        (the log ended) and _idem (the idempotency key's Redis key, or "")
#   idem:<sha256>        string: the job id of an (owner, idempotency key)
#   events:<id>          sorted set: event JSON scored by event id
#   trimmed:<id>         list: ids of the job's kept TRIMMED_EVENTS, oldest first
#   unfinished           set: ids of jobs not finished
#   finished             sorted set: finished job ids scored by finished_at (retention)
#   delivery:<did>       hash: a delivery's fields
#   due                  sorted set: delivery ids scored by next_attempt_at (or lease end)
#   job-deliveries:<id>  set: a job's delivery ids
# Each change is one Lua script, atomic on the server. Values are JSON made in Python; the scripts
# compare and copy them as text and never decode them (Lua's cjson would round large integers).

_LUA_CREATE = """
local prefix, job_id, digest, has_key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if has_key == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing then
    local existing_hash = redis.call('HGET', prefix .. 'job:' .. existing, 'body_hash')
    if existing_hash then
      if existing_hash == digest then return {'existing', existing} end
      return {'conflict', existing}
    end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', job_id} end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], '_seq', 0, '_closed', 0, '_idem', has_key == '1' and KEYS[2] or '')
if has_key == '1' then redis.call('SET', KEYS[2], job_id) end
redis.call('SADD', KEYS[3], job_id)
return {'created', job_id}
"""

_LUA_UPDATE = """
local job_id, finished_at = ARGV[1], ARGV[2]
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"succeeded"' or status == '"failed"' or status == '"cancelled"' then return false end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if finished_at ~= '' then
  redis.call('SREM', KEYS[2], job_id)
  redis.call('ZADD', KEYS[3], finished_at, job_id)
end
return redis.call('HGETALL', KEYS[1])
"""

_LUA_APPEND = """
local type_json, at_json, data_json, trimmed, terminal, max_events = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local closed = redis.call('HGET', KEYS[1], '_closed')
if not closed or closed == '1' then return false end
local id = redis.call('HINCRBY', KEYS[1], '_seq', 1)
if terminal == '1' then redis.call('HSET', KEYS[1], '_closed', 1) end
redis.call('ZADD', KEYS[2], id, '{"id":' .. id .. ',"type":' .. type_json .. ',"at":' .. at_json .. ',"data":' .. data_json .. '}')
if trimmed == '1' then
  redis.call('RPUSH', KEYS[3], id)
  while redis.call('LLEN', KEYS[3]) > max_events do
    local oldest = redis.call('LPOP', KEYS[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], oldest, oldest)
  end
end
return id
"""

_LUA_ENQUEUE = """
local prefix, job_id, did, event_id, type_name, data_json, at, now, coalesce = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local url = redis.call('HGET', KEYS[1], 'webhook_url')
if not url or url == 'null' then return false end
local attempts, next_at, next_text = 0, tonumber(now), now
if coalesce == '1' then
  for _, old in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local key = prefix .. 'delivery:' .. old
    local fields = redis.call('HMGET', key, 'type', 'leased_until', 'attempts')
    if fields[1] == type_name and tonumber(fields[2]) <= tonumber(now) then
      attempts = math.max(attempts, tonumber(fields[3]))
      local score = redis.call('ZSCORE', KEYS[2], old)
      if score and tonumber(score) > next_at then next_at, next_text = tonumber(score), score end
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[2], old)
      redis.call('SREM', KEYS[3], old)
    end
  end
end
redis.call('HSET', prefix .. 'delivery:' .. did, 'job_id', job_id, 'event_id', event_id, 'type', type_name,
           'data', data_json, 'at', at, 'url', url, 'attempts', attempts, 'leased_until', 0)
redis.call('ZADD', KEYS[2], next_text, did)
redis.call('SADD', KEYS[3], did)
return {url, tostring(attempts), next_text}
"""

_LUA_CLAIM = """
local prefix, now, limit, lease_until = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
for _, did in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  local key = prefix .. 'delivery:' .. did
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[1], lease_until, did)
    redis.call('HSET', key, 'leased_until', lease_until)
    table.insert(out, did)
    table.insert(out, redis.call('HGETALL', key))
  else
    redis.call('ZREM', KEYS[1], did)
  end
end
return out
"""

_LUA_REMOVE_DELIVERY = """
local prefix, did = ARGV[1], ARGV[2]
local key = prefix .. 'delivery:' .. did
local job_id = redis.call('HGET', key, 'job_id')
redis.call('DEL', key)
redis.call('ZREM', KEYS[1], did)
if job_id then redis.call('SREM', prefix .. 'job-deliveries:' .. job_id, did) end
return 1
"""

_LUA_RETRY = """
local prefix, did, next_at, attempts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = prefix .. 'delivery:' .. did
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, 'attempts', attempts, 'leased_until', 0)
redis.call('ZADD', KEYS[1], next_at, did)
return 1
"""

_LUA_PURGE = """
local prefix, cutoff, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'LIMIT', 0, limit)
for _, job_id in ipairs(ids) do
  local job_key = prefix .. 'job:' .. job_id
  local idem = redis.call('HGET', job_key, '_idem')
  if idem and idem ~= '' and redis.call('GET', idem) == job_id then redis.call('DEL', idem) end
  local deliveries = prefix .. 'job-deliveries:' .. job_id
  for _, did in ipairs(redis.call('SMEMBERS', deliveries)) do
    redis.call('DEL', prefix .. 'delivery:' .. did)
    redis.call('ZREM', KEYS[2], did)
  end
  redis.call('DEL', job_key, prefix .. 'events:' .. job_id, prefix .. 'trimmed:' .. job_id, deliveries)
  redis.call('ZREM', KEYS[1], job_id)
  redis.call('SREM', KEYS[3], job_id)
end
return #ids
"""


def _number(value: float) -> str:
    """A float as text Redis and Lua read back exactly (repr round-trips)."""
    return repr(float(value))


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return ()
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            redis.exceptions.ReadOnlyError)


_REDIS_ERRORS = _redis_errors()


def _redacted_url(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


class StoreUrl(str):
    """JOB_STORE_URL, shown without its password: the start-up log prints every setting with repr()."""

    def __repr__(self) -> str:
        return repr(_redacted_url(str(self)))


def parse_store_url(text: str) -> StoreUrl | None:
    """JOB_STORE_URL: a redis://, rediss:// or unix:// URL; empty means none."""
    text = text.strip()
    if not text:
        return None
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://[:PASSWORD@]HOST:PORT/DB, rediss://... (TLS) or unix:///PATH.sock")
    return StoreUrl(text)


class RedisJobStore(JobStore):
    """The store in one Redis server (``url``: redis://[:password@]host:port/db, rediss:// for TLS,
    unix:///path.sock), shared by every gateway that uses the same URL and prefix."""

    def __init__(self, url: str, *, prefix: str = "imagegen:jobs:", max_events: int = DEFAULT_MAX_EVENTS,
                 socket_timeout_s: float = 5.0) -> None:
        import redis

        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.where = _redacted_url(url)
        self.prefix = prefix
        self.max_events = max_events
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s)
        self._create = self._redis.register_script(_LUA_CREATE)
        self._update = self._redis.register_script(_LUA_UPDATE)
        self._append = self._redis.register_script(_LUA_APPEND)
        self._enqueue = self._redis.register_script(_LUA_ENQUEUE)
        self._claim = self._redis.register_script(_LUA_CLAIM)
        self._remove_delivery = self._redis.register_script(_LUA_REMOVE_DELIVERY)
        self._retry = self._redis.register_script(_LUA_RETRY)
        self._purge = self._redis.register_script(_LUA_PURGE)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _idem_key(self, owner: str, key: str) -> str:
        return self._key("idem", hashlib.sha256(_dumps([owner, key]).encode()).hexdigest())

    @staticmethod
    def _job(fields_: Mapping[str, str]) -> Job | None:
        if not fields_:
            return None
        return Job.from_json({name: json.loads(value) for name, value in fields_.items()
                              if not name.startswith("_")})

    @staticmethod
    def _pairs(document: Mapping[str, Any]) -> list[str]:
        pairs: list[str] = []
        for name, value in document.items():
            pairs += [name, _dumps(value)]
        return pairs

    @_translating(_REDIS_ERRORS, "Redis at")
    def create(self, job: Job) -> Job:
        check_new(job)
        has_key = job.idempotency_key is not None
        idem = self._idem_key(job.owner, job.idempotency_key) if has_key else self._key("idem", "none")
        outcome, job_id = self._create(
            keys=[self._key("job", job.id), idem, self._key("unfinished")],
            args=[self.prefix, job.id, _dumps(job.body_hash), "1" if has_key else "0", *self._pairs(job.to_json())])
        if outcome == "created":
            return job
        if outcome == "duplicate":
            raise ValueError(f"a job with id {job.id!r} already exists")
        if outcome == "conflict":
            raise IdempotencyConflict(job.idempotency_key or "", job_id)
        existing = self.load(job_id)
        if existing is None:  # purged in between: store this one
            return self.create(job)
        return existing

    @_translating(_REDIS_ERRORS, "Redis at")
    def load(self, job_id: str) -> Job | None:
        return self._job(self._redis.hgetall(self._key("job", job_id)))

    @_translating(_REDIS_ERRORS, "Redis at")
    def update(self, job_id: str, **changes: Any) -> Job | None:
        check_changes(changes)
        finished_at = changes.get("finished_at") if changes.get("status") in TERMINAL_STATUSES else None
        flat = self._update(keys=[self._key("job", job_id), self._key("unfinished"), self._key("finished")],
                            args=[job_id, "" if finished_at is None else _number(finished_at),
                                  *self._pairs(changes)])
        if not flat:
            return None
        return self._job(dict(zip(flat[::2], flat[1::2])))

    @_translating(_REDIS_ERRORS, "Redis at")
    def unfinished(self, limit: int = 10000) -> list[Job]:
        ids = list(self._redis.sscan_iter(self._key("unfinished"), count=1000))[:limit]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
        jobs = [job for job in map(self._job, pipe.execute()) if job is not None and not job.finished]
        return sorted(jobs, key=lambda job: job.created_at)

    @_translating(_REDIS_ERRORS, "Redis at")
    def append_event(self, job_id: str, type: str, data: dict | None = None, *,
                     at: float | None = None) -> Event | None:
        check_event_type(type)
        data = {} if data is None else data
        at = time.time() if at is None else at
        event_id = self._append(
            keys=[self._key("job", job_id), self._key("events", job_id), self._key("trimmed", job_id)],
            args=[_dumps(type), _number(at), _dumps(data), int(type in TRIMMED_EVENTS),
                  int(type in TERMINAL_EVENTS), self.max_events])
        if event_id is None:
            return None
        return Event(job_id, int(event_id), type, data, at)

    @_translating(_REDIS_ERRORS, "Redis at")
    def events_after(self, job_id: str, last_event_id: int = 0, limit: int | None = None) -> list[Event]:
        members = self._redis.zrangebyscore(self._key("events", job_id), f"({int(last_event_id)}", "+inf",
                                            start=0 if limit is not None else None, num=limit)
        events = []
        for member in members:
            entry = json.loads(member)
            events.append(Event(job_id, entry["id"], entry["type"], entry["data"], entry["at"]))
        return events

    @_translating(_REDIS_ERRORS, "Redis at")
    def enqueue(self, job_id: str, event: Event, now: float) -> Delivery | None:
        did = delivery_id(job_id, event.id)
        answer = self._enqueue(
            keys=[self._key("job", job_id), self._key("due"), self._key("job-deliveries", job_id)],
            args=[self.prefix, job_id, did, event.id, event.type, _dumps(event.data), _number(event.at),
                  _number(now), int(event.type in TRIMMED_EVENTS)])
        if not answer:
            return None
        url, attempts, next_attempt_at = answer
        return Delivery(did, job_id, event.id, event.type, event.data, event.at, json.loads(url), int(attempts),
                        float(next_attempt_at))

    @staticmethod
    def _delivery(did: str, fields_: Mapping[str, str], next_attempt_at: float) -> Delivery:
        return Delivery(did, fields_["job_id"], int(fields_["event_id"]), fields_["type"], json.loads(fields_["data"]),
                        float(fields_["at"]), json.loads(fields_["url"]), int(fields_["attempts"]), next_attempt_at)

    @_translating(_REDIS_ERRORS, "Redis at")
    def claim_due(self, now: float, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[Delivery]:
        lease_until = now + lease_s
        flat = self._claim(keys=[self._key("due")], args=[self.prefix, _number(now), limit, _number(lease_until)])
        claimed = []
        for did, pairs in zip(flat[::2], flat[1::2]):
            claimed.append(self._delivery(did, dict(zip(pairs[::2], pairs[1::2])), lease_until))
        return claimed

    @_translating(_REDIS_ERRORS, "Redis at")
    def mark_delivered(self, delivery_id: str) -> None:
        self._remove_delivery(keys=[self._key("due")], args=[self.prefix, delivery_id])

    @_translating(_REDIS_ERRORS, "Redis at")
    def mark_retry(self, delivery_id: str, next_attempt_at: float, attempts: int) -> None:
        self._retry(keys=[self._key("due")], args=[self.prefix, delivery_id, _number(next_attempt_at), attempts])

    def mark_given_up(self, delivery_id: str) -> None:
        self.mark_delivered(delivery_id)

    @_translating(_REDIS_ERRORS, "Redis at")
    def pending_deliveries(self, job_id: str) -> list[Delivery]:
        ids = sorted(self._redis.smembers(self._key("job-deliveries", job_id)))
        pipe = self._redis.pipeline(transaction=False)
        for did in ids:
            pipe.hgetall(self._key("delivery", did))
            pipe.zscore(self._key("due"), did)
        answers = pipe.execute()
        found = [self._delivery(did, fields_, float(score)) for did, fields_, score
                 in zip(ids, answers[::2], answers[1::2]) if fields_ and score is not None]
        return sorted(found, key=lambda delivery: delivery.event_id)

    @_translating(_REDIS_ERRORS, "Redis at")
    def purge(self, now: float, max_age_s: float) -> int:
        purged = 0
        while True:
            count = int(self._purge(keys=[self._key("finished"), self._key("due"), self._key("unfinished")],
                                    args=[self.prefix, _number(now - max_age_s), PURGE_BATCH]))
            purged += count
            if count < PURGE_BATCH:
                return purged

    def close(self) -> None:
        self._redis.close()
