"""The job runner: each job's request at the broker, its events, its status and its end.

:class:`JobRunner` is the gateway's part of a job's life (docs/jobs.md, docs/api.md):

* ``submit(job, parsed, label, origin)`` stores the job (or finds the owner's job with the same
  idempotency key and body), logs its first ``queued`` event and starts an asyncio task that sends
  its request to the broker (``broker.generate(..., on_event=..., watch=True)``) under a service-made
  request id (gateway/request_ids.py) kept in the job, so another start of the gateway can collect it.
* The broker's reports, delivered to ``on_event`` in the event loop, become the job's events:

  ========================  =====================================================================
  report                    event (and the job's record)
  ========================  =====================================================================
  Queued (position)         ``queued`` {position, estimated_start_s}; status queued
  first Progress            ``started`` {attempt, steps, batch_size, worker}; status running
  Progress (step)           ``progress`` {step, steps}, steps only ever increasing within an attempt
  Progress, higher attempt  ``restarted`` {attempt}; its steps count from the start again
  Preview (its JPEG)        ``preview`` {step, steps, image: a data: URL}, for a job with preview on
  Result                    ``succeeded`` (the /generate answer's fields; the image kept)
  Failure, timeout          ``failed`` {error: {code, message}}
  DELETE /v1/jobs/{id}      ``cancelled``
  ========================  =====================================================================

  **Rate limit**: a job records at most one ``progress`` event, and one ``queued`` position change,
  per PROGRESS_EVENT_INTERVAL_S (0.5 s by default); a step reported sooner waits and is replaced
  by a newer one, and the newest is written when the interval ends. A job's last step, ``started``,
  ``restarted`` and the terminal event are never held back or dropped.
* Each job's store writes go through one writer task, in the order the reports came, each change
  of the record first and its event after it, only if the change applied (a finished job's record
  never changes again, store.py), so the log and the record agree: a result that arrives after a
  cancel is dropped. Store calls block (SQLite, Redis): they run in the runner's own thread pool.
  Every event also goes to the webhook outbox when the job's webhook wants it
  (:func:`gateway.jobs.webhooks.record_event`), and wakes the webhook sender and the job's event
  streams (:class:`EventHub`).
* ``resume()`` (at the gateway's start): every queued or running job in the store is collected
  from the broker (``broker.collect``), which may still hold or have finished its request; one the
  broker knows nothing of fails with ``job_lost``.
* ``cancel(job_id, owner)`` marks the job cancelled at once (its status and its ``cancelled``
  event), tells the broker (``broker.cancel``) and stops the task if it runs here.
* Stopping: ``stop_serving()`` ends the event streams; ``close()``, after the broker link has
  closed, waits for the writers to record what they hold and stops the tasks without marking their
  jobs: the requests stay at the broker and the next start collects them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import inspect
import logging
import math
import time
from collections import deque
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

from gateway.answers import IMAGE_ROUTE, broker_silent_text, how_it_was_made
from gateway.auth import share_of
from gateway.broker_client import BrokerFailure
from gateway.images import StorageUnavailable, new_image_id, png_size
from gateway.jobs.store import SQLITE_FILE, Event, Job, JobStore, JobStoreError, open_job_store
from gateway.jobs.webhooks import WebhookSender, record_event, wants
from gateway.request_ids import new_request_id
from gateway.validation import FieldError, GenerateRequest, parse_generate_request
from imagegen.protocol import DEFAULT_PRIORITY, GenerationParams, Preview, Result

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_THREADS = 8            # the runner's thread pool for store calls
PURGE_INTERVAL_S = 60.0      # how often finished jobs past JOB_RETENTION_S are deleted
CLOSE_WAIT_S = 5.0           # at close, how long the writers get to record what they hold
TERMINAL_WRITE_ATTEMPTS = 3  # a job's end is written again after a store error, this many times in all
TERMINAL_RETRY_S = 1.0
RESUME_MIN_TIMEOUT_S = 10.0  # a resumed job waits at least this long for the broker's answer
UNKNOWN_REQUEST = "unknown_request"  # the broker's answer to collect for a request it knows nothing of
LOST_CODE = "job_lost"
LOST_MESSAGE = ("the broker knows nothing of this job's request: it was lost in a broker restart while the "
                "gateway was away (or the broker dropped its result before the gateway came back for it); "
                "submit it again")


def _estimated_start_s(message: Any) -> float | None:
    """The broker's estimate of when a queued request starts, in seconds from now (None: none)."""
    for name in ("estimated_start_s", "estimated_wait_s", "eta_s"):
        value = getattr(message, name, None)
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            return float(value)
    return None


