"""The gateway's link to the broker: one DEALER socket, one reader task, a future per request."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import zmq
import zmq.asyncio

from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    Failure,
    Generate,
    GenerationParams,
    ProtocolError,
    Result,
    StatsQuery,
    StatsReply,
)
from imagegen.sockets import make_dealer

log = logging.getLogger(__name__)


class BrokerFailure(Exception):
    """The broker or a worker ended a request without an image (code: a FailureCode value)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BrokerClient:
    """Sends requests and stats queries to the broker and matches replies to waiting callers.

    Replies are matched by id, so any number of requests can be outstanding on the one socket;
    a reply for a caller that has already given up (timeout) is dropped."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = make_dealer(self.ctx, address, linger_ms=0)
        self.pending: dict[str, asyncio.Future] = {}
        self.malformed_messages = 0
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self.pending.values():
            future.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float) -> tuple[Result, bytes]:
        """The image for ``params`` (PNG bytes) and how it was made; raises BrokerFailure or TimeoutError."""
        reply = await self._ask(request_id, Generate(request_id, params, timeout_s), timeout_s)
        message, payload = reply
        if isinstance(message, Failure):
            raise BrokerFailure(message.code, message.message)
        return message, bytes(payload[0])

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        query_id = uuid.uuid4().hex
        message, _ = await self._ask(query_id, StatsQuery(query_id), timeout_s)
        return message.stats

    async def _ask(self, reply_id: str, message: protocol.Message, timeout_s: float) -> tuple[Any, list]:
        future = asyncio.get_running_loop().create_future()
        self.pending[reply_id] = future
        try:
            await self.sock.send_multipart(protocol.encode(CLIENT_LINK, message), copy=False)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self.pending.pop(reply_id, None)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                message, payload = protocol.decode(frames, CLIENT_LINK)
            except ProtocolError as exc:
                self.malformed_messages += 1
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            reply_id = message.query_id if isinstance(message, StatsReply) else getattr(message, "request_id", None)
            future = self.pending.get(reply_id)
            if future is not None and not future.done():
                future.set_result((message, payload))
