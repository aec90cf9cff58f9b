"""The job API's HTTP routes (docs/api.md, "Jobs"), on the gateway's aiohttp application.

* ``POST /v1/jobs``: the body of POST /generate, checked by the same validator
  (gateway/validation.py), plus optional ``webhook`` (URL), ``webhook_events`` (list) and
  ``preview`` (bool); answers 202 ``{"id", "status", "status_url", "events_url"}`` (and
  ``Location``). ``POST /generate`` with ``Prefer: respond-async`` does the same (gateway/app.py
  calls :func:`submit_job` when :func:`prefers_async`). ``Idempotency-Key``: the same key and body
  give the same job (202, same id), another body 409 ``idempotency_conflict``.
* ``GET /v1/jobs/{id}``: the job's status document (:func:`job_document`).
* ``DELETE /v1/jobs/{id}``: cancels a queued, running or paused job (200, status cancelled at once); a
  cancelled job answers 200 again; a succeeded or failed one 409 ``job_finished``.
* ``GET /v1/jobs/{id}/events``: Server-Sent Events (:func:`job_events`): the job's stored events
  after ``Last-Event-ID`` (header, or ``?last_event_id=``) or from the first, then new ones as they
  come; a comment line every HEARTBEAT_S; the stream ends after the terminal event.

With API keys on, a job belongs to the key that submitted it (gateway/auth.py ``key_name``): for
any other key it does not exist (404). Errors take the gateway's JSON shape
``{"error": {"code", "message", "field"}}`` (not OpenAI's, though the paths are under /v1/).

:func:`setup_jobs` adds the routes and the job runner's lifecycle to the app: the store opens on
first use or at start when it holds jobs (then the jobs it holds are collected from the broker),
and closes after the broker link does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncIterator

from aiohttp import web

from gateway.answers import IMAGE_ROUTE
from gateway.auth import api_key_name_of, ranking_of
from gateway.context import BROKER, IMAGES, JOBS_PATH, METRICS, SETTINGS, read_json_body
from gateway.jobs.runner import JobRunner, StreamsFull, iso_time
from gateway.jobs.store import (STATUSES, TERMINAL_EVENTS, IdempotencyConflict, Job, JobStore, JobStoreError,
                                new_job)
from gateway.jobs.webhooks import (WEBHOOK_EVENT_NAMES, WebhookUrlRefused, configured_webhook_secret,
                                   parse_webhook_events, resolve_webhook_url)
from gateway.metrics import OUTCOME
from gateway.request_ids import request_label_of
from gateway.validation import KNOWN_FIELDS, FieldError, parse_generate_request
from imagegen.protocol import DEFAULT_PRIORITY, PRIORITIES

log = logging.getLogger(__name__)

JOBS = web.AppKey("jobs", JobRunner)
JOB_FIELDS = ("webhook", "webhook_events", "preview")  # what a job's body may add to /generate's
MAX_IDEMPOTENCY_KEY_CHARS = 255
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_IDEMPOTENCY_KEY_CHARS)
MAX_EVENT_ID = 2 ** 53
HEARTBEAT_S = 15.0        # a comment line on an idle event stream, so proxies keep it open
REMOTE_POLL_S = 0.5       # a stream of a job run by another gateway (a shared Redis store) reads the store this often
CONNECTION_CHECK_S = 1.0  # a stream checks this often that its client is still there
END_GRACE_POLLS = 4       # a finished job whose terminal event is not stored yet: read again this many times
EVENTS_PAGE = 200         # events read from the store at once
RETRY_MS = 2000           # the SSE retry field: how long a browser's EventSource waits to reconnect


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response({"error": {"code": code, "message": message, "field": field}}, status=status,
                                 headers=headers)
    response[OUTCOME] = code
    return response


def _store_error(request: web.Request, exc: JobStoreError) -> web.Response:
    log.warning("job store: %s", exc)
    return error_response(503, "job_store_unavailable", f"the job store cannot be used now: {exc}",
                          headers={"Retry-After": str(request.app[SETTINGS].retry_after_s)})


def _not_found(job_id: str) -> web.Response:
    return error_response(404, "not_found", f"no job {job_id!r} (finished jobs are deleted after JOB_RETENTION_S; "
                                            "a job is seen only with the API key that submitted it)")


def _base(request: web.Request) -> str:
    return (request.app[SETTINGS].public_base_url or str(request.url.origin())).rstrip("/")


def job_urls(request: web.Request, job_id: str) -> dict[str, str]:
    status_url = f"{_base(request)}{JOBS_PATH}/{job_id}"
    return {"status_url": status_url, "events_url": status_url + "/events"}


def _priority_of(job: Job) -> str:
    """The priority the job's request asked for (its body's ``priority``; normal when it gave none)."""
    priority = job.request.get("priority")
    return priority if priority in PRIORITIES else DEFAULT_PRIORITY


def job_document(request: web.Request, job: Job, now: float) -> dict[str, Any]:
    """GET /v1/jobs/{id}: what the job is, as of ``now`` (Unix seconds)."""
    document: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
        "attempt": job.attempt,
        "priority": _priority_of(job),
        **job_urls(request, job.id),
    }
    if job.status == "queued":
        document["queue_position"] = job.queue_position
        document["estimated_start_s"] = (None if job.estimated_start_at is None
                                         else round(max(0.0, job.estimated_start_at - now), 1))
    if job.progress is not None:
        document["progress"] = job.progress
    if job.status in ("running", "paused", "succeeded"):
        document["batch_size"] = job.batch_size
        document["worker"] = job.worker
    if job.status == "succeeded" and job.result is not None:
        result = dict(job.result)
        result["image_url"] = _base(request) + IMAGE_ROUTE.format(name=f"{result['image_id']}.png")
        document["image_url"] = result["image_url"]
        document["result"] = result
    if job.status == "failed":
        document["error"] = job.error
    if job.webhook_url is not None:
        document["webhook"] = job.webhook_url
    return document


# ---------------------------------------------------------------------------------------------
# Submitting

def prefers_async(request: web.Request) -> bool:
    """Whether the request says ``Prefer: respond-async`` (RFC 7240; among other preferences too)."""
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            name = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if name == "respond-async":
                return True
    return False


def _options(body: dict) -> tuple[dict, str | None, tuple[str, ...] | None, bool]:
    """Split a job body into /generate's body and the job's own options (checked)."""
    request = {name: value for name, value in body.items() if name not in JOB_FIELDS}
    webhook = body.get("webhook")
    if webhook is not None and not isinstance(webhook, str):
        raise FieldError("webhook", "webhook must be an http:// or https:// URL (a string)")
    events = body.get("webhook_events")
    if events is not None:
        if webhook is None:
            raise FieldError("webhook_events", "webhook_events needs a webhook URL to send them to")
        try:
            events = parse_webhook_events(events)
        except ValueError as exc:
            raise FieldError("webhook_events", str(exc)) from None
    preview = body.get("preview")
    if preview is not None and not isinstance(preview, bool):
        raise FieldError("preview", "preview must be true or false")
    return request, webhook, events, bool(preview)


async def submit_job(request: web.Request) -> web.Response:
    """POST /v1/jobs, and POST /generate with Prefer: respond-async."""
    settings = request.app[SETTINGS]
    runner = request.app[JOBS]
    try:
        body = await read_json_body(request, settings.max_request_bytes)
        if not isinstance(body, dict):
            raise FieldError(None, "the request body must be a JSON object")
        generate_body, webhook, events, preview = _options(body)
        try:
            parsed = parse_generate_request(generate_body, settings)
        except FieldError as exc:
            if exc.field is not None and exc.field not in KNOWN_FIELDS:  # an unknown field: name every accepted one
                raise FieldError(exc.field, f"unknown field {exc.field!r}; accepted fields: "
                                            f"{', '.join((*KNOWN_FIELDS, *JOB_FIELDS))}") from None
            raise
        ranking_of(request, parsed.priority)  # 403 priority_not_allowed: above the key's max_priority
        if webhook is not None:
            if configured_webhook_secret(settings) is None:
                raise FieldError("webhook", "this gateway sends no webhooks: its operator has not set WEBHOOK_SECRET "
                                            "(or WEBHOOK_SECRET_FILE); leave webhook out and poll status_url or "
                                            "read events_url")
            try:
                webhook = await resolve_webhook_url(webhook, settings.webhook_allow_private)
            except WebhookUrlRefused as exc:
                raise FieldError("webhook", str(exc)) from None
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise FieldError(None, f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable "
                                   "ASCII characters without spaces (a UUID, say)")
    except FieldError as exc:
        return error_response(exc.status, exc.code or "invalid_request", exc.message, exc.field)
    job = new_job(api_key_name_of(request), generate_body, runner.clock(), webhook_url=webhook,
                  webhook_events=events, preview=preview, idempotency_key=key)
    try:
        # Shielded: a client that goes away mid-call (handler_cancellation) must not leave a job
        # stored and never started.
        stored, created = await asyncio.shield(runner.submit(job, parsed, label=request_label_of(request),
                                                             origin=str(request.url.origin())))
    except IdempotencyConflict as exc:
        return error_response(409, "idempotency_conflict", str(exc))
    except JobStoreError as exc:
        return _store_error(request, exc)
    if created:
        log.info("job %s submitted: %dx%d, %d steps", stored.id, parsed.params.width, parsed.params.height,
                 parsed.params.num_inference_steps)
    urls = job_urls(request, stored.id)
    headers = {"Location": urls["status_url"]}
    if prefers_async(request):
        headers["Preference-Applied"] = "respond-async"
    return web.json_response({"id": stored.id, "status": stored.status, **urls}, status=202, headers=headers)


# ---------------------------------------------------------------------------------------------
# Status and cancel

async def _owned_job(request: web.Request) -> tuple[Job | None, web.Response | None]:
    runner = request.app[JOBS]
    job_id = request.match_info["job_id"]
    try:
        store = await runner.ensure_store()
        job = await runner.call(store.get, job_id, api_key_name_of(request))
    except JobStoreError as exc:
        return None, _store_error(request, exc)
    if job is None:
        return None, _not_found(job_id)
    return job, None


async def get_job(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}."""
    job, error = await _owned_job(request)
    if error is not None:
        return error
    return web.json_response(job_document(request, job, request.app[JOBS].clock()))


