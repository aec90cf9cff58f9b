"""The broker's socket shell: two ROUTER sockets around the pure :class:`BrokerState`.

Each socket has one reader task; a timer task expires silent workers. Every received message is
decoded and validated (:mod:`imagegen.protocol`), handed to the state with the current time, and
the actions that come back are sent at once with DONTWAIT: the broker never blocks on a peer.
Malformed input is dropped and counted per link; it never stops the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import Any, Callable, Sequence

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from broker.config import BrokerSettings
from broker.state import Action, BrokerPolicy, BrokerState, ToClient, ToWorker
from broker.stats import build_stats
from imagegen import protocol, stage_trace
from imagegen.protocol import (
    CLIENT_LINK,
    PROTOCOL_VERSION,
    WORKER_LINK,
    BrokerHeartbeat,
    Cancel,
    Disconnect,
    FailureCode,
    Failure,
    Generate,
    Heartbeat,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Register,
    Result,
    StatsQuery,
    StatsReply,
    Welcome,
)
from imagegen.keys import KeyAllowList, load_secret, name_allowed
from imagegen.logs import request_fields, request_name
from imagegen.sockets import CurveServerKeys, is_local_endpoint, make_router

log = logging.getLogger(__name__)

# Refusals under load or at shutdown: counted in /stats and /metrics, logged at DEBUG only (one
# INFO line per refused request would flood the log exactly when the broker is busiest).
_QUIET_FAILURES = {FailureCode.OVERLOADED.value, FailureCode.SHUTTING_DOWN.value}
# How often requests past their deadline are looked for (broker._deadlines): well inside the grace the
# gateway waits for the broker's answer past REQUEST_TIMEOUT_S (gateway.broker_client.BROKER_ANSWER_GRACE_S).
DEADLINE_CHECK_INTERVAL_S = 0.2


def send_now(sock: zmq.asyncio.Socket, frames: Sequence[Any]) -> Exception | None:
    """Send without waiting; returns the error instead of raising (EHOSTUNREACH: peer gone)."""
    future = sock.send_multipart(list(frames), flags=zmq.DONTWAIT, copy=False)
    if not future.done():  # cannot happen while we never queue blocking sends on this socket
        return None
    return future.exception()


def _user_id(frame: Any) -> str | None:
    """The ZAP User-Id of the connection a frame came in on (the z85 public key under CurveZMQ)."""
    try:
        return frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None


class BrokerServer:
    def __init__(self, settings: BrokerSettings, clock=time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        policy = BrokerPolicy(
            strategy=settings.strategy,
            max_queue_size=settings.max_queue_size,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            liveness=settings.heartbeat_liveness,
            max_attempts=settings.max_attempts,
            progress_timeout_s=settings.worker_progress_timeout_s,
        )
        self.state = BrokerState(policy, epoch=uuid.uuid4().hex)
        self.dropped: Counter[str] = Counter()  # malformed or undeliverable messages, by kind
        self.ctx = zmq.asyncio.Context()
        self.allow_list: KeyAllowList | None = None
        self.authenticator: AsyncioAuthenticator | None = None
        self.worker_keys: dict[bytes, bytes] = {}  # under CurveZMQ: routing id -> the key it registered with
        try:
            self.client_sock = make_router(self.ctx, settings.client_bind)
            self.worker_sock = make_router(self.ctx, settings.worker_bind, self._start_authentication())
        except BaseException:
            # A socket left open would make the context's term() (at garbage collection) wait forever.
            if self.authenticator is not None:
                self.authenticator.stop()
            self.ctx.destroy(linger=0)
            raise
        log.info("broker %s: gateways on %s, workers on %s (%s), strategy %s", self.state.epoch[:8],
                 settings.client_bind, settings.worker_bind,
                 "CurveZMQ, %d authorized keys" % len(self.allow_list.keys) if self.allow_list else "no authentication",
                 settings.strategy)
        if self.allow_list is None and not is_local_endpoint(settings.worker_bind):
            # Only reachable with BROKER_ALLOW_UNAUTHENTICATED_WORKERS=true (settings refuse it otherwise).
            log.warning("workers on %s are NOT authenticated (BROKER_ALLOW_UNAUTHENTICATED_WORKERS=true): anyone "
                        "who reaches it can register as a worker, read prompts and answer with any image; "
                        "make keys with `python -m imagegen.keys cluster` (README)", settings.worker_bind)

    def _start_authentication(self) -> CurveServerKeys | None:
        """With BROKER_CURVE_SECRET_KEY set, only workers whose public key is authorized may connect."""
        if self.settings.curve_secret_key is None:
            return None
        public, secret = load_secret(self.settings.curve_secret_key)
        self.allow_list = KeyAllowList(self.settings.authorized_keys_dir)
        # Without a running ZAP handler a CURVE server would accept ANY client key.
        self.authenticator = AsyncioAuthenticator(self.ctx)
        self.authenticator.start()
        self.authenticator.configure_curve_callback("*", self.allow_list)
        return CurveServerKeys(public, secret)

    async def serve(self, stop: asyncio.Event, drain_timeout_s: float = 0.0) -> None:
        """Run until ``stop`` is set; then drain (up to ``drain_timeout_s``) and close the sockets."""
        tasks = [
            asyncio.create_task(self._read(self.client_sock, self._on_client_message), name="clients"),
            asyncio.create_task(self._read(self.worker_sock, self._on_worker_message), name="workers"),
            asyncio.create_task(self._liveness(), name="liveness"),
            asyncio.create_task(self._deadlines(), name="deadlines"),
        ]
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # they run until cancelled: one that ended failed (e.g. out of memory), exit
                if task.done():
                    raise task.exception() or RuntimeError(f"the broker's {task.get_name()} task ended")
            await self._drain(drain_timeout_s)
        finally:
            stopped.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    async def _deadlines(self) -> None:
        """Answer requests past their deadline, queued or at a worker, and tell their workers to drop
        them: checked every DEADLINE_CHECK_INTERVAL_S, so the broker's answer, which says where the
        request was, reaches the gateway before the gateway's own timer gives up (it waits a grace
        past REQUEST_TIMEOUT_S for it, gateway/broker_client.py). Runs during a drain too: a drain
        never waits for requests nobody waits for."""
        while True:
            await asyncio.sleep(DEADLINE_CHECK_INTERVAL_S)
            self._execute(self.state.expire_deadlines(self.clock()))

    async def _drain(self, timeout_s: float) -> None:
        """Refuse new requests, let accepted ones finish (those past their deadline or cancelled are
        answered meanwhile, and never waited for), then answer the rest with shutting_down and tell
        their workers to drop them."""
        if timeout_s <= 0:
            return
        self.state.begin_drain()
        log.info("draining: %d requests in progress, waiting up to %.0fs", self.state.in_progress(), timeout_s)
        deadline = self.clock() + timeout_s
        while not self.state.drained and self.clock() < deadline:
            await asyncio.sleep(0.05)
        actions = self.state.fail_all(FailureCode.SHUTTING_DOWN,
                                      "the broker shut down before a worker finished this request")
        self._execute(actions)
        log.info("drained (%d requests answered shutting_down)", sum(isinstance(a, ToClient) for a in actions))
        await asyncio.sleep(0.1)  # let the last replies leave (LINGER is 0)

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
        self.client_sock.close(linger=0)
        self.worker_sock.close(linger=0)
        self.ctx.term()

    # ------------------------------------------------------------------ receiving

    async def _read(self, sock: zmq.asyncio.Socket, handle) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                handle(frames[0].bytes, frames[1:])
            except ProtocolError as exc:
                link = "client" if sock is self.client_sock else "worker"
                self.dropped[f"malformed_{link}_messages"] += 1
                log.warning("dropped a malformed %s message: %s", link, exc)
                if sock is self.client_sock:
                    self._refuse_unreadable_request(frames[0].bytes, frames[1:], exc)
            except MemoryError:  # past BROKER_MEMORY_LIMIT_BYTES: exit, for supervisord to restart a sound broker
                raise
            except Exception:  # a bug handling one message must not stop the broker
                self.dropped["internal_errors"] += 1
                log.exception("error while handling a message; dropped it")

    def _refuse_unreadable_request(self, client_id: bytes, frames: Sequence[Any], exc: ProtocolError) -> None:
        """A request the broker cannot read (a gateway of another build, with other bounds) is
        answered at once, so its client is not left waiting for its deadline."""
        failure = protocol.failure_for_refused(frames, CLIENT_LINK, "broker", exc)
        if failure is not None and failure.request_id not in self.state.requests:  # not another's answer
            self._send(self.client_sock, client_id, protocol.encode(CLIENT_LINK, failure))

    def _on_client_message(self, client_id: bytes, frames: Sequence[Any]) -> None:
        message, _ = protocol.decode(frames, CLIENT_LINK)
        now = self.clock()
        if isinstance(message, Generate):
            stage_trace.stage("broker_got_request", message.request_id)
            self._execute(self.state.submit(client_id, message, now))
        elif isinstance(message, Cancel):
            record = self.state.requests.get(message.request_id)
            if record is not None:
                label = record.message.label
                where = ("queued" if record.worker is None else f"at worker {self._worker_name(record.worker)}"
                         + ("" if record.step is None else f", step {record.step} of {record.steps}"))
                log.info("request %s cancelled: its client stopped waiting (%s)",
                         request_name(message.request_id, label), where, extra=request_fields(message.request_id, label))
            self._execute(self.state.cancel(client_id, message, now))
        elif isinstance(message, Ping):
            pong = Pong(message.query_id, self.state.epoch, self.state.accepting_workers())
            self._send(self.client_sock, client_id, protocol.encode(CLIENT_LINK, pong))
        elif isinstance(message, StatsQuery):
            counters = dict(self.dropped)
            if self.allow_list is not None:
                counters["connections_refused_unknown_key"] = self.allow_list.refused
            stats = build_stats(self.state, now, counters)
            self._send(self.client_sock, client_id, protocol.encode(CLIENT_LINK, StatsReply(message.query_id, stats)))
        else:
            raise ProtocolError(f"{type(message).__name__} is not something a gateway may send")

    def _on_worker_message(self, routing_id: bytes, frames: Sequence[Any]) -> None:
        message, payload = protocol.decode(frames, WORKER_LINK)
        now = self.clock()
        user_id = _user_id(frames[0])
        if isinstance(message, Register):
            self._execute(self._register(routing_id, message, now, user_id))
            return
        # Every other message must come from a registered worker's connection, under its key.
        sender = self._worker_name(routing_id)
        known = routing_id in self.state.workers
        refusal = self.state.check_sender(routing_id, None if user_id is None else user_id.encode(), message, now)
        if refusal is not None:
            log.warning("refused a %s from %s: %s", type(message).__name__, sender,
                        "the connection under a key other than its worker's" if known
                        else "a connection that is no registered worker")
            self._execute(refusal)
            return
        if isinstance(message, Heartbeat):
            self._execute(self.state.heartbeat(routing_id, message, now))
        elif isinstance(message, Result):
            stage_trace.stage("broker_got_result", message.request_id)
            self._execute(self.state.result(routing_id, message, now), payload)
        elif isinstance(message, Failure):
            self._execute(self.state.failure(routing_id, message, now))
        elif isinstance(message, Progress):
            self._execute(self.state.progress(routing_id, message, now))
        elif isinstance(message, Disconnect):
            log.info("worker %s leaves: %s", self._worker_name(routing_id), message.reason)
            self._execute(self._logging_requeues("left", lambda: self.state.disconnect(routing_id, now)))
        else:
            raise ProtocolError(f"{type(message).__name__} is not something a worker may send")

    def _register(self, routing_id: bytes, message: Register, now: float, user_id: str | None) -> list[Action]:
        reason = self._refusal(message, user_id)
        if reason is not None:
            self.state.counters.registrations_refused += 1
            log.warning("refused worker %s: %s", message.worker_name, reason)
            return [ToWorker(routing_id, Disconnect(reason))]
        key = None if user_id is None else user_id.encode()
        actions = self._logging_requeues("registered again", lambda: self.state.register(routing_id, message, now, key))
        if not any(isinstance(a.message, Welcome) for a in actions):  # the state refused it
            log.warning("refused worker %s: %s", message.worker_name,
                        "; ".join(a.message.reason for a in actions if isinstance(a.message, Disconnect)))
            return actions
        if key is not None:
            self.worker_keys[routing_id] = key
        log.info("worker %s registered: host %s gpu %d pid %d model %s on %s, max batch %d, capacity %d",
                 message.worker_name, message.host, message.gpu_id, message.pid, message.model_id,
                 message.device, message.batching.max_batch_size, message.capacity)
        return actions

    def _refusal(self, message: Register, user_id: str | None) -> str | None:
        """Why this registration is refused, or None. With CurveZMQ on, the connection's key (its
        ZAP User-Id) must be authorized for the worker name it claims (imagegen/keys.py)."""
        if message.protocol_version != PROTOCOL_VERSION:
            return f"protocol version {message.protocol_version} is not {PROTOCOL_VERSION}: upgrade the worker"
        if self.allow_list is None:
            return None
        stem = self.allow_list.keys.get((user_id or "").encode())
        if stem is None or not name_allowed(message.worker_name, stem):
            return (f"key {stem or user_id!r} may not register as {message.worker_name!r}: "
                    f"name the worker after its key file (NAME or NAME-...)")
        return None

    async def _liveness(self) -> None:
        """Every interval: tell each worker we are alive, and expire the workers that fell silent."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            beat = protocol.encode(WORKER_LINK, BrokerHeartbeat(self.state.epoch))
            for routing_id in list(self.state.workers):
                self._send(self.worker_sock, routing_id, beat)
            before = {rid: w.info.worker_name for rid, w in self.state.workers.items()}
            now = self.clock()
            stuck = {w.routing_id for w in self.state.stuck_workers(now)}
            actions = self._logging_requeues("missed heartbeats or made no progress",
                                             lambda: self.state.expire(now))
            for routing_id in set(before) - set(self.state.workers):
                if routing_id in stuck:
                    log.warning("worker %s sent no progress on the requests it held for %gs: declared stuck, "
                                "its requests requeued", before[routing_id], self.settings.worker_progress_timeout_s)
                else:
                    log.warning("worker %s missed %d heartbeats: declared dead, its requests requeued",
                                before[routing_id], self.settings.heartbeat_liveness)
            self._execute(actions)
            self._disconnect_revoked_workers()

    def _disconnect_revoked_workers(self) -> None:
        """Read the authorized-keys folder again; the workers whose key is no longer in it (or no
        longer admits their name) leave now, their requests requeued, and are told so; their
        registration is refused from then on. Every worker is checked, not only on a change seen
        here: a handshake's refresh may have read the change first."""
        if self.allow_list is None:
            return
        self.allow_list.refresh()
        self.worker_keys = {rid: key for rid, key in self.worker_keys.items() if rid in self.state.workers}
        for routing_id, key in list(self.worker_keys.items()):
            worker = self.state.workers.get(routing_id)  # gone meanwhile if a requeue found it unreachable
            stem = self.allow_list.keys.get(key)
            if worker is None or (stem is not None and name_allowed(worker.info.worker_name, stem)):
                continue
            name = worker.info.worker_name
            log.warning("worker %s disconnected: its key is no longer authorized for it in %s", name,
                        self.allow_list.directory)
            del self.worker_keys[routing_id]
            self._execute(self._logging_requeues(
                "lost its key", lambda: self.state.disconnect(routing_id, self.clock())))
            self._send(self.worker_sock, routing_id,
                       protocol.encode(WORKER_LINK, Disconnect("this worker's key is no longer authorized")))

    # ------------------------------------------------------------------ sending

    def _logging_requeues(self, why: str, change: Callable[[], list[Action]]) -> list[Action]:
        """Run ``change`` (it may remove workers) and log, by id, each request it took back from one."""
        held = {rid: w for w in self.state.workers.values() for rid in w.in_flight}
        actions = change()
        for request_id, worker in held.items():
            record = self.state.requests.get(request_id)
            if (record is not None and record.worker != worker.routing_id
                    and self.state.workers.get(worker.routing_id) is not worker):
                label = record.message.label
                log.info("request %s requeued: worker %s %s", request_name(request_id, label),
                         worker.info.worker_name, why, extra=request_fields(request_id, label))
        return actions

    def _log_action(self, action: Action) -> None:
        """Dispatches and answers at DEBUG, failures at INFO: each line names its request's id."""
        message = action.message
        if isinstance(message, Failure) and isinstance(action, ToClient):
            level = logging.DEBUG if message.code in _QUIET_FAILURES else logging.INFO
            log.log(level, "request %s failed: %s: %s", request_name(message.request_id, action.label),
                    message.code, message.message, extra=request_fields(message.request_id, action.label))
        elif not log.isEnabledFor(logging.DEBUG):
            return
        elif isinstance(message, Generate):
            log.debug("request %s dispatched to worker %s", request_name(message.request_id, message.label),
                      self._worker_name(action.routing_id), extra=request_fields(message.request_id, message.label))
        elif isinstance(message, Result):
            log.debug("request %s answered by worker %s, batch %s", request_name(message.request_id, action.label),
                      message.worker_name, message.batch_id, extra=request_fields(message.request_id, action.label))

    def _execute(self, actions: list[Action], payload: Sequence[Any] = ()) -> None:
        # The stage trace's "sent" stages are written just before the send: once a result is sent, the
        # gateway may answer before this thread runs on, and a line written after would fall outside
        # the request.
        for action in actions:
            self._log_action(action)
            if isinstance(action, ToClient):
                frames_payload = payload if isinstance(action.message, Result) else ()
                frames = protocol.encode(CLIENT_LINK, action.message, frames_payload)
                if isinstance(action.message, Result):
                    stage_trace.stage("broker_sent_result", action.message.request_id)
                self._send(self.client_sock, action.client_id, frames)
                continue
            frames = protocol.encode(WORKER_LINK, action.message)
            if isinstance(action.message, Generate):
                stage_trace.stage("broker_sent_request", action.message.request_id)
            if not self._send(self.worker_sock, action.routing_id, frames):
                # The worker's connection is gone: treat it as a disconnect, requeueing what it held.
                self._execute(self._logging_requeues(
                    "could not be reached", lambda: self.state.disconnect(action.routing_id, self.clock())))

    def _send(self, sock: zmq.asyncio.Socket, peer: bytes, frames: list[Any]) -> bool:
        error = send_now(sock, [peer, *frames])
        if error is None:
            return True
        link = "client" if sock is self.client_sock else "worker"
        self.dropped[f"undeliverable_{link}_messages"] += 1
        log.warning("could not send to %s %s: %s", link, peer.hex()[:8], error)
        return False

    def _worker_name(self, routing_id: bytes) -> str:
        worker = self.state.workers.get(routing_id)
        return worker.info.worker_name if worker else routing_id.hex()[:8]