class StreamsFull(Exception):
    """An event stream refused: ``status`` 429 (this job has its most) or 503 (the gateway has)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EventHub:
    """Wake-ups for the event streams of jobs run by this gateway, and the streams' bounds.

    A stream ``open``s a wake-up (an asyncio.Event) for its job, clears it before each read of the
    job's log and waits on it after: ``notify(job_id)``, called after each event is stored, sets
    every wake-up of the job, so no event stored after a read goes unnoticed. At most
    ``max_streams`` streams at once, ``max_per_job`` per job (StreamsFull beyond); ``close`` frees
    the place; ``shut`` wakes every stream to end it (the gateway is stopping)."""

    def __init__(self, max_streams: int, max_per_job: int) -> None:
        self.max_streams = max_streams
        self.max_per_job = max_per_job
        self.closing = False
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self.count = 0

    def open(self, job_id: str) -> asyncio.Event:
        if self.count >= self.max_streams:
            raise StreamsFull(503, f"the gateway has {self.max_streams} job event streams open "
                                   "(JOB_EVENT_STREAMS_MAX); retry later, or poll GET /v1/jobs/{id}")
        listeners = self._waiting.setdefault(job_id, set())
        if len(listeners) >= self.max_per_job:
            raise StreamsFull(429, f"this job has {self.max_per_job} event streams open "
                                   "(JOB_EVENT_STREAMS_PER_JOB); close one first")
        wake = asyncio.Event()
        listeners.add(wake)
        self.count += 1
        return wake

    def close(self, job_id: str, wake: asyncio.Event) -> None:
        listeners = self._waiting.get(job_id)
        if listeners is None or wake not in listeners:
            return
        listeners.discard(wake)
        self.count -= 1
        if not listeners:
            del self._waiting[job_id]

    def listeners(self, job_id: str) -> int:
        return len(self._waiting.get(job_id, ()))

    def notify(self, job_id: str) -> None:
        for wake in self._waiting.get(job_id, ()):
            wake.set()

    def shut(self) -> None:
        self.closing = True
        for listeners in self._waiting.values():
            for wake in listeners:
                wake.set()


@dataclass
class _Op:
    """One write of a job: a change of its record, then (if the change applied) an event."""

    changes: dict
    event: str | None
    data: dict | None
    at: float
    terminal: bool = False


@dataclass(eq=False)
class _Run:
    """A job this gateway runs: what its reports have said so far, and its writes to come."""

    job: Job
    request_id: str
    label: str
    params: GenerationParams | None
    parsed: GenerateRequest | None
    origin: str | None
    status: str
    attempt: int
    started: bool
    step: int = 0
    steps: int | None = None
    position: int | None = None
    progress_written: float = -math.inf   # monotonic time of the last progress event made
    queued_written: float = -math.inf     # ... and of the last queue position change
    pending_progress: tuple[int, int] | None = None
    pending_queued: tuple[int, float | None] | None = None
    flush: asyncio.TimerHandle | None = None
    ops: deque = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False        # no more ops will come (the terminal one is queued, or it was cancelled)
    cancelled: bool = False   # cancelled through this gateway: its task ends without writing
    unreported: bool = False  # resumed without any report of the broker in its record (maybe never sent)
    task: asyncio.Task | None = None
    writer: asyncio.Task | None = None


def iso_time(timestamp: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds ("2026-01-01T12:00:00.250Z"); None stays None."""
    if timestamp is None:
        return None
    seconds = math.floor(timestamp)
    millis = min(999, round((timestamp - seconds) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JobRunner:
    """Runs jobs through ``broker`` (set before ``start``), recording them in the job store.

    ``store`` is opened on first use (``await ensure_store()``) unless given: a gateway that never
    serves a job never creates STATE_DIR/jobs.sqlite3. ``clock`` (Unix seconds) stamps records and
    events; ``monotonic`` paces the rate limit (tests inject both)."""

    def __init__(self, settings: Any, *, store: JobStore | None = None, broker: Any = None, images: Any = None,
                 metrics: Any = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self._own_store = store is None
        self.broker = broker
        self.images = images
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.interval_s = settings.progress_event_interval_s
        self.hub = EventHub(settings.job_event_streams_max, settings.job_event_streams_per_job)
        self.sender: WebhookSender | None = None
        self.sender_options: dict[str, Any] = {}  # WebhookSender's keyword options (tests: a quick backoff)
        self.closing = False
        self.stats = {"submitted": 0, "resumed": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "lost": 0}
        self._runs: dict[str, _Run] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="job-store")
        self._opening: asyncio.Lock | None = None
        self._purge_task: asyncio.Task | None = None
        self._started = False

    # ------------------------------------------------------------------ the store

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in the runner's thread pool (store calls block)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                functools.partial(function, *args, **kwargs))

    async def ensure_store(self) -> JobStore:
        """The store, opened (and the webhook sender started) on first use; JobStoreUnavailable if it
        cannot be opened."""
        if self.store is not None:
            return self.store
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.store is None:
                store = await self.call(open_job_store, self.settings)
                if self.closing:
                    await self.call(store.close)
                    raise JobStoreError("the gateway is stopping")
                self.store = store
                await self._store_opened()
        return self.store

    def _store_exists(self) -> bool:
        """Whether a store may hold jobs already (then the start opens it to collect them)."""
        if self.store is not None or self.settings.job_store == "redis":
            return True
        return (Path(self.settings.state_dir) / SQLITE_FILE).exists()

    async def _store_opened(self) -> None:
        """Start what works on the store: the webhook sender and the retention purge."""
        if not self._started or self.store is None:
            return
        if self.sender is None:
            self.sender = WebhookSender.from_settings(self.store, self.settings, **self.sender_options)
            if self.sender is not None:
                await self.sender.start()
        if self._purge_task is None:
            self._purge_task = asyncio.create_task(self._purge_loop(), name="job-purge")

    async def _purge_loop(self) -> None:
        while True:
            try:
                purged = await self.call(self.store.purge, self.clock(), self.settings.job_retention_s)
                if purged:
                    log.info("jobs: deleted %d finished more than %gs ago (JOB_RETENTION_S)", purged,
                             self.settings.job_retention_s)
            except JobStoreError as exc:
                log.warning("jobs: retention purge failed: %s", exc)
            await asyncio.sleep(PURGE_INTERVAL_S)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """At the gateway's start, after the broker link: collect the jobs a previous start left."""
        self._started = True
        if self._store_exists():
            try:
                await self.ensure_store()
                await self.resume()
            except JobStoreError as exc:
                log.error("jobs: cannot collect the jobs of the previous start: %s", exc)
        elif self.store is not None:
            await self._store_opened()

    async def resume(self) -> int:
        """Collect every queued or running job in the store that is not running here; how many."""
        store = await self.ensure_store()
        jobs = await self.call(store.unfinished)
        mine = self.gateway_id
        resumed = 0
        for job in jobs:
            if job.id in self._runs:
                continue
            if self.settings.job_store == "redis" and job.gateway not in (None, mine):
                continue  # another gateway sharing the store runs it, and collects it when it restarts
            if job.request_id is None:  # stored, then the gateway stopped before sending it
                await self._write_end(job, "failed", {"error": {"code": LOST_CODE, "message": LOST_MESSAGE}})
                continue
            parsed = self._parse(job.request)
            run = _Run(job=job, request_id=job.request_id, label="", params=self._params(job, parsed),
                       parsed=parsed, origin=None, status=job.status, attempt=job.attempt,
                       started=job.started_at is not None, position=job.queue_position,
                       step=(job.progress or {}).get("step", 0), steps=(job.progress or {}).get("steps"),
                       unreported=(job.status == "queued" and job.queue_position is None and job.started_at is None
                                   and job.attempt == 1))
            self._launch(run, resume=True)
            resumed += 1
        if resumed:
            log.info("jobs: collecting %d jobs from the broker after the gateway's restart", resumed)
        self.stats["resumed"] += resumed
        return resumed

    async def stop_serving(self) -> None:
        """The gateway is stopping: end the event streams, the webhook sender and the purge."""
        self.closing = True
        self.hub.shut()
        if self._purge_task is not None:
            self._purge_task.cancel()
            await asyncio.gather(self._purge_task, return_exceptions=True)
            self._purge_task = None
        if self.sender is not None:
            await self.sender.stop()
            self.sender = None

    async def close(self) -> None:
        """After the broker link closed: let the writers record what they hold, stop every task
        (their jobs stay queued or running in the store, for the next start to collect) and close
        the store."""
        await self.stop_serving()
        runs = list(self._runs.values())
        tasks = [run.task for run in runs if run.task is not None and not run.task.done()]
        if tasks:  # the broker link has closed: they end now, or record an answer that just came
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        for run in runs:
            if run.task is None or run.task.done():
                continue
            self._abandon(run)
        writers = [run.writer for run in runs if run.writer is not None and not run.writer.done()]
        for run in runs:
            if not run.done:
                self._abandon(run)
        if writers:
            await asyncio.wait(writers, timeout=CLOSE_WAIT_S)
        tasks = [task for run in runs for task in (run.task, run.writer) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()
        if self.store is not None and self._own_store:
            await self.call(self.store.close)
            self.store = None
        self._executor.shutdown(wait=False)

    @property
    def gateway_id(self) -> str | None:
        """This gateway's GATEWAY_ID (gateway/identity.py), when its broker link has one."""
        return getattr(getattr(self.broker, "identity", None), "gateway_id", None)

    def runs_here(self, job_id: str) -> bool:
        return job_id in self._runs

    # ------------------------------------------------------------------ submitting

    async def submit(self, job: Job, parsed: GenerateRequest, label: str = "",
                     origin: str | None = None) -> tuple[Job, bool]:
        """Store ``job`` and start it; (the job, True), or (the owner's job with the same idempotency
        key and body, False: nothing new started). IdempotencyConflict, JobStoreError propagate."""
        store = await self.ensure_store()
        job = replace(job, request_id=new_request_id(), gateway=self.gateway_id)
        now = self.clock()

        def create() -> tuple[Job, Event | None]:
            stored = store.create(job)
            if stored.id != job.id:
                return stored, None
            return stored, record_event(store, stored, "queued", {"position": None, "estimated_start_s": None},
                                        now=now)

        stored, event = await self.call(create)
        if stored.id != job.id:
            return stored, False
        self.stats["submitted"] += 1
        self._after_event(stored, event)
        run = _Run(job=stored, request_id=stored.request_id or "", label=label, params=self._params(stored, parsed),
                   parsed=parsed, origin=origin, status="queued", attempt=1, started=False)
        self._launch(run, resume=False)
        await asyncio.sleep(0)  # its task sends the request to the broker before the client hears of the job
        return stored, True

    def _launch(self, run: _Run, resume: bool) -> None:
        self._runs[run.job.id] = run
        run.writer = asyncio.create_task(self._write(run), name=f"job-writer-{run.job.id}")
        run.task = asyncio.create_task(self._drive(run, resume), name=f"job-{run.job.id}")

    @staticmethod
    def _params(job: Job, parsed: GenerateRequest | None) -> GenerationParams | None:
        """What the broker gets: the request's parameters, asking for previews when the job does."""
        if parsed is None:
            return None
        return replace(parsed.params, preview=True) if job.preview else parsed.params

    def _parse(self, request: dict) -> GenerateRequest | None:
        try:
            return parse_generate_request(request, self.settings)
        except FieldError:
            return None

    # ------------------------------------------------------------------ the broker's reports

    def _emit(self, run: _Run, changes: dict, event: str | None, data: dict | None, terminal: bool = False) -> None:
        run.ops.append(_Op(changes, event, data, self.clock(), terminal))
        run.wake.set()

    def on_event(self, run: _Run, message: Any) -> None:
        """A report from the broker about ``run``'s request (in the event loop)."""
        if run.done:
            return
        try:
            if isinstance(message, Preview):  # a gateway.broker_client.PreviewReport: its image is .image
                self._on_preview(run, message)
                return
            if hasattr(message, "position"):
                self._on_queued(run, message)
            elif hasattr(message, "step") and hasattr(message, "steps"):
                self._on_progress(run, message)
        except Exception:  # a report must never break the broker link's reader
            log.exception("job %s: could not use the report %r", run.job.id, message)

    def _on_queued(self, run: _Run, message: Any) -> None:
        position = int(message.position)
        estimate = _estimated_start_s(message)
        requeued = run.status in ("running", "paused")
        if requeued:  # back in a queue (its worker was lost, or it was preempted)
            self._flush(run)
            run.status = "queued"
        elif position == run.position:
            return
        run.position = position
        now = self.monotonic()
        if requeued or now - run.queued_written >= self.interval_s:
            run.pending_queued = None
            run.queued_written = now
            self._emit_queued(run, position, estimate)
        else:
            run.pending_queued = (position, estimate)
            self._schedule_flush(run, run.queued_written + self.interval_s - now)

    def _on_preview(self, run: _Run, message: Any) -> None:
        """A preview of the job's latents: a ``preview`` event whose image is a data: URL (a JPEG of a
        few KiB), for a job that asked (``preview: true``)."""
        image = getattr(message, "image", b"")
        if not run.job.preview or not image:
            return
        self._emit(run, {}, "preview", {"step": int(message.step), "steps": int(message.steps),
                                        "image": "data:image/jpeg;base64," + base64.b64encode(image).decode()})

    def _emit_queued(self, run: _Run, position: int, estimate: float | None) -> None:
        at = self.clock()
        self._emit(run, {"status": "queued", "queue_position": position,
                         "estimated_start_at": None if estimate is None else at + estimate},
                   "queued", {"position": position, "estimated_start_s": estimate})

    def _on_progress(self, run: _Run, message: Any) -> None:
        step, steps = int(message.step), int(message.steps)
        paused = bool(getattr(message, "paused", False))
        attempt = int(getattr(message, "attempt", None) or run.attempt)
        if attempt < run.attempt:
            return  # a late report of an attempt already given up
        worker = getattr(message, "worker", None) or getattr(message, "worker_name", None)
        batch_size = getattr(message, "batch_size", None)
        known = {key: value for key, value in (("worker", worker), ("batch_size", batch_size)) if value}
        running = {"status": "running", "queue_position": None, "estimated_start_at": None, **known}
        if attempt > run.attempt or step < run.step:
            # Stopped and started again: on another worker (a new attempt number: its worker was
            # lost), or on the same one from step 0 (its batch was preempted). Steps count again.
            self._cancel_flush(run)
            run.pending_progress = run.pending_queued = None
            run.attempt, run.step, run.steps, run.status = attempt, 0, steps, "running"
            run.progress_written = -math.inf
            self._emit(run, {**running, "attempt": attempt, "progress": {"step": step, "steps": steps}},
                       "restarted", {"attempt": attempt})
        elif run.status == "paused" and not paused:
            self._flush(run)
            run.status, run.steps = "running", steps
            run.step = max(step, run.step)
            resumed_at = {"step": run.step, "steps": steps}
            self._emit(run, {**running, "progress": resumed_at}, "resumed", resumed_at)
        elif run.status not in ("running", "paused"):
            self._flush(run)
            run.status, run.steps = "running", steps
            if not run.started:
                run.started = True
                self._emit(run, {**running, "started_at": self.clock(), "attempt": attempt,
                                 "progress": {"step": step, "steps": steps}},
                           "started", {"attempt": attempt, "steps": steps, **known})
            else:
                self._emit(run, {**running, "progress": {"step": run.step, "steps": steps}}, None, None)
        if paused:
            self._pause(run, step, steps)
            return
        if step <= run.step:
            return  # steps only increase within an attempt
        run.step, run.steps = step, steps
        now = self.monotonic()
        if step >= steps or now - run.progress_written >= self.interval_s:
            run.pending_progress = None
            run.progress_written = now
            self._emit_progress(run, step, steps)
        else:
            run.pending_progress = (step, steps)
            self._schedule_flush(run, run.progress_written + self.interval_s - now)

    def _pause(self, run: _Run, step: int, steps: int) -> None:
        """Its row waits, latents kept, while better-priority rows run (BATCH_POLICY=step): status
        ``paused`` and a ``paused`` event, after the step held back by the rate limit."""
        if run.status == "paused":
            return
        self._flush(run)
        run.status, run.step, run.steps = "paused", max(step, run.step), steps
        at = {"step": run.step, "steps": steps}
        self._emit(run, {"status": "paused", "progress": at}, "paused", at)

    def _emit_progress(self, run: _Run, step: int, steps: int) -> None:
        self._emit(run, {"status": "running", "progress": {"step": step, "steps": steps}}, "progress",
                   {"step": step, "steps": steps})

    def _schedule_flush(self, run: _Run, delay_s: float) -> None:
        if run.flush is None:
            run.flush = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._timed_flush, run)

    def _cancel_flush(self, run: _Run) -> None:
        if run.flush is not None:
            run.flush.cancel()
            run.flush = None

    def _timed_flush(self, run: _Run) -> None:
        run.flush = None
        if not run.done:
            self._flush(run)

    def _flush(self, run: _Run) -> None:
        """Write the queue position and the step held back by the rate limit, if any."""
        self._cancel_flush(run)
        now = self.monotonic()
        if run.pending_queued is not None:
            position, estimate = run.pending_queued
            run.pending_queued, run.queued_written = None, now
            self._emit_queued(run, position, estimate)
        if run.pending_progress is not None:
            step, steps = run.pending_progress
            run.pending_progress, run.progress_written = None, now
            self._emit_progress(run, step, steps)

    # ------------------------------------------------------------------ the request's end

    async def _ask_broker(self, run: _Run, resume: bool) -> tuple[Result, bytes]:
        """The job's answer from the broker: sent now, or (``resume``) collected after a restart."""
        on_event = functools.partial(self.on_event, run)
        remaining_s = run.job.created_at + self.settings.request_timeout_s - self.clock()
        if resume:
            try:
                return await self.broker.collect(run.request_id, max(remaining_s, RESUME_MIN_TIMEOUT_S),
                                                 on_event=on_event)
            except BrokerFailure as exc:
                # Stored, answered 202, and the gateway stopped before its request reached the broker
                # (no report ever came for it): send it now rather than call it lost.
                if exc.code != UNKNOWN_REQUEST or not run.unreported or run.params is None:
                    raise
                log.info("job %s: its request never reached the broker (the gateway stopped first): sending it now",
                         run.job.id)
        assert run.params is not None
        # cancel_on_exit=False: the request outlives this call (the gateway stopping leaves it at the
        # broker for the next start to collect); cancel() cancels it.
        timeout_s = max(remaining_s, RESUME_MIN_TIMEOUT_S) if resume else self.settings.request_timeout_s
        # Its place in the broker's queue: the priority it asked for (checked against its key when it
        # was submitted), charged to the key that submitted it, with that key's share.
        priority = run.parsed.priority if run.parsed is not None else DEFAULT_PRIORITY
        return await self.broker.generate(run.request_id, run.params, timeout_s, label=run.label, on_event=on_event,
                                          watch=True, cancel_on_exit=False, priority=priority, owner=run.job.owner,
                                          share=share_of(self.settings, run.job.owner))

    async def _drive(self, run: _Run, resume: bool) -> None:
        settings = self.settings
        try:
            result, png = await self._ask_broker(run, resume)
        except asyncio.CancelledError:
            self._abandon(run)
            raise
        except BrokerFailure as exc:
            if run.cancelled:
                return
            if exc.code == UNKNOWN_REQUEST:
                self.stats["lost"] += 1
                log.warning("job %s: %s", run.job.id, LOST_MESSAGE)
                self._end(run, "failed", {"error": {"code": LOST_CODE, "message": LOST_MESSAGE}})
            else:
                self._end(run, "failed", {"error": {"code": exc.code, "message": exc.message}})
            return
        except asyncio.TimeoutError:
            if not run.cancelled:
                self._end(run, "failed", {"error": {"code": "timeout", "message": broker_silent_text(settings)}})
            return
        except Exception as exc:
            if run.cancelled or self.closing:  # the broker link closing under it: the next start collects it
                self._abandon(run)
                return
            log.exception("job %s: the request to the broker failed", run.job.id)
            self._end(run, "failed", {"error": {"code": "internal_error",
                                                "message": f"the gateway failed to run the job: {exc!r}"}})
            return
        if not run.cancelled:
            await self._succeed(run, result, png)

    def _abandon(self, run: _Run) -> None:
        run.done = True
        self._cancel_flush(run)
        run.wake.set()

    async def _succeed(self, run: _Run, result: Result, png: bytes) -> None:
        if png_size(png) != (result.width, result.height):  # as /generate checks (gateway/answers.py)
            log.error("job %s: worker %s sent an image of another size than %dx%d", run.job.id, result.worker_name,
                      result.width, result.height)
            self._end(run, "failed", {"error": {"code": "bad_worker_output",
                                                "message": "the worker returned an image of the wrong size"}})
            return
        image_id = new_image_id()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.images.save, image_id, png)
        except StorageUnavailable as exc:
            self._end(run, "failed", {"error": {"code": "storage_unavailable", "message": str(exc)}})
            return
        except asyncio.CancelledError:
            self._abandon(run)
            raise
        if self.metrics is not None:
            self.metrics.observe_result(result)
        finished = self.clock()
        body = self.result_body(run, result, image_id, finished)
        steps = run.steps or body["num_inference_steps"]
        changes = {"result": body, "batch_size": result.batch_size, "worker": result.worker_name,
                   "progress": {"step": steps, "steps": steps}}
        if not run.started:
            changes["started_at"] = max(run.job.created_at, finished - result.generation_ms / 1000.0)
        self._end(run, "succeeded", body, changes, finished)

    def result_body(self, run: _Run, result: Result, image_id: str, finished: float) -> dict[str, Any]:
        """What POST /generate answers with (gateway/app.py ``_success_body``), for the job's result:
        the same fields; duration_ms is the job's, from its submission."""
        parsed = run.parsed
        request = run.job.request
        path = IMAGE_ROUTE.format(name=f"{image_id}.png")
        base = self.settings.public_base_url or run.origin
        return {
            "image_id": image_id,
            "image_url": base.rstrip("/") + path if base else path,
            "duration_ms": round((finished - run.job.created_at) * 1000.0, 1),
            "game_id": parsed.game_id if parsed else _label(request.get("game_id")),
            "round_id": parsed.round_id if parsed else _label(request.get("round_id")),
            "player_id": parsed.player_id if parsed else _label(request.get("player_id")),
            "width": result.width,
            "height": result.height,
            "num_inference_steps": (parsed.params.num_inference_steps if parsed
                                    else request.get("num_inference_steps") or self.settings.default_steps),
            "guidance_scale": (parsed.params.guidance_scale if parsed
                               else request.get("guidance_scale") or self.settings.default_guidance_scale),
            "seed": result.seed,
            **how_it_was_made(result),
        }

    def _end(self, run: _Run, status: str, data: dict, changes: dict | None = None,
             finished: float | None = None) -> None:
        """Queue the job's last write: its terminal status and event (after what the rate limit holds)."""
        self._flush(run)
        finished = self.clock() if finished is None else finished
        record = {"status": status, "finished_at": finished, "queue_position": None, "estimated_start_at": None,
                  **(changes or {})}
        if status == "failed":
            record["error"] = data["error"]
        run.done = True
        run.ops.append(_Op(record, status, data, finished, terminal=True))
        run.wake.set()

    # ------------------------------------------------------------------ writing

    async def _write(self, run: _Run) -> None:
        """The job's writer: its ops, in order, until the terminal one (or until it is abandoned)."""
        try:
            while True:
                while run.ops:
                    op = run.ops.popleft()
                    await self._apply(run, op)
                    if op.terminal:
                        return
                if run.done:
                    return
                run.wake.clear()
                await run.wake.wait()
        finally:
            if self._runs.get(run.job.id) is run:
                del self._runs[run.job.id]
            self.hub.notify(run.job.id)

    async def _apply(self, run: _Run, op: _Op) -> None:
        store = self.store
        assert store is not None

        def apply() -> tuple[Job | None, Event | None]:
            # An event that changes nothing in the record (a preview) is only appended: the log
            # refuses it once the job has ended.
            job = store.update(run.job.id, **op.changes) if op.changes else run.job
            if job is None or op.event is None:
                return job, None
            return job, record_event(store, job, op.event, op.data, now=op.at)

        for attempt in range(1, (TERMINAL_WRITE_ATTEMPTS if op.terminal else 1) + 1):
            try:
                job, event = await self.call(apply)
                break
            except JobStoreError as exc:
                log.warning("job %s: could not record %s (attempt %d): %s", run.job.id,
                            op.event or "its state", attempt, exc)
                if attempt >= (TERMINAL_WRITE_ATTEMPTS if op.terminal else 1):
                    return
                await asyncio.sleep(TERMINAL_RETRY_S)
        if job is None or (not op.changes and event is None):  # finished (cancelled elsewhere, say)
            self.hub.notify(run.job.id)
            return
        if op.terminal:
            self.stats[job.status] += 1
            log.info("job %s %s", job.id, job.status)
        self._after_event(job, event)

    def _after_event(self, job: Job, event: Event | None) -> None:
        if event is None:
            return
        self.hub.notify(job.id)
        if self.sender is not None and job.webhook_url is not None and wants(job.webhook_events, event.type):
            self.sender.wake()

    async def _write_end(self, job: Job, status: str, data: dict) -> Job | None:
        """Write a job's end directly (a job not running here); the job as it now is, None if it had ended."""
        store = await self.ensure_store()
        now = self.clock()
        changes = {"status": status, "finished_at": now, "queue_position": None, "estimated_start_at": None}
        if status == "failed":
            changes["error"] = data["error"]

        def end() -> tuple[Job | None, Event | None]:
            updated = store.update(job.id, **changes)
            if updated is None:
                return None, None
            return updated, record_event(store, updated, status, data, now=now)

        updated, event = await self.call(end)
        if updated is not None:
            self.stats[status] += 1
            self._after_event(updated, event)
        else:
            self.hub.notify(job.id)
        return updated

    # ------------------------------------------------------------------ cancelling

    async def cancel(self, job: Job) -> Job:
        """Cancel ``job`` (the caller checked its owner): the status says cancelled at once, the
        broker is told, the task here (if any) stops. A finished job is returned as it is."""
        if job.finished:
            return job
        updated = await self._write_end(job, "cancelled", {})
        if updated is None:  # it ended meanwhile
            store = await self.ensure_store()
            return await self.call(store.load, job.id) or job
        if job.request_id:
            await self._tell_broker_cancel(job.request_id)
        run = self._runs.get(job.id)
        if run is not None:
            run.cancelled = True
            self._abandon(run)
            if run.task is not None:
                run.task.cancel()
        log.info("job %s cancelled", job.id)
        return updated

    async def _tell_broker_cancel(self, request_id: str) -> None:
        cancel = getattr(self.broker, "cancel", None)
        if cancel is None:
            return
        try:
            sent = cancel(request_id)
            if inspect.isawaitable(sent):
                await sent
        except Exception:
            log.exception("could not send CANCEL for request %s", request_id)


def _label(value: Any) -> str | None:
    return None if value is None else str(value)