async def delete_job(request: web.Request) -> web.Response:
    """DELETE /v1/jobs/{id}: cancel. 200 with the job (cancelled) when it was queued, running, paused
    or already cancelled; 409 job_finished when it had succeeded or failed."""
    job, error = await _owned_job(request)
    if error is not None:
        return error
    runner = request.app[JOBS]
    try:
        job = await asyncio.shield(runner.cancel(job))  # once begun, the broker is told, whoever waits
    except JobStoreError as exc:
        return _store_error(request, exc)
    if job.status in ("succeeded", "failed"):
        return error_response(409, "job_finished", f"job {job.id} has already {job.status}; there is nothing to "
                                                   "cancel (GET its status_url for the outcome)")
    return web.json_response(job_document(request, job, runner.clock()))


# ---------------------------------------------------------------------------------------------
# Events

def _last_event_id(request: web.Request) -> int:
    text = request.headers.get("Last-Event-ID")
    if text is None:
        text = request.query.get("last_event_id")
    if text is None or text.strip() == "":
        return 0
    if not text.strip().isdigit() or int(text) > MAX_EVENT_ID:
        raise FieldError("Last-Event-ID", f"Last-Event-ID must be an event id (a whole number), got {text[:40]!r}")
    return int(text)


def sse_event(event_id: int, event_type: str, data: dict, at: float) -> bytes:
    """One event in the text/event-stream format: id, event, and data as one JSON line."""
    payload = json.dumps({**data, "at": iso_time(at)}, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\nevent: {event_type}\ndata: {payload}\n\n".encode()


async def job_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/jobs/{id}/events: Server-Sent Events, resumable with Last-Event-ID."""
    try:
        last_id = _last_event_id(request)
    except FieldError as exc:
        return error_response(400, "invalid_request", exc.message, exc.field)
    job, error = await _owned_job(request)
    if error is not None:
        return error
    runner = request.app[JOBS]
    hub = runner.hub
    try:
        wake = hub.open(job.id)
    except StreamsFull as exc:
        headers = {"Retry-After": str(request.app[SETTINGS].retry_after_s)} if exc.status == 503 else None
        return error_response(exc.status, "too_many_streams", exc.message, headers=headers)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response[OUTCOME] = "ok"
    try:
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        await _stream(request, response, runner, job.id, last_id, wake)
    except ConnectionError:
        pass  # the client went away (with handler_cancellation, the handler is cancelled instead)
    except JobStoreError as exc:
        log.warning("job %s: event stream ended: %s", job.id, exc)
    finally:
        hub.close(job.id, wake)
    try:
        await response.write_eof()
    except ConnectionError:
        pass
    return response


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _stream(request: web.Request, response: web.StreamResponse, runner: JobRunner, job_id: str,
                  last_id: int, wake: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    store: JobStore = await runner.ensure_store()
    hub = runner.hub
    last_write = loop.time()
    finished_reads = 0
    while not hub.closing:
        wake.clear()
        events = await runner.call(store.events_after, job_id, last_id, EVENTS_PAGE)
        if events:
            await response.write(b"".join(sse_event(e.id, e.type, e.data, e.at) for e in events))
            last_write = loop.time()
            last_id = events[-1].id
            if events[-1].type in TERMINAL_EVENTS:
                return
            if len(events) == EVENTS_PAGE:
                continue
        local = runner.runs_here(job_id)
        if not local:
            # Run elsewhere (another gateway), or finished: has it ended with nothing more to send?
            job = await runner.call(store.load, job_id)
            if job is None:
                return  # purged
            if job.finished:
                finished_reads += 1  # its terminal event may be a moment behind its status
                if finished_reads > END_GRACE_POLLS or await runner.call(_already_ended, store, job_id, last_id):
                    return
        until_beat = HEARTBEAT_S - (loop.time() - last_write)
        if until_beat <= 0:
            await response.write(b": heartbeat\n\n")
            last_write = loop.time()
            until_beat = HEARTBEAT_S
        timeout = min(until_beat, CONNECTION_CHECK_S if local else REMOTE_POLL_S)
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if _gone(request):
            return


def _already_ended(store: JobStore, job_id: str, last_id: int) -> bool:
    """Whether the stream's client has had the job's terminal event already (it resumed after it)."""
    if last_id <= 0:
        return False
    around = store.events_after(job_id, last_id - 1, 1)
    return bool(around) and around[0].id == last_id and around[0].type in TERMINAL_EVENTS


# ---------------------------------------------------------------------------------------------
# The app

def setup_jobs(app: web.Application, store: JobStore | None = None, **runner_options: Any) -> JobRunner:
    """Add the job routes and the runner's lifecycle to ``app`` (made by gateway.app.create_app,
    after its broker link and image pruning): the store closes after the broker link, so an answer
    the link delivers while the gateway stops is still recorded."""
    runner = JobRunner(app[SETTINGS], store=store, images=app[IMAGES], metrics=app[METRICS], **runner_options)
    app[JOBS] = runner

    async def job_store(app: web.Application) -> AsyncIterator[None]:
        yield
        await runner.close()

    async def jobs(app: web.Application) -> AsyncIterator[None]:
        runner.broker = app[BROKER]
        await runner.start()
        yield
        await runner.stop_serving()

    async def end_streams(app: web.Application) -> None:
        runner.hub.shut()  # before aiohttp waits for the requests in progress to finish

    app.on_shutdown.append(end_streams)
    app.cleanup_ctx.insert(0, job_store)  # cleaned up last
    app.cleanup_ctx.append(jobs)           # started after the broker link, cleaned up first
    app.router.add_post(JOBS_PATH, submit_job)
    app.router.add_get(JOBS_PATH + "/{job_id}", get_job)
    app.router.add_delete(JOBS_PATH + "/{job_id}", delete_job)
    app.router.add_get(JOBS_PATH + "/{job_id}/events", job_events)
    return runner


# ---------------------------------------------------------------------------------------------
# OpenAPI (gateway/openapi.py merges these into the document)

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
_TIMESTAMP = {"type": ["string", "null"], "format": "date-time",
              "description": "ISO 8601, UTC, with milliseconds; null until it happens."}


def openapi_schemas(settings: Any, generate_request: dict[str, Any]) -> dict[str, Any]:
    """The job API's components: ``generate_request`` is POST /generate's body schema, which a
    job's body extends."""
    body = dict(generate_request)
    body["title"] = "JobRequest"
    body["description"] = ("The body of POST /generate (the same fields, bounds and checks) plus the job's own "
                           "options. " + generate_request.get("description", ""))
    body["properties"] = {
        **generate_request["properties"],
        "webhook": {"type": ["string", "null"], "format": "uri", "maxLength": 2048,
                    "description": "Where to POST the job's events, signed (docs/jobs.md). http(s) only; loopback "
                                   "and private addresses are refused unless WEBHOOK_ALLOW_PRIVATE=true. Needs "
                                   "WEBHOOK_SECRET on the gateway (400 otherwise)."},
        "webhook_events": {"type": ["array", "null"], "minItems": 1,
                           "items": {"enum": list(WEBHOOK_EVENT_NAMES)},
                           "description": "Which events go to the webhook: start, completed (the default), "
                                          "queued, progress, preview, or event names. Needs webhook."},
        "preview": {"type": ["boolean", "null"], "default": False,
                    "description": "Ask for preview events (small images of the work in progress)."},
    }
    status_enum = {"enum": list(STATUSES)}
    error = {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
             "required": ["code", "message"]}
    return {
        "JobRequest": body,
        "JobAccepted": {
            "type": "object",
            "title": "JobAccepted",
            "properties": {"id": {"type": "string", "description": "The job's id (random, URL-safe)."},
                           "status": status_enum,
                           "status_url": {"type": "string", "format": "uri", "description": "GET the job here."},
                           "events_url": {"type": "string", "format": "uri",
                                          "description": "Its Server-Sent Events."}},
            "required": ["id", "status", "status_url", "events_url"],
        },
        "Job": {
            "type": "object",
            "title": "Job",
            "description": "A job's status. Fields appear by status: queue_position and estimated_start_s while "
                           "queued; progress once it started; batch_size and worker while running or paused "
                           "(its row waits, latents kept, while higher-priority rows run; BATCH_POLICY=step) and after "
                           "success; image_url and result (the answer POST /generate would have given, "
                           "duration_ms counted from submission) when succeeded; error when failed.",
            "properties": {
                "id": {"type": "string"},
                "status": status_enum,
                "created_at": _TIMESTAMP,
                "started_at": _TIMESTAMP,
                "finished_at": _TIMESTAMP,
                "attempt": {"type": "integer", "minimum": 1,
                            "description": "1, then 2, 3... each time the job was stopped and started again "
                                           "(preempted, or its worker was lost)."},
                "priority": {"enum": list(PRIORITIES),
                             "description": "The priority its request asked for (normal when it gave none)."},
                "status_url": {"type": "string", "format": "uri"},
                "events_url": {"type": "string", "format": "uri"},
                "queue_position": {"type": ["integer", "null"], "minimum": 0,
                                   "description": "Requests ahead of it (while queued; null until the broker says)."},
                "estimated_start_s": {"type": ["number", "null"], "minimum": 0,
                                      "description": "Seconds until it is expected to start, from the workers' "
                                                     "measured costs (while queued)."},
                "progress": {"type": "object",
                             "properties": {"step": {"type": "integer", "minimum": 0},
                                            "steps": {"type": "integer", "minimum": 1}},
                             "required": ["step", "steps"]},
                "batch_size": {"type": ["integer", "null"], "minimum": 1},
                "worker": {"type": ["string", "null"]},
                "image_url": {"type": "string", "format": "uri"},
                "result": _ref("GenerateResponse"),
                "error": error,
                "webhook": {"type": "string"},
            },
            "required": ["id", "status", "created_at", "started_at", "finished_at", "attempt", "priority",
                         "status_url", "events_url"],
        },
    }


