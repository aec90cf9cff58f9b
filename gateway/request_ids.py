"""Request ids: the service makes the id that routes a request; a client's X-Request-ID is a label.

Every HTTP request gets a fresh id made here (32 hex characters, uuid4: 122 random bits). That id is
the request's key on the broker link, in the broker's tables and at the worker, and it is never
derived from anything a client sends: a client that could choose it could collide with another
client's request and receive that client's image.

A client (or a proxy in front of the gateway) may send ``X-Request-ID``: a token of 1 to 64
characters from ``[A-Za-z0-9._-]`` becomes the request's *label*. The label is echoed in the answer's
``X-Request-ID`` and travels with the request to the broker and the worker, which write it beside
the id in their log lines, so one grep for it finds the request in all three services' logs. It
routes nothing, and two requests may carry the same label. Without a (valid) header, the answer's
``X-Request-ID`` is the service-made id.
"""

from __future__ import annotations

import re
import uuid

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"
MAX_CLIENT_ID_CHARS = 64
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_CLIENT_ID_CHARS)
# Typed request storage appeared in aiohttp 3.14; older releases take a plain string key.
if hasattr(web, "RequestKey"):
    REQUEST_ID = web.RequestKey("request_id", str)
    REQUEST_LABEL = web.RequestKey("request_label", str)
else:  # pragma: no cover - older aiohttp
    REQUEST_ID, REQUEST_LABEL = "imagegen_request_id", "imagegen_request_label"


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_label(header: str | None) -> str:
    """The client's X-Request-ID if it is a safe token, else "" (no label)."""
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return ""


def request_id_of(request: web.Request) -> str:
    """The id request_id_middleware gave this request (a fresh one if the middleware is absent)."""
    return request.get(REQUEST_ID) or new_request_id()


def request_label_of(request: web.Request) -> str:
    """The client's label for this request ("" if it sent none)."""
    return request.get(REQUEST_LABEL) or ""


def request_id_middleware():
    """An aiohttp middleware that gives each request its id and label, and answers X-Request-ID."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        request[REQUEST_ID] = new_request_id()
        request[REQUEST_LABEL] = client_label(request.headers.get(REQUEST_ID_HEADER))
        response = await handler(request)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_LABEL] or request[REQUEST_ID]
        return response

    return middleware
