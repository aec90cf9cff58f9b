"""The gateway's link to the broker: one DEALER socket, one reader task, a future per request.

Beyond matching replies to callers, it keeps requests alive across a broker restart:

* it pings the broker every ``ping_interval_s``; each PONG carries the broker's epoch (a fresh id
  per broker start) and how many workers are registered (used by /readyz);
* when the epoch changes, the new broker knows nothing of our requests: each one still waiting is
  sent again, once, with the same id; a request caught by a second restart fails with
  ``broker_restarted`` (HTTP 503) instead of hanging;
* a caller that stops waiting (its HTTP client went away, or its deadline passed) sends CANCEL, so
  the broker and the worker drop the request before it costs GPU time;
* at most ``max_pending`` requests wait at once; beyond that callers get ``overloaded`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
import zmq.asyncio

from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    Cancel,
    Failure,
    FailureCode,
    Generate,
    GenerationParams,
    Ping,
    Pong,
    ProtocolError,
    Result,
    StatsQuery,
    StatsReply,
)
from imagegen.sockets import make_dealer

log = logging.getLogger(__name__)

# The broker answers a request past its deadline itself, saying where it was (queued, or at which
# step on which worker; broker.server checks every 0.2 s): the gateway waits this long past
# REQUEST_TIMEOUT_S for that answer before it gives up on its own (504 "the broker did not answer").
BROKER_ANSWER_GRACE_S = 2.0


class BrokerFailure(Exception):
    """The broker or a worker ended a request without an image (code: a FailureCode value)."""

    def __init__(self, code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # the broker's estimate of when a retry may succeed; 0: none


@dataclass
class _Waiting:
    future: asyncio.Future
    message: protocol.Message | None = None  # a Generate, kept for a resend after a broker restart
    sent_at: float = 0.0
    resent: bool = False


@dataclass
class BrokerView:
    """What the last PONG said, and when."""

    epoch: str | None = None
    workers: int = 0
    last_pong: float = field(default=float("-inf"))


class BrokerClient:
    def __init__(self, address: str, ping_interval_s: float = 1.0, max_pending: int = 10_000,
                 clock=time.monotonic) -> None:
        self.address = address
        self.ping_interval_s = ping_interval_s
        self.max_pending = max_pending
        self.clock = clock
        self.ctx = zmq.asyncio.Context()
        self.sock = make_dealer(self.ctx, address, linger_ms=0)
        self.waiting: dict[str, _Waiting] = {}
        self.broker = BrokerView()
        self.malformed_messages = 0
        self.resent_after_restart = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read(), name="broker-reader"),
                       asyncio.create_task(self._ping(), name="broker-ping")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiting in self.waiting.values():
            waiting.future.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    def broker_alive(self) -> bool:
        """The broker answered a ping within the last three intervals."""
        return self.clock() - self.broker.last_pong <= 3 * self.ping_interval_s

    # ------------------------------------------------------------------ requests

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float,
                       label: str = "") -> tuple[Result, bytes]:
        """The image for ``params`` (PNG bytes) and how it was made; raises BrokerFailure or TimeoutError.

        ``request_id`` is service-made (gateway/request_ids.py); ``label``, the client's X-Request-ID,
        only travels to the logs. If the caller is cancelled or times out, the broker is told to
        drop the request."""
        if len(self.waiting) >= self.max_pending:
            raise BrokerFailure(FailureCode.OVERLOADED.value,
                                f"the gateway already has {self.max_pending} requests waiting; retry later")
        answered = False
        try:
            message, payload = await self._ask(request_id, Generate(request_id, params, timeout_s, label),
                                               timeout_s + BROKER_ANSWER_GRACE_S)
            answered = True
        finally:
            if not answered:
                self._send(Cancel(request_id))
        if isinstance(message, Failure):
            raise BrokerFailure(message.code, message.message, message.retry_after_s)
        return message, bytes(payload[0])

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        query_id = uuid.uuid4().hex
        message, _ = await self._ask(query_id, StatsQuery(query_id), timeout_s)
        return message.stats

    async def _ask(self, reply_id: str, message: protocol.Message, timeout_s: float) -> tuple[Any, list]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[reply_id] = _Waiting(future, message if isinstance(message, Generate) else None, self.clock())
        try:
            self._send(message)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self.waiting.pop(reply_id, None)

    def _send(self, message: protocol.Message) -> None:
        # The DEALER queues while the broker is away; DONTWAIT keeps a full queue from blocking us.
        future = self.sock.send_multipart(protocol.encode(CLIENT_LINK, message), flags=zmq.DONTWAIT, copy=False)
        if future.done() and future.exception() is not None:
            log.warning("could not send %s to the broker: %s", type(message).__name__, future.exception())

    # ------------------------------------------------------------------ broker liveness

    async def _ping(self) -> None:
        while True:
            self._send(Ping(uuid.uuid4().hex))
            await asyncio.sleep(self.ping_interval_s)

    def _on_pong(self, pong: Pong) -> None:
        restarted = self.broker.epoch is not None and pong.broker_epoch != self.broker.epoch
        self.broker = BrokerView(pong.broker_epoch, pong.workers, self.clock())
        if restarted:
            self._resend_after_restart()

    def _resend_after_restart(self) -> None:
        """The broker restarted and lost our requests: send each again once, with the same id."""
        resent = lost = 0
        for request_id, waiting in list(self.waiting.items()):
            if waiting.message is None or waiting.future.done():
                continue
            if waiting.resent:
                lost += 1
                waiting.future.set_result((Failure(request_id, FailureCode.BROKER_RESTARTED.value,
                                                   "the broker restarted twice while this request waited; "
                                                   "retry it"), []))
                continue
            waiting.resent = True
            resent += 1
            remaining_s = max(0.0, waiting.message.deadline_s - (self.clock() - waiting.sent_at))
            self._send(replace(waiting.message, deadline_s=remaining_s))
        self.resent_after_restart += resent
        log.warning("the broker restarted (epoch %s): resent %d waiting requests, %d failed",
                    self.broker.epoch[:8], resent, lost)

    # ------------------------------------------------------------------ receiving

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                message, payload = protocol.decode(frames, CLIENT_LINK)
            except ProtocolError as exc:
                self.malformed_messages += 1
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            if isinstance(message, Pong):
                self._on_pong(message)
                continue
            reply_id = message.query_id if isinstance(message, StatsReply) else getattr(message, "request_id", None)
            waiting = self.waiting.get(reply_id)
            if waiting is not None and not waiting.future.done():
                waiting.future.set_result((message, payload))
