"""Hostile frames straight to both broker sockets (Hypothesis): dropped, counted, and it keeps serving.

A real BrokerServer runs in-process on free 127.0.0.1 ports, with the gateway's real BrokerClient
and one scripted worker (FakeWorker from tests/support/fake_worker.py: a FAKE, no model, it answers
every request with fixed bytes). Each Hypothesis example opens a raw DEALER on the client or the worker
socket and sends 1-8 messages of 1-6 frames each: random bytes, valid link tags with random
command bytes and random msgpack-ish headers, well-formed messages with random field values,
truncated or re-tagged valid messages, msgpack bombs (huge declared lengths, bad extension
types), very deep nesting, headers around MAX_HEADER_BYTES. (A ZeroMQ message has at least one
frame: an "empty" message is one empty frame.) Then:

* the broker counted every message that protocol.decode refuses in stats["broker"]
  ["malformed_<link>_messages"] -- exactly, when every message was undecodable; messages that do
  decode may be counted too (sent in the wrong direction), never more than that;
* no message raised anything but ProtocolError (no "internal_errors" counter), and protocol.decode
  itself, run here on the same frames, raised nothing but ProtocolError;
* a real request still goes gateway -> broker -> worker -> broker -> gateway.
Sometimes a frame above protocol.MAX_FRAME_BYTES is also sent from another socket: libzmq drops
that peer's connection (ZMQ_MAXMSGSIZE), so it is never counted; the test waits for the
disconnect event.

One event loop per module (``BrokerHarness``) runs the broker and every example, in order: the
attacker's last message is a sync probe whose answer proves the broker handled all before it
(a StatsQuery on the client link; on the worker link a Heartbeat, which an unregistered peer gets
answered with Disconnect -- so messages that decode as Register or Heartbeat are not sent there:
they would register the attacker, or answer the probe early).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import types
import typing
import uuid
from typing import Any, Union

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import parse_monitor_message

from broker.config import BrokerSettings
from broker.server import BrokerServer
from gateway.broker_client import BrokerClient
from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    WORKER_LINK,
    Command,
    Disconnect,
    Heartbeat,
    ProtocolError,
    Register,
    StatsQuery,
    StatsReply,
    WorkerStatus,
)
from tests.support.fake_worker import FakeWorker, params
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(120)

FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
LINKS = {"client": CLIENT_LINK, "worker": WORKER_LINK}
OVERSIZED = b"\x00" * (MAX_FRAME_BYTES + 1)


class BrokerHarness:
    """A broker, a real BrokerClient and one fake worker, all on one event loop owned by the test."""

    QUIET = ("broker.server", "gateway.broker_client")  # a warning per dropped message: thousands

    def __init__(self) -> None:
        self.levels = {name: logging.getLogger(name).level for name in self.QUIET}
        for name in self.QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        client_port, worker_port = free_port(), free_port()
        self.address = {"client": f"tcp://127.0.0.1:{client_port}", "worker": f"tcp://127.0.0.1:{worker_port}"}
        # Slow heartbeats: the fake worker sends none, and must not expire during the test.
        broker_settings = BrokerSettings(client_bind=self.address["client"], worker_bind=self.address["worker"],
                                         max_queue_size=1000, heartbeat_interval_s=30.0)
        self.stop = asyncio.Event()
        self.server = BrokerServer(broker_settings)
        self.serving = asyncio.create_task(self.server.serve(self.stop))
        self.client = BrokerClient(self.address["client"])
        await self.client.start()
        self.ctx = zmq.asyncio.Context()
        self.worker = FakeWorker(self.ctx, self.address["worker"], "gpu0")
        await self.worker.start()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        async def stop() -> None:
            await self.worker.stop()
            await self.client.close()
            self.ctx.term()
            self.stop.set()
            await self.serving

        self.run(stop())
        self.loop.close()
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)

    def __repr__(self) -> str:
        return "BrokerHarness()"

    def assert_worker_alive(self) -> None:
        """The fake worker stops at the first message from the broker it cannot decode (the broker
        must only send what the protocol allows): say so, rather than time out on the next request."""
        if self.worker.task.done():
            raise AssertionError(f"the fake worker stopped on a message from the broker: {self.worker.task.exception()!r}")

    async def counters(self) -> dict[str, Any]:
        return (await self.client.stats())["broker"]

    def attacker(self, link: str, connect: bool = True) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        if connect:
            sock.connect(self.address[link])
        return sock

    async def sync(self, sock: zmq.asyncio.Socket, link: str, refused: int = 0) -> None:
        """Send a probe the broker answers; once it has, it has handled everything sent before it.
        ``refused``: worker-link messages sent before it that the broker also answers with Disconnect
        (any but a DISCONNECT, from an unregistered sender): their answers come first."""
        if link == "client":
            probe_id = uuid.uuid4().hex
            await sock.send_multipart(protocol.encode(CLIENT_LINK, StatsQuery(probe_id)))
            done = lambda m: isinstance(m, StatsReply) and m.query_id == probe_id  # noqa: E731
        else:  # an unregistered worker's heartbeat is answered with Disconnect ("register again")
            await sock.send_multipart(protocol.encode(WORKER_LINK, Heartbeat(WorkerStatus("ready", 0, 0, 0, 0, 0, 0,
                                                                                          0.0, 0.0))))
            disconnects = [refused + 1]

            def done(message) -> bool:
                disconnects[0] -= isinstance(message, Disconnect)
                return disconnects[0] == 0
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), 5)
            try:
                if done(protocol.decode(frames, LINKS[link])[0]):
                    return
            except ProtocolError:
                continue

    async def send_oversized(self, link: str, frames: list[bytes]) -> None:
        """Send a message with a frame over MAX_FRAME_BYTES and wait until the broker hangs up."""
        sock = self.attacker(link, connect=False)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address[link])  # after the monitor, so that no event is missed
        try:
            assert (await self._event(monitor))["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            await sock.send_multipart(frames, copy=False)
            assert (await self._event(monitor))["event"] == zmq.EVENT_DISCONNECTED
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    @staticmethod
    async def _event(monitor: zmq.asyncio.Socket) -> dict:
        return parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))

    async def still_serves(self) -> None:
        request_id = "e2e-" + uuid.uuid4().hex
        self.assert_worker_alive()
        try:
            result, payload = await asyncio.wait_for(self.client.generate(request_id, params(7), 10), 15)
        except TimeoutError:
            self.assert_worker_alive()
            raise
        assert result.request_id == request_id
        assert bytes(payload) == self.worker.payload(protocol.Generate(request_id, params(7), 10))


@pytest.fixture(scope="module")
def harness():
    h = BrokerHarness()
    try:
        yield h
    finally:
        h.close()


# --------------------------------------------------------------------------- strategies

keys = st.one_of(st.text(max_size=12), st.sampled_from(sorted({f.name for cls in protocol.MESSAGE_TYPES[CLIENT_LINK].values()
                                                               for f in dataclasses.fields(cls)} |
                                                              {f.name for cls in protocol.MESSAGE_TYPES[WORKER_LINK].values()
                                                               for f in dataclasses.fields(cls)})))
mp_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(), st.text(max_size=40), st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),  # negative codes: see _bombs
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
mp_values = st.recursive(
    mp_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=5),
        st.dictionaries(st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=4)), children, max_size=2),
    ),
    max_leaves=20,
)


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                        st.text(max_size=20))


def _field_values(hint: Any, meta: typing.Mapping, valid: bool) -> st.SearchStrategy:
    """Values of a protocol field's type within its bounds; unless ``valid``, also just outside them."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return st.one_of(st.none(), _field_values(inner, meta, valid))
    if dataclasses.is_dataclass(hint):
        return message_headers(hint, valid)
    if origin is tuple:  # tuple[X, ...]: an array of at most max_len X; unless valid, sometimes one more
        (item_hint, _ellipsis) = typing.get_args(hint)
        max_len = meta.get("max_len") or 8
        items = _field_values(item_hint, {}, valid)
        arrays = st.lists(items, max_size=min(max_len, 4))
        return arrays if valid else st.one_of(arrays, st.lists(items, min_size=max_len + 1, max_size=max_len + 1))
    if hint is dict:
        return st.dictionaries(st.text(max_size=8), json_leaves if valid else mp_values, max_size=3)
    if hint is bool:
        return st.booleans()
    low, high = meta.get("low"), meta.get("high")
    if hint is int:
        low = -(2**63) if low is None else int(low)
        high = 2**63 - 1 if high is None else int(high)
        edges = [low, high] if valid else [n for n in (low - 1, high + 1, low, high) if -(2**63) <= n < 2**64]
        return st.one_of(st.integers(low, high), st.sampled_from(edges))
    if hint is float:
        in_range = st.floats(-1e300 if low is None else low, 1e300 if high is None else high, allow_nan=False)
        return in_range if valid else st.one_of(in_range, st.floats())
    if hint is str:
        max_len = meta.get("max_len") or 64
        edges = ["x" * max_len] if valid else ["x" * max_len, "x" * (max_len + 1)]
        return st.one_of(st.text(max_size=min(max_len, 30)), st.sampled_from(edges))
    raise AssertionError(f"no strategy for {hint!r}")


