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

For jobs, which outlive one gateway process (docs/architecture.md, "Results a gateway did not take"):

* the socket connects under the gateway's lasting identity (GATEWAY_ID, gateway/identity.py), so a
  restarted gateway gets its connection back, and answers the broker could not deliver meanwhile
  wait there; ``collect()`` fetches one by request id (or waits for it, from any gateway), and
  ``cancel()`` cancels any request by id;
* ``on_event`` receives a request's PROGRESS (and with ``watch``, QUEUED) reports before its answer,
  and its PREVIEWs (requests with ``GenerationParams.preview``) as :class:`PreviewReport`, which
  carries the image;
* an answer that comes for no waiting call (one the previous process of this gateway sent, finished
  before the jobs code collected it) is kept a while (ORPHAN_KEEP_S) for ``collect()``;
* after a gap in PONGs from the same broker (the link dropped, or this process stalled; the broker
  keeps the answers of a gateway silent for 5 s) every waiting request is asked for again: a
  GENERATE sent again (the broker ignores one it holds, answers one it kept, runs one it never got),
  a COLLECT sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import zmq
import zmq.asyncio

from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    DEFAULT_PRIORITY,
    DEFAULT_SHARE,
    Cancel,
    Collect,
    Failure,
    FailureCode,
    Generate,
    GenerationParams,
    Ping,
    Pong,
    Preview,
    Progress,
    ProtocolError,
    Queued,
    Result,
    StatsQuery,
    StatsReply,
)
from gateway.identity import GatewayIdentity
from imagegen.sockets import make_dealer

log = logging.getLogger(__name__)

# The broker answers a request past its deadline itself, saying where it was (queued, or at which
# step on which worker; broker.server checks every 0.2 s): the gateway waits this long past
# REQUEST_TIMEOUT_S for that answer before it gives up on its own (504 "the broker did not answer").
BROKER_ANSWER_GRACE_S = 2.0
# Answers that come for no waiting call are kept this long, at most this many and bytes, for collect().
ORPHAN_KEEP_S = 300.0
ORPHAN_MAX = 1000
ORPHAN_MAX_BYTES = 128 * 1024 * 1024
# Ids of requests whose caller gave up (and cancelled them) are remembered, at most this many, so
# their late answers are not kept as orphans.
ABANDONED_MEMORY = 10_000
# No PONG for this many ping intervals, then one from the same broker: the link had a gap (the broker
# keeps the answers of a gateway silent for 5 s, broker.state.BrokerPolicy.client_silence_s).
LINK_GAP_PINGS = 2.5

OnEvent = Callable[[protocol.Message], None]  # receives a Progress, a Queued or a PreviewReport


@dataclass(frozen=True)
class PreviewReport(Preview):
    """What ``on_event`` gets for a PREVIEW: the message (``request_id``, ``step``, ``steps``; it is a
    :class:`imagegen.protocol.Preview`) and ``image``, its payload: the preview's JPEG bytes
    (gpu_worker/model/previews.py). Only made here, never sent."""

    image: bytes = b""


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
    message: protocol.Message | None = None  # a Generate or Collect, kept to ask again (broker restart, link gap)
    sent_at: float = 0.0
    resent: bool = False
    on_event: OnEvent | None = None


@dataclass
class BrokerView:
    """What the last PONG said, and when."""

    epoch: str | None = None
    workers: int = 0
    last_pong: float = field(default=float("-inf"))


