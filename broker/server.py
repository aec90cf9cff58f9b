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
from typing import Any, Sequence

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from broker.config import BrokerSettings
from broker.state import (
    Action,
    BrokerPolicy,
    BrokerState,
    Cancelled,
    Event,
    Registered,
    RegistrationRefused,
    Removal,
    Requeued,
    SenderRefused,
    ToClient,
    ToWorker,
    WorkerRemoved,
)
from broker.stats import build_stats
from imagegen import protocol, stage_trace
from imagegen.protocol import (
    CLIENT_LINK,
    WORKER_LINK,
    BrokerHeartbeat,
    Cancel,
    Collect,
    Disconnect,
    FailureCode,
    Failure,
    Generate,
    Heartbeat,
    Ping,
    Pong,
    Preview,
    Progress,
    ProtocolError,
    Register,
    Result,
    StatsQuery,
    StatsReply,
)
from imagegen.keys import KeyAllowList, load_secret
from imagegen.logs import request_fields, request_name
from imagegen.sockets import CurveServerKeys, is_local_endpoint, make_router

log = logging.getLogger(__name__)

# Refusals under load or at shutdown: counted in /stats and /metrics, logged at DEBUG only (one
# INFO line per refused request would flood the log exactly when the broker is busiest).
_QUIET_FAILURES = {FailureCode.OVERLOADED.value, FailureCode.SHUTTING_DOWN.value}
# How often requests past their deadline are looked for (broker._deadlines): well inside the grace the
# gateway waits for the broker's answer past REQUEST_TIMEOUT_S (gateway.broker_client.BROKER_ANSWER_GRACE_S).
DEADLINE_CHECK_INTERVAL_S = 0.2
# The end of the log line "request ... requeued: worker NAME ...", by why the worker went.
_REQUEUED_BECAUSE = {
    Removal.MISSED_HEARTBEATS: "missed heartbeats or made no progress",
    Removal.NO_PROGRESS: "missed heartbeats or made no progress",
    Removal.LEFT: "left",
    Removal.KEY_REVOKED: "lost its key",
    Removal.KEY_CHANGED: "changed its connection's key",
    Removal.UNREACHABLE: "could not be reached",
    Removal.REGISTERED_AGAIN: "registered again",
}


def send_now(sock: zmq.asyncio.Socket, frames: Sequence[Any]) -> Exception | None:
    """Send without waiting; returns the error instead of raising (EHOSTUNREACH: peer gone)."""
    future = sock.send_multipart(list(frames), flags=zmq.DONTWAIT, copy=False)
    if not future.done():  # cannot happen while we never queue blocking sends on this socket
        return None
    return future.exception()


