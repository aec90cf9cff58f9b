"""The worker's connection to the broker: registration, liveness both ways, reconnection.

* Registers (REGISTER) and repeats it until the broker answers WELCOME.
* Counts any message from the broker as a sign of life (the broker sends BROKER_HEARTBEAT every
  interval). If the broker is silent for ``liveness`` intervals, the link closes its socket, opens
  a fresh one (a new routing id, so no stale state survives in libzmq) and registers again,
  waiting 1 s, 2 s, 4 s ... up to 32 s (with jitter) between attempts while the broker stays away.
* DISCONNECT from the broker ("I don't know you": it restarted or declared us dead) and a WELCOME
  from a broker with a new epoch both mean the work we hold is no longer the broker's: the link
  calls ``on_forgotten`` so the worker drops its queue, then registers again.

Only the event-loop thread touches the socket (pyzmq sockets are not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable, Sequence

import zmq
import zmq.asyncio

from imagegen import protocol
from imagegen.protocol import WORKER_LINK, BrokerHeartbeat, Disconnect, ProtocolError, Register, Welcome
from imagegen.sockets import CurveClientKeys, make_dealer

log = logging.getLogger(__name__)

REGISTER_RETRY_S = 3.0
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 32.0


class BrokerLink:
    def __init__(self, address: str, registration: Callable[[], Register],
                 on_message: Callable[[protocol.Message], None], on_forgotten: Callable[[str], None],
                 heartbeat_interval_s: float, liveness: int, clock=time.monotonic,
                 curve: CurveClientKeys | None = None) -> None:
        self.address = address
        self.registration = registration
        self.on_message = on_message
        self.on_forgotten = on_forgotten
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.clock = clock
        self.curve = curve
        self.registered = asyncio.Event()
        self.broker_epoch: str | None = None
        self.last_heard = clock()
        self.malformed_messages = 0
        self.reconnects = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = make_dealer(self.ctx, address, curve=curve)
        self._reader: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None
        self._forgotten_event = asyncio.Event()  # wakes the keeper to register again at once

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="broker-reader")
        self._keeper = asyncio.create_task(self._keep_registered(), name="broker-link")

    async def close(self, linger_ms: int = 2000) -> None:
        for task in (self._keeper, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.sock.close(linger=linger_ms)  # let the goodbye and the last results reach the broker
        self.ctx.term()

    def send(self, message: protocol.Message, payload: Sequence[bytes] = ()) -> None:
        # DONTWAIT: the DEALER queues up to its HWM while the broker is away; never block the loop.
        future = self.sock.send_multipart(protocol.encode(WORKER_LINK, message, payload),
                                          flags=zmq.DONTWAIT, copy=False)
        if future.done() and future.exception() is not None:
            log.warning("could not send %s to the broker: %s", type(message).__name__, future.exception())

    @property
    def broker_silent_s(self) -> float:
        return self.clock() - self.last_heard

    # ------------------------------------------------------------------ registration and liveness

    async def _keep_registered(self) -> None:
        backoff_s = RECONNECT_MIN_S
        while True:
            if not self.registered.is_set():
                self.send(self.registration())
                try:
                    await asyncio.wait_for(self.registered.wait(), REGISTER_RETRY_S)
                except asyncio.TimeoutError:
                    continue  # the broker may still be starting; the DEALER reconnects by itself
            backoff_s = RECONNECT_MIN_S
            self._forgotten_event.clear()
            while self.registered.is_set() and self.broker_silent_s <= self.heartbeat_interval_s * self.liveness:
                try:
                    await asyncio.wait_for(self._forgotten_event.wait(), self.heartbeat_interval_s)
                except asyncio.TimeoutError:
                    pass
            if self.registered.is_set():  # silent broker: start over on a fresh socket
                log.warning("no word from the broker for %.1fs; reconnecting in %.1fs",
                            self.broker_silent_s, backoff_s)
                self.registered.clear()
                await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
                backoff_s = min(RECONNECT_MAX_S, backoff_s * 2)
                await self._reopen()

    async def _reopen(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close(linger=0)
        self.sock = make_dealer(self.ctx, self.address, curve=self.curve)
        self.reconnects += 1
        self.last_heard = self.clock()  # give the new connection a full liveness window
        self._reader = asyncio.create_task(self._read(), name="broker-reader")

    # ------------------------------------------------------------------ receiving

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            self.last_heard = self.clock()
            try:
                message, _ = protocol.decode(frames, WORKER_LINK)
            except ProtocolError as exc:
                self.malformed_messages += 1
                log.warning("dropped a malformed message from the broker: %s", exc)
                self._refuse_unreadable_request(frames, exc)
                continue
            self._dispatch(message)

    def _refuse_unreadable_request(self, frames: Sequence, exc: ProtocolError) -> None:
        """A request this worker cannot read (a broker or gateway of another build, with other
        bounds) is answered at once, so its client is not left waiting for its deadline."""
        failure = protocol.failure_for_refused(frames, WORKER_LINK, "worker", exc)
        if failure is not None:
            self.send(failure)

    def _dispatch(self, message: protocol.Message) -> None:
        if isinstance(message, Welcome):
            self._welcomed(message)
        elif isinstance(message, Disconnect):
            self._forgotten(f"the broker asks us to register again ({message.reason})")
        elif isinstance(message, BrokerHeartbeat):
            if self.broker_epoch is not None and message.broker_epoch != self.broker_epoch:
                self._forgotten("a new broker is running")
        else:
            self.on_message(message)

    def _welcomed(self, message: Welcome) -> None:
        if self.broker_epoch is not None and message.broker_epoch != self.broker_epoch:
            self.on_forgotten("registered with a new broker")
        if not self.registered.is_set():
            log.info("registered with broker %s at %s", message.broker_epoch[:8], self.address)
        self.broker_epoch = message.broker_epoch
        self.heartbeat_interval_s = message.heartbeat_interval_s
        self.registered.set()

    def _forgotten(self, why: str) -> None:
        self.on_forgotten(why)
        self.registered.clear()
        self._forgotten_event.set()