class BrokerClient:
    def __init__(self, address: str, ping_interval_s: float = 1.0, max_pending: int = 10_000,
                 clock=time.monotonic, identity: GatewayIdentity | bytes | None = None) -> None:
        """``identity``: the gateway's lasting identity (gateway/identity.py; its file lock is let go
        at close()), or a routing id as bytes; None: a random routing id for this connection only."""
        self.address = address
        self.ping_interval_s = ping_interval_s
        self.max_pending = max_pending
        self.clock = clock
        self.identity = identity
        routing_id = identity.routing_id if isinstance(identity, GatewayIdentity) else identity
        self.ctx = zmq.asyncio.Context()
        self.sock = make_dealer(self.ctx, address, linger_ms=0, routing_id=routing_id)
        self.waiting: dict[str, _Waiting] = {}
        self.broker = BrokerView()
        self.malformed_messages = 0
        self.resent_after_restart = 0
        self.asked_again_after_gap = 0
        self.event_errors = 0  # on_event callbacks that raised (logged, then ignored)
        self._orphans: OrderedDict[str, tuple[float, protocol.Message, list, int]] = OrderedDict()
        self._orphan_bytes = 0
        self._abandoned: set[str] = set()
        self._abandoned_order: deque[str] = deque()
        self._closing = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read(), name="broker-reader"),
                       asyncio.create_task(self._ping(), name="broker-ping")]

    async def close(self) -> None:
        """Stop. Requests still waiting are left at the broker (no CANCEL is sent): their answers are
        kept there for this gateway, restarted, or another to collect."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiting in self.waiting.values():
            waiting.future.cancel()
        self.sock.close(linger=0)
        self.ctx.term()
        if isinstance(self.identity, GatewayIdentity):
            self.identity.release()

    def broker_alive(self) -> bool:
        """The broker answered a ping within the last three intervals."""
        return self.clock() - self.broker.last_pong <= 3 * self.ping_interval_s

    # ------------------------------------------------------------------ requests

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float,
                       label: str = "", on_event: OnEvent | None = None, watch: bool = False,
                       cancel_on_exit: bool = True, priority: str = DEFAULT_PRIORITY, owner: str = "",
                       share: float = DEFAULT_SHARE) -> tuple[Result, bytes]:
        """The image for ``params`` (PNG bytes) and how it was made; raises BrokerFailure or TimeoutError.

        ``request_id`` is service-made (gateway/request_ids.py); ``label``, the client's X-Request-ID,
        only travels to the logs. If the caller is cancelled or times out, the broker is told to
        drop the request (``cancel_on_exit`` False: it is not, and its answer waits at the broker for
        a collect(): a job that outlives this call). close() never cancels.

        ``on_event(message)`` is called, in the event loop, for each Progress (every request gets
        them once a worker runs it, at most one each 0.5 s, with the attempt number), with
        ``watch``, each Queued (its place in the broker's queue, when it changes, at most once a
        second), and with ``params.preview``, each preview as a :class:`PreviewReport` (a Preview
        whose ``image`` is the JPEG's bytes), that comes before the answer. An exception it raises
        is logged and ignored.

        ``priority``, ``owner`` and ``share``: its place in the broker's queue (broker/priorities.py):
        how urgent, the API key it is charged to (its name; "" without keys) and that key's weight."""
        if len(self.waiting) >= self.max_pending:
            raise BrokerFailure(FailureCode.OVERLOADED.value,
                                f"the gateway already has {self.max_pending} requests waiting; retry later")
        answered = False
        try:
            generate = Generate(request_id, params, timeout_s, label, watch, priority, owner, share)
            message, payload = await self._ask(request_id, generate,
                                               timeout_s + BROKER_ANSWER_GRACE_S, on_event)
            answered = True
        finally:
            if not answered and cancel_on_exit and not self._closing:
                self._abandon(request_id)
                self._send(Cancel(request_id))
        if isinstance(message, Failure):
            raise BrokerFailure(message.code, message.message, message.retry_after_s)
        return message, bytes(payload[0])

    async def collect(self, request_id: str, timeout_s: float,
                      on_event: OnEvent | None = None) -> tuple[Result, bytes]:
        """The answer of request ``request_id``, sent by any gateway (this one before a restart, or
        another): the image (PNG bytes) and how it was made; raises BrokerFailure or TimeoutError
        like generate().

        The broker answers at once with the answer it kept (its gateway was away when it came); for
        a request still queued or running, this gateway becomes the one its answer and reports go to
        (``on_event`` gets a Queued or the latest Progress at once, then as generate's with
        ``watch``) and the call waits up to ``timeout_s`` (plus a grace) for the answer. A request
        the broker knows nothing of raises BrokerFailure ``unknown_request``: its answer was taken
        already, or kept and dropped (BROKER_UNCLAIMED_RESULT_TTL_S and the other bounds), or the
        broker restarted since it was sent (a restarted broker knows nothing of earlier requests,
        and a restart while this call waits raises unknown_request at once). Leaving this call
        (timeout, cancellation) never cancels the request: cancel() does."""
        kept = self._orphans.pop(request_id, None)
        if kept is not None:
            _, message, payload, size = kept
            self._orphan_bytes -= size
        else:
            if len(self.waiting) >= self.max_pending:
                raise BrokerFailure(FailureCode.OVERLOADED.value,
                                    f"the gateway already has {self.max_pending} requests waiting; retry later")
            message, payload = await self._ask(request_id, Collect(request_id), timeout_s + BROKER_ANSWER_GRACE_S,
                                               on_event)
        if isinstance(message, Failure):
            raise BrokerFailure(message.code, message.message, message.retry_after_s)
        return message, bytes(payload[0])

    def cancel(self, request_id: str) -> None:
        """Tell the broker to drop request ``request_id`` (sent by any gateway), queued or running,
        or the answer it keeps for it; without waiting (the broker answers nothing). A generate() or
        collect() waiting for it here raises asyncio.CancelledError."""
        self._abandon(request_id)
        kept = self._orphans.pop(request_id, None)
        if kept is not None:
            self._orphan_bytes -= kept[3]
        self._send(Cancel(request_id))
        waiting = self.waiting.get(request_id)
        if waiting is not None:
            waiting.future.cancel()

    def _abandon(self, request_id: str) -> None:
        """Remember that nobody here wants ``request_id``'s answer any more (not kept as an orphan)."""
        if request_id in self._abandoned:
            return
        self._abandoned.add(request_id)
        self._abandoned_order.append(request_id)
        if len(self._abandoned_order) > ABANDONED_MEMORY:
            self._abandoned.discard(self._abandoned_order.popleft())

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        query_id = uuid.uuid4().hex
        message, _ = await self._ask(query_id, StatsQuery(query_id), timeout_s)
        return message.stats

    async def _ask(self, reply_id: str, message: protocol.Message, timeout_s: float,
                   on_event: OnEvent | None = None) -> tuple[Any, list]:
        if reply_id in self.waiting:
            raise ValueError(f"a call already waits for {reply_id!r} on this broker link")
        future = asyncio.get_running_loop().create_future()
        kept = message if isinstance(message, (Generate, Collect)) else None
        self.waiting[reply_id] = _Waiting(future, kept, self.clock(), on_event=on_event)
        try:
            self._send(message)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self.waiting.pop(reply_id, None)

    def _send(self, message: protocol.Message) -> None:
        # The DEALER queues while the broker is away; DONTWAIT keeps a full queue from blocking us.
        if self._closing:
            return
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
        gap = (self.broker.epoch is not None
               and self.clock() - self.broker.last_pong > LINK_GAP_PINGS * self.ping_interval_s)
        self.broker = BrokerView(pong.broker_epoch, pong.workers, self.clock())
        if restarted:
            self._resend_after_restart()
        elif gap:
            self._ask_again_after_gap()

    def _ask_again_after_gap(self) -> None:
        """The same broker answered after a gap: answers meant for us may have been kept there (or
        a request lost on a dropped connection). Ask again for every waiting request: a GENERATE
        again (held: ignored; kept: answered; never received: run), a COLLECT again."""
        asked = 0
        for request_id, waiting in list(self.waiting.items()):
            if waiting.message is None or waiting.future.done():
                continue
            message = waiting.message
            if isinstance(message, Generate):
                remaining_s = max(0.0, message.deadline_s - (self.clock() - waiting.sent_at))
                message = replace(message, deadline_s=remaining_s)
            self._send(message)
            asked += 1
        self.asked_again_after_gap += asked
        if asked:
            log.warning("no answer from the broker for a while (the link dropped, or this gateway stalled): asked "
                        "again for %d waiting requests", asked)

    def _resend_after_restart(self) -> None:
        """The broker restarted and lost our requests: send each again once, with the same id."""
        resent = lost = 0
        for request_id, waiting in list(self.waiting.items()):
            if waiting.message is None or waiting.future.done():
                continue
            if isinstance(waiting.message, Collect):  # the new broker knows nothing of it
                waiting.future.set_result((Failure(request_id, FailureCode.UNKNOWN_REQUEST.value,
                                                   "the broker restarted while this request was being "
                                                   "collected: it lost every request and answer it held"), []))
                lost += 1
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
            if isinstance(message, (Progress, Queued, Preview)):
                if waiting is not None and waiting.on_event is not None and not waiting.future.done():
                    if isinstance(message, Preview):
                        message = PreviewReport(message.request_id, message.step, message.steps,
                                                image=bytes(payload[0]))
                    self._report(waiting.on_event, message)
            elif waiting is not None and not waiting.future.done():
                waiting.future.set_result((message, payload))
            elif isinstance(message, Result) or (isinstance(message, Failure)
                                                 and message.code != FailureCode.UNKNOWN_REQUEST.value):
                self._keep_orphan(message, payload)

    def _report(self, on_event: OnEvent, message: protocol.Message) -> None:
        try:
            on_event(message)
        except Exception:  # noqa: BLE001 - the caller's bug must not stop the reader
            self.event_errors += 1
            log.exception("on_event raised for %s of request %s; ignored", type(message).__name__,
                          getattr(message, "request_id", "?"))

    def _keep_orphan(self, message: protocol.Message, payload: list) -> None:
        """An answer for no waiting call, kept for a collect(): one a caller here gave up on is not."""
        request_id = message.request_id
        if request_id in self._abandoned:
            return
        now = self.clock()
        frames = [bytes(frame) for frame in payload]
        size = sum(len(frame) for frame in frames) + 1024
        old = self._orphans.pop(request_id, None)
        if old is not None:
            self._orphan_bytes -= old[3]
        self._orphans[request_id] = (now, message, frames, size)
        self._orphan_bytes += size
        while self._orphans:
            at, _, _, oldest_size = next(iter(self._orphans.values()))
            if now - at < ORPHAN_KEEP_S and len(self._orphans) <= ORPHAN_MAX and self._orphan_bytes <= ORPHAN_MAX_BYTES:
                break
            self._orphans.popitem(last=False)
            self._orphan_bytes -= oldest_size
