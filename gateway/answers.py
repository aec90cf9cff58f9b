"""What the generate routes answer, shared by POST /generate (gateway/app.py) and
POST /v1/images/generations (gateway/openai_api.py).

The errors are decisions: :func:`broker_failure_answer` (a FailureCode through
:data:`FAILURE_STATUS`), :func:`broker_silent_answer`, :func:`wrong_size_answer` and
:func:`storage_answer` each return an :class:`ErrorAnswer` (status, code, message, Retry-After),
which each route writes in its own shape: ``{"error": {"code", "message", "field"}}`` for
/generate, OpenAI's for /v1/. The image is kept the same way for both (:func:`keep_image`) and
found at the same URL (:func:`image_url`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.broker_client import BROKER_ANSWER_GRACE_S, BrokerFailure
from gateway.config import GatewaySettings
from gateway.context import IMAGES, SETTINGS
from gateway.images import StorageUnavailable, new_image_id, png_size
from imagegen.protocol import FailureCode, Result

# How a broker-side failure reaches the HTTP client; a code not listed here is a 500.
FAILURE_STATUS = {
    FailureCode.OVERLOADED.value: 503,
    FailureCode.WORKER_LOST.value: 503,
    FailureCode.SHUTTING_DOWN.value: 503,
    FailureCode.BROKER_RESTARTED.value: 503,
    FailureCode.UNKNOWN_REQUEST.value: 503,  # collected after the broker lost it (a restart): send it again
    FailureCode.INVALID_REQUEST.value: 400,
    FailureCode.TOO_COSTLY.value: 400,
    FailureCode.UNKNOWN_MODEL.value: 400,
    FailureCode.MODEL_REQUIRED.value: 400,
    FailureCode.SIZE_NOT_SERVED.value: 400,
    FailureCode.DEADLINE_EXCEEDED.value: 504,
    FailureCode.GENERATION_FAILED.value: 500,
}
UNKNOWN_FAILURE_STATUS = 500
# Failures about one request field: the error names it (/generate's "field", OpenAI's "param"; a
# size is /generate's width and height, OpenAI's size: see gateway/openai_api.py).
FAILURE_FIELD = {
    FailureCode.UNKNOWN_MODEL.value: "model",
    FailureCode.MODEL_REQUIRED.value: "model",
    FailureCode.SIZE_NOT_SERVED.value: "width",
}

# GET serves a kept image here (gateway/app.py image()); the name is "<image id>.png".
IMAGE_ROUTE = "/images/{name}"


@dataclass(frozen=True)
class ErrorAnswer:
    """An error for a route to send, in its own JSON shape."""

    status: int
    code: str
    message: str
    retry_after_s: int | None = None  # sent as Retry-After; None: no such header
    field: str | None = None  # the request field at fault, if one is

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def retry_after_s(exc: Any, settings: GatewaySettings) -> int:
    """Seconds for a 503's Retry-After: the broker's estimate when it gave one, else RETRY_AFTER_S."""
    estimate = getattr(exc, "retry_after_s", 0.0)
    return max(1, math.ceil(estimate)) if estimate > 0 else settings.retry_after_s


def broker_failure_answer(exc: BrokerFailure, settings: GatewaySettings) -> ErrorAnswer:
    """The broker (or a worker) ended the request without an image: its code decides the status;
    every 503 says when to retry."""
    status = FAILURE_STATUS.get(exc.code, UNKNOWN_FAILURE_STATUS)
    return ErrorAnswer(status, exc.code, exc.message, retry_after_s(exc, settings) if status == 503 else None,
                       FAILURE_FIELD.get(exc.code))


def broker_silent_text(settings: GatewaySettings) -> str:
    """The 504 message when not even the broker answered in time (it answers deadline_exceeded itself,
    saying where the request was, just before REQUEST_TIMEOUT_S)."""
    return (f"no answer within REQUEST_TIMEOUT_S={settings.request_timeout_s:g}s: the broker did not answer "
            f"(not even with where the request was) within {BROKER_ANSWER_GRACE_S:g}s more; it may be down "
            "or overloaded")


def broker_silent_answer(settings: GatewaySettings) -> ErrorAnswer:
    return ErrorAnswer(504, "timeout", broker_silent_text(settings))


def has_reported_size(png: bytes, result: Result) -> bool:
    """Whether the worker's PNG has the size its result reports (a model that ignores the size, or a
    worker's bug, must not reach the client as success). That is the size asked for, or with
    UNLISTED_SIZE=snap the listed size the worker drew instead (the answer reports it)."""
    return png_size(png) == (result.width, result.height)


def how_it_was_made(result: Result) -> dict[str, Any]:
    """The fields of a /generate answer (and a succeeded job's result) that the worker's result gives:
    its batch, worker, host, GPU, wait and generation times, and model."""
    return {
        "batch_id": result.batch_id,
        "batch_size": result.batch_size,
        "gpu_id": result.gpu_id,
        "worker": result.worker_name,
        "host": result.host,
        "queue_wait_ms": round(result.queue_wait_ms, 1),
        "generation_ms": round(result.generation_ms, 1),
        "model": result.model or None,
    }


def wrong_size_answer(sender: str) -> ErrorAnswer:
    """502 for an image of another size than asked; ``sender`` names who sent it ("the worker")."""
    return ErrorAnswer(502, "bad_worker_output", f"{sender} returned an image of the wrong size")


def storage_answer(exc: StorageUnavailable, settings: GatewaySettings) -> ErrorAnswer:
    """503: the image folder cannot take the image; the message names the cause."""
    return ErrorAnswer(503, "storage_unavailable", str(exc), settings.retry_after_s)


async def keep_image(request: web.Request, png: bytes) -> str:
    """Store the PNG under a fresh id, in an executor thread (a disk write), and return the id;
    raises StorageUnavailable when the folder cannot take it."""
    image_id = new_image_id()
    await asyncio.get_running_loop().run_in_executor(None, request.app[IMAGES].save, image_id, png)
    return image_id


def image_url(request: web.Request, image_id: str) -> str:
    """Where a client GETs a kept image: PUBLIC_BASE_URL (else the request's own scheme and host)
    followed by the image's path."""
    base = request.app[SETTINGS].public_base_url or str(request.url.origin())
    return base.rstrip("/") + IMAGE_ROUTE.format(name=f"{image_id}.png")
