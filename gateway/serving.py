"""Running the gateway's aiohttp application on a TCP port, with a cap on open connections.

aiohttp has no connection limit of its own: every accepted connection gets a RequestHandler and a
file descriptor for as long as the client keeps it open. :class:`CappedRunner` wraps the protocol
factory aiohttp hands to ``loop.create_server`` so that beyond GATEWAY_MAX_CONNECTIONS a new
connection is answered ``503 too_many_connections`` (JSON, Retry-After) and closed at once, before
any of its bytes are parsed. The count covers every HTTP connection, idle keep-alive ones included;
the job API's long-lived event streams have a cap of their own (JOB_EVENT_STREAMS_MAX) so they cannot
crowd out ordinary requests.

The other bounds on a slow client: GATEWAY_IDLE_TIMEOUT_S closes a connection with no request in
progress (idle keep-alive, or headers that never finish); GATEWAY_BODY_TIMEOUT_S bounds reading a
body (gateway/context.py ``read_json_body``, which answers 408 and closes the connection); and a
body nobody reads (an error answered first) is drained for at most that long too (aiohttp's
``lingering_time``) before the connection closes.

Each connection is a file descriptor: :func:`raise_open_files_limit` (at start) lifts the soft
RLIMIT_NOFILE, often 1024, to GATEWAY_MAX_CONNECTIONS plus the gateway's own files, so that the cap,
not EMFILE, is what a crowd of clients meets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from gateway.config import GatewaySettings
from gateway.context import METRICS

log = logging.getLogger(__name__)

REFUSED_LINGER_S = 2.0  # how long a refused connection's request is read and dropped before closing
# Files the gateway holds besides its HTTP connections: the listening socket, the broker link's
# ZeroMQ sockets, the job store, image files being written, logs, the event loop (about 20 when idle).
OWN_FILES = 100


def raise_open_files_limit(max_connections: int, getrlimit: Callable = resource.getrlimit,
                           setrlimit: Callable = resource.setrlimit) -> tuple[int, int, int]:
    """Raise the soft limit on open files to ``max_connections + OWN_FILES``, as far as the hard limit
    allows; (soft limit before, soft limit now, what is needed)."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + OWN_FILES
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft, needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target, needed
        except (ValueError, OSError):
            pass
    return soft, soft, needed


def check_open_files_limit(settings: GatewaySettings) -> None:
    """At start: raise the open files limit for GATEWAY_MAX_CONNECTIONS, or say why it could not be."""
    before, now, needed = raise_open_files_limit(settings.max_connections)
    if now != resource.RLIM_INFINITY and now < needed:
        log.warning("the open files limit is %d (hard limit included), below GATEWAY_MAX_CONNECTIONS=%d plus %d for "
                    "the gateway's own files: past it new connections fail (too many open files) instead of "
                    "getting 503 too_many_connections; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, "
                    "supervisord minfds) or lower GATEWAY_MAX_CONNECTIONS", now, settings.max_connections, OWN_FILES)
    elif now != before:
        log.info("open files limit raised from %d to %d for GATEWAY_MAX_CONNECTIONS=%d", before, now,
                 settings.max_connections)


