"""The gateway's aiohttp application: routes, JSON errors, and the broker link's lifecycle.

``create_app(settings, broker_client=None)`` builds the app; tests pass a fake broker client,
``python -m gateway`` lets it open the real one (a ZeroMQ DEALER) at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web

from gateway.answers import IMAGE_ROUTE, ErrorAnswer, broker_failure_answer, broker_silent_answer
from gateway.answers import has_reported_size, how_it_was_made, image_url, keep_image, storage_answer, wrong_size_answer
from gateway.auth import api_key_middleware, load_key_policies, ranking_of
from gateway.key_policies import key_name
from gateway.broker_client import BrokerClient, BrokerFailure
from gateway.config import GatewaySettings
from gateway.identity import resolve_gateway_identity
from gateway.context import BODY_STALLED, BROKER, IMAGES, METRICS, SETTINGS, openai_shaped, read_json_body
from gateway.images import ImageStore, StorageUnavailable, png_size
from gateway.jobs.routes import prefers_async, setup_jobs, submit_job
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import OUTCOME, GatewayMetrics, metrics_middleware
from gateway.openapi import openapi_handler
from gateway.readiness import readiness
from gateway.request_ids import request_id_middleware, request_id_of, request_label_of
from gateway.openai_api import images_generations, openai_error
from gateway.validation import FieldError, GenerateRequest, parse_generate_request
from gateway.web_page import index_page
from imagegen import stage_trace
from imagegen.logs import request_fields, request_name
from imagegen.protocol import Result

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 60.0
READY_TIMEOUT_S = 1.0
METRICS_STATS_TIMEOUT_S = 2.0  # within Prometheus' default scrape_timeout (10 s)

def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    response = web.json_response(body, status=status, headers=headers)
    response[OUTCOME] = code  # the outcome label of imagegen_gateway_http_requests_total
    return response


def answer_error(answer: ErrorAnswer) -> web.Response:
    """A generate error (gateway/answers.py) in this route's shape."""
    return error_response(answer.status, answer.code, answer.message, answer.field, headers=answer.headers())


@web.middleware
async def close_stalled_connections(request: web.Request, handler) -> web.StreamResponse:
    """After the answer to a request whose body stopped arriving (read_json_body's 408), close the
    connection at once rather than wait, lingering, for the rest of a body that is not coming. It
    runs outermost, so the answer is sent with every header the other middlewares add."""
    response = await handler(request)
    if request.get(BODY_STALLED):
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error, aiohttp's own 404/405/413 included, answers with the same JSON shape (under
    /v1/, OpenAI's). A 404 lists the endpoints; a 405 names the allowed methods (and sends Allow)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = exc.reason.lower().replace(" ", "_"), exc.text or exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
            headers = {"Allow": allowed}
        elif isinstance(exc, web.HTTPNotFound) and request.match_info.route.resource is None:
            message = f"no endpoint at {request.path}; endpoints: {', '.join(_endpoints(request.app))}"
        if openai_shaped(request.path):
            response = openai_error(exc.status, message, code=code, headers=headers)
            response[OUTCOME] = code
            return response
        return error_response(exc.status, code, message, headers=headers)


def _endpoints(app: web.Application) -> list[str]:
    """"METHOD /path" of every route (HEAD goes with GET, so it is left out)."""
    return sorted({f"{route.method} {route.resource.canonical}" for route in app.router.routes()
                   if route.method != "HEAD" and route.resource is not None})


async def generate(request: web.Request) -> web.Response:
    """POST /generate; logs the request's id (and the client's X-Request-ID, its label) with its
    answer's status and duration. With ``Prefer: respond-async``: a job (gateway/jobs/routes.py)."""
    if prefers_async(request):
        return await submit_job(request)
    started = time.perf_counter()
    request_id, label = request_id_of(request), request_label_of(request)
    name, fields = request_name(request_id, label), request_fields(request_id, label)
    stage_trace.stage("gateway_received", request_id)
    try:
        response = await _generate(request, request_id, label, started)
    except asyncio.CancelledError:
        log.info("request %s: the client went away after %.3fs", name, time.perf_counter() - started, extra=fields)
        raise
    log.info("request %s: %d %s in %.3fs", name, response.status, response.get(OUTCOME) or "ok",
             time.perf_counter() - started, extra=fields)
    return response