def message_headers(cls: type, valid: bool = False) -> st.SearchStrategy:
    """Header maps for ``cls``. Valid: every field present and in bounds (plus an unknown key or
    two, which decode ignores). Otherwise each field is usually right-typed, sometimes anything,
    sometimes absent."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: _field_values(hints[f.name], f.metadata, valid) for f in dataclasses.fields(cls)}
    if valid:
        base = st.fixed_dictionaries(fields)
        extra = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in fields), json_leaves, max_size=2)
    else:
        base = st.fixed_dictionaries({}, optional={k: st.one_of(v, mp_values) for k, v in fields.items()})
        extra = st.dictionaries(keys, mp_values, max_size=2)
    return st.tuples(base, extra).map(lambda pair: {**pair[1], **pair[0]})


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def shaped_messages(draw, link: bytes) -> list[bytes]:
    """[tag, command, header, payload...] for a real message class, with random field values."""
    cls = draw(st.sampled_from(sorted({c for t in protocol.MESSAGE_TYPES.values() for c in t.values()},
                                      key=lambda c: c.__name__)))
    tag = draw(st.sampled_from([link, link, CLIENT_LINK if link == WORKER_LINK else WORKER_LINK]))
    payload = draw(st.lists(st.binary(max_size=64), max_size=2))
    return [tag, cls.COMMAND.value, pack(draw(message_headers(cls))), *payload]


@st.composite
def valid_messages(draw, link: bytes) -> list[bytes]:
    """A message decode accepts on ``link`` (in either direction), with random in-bounds values."""
    cls = draw(st.sampled_from(sorted(protocol.MESSAGE_TYPES[link].values(), key=lambda c: c.__name__)))
    payload_commands = getattr(protocol, "_PAYLOAD_COMMANDS", {Command.RESULT})
    payload = [draw(st.binary(max_size=64))] if cls.COMMAND in payload_commands else []
    return [link, cls.COMMAND.value, pack(draw(message_headers(cls, valid=True))), *payload]


def _bombs() -> st.SearchStrategy:
    n32 = st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n))
    n16 = st.integers(0, 2**16 - 1).map(lambda n: struct.pack(">H", n))
    depth = st.integers(1, 100_000)
    return st.one_of(
        st.tuples(st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]), n32, st.binary(max_size=8))
        .map(b"".join),  # array/map/str/bin/ext 32 claiming up to 4 GiB
        st.tuples(st.sampled_from([b"\xdc", b"\xde", b"\xda", b"\xc5", b"\xc8"]), n16, st.binary(max_size=8))
        .map(b"".join),
        depth.map(lambda d: b"\x91" * d + b"\xc0"),  # [[[...nil...]]]
        depth.map(lambda d: b"\x81\xa1a" * d + b"\xc0"),  # {"a": {"a": ...}}
        depth.map(lambda d: b"\x81\xaarequest_id" + b"\x91" * d + b"\xa1x"),  # deep inside a real field
        st.binary(min_size=1, max_size=12).map(lambda b: b"\xd6\xff" + b[:4].ljust(4, b"\xff")),  # timestamp32
        st.binary(max_size=12).map(lambda b: b"\xc7\x0c\xff" + b.ljust(12, b"\xff")),  # timestamp96, bad nanos
        st.just(b"\xc1"),  # the never-used byte
        st.integers(-16, 16).map(lambda d: pack({"request_id": "x" * (MAX_HEADER_BYTES - 16 + d)})),
        st.tuples(st.just(pack({"query_id": "q"})), st.binary(min_size=1, max_size=8)).map(b"".join),  # extra data
    )


@st.composite
def hostile_messages(draw, link: bytes) -> list[bytes]:
    kind = draw(st.sampled_from(["bytes", "tagged", "shaped", "valid", "truncated", "bomb"]))
    if kind == "bytes":
        first = draw(st.one_of(st.binary(max_size=8), st.sampled_from([CLIENT_LINK, WORKER_LINK, b"", b"IGC0"])))
        return [first, *draw(st.lists(st.binary(max_size=64), max_size=5))]
    tag = draw(st.sampled_from([link, link, link, b"IGC2", b"IGW0", link[:3], link + b"\x00"]))
    command = draw(st.one_of(st.sampled_from([c.value for c in Command]), st.binary(max_size=3)))
    if kind == "tagged":
        header = draw(st.one_of(st.binary(max_size=64), mp_values.map(pack)))
        return [tag, command, header, *draw(st.lists(st.binary(max_size=32), max_size=3))]
    if kind == "shaped":
        return draw(shaped_messages(link))
    if kind == "valid":
        return draw(valid_messages(link))
    if kind == "bomb":
        return [tag, command, draw(_bombs()), *draw(st.lists(st.binary(max_size=8), max_size=1))]
    # truncated: a well-formed message cut short (header bytes, or whole frames), or padded
    frames = draw(valid_messages(link))
    how = draw(st.sampled_from(["header", "frames", "extra"]))
    if how == "header" and frames[2]:
        frames[2] = frames[2][:draw(st.integers(0, len(frames[2]) - 1))]
    elif how == "frames":
        frames = frames[:draw(st.integers(1, 2))]
    else:
        frames = frames + [b""] * draw(st.integers(1, 3))
    return frames[:6]


def classify(frames: list[bytes], link: bytes) -> type | None:
    """protocol.decode's verdict: None for malformed, else the message class. Any other exception
    escapes (a bug in protocol.decode: it must refuse bad input with ProtocolError only)."""
    try:
        message, _ = protocol.decode(frames, link)
    except ProtocolError:
        return None
    return type(message)


def counter(counters: dict, name: str) -> int:
    return counters.get(name, 0)


async def attack(h: BrokerHarness, link: str, messages: list[list[bytes]], oversized: tuple | None) -> None:
    tag = LINKS[link]
    before = await h.counters()
    malformed = decodable = refused = 0
    to_send = []
    for frames in messages:
        kind = classify(frames, tag)
        if link == "worker" and kind in (Register, Heartbeat):
            continue  # would register the attacker (then it gets real work) or answer the sync probe
        to_send.append(frames)
        if kind is None:
            malformed += 1
        else:
            decodable += 1
            refused += link == "worker" and kind is not Disconnect  # answered Disconnect: register first
    if oversized is not None:
        position, command = oversized
        frames = [tag, command, pack({"request_id": "x"}), b"png"][:max(3, position + 1)]
        frames[position] = OVERSIZED
        await h.send_oversized(link, frames)
    sock = h.attacker(link)
    try:
        for frames in to_send:
            await sock.send_multipart(frames)
        await h.sync(sock, link, refused)
    finally:
        sock.close(linger=0)
    after = await h.counters()
    name = f"malformed_{link}_messages"
    counted = counter(after, name) - counter(before, name)
    assert malformed <= counted <= malformed + decodable, (counted, malformed, decodable)
    assert counter(after, "internal_errors") == counter(before, "internal_errors") == 0
    await h.still_serves()


# --------------------------------------------------------------------------- the properties


def fuzz_link(harness: BrokerHarness, link: str, data) -> None:
    messages = data.draw(st.lists(hostile_messages(LINKS[link]), min_size=1, max_size=8), label="messages")
    oversized = data.draw(st.one_of(st.none(), st.none(), st.none(), st.none(), st.none(), st.none(), st.none(),
                                    st.tuples(st.integers(0, 3), st.sampled_from([c.value for c in Command]))),
                          label="oversized (frame position, command)")
    harness.run(attack(harness, link, messages, oversized))


@settings(max_examples=250, **FUZZ)
@given(data=st.data())
def test_client_socket_survives_hostile_frames(harness: BrokerHarness, data):
    fuzz_link(harness, "client", data)


@settings(max_examples=250, **FUZZ)
@given(data=st.data())
def test_worker_socket_survives_hostile_frames(harness: BrokerHarness, data):
    fuzz_link(harness, "worker", data)


@pytest.mark.parametrize("link", ["client", "worker"])
def test_known_hostile_frames_are_counted_exactly(harness: BrokerHarness, link: str):
    tag = LINKS[link]
    generate = protocol.encode(CLIENT_LINK, protocol.Generate("x", params(), 5))
    hostile = [
        [b""],
        [b"garbage"],
        [tag],
        [tag, Command.GENERATE.value],
        [tag, b"\x7f", b"\x80"],
        [tag, Command.GENERATE.value, b"\xdd\xff\xff\xff\xff"],  # array of 2**32, no elements
        [tag, Command.GENERATE.value, b"\xdf\xff\xff\xff\xff"],  # map of 2**32
        [tag, Command.GENERATE.value, b"\x91" * 100_000 + b"\xc0"],  # nesting bomb
        [tag, Command.GENERATE.value, b"\xc1"],
        [tag, Command.GENERATE.value, generate[2][:-3]],  # truncated
        [tag, Command.GENERATE.value, generate[2] + b"\xc0"],  # trailing data
        [tag, Command.GENERATE.value, pack({"request_id": "x" * (MAX_HEADER_BYTES + 1)})],
        [tag, Command.GENERATE.value, pack({"request_id": msgpack.ExtType(5, b"")})],
        [tag, Command.RESULT.value, generate[2]],  # a Generate header under the RESULT command
        [tag, Command.GENERATE.value, generate[2], b"unexpected payload"],
    ]
    assert all(classify(frames, tag) is None for frames in hostile)
    harness.run(attack(harness, link, hostile, None))
    for position in range(4):  # every frame position, one connection each
        harness.run(attack(harness, link, [[b"garbage"]], (position, Command.RESULT.value)))