def openapi_paths(settings: Any) -> dict[str, Any]:
    """The job API's path items."""
    s = settings
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "The id POST /v1/jobs answered with."}
    not_found = _answer("No such job, or another API key's (not_found).", "Error")
    store_down = _answer("The job store cannot be reached (job_store_unavailable).", "Error", _RETRY_AFTER)
    return {
        JOBS_PATH: {"post": {
            "operationId": "submitJob",
            "summary": "Submit a job: answered at once, generated in the background",
            "description": "Also POST /generate with the header Prefer: respond-async. Events of the job: "
                           "GET events_url; its status: GET status_url.",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
                                       "pattern": r"^[!-~]+$"},
                            "description": "The same key with the same body answers with the same job (and "
                                           "starts nothing); with another body, 409 idempotency_conflict. "
                                           "Keys belong to their API key and are forgotten with the job "
                                           "(JOB_RETENTION_S)."}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobRequest")}}},
            "responses": {
                "202": {**_answer("The job is stored and queued.", "JobAccepted"),
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "status_url"}}},
                "400": _answer("A field is wrong (error.field names it), as for POST /generate; or the webhook "
                               "URL is refused, or the gateway has no WEBHOOK_SECRET.", "Error"),
                "403": _answer("The priority is above what the API key may use (priority_not_allowed).", "Error"),
                "409": _answer("The Idempotency-Key was used with another body (idempotency_conflict).", "Error"),
                "413": _answer(f"The body exceeds {s.max_request_bytes} bytes (MAX_REQUEST_BYTES).", "Error"),
                "503": store_down,
            },
        }},
        JOBS_PATH + "/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "A job's status",
                "parameters": [job_id],
                "responses": {"200": _answer("The job.", "Job"), "404": not_found, "503": store_down},
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a job",
                "description": "A queued job is dropped; a running or paused one leaves its batch before its next step. "
                               "Cancelling a cancelled job answers 200 again.",
                "parameters": [job_id],
                "responses": {
                    "200": _answer("The job, cancelled.", "Job"),
                    "404": not_found,
                    "409": _answer("The job had already succeeded or failed (job_finished).", "Error"),
                    "503": store_down,
                },
            },
        },
        JOBS_PATH + "/{job_id}/events": {"get": {
            "operationId": "jobEvents",
            "summary": "A job's events, as Server-Sent Events",
            "description": "Each event: id (1, 2, 3... per job), event (queued, started, progress, preview, "
                           "restarted, succeeded, failed, cancelled) and data (JSON, with at: when it happened). "
                           "The stored events after Last-Event-ID (or from the first), then new ones live; a "
                           f"comment line every {HEARTBEAT_S:g} s; the stream ends after the terminal event. "
                           f"progress: at most one per PROGRESS_EVENT_INTERVAL_S={s.progress_event_interval_s:g}s.",
            "parameters": [job_id,
                           {"name": "Last-Event-ID", "in": "header", "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "Resume after this event id (browsers send it when they reconnect)."},
                           {"name": "last_event_id", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "The same, for clients that cannot set headers."}],
            "responses": {
                "200": {"description": "The event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "400": _answer("Last-Event-ID is not a whole number.", "Error"),
                "404": not_found,
                "429": _answer(f"The job has {s.job_event_streams_per_job} streams open "
                               "(JOB_EVENT_STREAMS_PER_JOB; too_many_streams).", "Error"),
                "503": _answer(f"The gateway has {s.job_event_streams_max} event streams open "
                               "(JOB_EVENT_STREAMS_MAX; too_many_streams), or the job store cannot be reached.",
                               "Error", _RETRY_AFTER),
            },
        }},
    }
