"""One id per HTTP request, carried to the broker and the worker so that their log lines match.

A client (or a proxy in front of the gateway) may send ``X-Request-ID``: a token of 1 to 64
characters from ``[A-Za-z0-9._-]`` becomes the request's id; anything else is ignored and the
gateway makes one (32 hex characters). Every answer carries the id back in ``X-Request-ID``.

The id is also the request's key on the broker link (replies are matched by it), so two requests
in flight must never share one: a client id that this gateway already has in flight gets ``-`` and
8 random hex characters appended, and the answer's header shows the id actually used.
"""

from __future__ import annotations

import re
import secrets
import uuid

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"
MAX_CLIENT_ID_CHARS = 64
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_CLIENT_ID_CHARS)
# Typed request storage appeared in aiohttp 3.14; older releases take a plain string key.
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "imagegen_request_id"


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_request_id(header: str | None) -> str | None:
    """The client's X-Request-ID if it is a safe token, else None (the gateway makes its own)."""
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return None


def request_id_of(request: web.Request) -> str:
    """The id request_id_middleware gave this request (a fresh one if the middleware is absent)."""
    return request.get(REQUEST_ID) or new_request_id()


def request_id_middleware():
    """An aiohttp middleware that gives each request its id and returns it in X-Request-ID."""
    in_flight: set[str] = set()

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        request_id = client_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_request_id()
        if request_id in in_flight:
            request_id = f"{request_id}-{secrets.token_hex(4)}"
        in_flight.add(request_id)
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        finally:
            in_flight.discard(request_id)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return middleware