async def _generate(request: web.Request, request_id: str, label: str, started: float) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        body = await read_json_body(request, settings.max_request_bytes)
        parsed = parse_generate_request(body, settings)
        ranking = ranking_of(request, parsed.priority)
    except FieldError as exc:
        return error_response(exc.status, exc.code or "invalid_request", exc.message, exc.field)
    params = parsed.params
    log.info("request %s accepted: %dx%d, %d steps", request_name(request_id, label), params.width, params.height,
             params.num_inference_steps, extra=request_fields(request_id, label))
    try:
        with request.app[METRICS].requests_waiting.track_inprogress():
            stage_trace.stage("gateway_sent_request", request_id)
            result, png = await request.app[BROKER].generate(request_id, params, settings.request_timeout_s,
                                                                 label=label, **ranking)
            stage_trace.stage("gateway_got_result", request_id)
    except BrokerFailure as exc:
        return answer_error(broker_failure_answer(exc, settings))
    except asyncio.TimeoutError:
        return answer_error(broker_silent_answer(settings))
    request.app[METRICS].observe_result(result)
    if not has_reported_size(png, result):
        log.error("request %s: worker %s sent an image of size %s, reporting %dx%d", request_id,
                  result.worker_name, png_size(png), result.width, result.height,
                  extra={"request_id": request_id})
        return answer_error(wrong_size_answer("the worker"))
    try:
        image_id = await keep_image(request, png)
    except StorageUnavailable as exc:
        return answer_error(storage_answer(exc, settings))
    stage_trace.stage("gateway_saved_image", request_id)
    return web.json_response(_success_body(request, parsed, result, image_id, started))


def _success_body(request: web.Request, parsed: GenerateRequest, result: Result, image_id: str,
                  started: float) -> dict[str, Any]:
    params = parsed.params
    return {
        "image_id": image_id,
        "image_url": image_url(request, image_id),
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 1),
        "game_id": parsed.game_id,
        "round_id": parsed.round_id,
        "player_id": parsed.player_id,
        "width": result.width,  # the size drawn: with UNLISTED_SIZE=snap, maybe not the one asked
        "height": result.height,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "seed": params.seed,
        **how_it_was_made(result),
    }


async def stats(request: web.Request) -> web.Response:
    try:
        document = await request.app[BROKER].stats()
    except asyncio.TimeoutError:
        return error_response(503, "broker_unreachable", "the broker did not answer the stats query",
                              headers={"Retry-After": str(request.app[SETTINGS].retry_after_s)})
    return web.json_response(document)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: the gateway's own metrics, and the cluster's from the broker's stats
    (without an answer from the broker, imagegen_broker_up is 0 and the cluster's metrics are left out)."""
    try:
        document = await request.app[BROKER].stats(METRICS_STATS_TIMEOUT_S)
    except asyncio.TimeoutError:
        document = None
    return web.Response(body=request.app[METRICS].exposition(document), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: this process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness (gateway/readiness.py decides): the broker answers, a worker accepts work, and the
    image folder takes images."""
    store_problem = await asyncio.get_running_loop().run_in_executor(None, request.app[IMAGES].problem)
    try:
        document = await request.app[BROKER].stats(READY_TIMEOUT_S)
    except asyncio.TimeoutError:
        document = None
    status, body = readiness(document, store_problem)
    return web.json_response(body, status=status)


async def image(request: web.Request) -> web.StreamResponse:
    """GET /images/<id>.png: a regular file of the image folder, never through a symbolic link."""
    name = request.match_info["name"]
    data = None
    if name.endswith(".png"):
        data = await asyncio.get_running_loop().run_in_executor(None, request.app[IMAGES].read,
                                                                name.removesuffix(".png"))
    if data is None:
        return error_response(404, "not_found", f"no image named {name!r} (images expire; see IMAGE_RETENTION_S)")
    return web.Response(body=data, headers={"Content-Type": "image/png", "Cache-Control": "public, max-age=86400"})


async def _broker_link(app: web.Application) -> AsyncIterator[None]:
    if BROKER not in app:
        settings = app[SETTINGS]
        identity = resolve_gateway_identity(settings.gateway_id, settings.state_dir)  # GatewayIdentityError
        log.info("gateway id %s (from %s)", identity.gateway_id, identity.source)
        app[BROKER] = BrokerClient(settings.broker_address, max_pending=settings.max_pending, identity=identity)
    await app[BROKER].start()
    yield
    await app[BROKER].close()


async def _prune_images(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            await asyncio.get_running_loop().run_in_executor(None, app[IMAGES].prune)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    task = asyncio.create_task(loop(), name="prune-images")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: GatewaySettings, broker_client: Any = None) -> web.Application:
    # client_max_size above our own limit: read_json_body enforces MAX_REQUEST_BYTES with a JSON error.
    # With API keys configured, authentication runs inside json_errors (see gateway/auth.py).
    # Request ids and metrics come first, so they see every answer, errors and 401s included.
    api_keys = load_key_policies(settings)
    gateway_metrics = GatewayMetrics(owners=frozenset(key_name(key) for key in api_keys))
    middlewares = [close_stalled_connections, request_id_middleware(), metrics_middleware(gateway_metrics),
                   json_errors]
    middlewares += [api_key_middleware(api_keys)] if api_keys else []
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes + 1024)
    app[SETTINGS] = settings
    app[METRICS] = gateway_metrics
    app[IMAGES] = ImageStore(settings.image_dir, settings.image_retention_count, settings.image_retention_s)
    if broker_client is not None:
        app[BROKER] = broker_client
    app.cleanup_ctx.extend([_broker_link, _prune_images])
    app.router.add_post("/generate", generate)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(IMAGE_ROUTE, image)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post("/v1/images/generations", images_generations)
    app.router.add_get("/", index_page)
    setup_jobs(app)  # the job API (/v1/jobs); its store closes after the broker link
    return app