def refusal_bytes(retry_after_s: int, limit: int) -> bytes:
    """The whole HTTP answer sent to a connection over the cap."""
    body = json.dumps({"error": {
        "code": "too_many_connections",
        "message": f"the gateway has {limit} connections open (GATEWAY_MAX_CONNECTIONS); retry later",
        "field": None}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Counted(asyncio.Protocol):
    """Stands between the transport and aiohttp's RequestHandler, counting open connections.

    The decision to serve or refuse is taken in connection_made, when the connection exists; a
    refused connection never reaches aiohttp."""

    __slots__ = ("_cap", "_inner", "_counted", "_linger")

    def __init__(self, cap: "ConnectionCap", inner: asyncio.Protocol) -> None:
        self._cap = cap
        self._inner = inner
        self._counted = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._cap.open >= self._cap.limit:
            self._cap.refused += 1
            if self._cap.on_refused is not None:
                self._cap.on_refused()
            transport.write(self._cap.refusal)  # type: ignore[attr-defined]
            # Closing with the client's request unread would reset the connection and could discard
            # the answer: send FIN, read and drop what comes for a moment, then close.
            transport.write_eof()  # type: ignore[attr-defined]
            self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            return
        self._cap.open += 1
        self._counted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._counted:
            self._counted = False
            self._cap.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._counted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        # A refused connection: returning False closes it now that the client has finished.
        return self._inner.eof_received() if self._counted else False

    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, except that the answers it makes itself use the gateway's JSON
    error shape: a request its parser refuses before any middleware runs (a request line or header
    over 8190 bytes, more than 128 headers, a malformed request) and an exception nothing caught."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer was already started
        if status == 500:
            code, text = "internal_error", "the gateway failed to answer this request; its log says why"
        elif status == 504:
            code, text = "timeout", "the gateway did not answer in time"
        elif isinstance(exc, LineTooLong):
            code, text = "bad_request", ("the request line or a header is longer than 8190 bytes, the most "
                                         "the gateway reads")
        else:
            code = "bad_request"
            text = (f"the request could not be read: {message or exc or 'malformed'} (limits: the request line "
                    "and each header at most 8190 bytes, at most 128 headers)")
        response = web.json_response({"error": {"code": code, "message": text, "field": None}}, status=status)
        response.force_close()
        return response


class ConnectionCap:
    """A protocol factory for ``loop.create_server``: aiohttp's server, at most ``limit`` connections."""

    def __init__(self, server: web.Server, limit: int, retry_after_s: int,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.server = server
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.on_refused = on_refused  # the gateway's connections-refused metric
        self.refusal = refusal_bytes(retry_after_s, limit)

    def __call__(self) -> asyncio.Protocol:
        # What web.Server.__call__ does, with the JSON-answering handler class.
        handler = JsonErrorRequestHandler(self.server, loop=self.server._loop, **self.server._kwargs)
        return _Counted(self, handler)

    def __getattr__(self, name: str) -> Any:
        # Everything else (shutdown, connections, requests_count...) is the wrapped server's.
        return getattr(self.server, name)


class CappedRunner(web.AppRunner):
    """An AppRunner whose server (the protocol factory its sites listen with) is a ConnectionCap."""

    def __init__(self, app: web.Application, max_connections: int, retry_after_s: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._retry_after_s = retry_after_s

    async def _make_server(self) -> Any:
        metrics = self.app.get(METRICS)
        return ConnectionCap(await super()._make_server(), self._max_connections, self._retry_after_s,
                             metrics.connections_refused.inc if metrics is not None else None)

    @property
    def cap(self) -> ConnectionCap:
        return self.server  # type: ignore[return-value]


def runner_for(app: web.Application, settings: GatewaySettings, **kwargs: Any) -> CappedRunner:
    """The runner ``python -m gateway`` uses; tests start it on port 0 the same way."""
    return CappedRunner(app, settings.max_connections, settings.retry_after_s,
                        keepalive_timeout=settings.idle_timeout_s,
                        # A body left unread (an error was answered first) is drained no longer than
                        # a body being read may take; then the connection closes.
                        lingering_time=settings.body_timeout_s,
                        shutdown_timeout=settings.shutdown_timeout_s, **kwargs)


async def serve(app: web.Application, settings: GatewaySettings, **kwargs: Any) -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests in progress finish for up to
    GATEWAY_SHUTDOWN_TIMEOUT_S, and run the app's cleanup (what web.run_app does)."""
    runner = runner_for(app, settings, handle_signals=False, **kwargs)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        log.info("listening on http://%s:%d (at most %d connections)", settings.host, settings.port,
                 settings.max_connections)
        await stop.wait()
        log.info("stopping: no new connections; requests in progress have %gs to finish",
                 settings.shutdown_timeout_s)
    finally:
        await runner.cleanup()