def _client_name(client_id: bytes) -> str:
    """A gateway's routing id for the log: its GATEWAY_ID when printable, else hex."""
    text = client_id.decode("ascii", "replace")
    return text if text.isprintable() and text.isascii() else client_id.hex()[:16]


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
            unclaimed_results=settings.unclaimed_results,
            unclaimed_bytes=settings.unclaimed_bytes(),
            unclaimed_ttl_s=settings.unclaimed_result_ttl_s,
            priority_aging_s=settings.priority_aging_s,
            fair_share_half_life_s=settings.fair_share_half_life_s,
            high_priority_reserve=settings.high_priority_reserve,
        )
        self.state = BrokerState(policy, epoch=uuid.uuid4().hex)
        self.dropped: Counter[str] = Counter()  # malformed or undeliverable messages, by kind
        self.ctx = zmq.asyncio.Context()
        self.allow_list: KeyAllowList | None = None
        self.authenticator: AsyncioAuthenticator | None = None
        try:
            # ROUTER_HANDOVER: a restarted gateway (the same GATEWAY_ID) takes its connection back.
            self.client_sock = make_router(self.ctx, settings.client_bind, handover=True)
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
        never waits for requests nobody waits for. Each round also sends the QUEUED reports due
        (watched requests whose place in the queue changed) and drops kept answers past their time."""
        while True:
            await asyncio.sleep(DEADLINE_CHECK_INTERVAL_S)
            now = self.clock()
            self._execute(self.state.expire_deadlines(now))
            self._execute(self.state.queue_reports(now))
            expired = self.state.expire_unclaimed(now)
            if expired:
                log.info("dropped %d kept answers nobody collected within BROKER_UNCLAIMED_RESULT_TTL_S (%gs)",
                         len(expired), self.settings.unclaimed_result_ttl_s)

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
        if failure is not None and not self.state.holds_request(failure.request_id):  # not another's answer
            self._send(self.client_sock, client_id, protocol.encode(CLIENT_LINK, failure))

    def _on_client_message(self, client_id: bytes, frames: Sequence[Any]) -> None:
        message, _ = protocol.decode(frames, CLIENT_LINK)
        now = self.clock()
        self.state.heard_from(client_id, now, pinged=isinstance(message, Ping))
        if isinstance(message, Generate):
            stage_trace.stage("broker_got_request", message.request_id)
            self._execute(self.state.submit(client_id, message, now))
        elif isinstance(message, Cancel):
            self._execute(self.state.cancel(client_id, message, now))
        elif isinstance(message, Collect):
            self._execute(self.state.collect(client_id, message, now))
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
        key = None if user_id is None else user_id.encode()
        if isinstance(message, Register):
            authorized_keys = None if self.allow_list is None else self.allow_list.keys
            self._execute(self.state.register(routing_id, message, now, key, authorized_keys))
            return
        # Every other message must come from a registered worker's connection, under its key.
        refusal = self.state.check_sender(routing_id, key, message, now)
        if refusal is not None:
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
        elif isinstance(message, Preview):
            self._execute(self.state.preview(routing_id, message, now), payload)
        elif isinstance(message, Disconnect):
            self._execute(self.state.disconnect(routing_id, now, Removal.LEFT, message.reason))
        else:
            raise ProtocolError(f"{type(message).__name__} is not something a worker may send")

    async def _liveness(self) -> None:
        """Every interval: tell each worker we are alive, and expire the workers that fell silent."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            beat = protocol.encode(WORKER_LINK, BrokerHeartbeat(self.state.epoch))
            for routing_id in self.state.worker_ids():
                self._send(self.worker_sock, routing_id, beat)
            self._execute(self.state.expire(self.clock()))
            self._disconnect_revoked_workers()

    def _disconnect_revoked_workers(self) -> None:
        """Read the authorized-keys folder again; the workers whose key is no longer in it (or no
        longer admits their name) leave now, their requests requeued, and are told so; their
        registration is refused from then on. Every worker is checked, not only on a change seen
        here: a handshake's refresh may have read the change first."""
        if self.allow_list is None:
            return
        self.allow_list.refresh()
        self._execute(self.state.revoke_keys(self.allow_list.keys, self.clock()))

    # ------------------------------------------------------------------ sending

    def _log_action(self, action: ToWorker | ToClient) -> None:
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
                      action.worker_name, extra=request_fields(message.request_id, message.label))
        elif isinstance(message, Result):
            log.debug("request %s answered by worker %s, batch %s", request_name(message.request_id, action.label),
                      message.worker_name, message.batch_id, extra=request_fields(message.request_id, action.label))

    def _log_event(self, event: Event) -> None:
        """One line for what the state says happened (each line naming its request, if any)."""
        if isinstance(event, Requeued):
            log.info("request %s requeued: worker %s %s", request_name(event.request_id, event.label),
                     event.worker_name, _REQUEUED_BECAUSE[event.why],
                     extra=request_fields(event.request_id, event.label))
        elif isinstance(event, WorkerRemoved):
            self._log_removal(event)
        elif isinstance(event, Cancelled):
            where = ("queued" if event.worker_name is None else f"at worker {event.worker_name}"
                     + ("" if event.step is None else f", step {event.step} of {event.steps}"))
            log.info("request %s cancelled: its client stopped waiting (%s)",
                     request_name(event.request_id, event.label), where,
                     extra=request_fields(event.request_id, event.label))
        elif isinstance(event, Registered):
            info = event.info
            log.info("worker %s registered: host %s gpu %d pid %d model %s on %s, max batch %d, capacity %d",
                     info.worker_name, info.host, info.gpu_id, info.pid, info.model_id,
                     info.device, info.batching.max_batch_size, info.capacity)
        elif isinstance(event, RegistrationRefused):
            log.warning("refused worker %s: %s", event.worker_name, event.reason)
        elif isinstance(event, SenderRefused):
            log.warning("refused a %s from %s: %s", event.message_type, event.sender,
                        "the connection under a key other than its worker's" if event.wrong_key
                        else "a connection that is no registered worker")

    def _log_removal(self, removed: WorkerRemoved) -> None:
        """A worker that left, or was removed, is named once (one that could not be reached, changed
        key or registered again shows in its requests' "requeued" lines only)."""
        name = removed.worker_name
        if removed.why is Removal.LEFT:
            log.info("worker %s leaves: %s", name, removed.reason)
        elif removed.why is Removal.MISSED_HEARTBEATS:
            log.warning("worker %s missed %d heartbeats: declared dead, its requests requeued",
                        name, self.settings.heartbeat_liveness)
        elif removed.why is Removal.NO_PROGRESS:
            log.warning("worker %s sent no progress on the requests it held for %gs: declared stuck, "
                        "its requests requeued", name, self.settings.worker_progress_timeout_s)
        elif removed.why is Removal.KEY_REVOKED and self.allow_list is not None:
            log.warning("worker %s disconnected: its key is no longer authorized for it in %s", name,
                        self.allow_list.directory)

    def _execute(self, actions: list[Action], payload: Sequence[Any] = ()) -> None:
        # The stage trace's "sent" stages are written just before the send: once a result is sent, the
        # gateway may answer before this thread runs on, and a line written after would fall outside
        # the request.
        for action in actions:
            if not isinstance(action, (ToClient, ToWorker)):
                self._log_event(action)
                continue
            if isinstance(action, ToClient):
                self._send_to_client(action, payload)
                continue
            self._log_action(action)
            frames = protocol.encode(WORKER_LINK, action.message)
            if isinstance(action.message, Generate):
                stage_trace.stage("broker_sent_request", action.message.request_id)
            if not self._send(self.worker_sock, action.routing_id, frames):
                # The worker's connection is gone: treat it as a disconnect, requeueing what it held.
                self._execute(self.state.disconnect(action.routing_id, self.clock(), Removal.UNREACHABLE))

    def _send_to_client(self, action: ToClient, payload: Sequence[Any]) -> None:
        """Send to a gateway. An answer (RESULT, FAILURE) that cannot go, because the gateway is not
        connected or has fallen silent (BrokerState.client_silent), is kept for a COLLECT
        (broker/unclaimed.py); a report (PROGRESS, QUEUED, PREVIEW) that cannot go is dropped."""
        message = action.message
        answer = isinstance(message, (Result, Failure))
        if answer:
            self._log_action(action)
        frames_payload = action.payload or (tuple(payload) if isinstance(message, (Result, Preview)) else ())
        if self.state.client_silent(action.client_id, self.clock()):
            error: Exception | None = ConnectionError("the gateway has sent nothing, not even a ping, lately")
        else:
            if isinstance(message, Result):
                stage_trace.stage("broker_sent_result", message.request_id)
            error = send_now(self.client_sock, [action.client_id, *protocol.encode(CLIENT_LINK, message,
                                                                                   frames_payload)])
        if error is None:
            return
        if not answer:
            self.dropped["undeliverable_client_reports"] += 1
            return
        self.dropped["undeliverable_client_messages"] += 1
        if not action.keep:
            log.warning("could not send to client %s: %s", action.client_id.hex()[:8], error)
            return
        dropped = self.state.keep_unclaimed(action, frames_payload, self.clock())
        name = request_name(message.request_id, action.label)
        extra = request_fields(message.request_id, action.label)
        if message.request_id in dropped:
            log.warning("request %s: could not deliver its answer to gateway %s (%s), nor keep it (larger than "
                        "BROKER_UNCLAIMED_RESULT_BYTES=%d, or BROKER_UNCLAIMED_RESULTS=0): dropped", name,
                        _client_name(action.client_id), error, self.settings.unclaimed_bytes(), extra=extra)
            return
        log.info("request %s: could not deliver its answer to gateway %s (%s): kept for a COLLECT (%d kept)",
                 name, _client_name(action.client_id), error, len(self.state.unclaimed), extra=extra)
        if dropped:
            log.warning("dropped the %d oldest kept answers to make room (BROKER_UNCLAIMED_RESULTS=%d, "
                        "BROKER_UNCLAIMED_RESULT_BYTES=%d)", len(dropped), self.settings.unclaimed_results,
                        self.settings.unclaimed_bytes())

    def _send(self, sock: zmq.asyncio.Socket, peer: bytes, frames: list[Any]) -> bool:
        error = send_now(sock, [peer, *frames])
        if error is None:
            return True
        link = "client" if sock is self.client_sock else "worker"
        self.dropped[f"undeliverable_{link}_messages"] += 1
        log.warning("could not send to %s %s: %s", link, peer.hex()[:8], error)
        return False
