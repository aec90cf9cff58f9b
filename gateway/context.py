"""What the gateway's request handlers share: the application's keys and reading a bounded JSON
body. Handler modules (app.py, openai_api.py, openapi.py) import it, so none of them needs to
import another; what the generate routes answer (errors, the kept image) is gateway/answers.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from gateway.broker_client import BrokerClient
from gateway.config import GatewaySettings
from gateway.images import ImageStore
from gateway.metrics import GatewayMetrics
from gateway.validation import FieldError

SETTINGS = web.AppKey("settings", GatewaySettings)
BROKER = web.AppKey("broker", BrokerClient)
IMAGES = web.AppKey("images", ImageStore)
METRICS = web.AppKey("metrics", GatewayMetrics)

# The job API (gateway/jobs/routes.py) lives under /v1/ but is the gateway's own: its errors, aiohttp's
# 404/405 and the API-key check's 401 included, take the gateway's shape, not OpenAI's.
JOBS_PATH = "/v1/jobs"


def openai_shaped(path: str) -> bool:
    """Whether errors on ``path`` take OpenAI's shape: the OpenAI-compatible routes under /v1/."""
    return path.startswith("/v1/") and path != JOBS_PATH and not path.startswith(JOBS_PATH + "/")


# Set on a request whose body stopped arriving: its answer (408) is the connection's last
# (app.py's close_stalled_connections closes it once the answer is written).
BODY_STALLED = web.RequestKey("body_stalled", bool)


async def read_json_body(request: web.Request, max_bytes: int, timeout_s: float | None = None) -> Any:
    """The decoded JSON body, at most ``max_bytes`` long and fully arrived within ``timeout_s``
    (default GATEWAY_BODY_TIMEOUT_S); FieldError (400, 408 or 413) otherwise."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise FieldError(None, f"the request body is {request.content_length} bytes; the limit is {max_bytes} "
                               "(MAX_REQUEST_BYTES)", status=413)
    timeout_s = request.app[SETTINGS].body_timeout_s if timeout_s is None else timeout_s
    # read(n) returns what has arrived so far (up to n bytes), not the whole body: loop to EOF.
    raw = b""
    try:
        async with asyncio.timeout(timeout_s):
            while len(raw) <= max_bytes:
                chunk = await request.content.read(max_bytes + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except TimeoutError:
        # A client that stops sending would otherwise hold its connection (and a file descriptor)
        # for ever: answer, then close.
        request[BODY_STALLED] = True
        raise FieldError(None, f"the request body did not arrive within {timeout_s:g}s (GATEWAY_BODY_TIMEOUT_S); "
                               f"{len(raw)} bytes came", status=408, code="body_timeout") from None
    if len(raw) > max_bytes:
        raise FieldError(None, f"the request body exceeds {max_bytes} bytes (MAX_REQUEST_BYTES)", status=413)
    try:
        return json.loads(raw)
    # ValueError covers JSONDecodeError and integers over Python's 4300-digit limit;
    # RecursionError, arrays nested tens of thousands deep: both are the client's fault (400).
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FieldError(None, f"the request body is not valid JSON: {exc}") from None
