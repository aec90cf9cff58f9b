"""ZeroMQ socket construction with the options this cluster relies on (see docs/architecture.md)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import zmq

from imagegen.protocol import MAX_FRAME_BYTES

# High-water marks count messages, not bytes. Credit-based dispatch bounds what is in flight far
# below this, so the HWM is a safety net, never the flow control.
HIGH_WATER_MARK = 10_000


@dataclass(frozen=True)
class CurveServerKeys:
    """The broker's key pair: its worker socket then speaks CurveZMQ (authenticated, encrypted)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class CurveClientKeys:
    """A worker's key pair and the broker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def is_local_endpoint(endpoint: str) -> bool:
    """Whether only processes on this machine can reach ``endpoint``: ipc:// and inproc://, or tcp://
    on a literal loopback address (127.0.0.0/8, ::1). Any other address, ``*``, an interface name
    or a host name (which may resolve to anything) is not local."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_router(ctx: zmq.Context, bind: str, curve: CurveServerKeys | None = None,
                handover: bool = False) -> zmq.Socket:
    """A broker-side ROUTER bound to ``bind``.

    ROUTER_MANDATORY makes a send to a vanished peer raise EHOSTUNREACH instead of silently
    dropping the message; MAXMSGSIZE disconnects a peer that sends an oversized frame before it
    can fill our memory; LINGER 0 keeps shutdown from hanging on unsendable messages.

    ROUTER_HANDOVER stays off by default (libzmq's default): with it on, a second connection that
    announces a connected peer's routing id takes that id over, and receives every message meant
    for the first (a worker's prompts). Off, such a connection is ignored while the id is in use.
    The gateways' socket turns it on (``handover``): each gateway announces a lasting id
    (GATEWAY_ID), and a restarted gateway must get its connection back at once, even while the
    broker has not yet noticed that the old one is gone. Only processes on the broker's host reach
    that socket (BROKER_CLIENT_BIND), and they may already submit and cancel anything."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    if curve is not None:  # the server role must be set before bind
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_server = True
    _enable_ipv6_if_needed(sock, bind)
    sock.bind(bind)
    return sock


def make_dealer(ctx: zmq.Context, connect: str, linger_ms: int = 2000,
                curve: CurveClientKeys | None = None, routing_id: bytes | None = None) -> zmq.Socket:
    """A DEALER connected to a broker; it reconnects by itself if the broker restarts.

    ``routing_id``: the id the broker's ROUTER knows this connection by (1 to 255 bytes, not
    starting with a zero byte); None: a random one that libzmq makes per connection."""
    sock = ctx.socket(zmq.DEALER)
    if routing_id is not None:
        if not 1 <= len(routing_id) <= 255 or routing_id[0] == 0:
            raise ValueError("a routing id is 1 to 255 bytes and does not start with a zero byte")
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, 250)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    # Detect a dead TCP peer at the transport level too (answered by libzmq's I/O thread).
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    if curve is not None:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server_public
    _enable_ipv6_if_needed(sock, connect)
    sock.connect(connect)
    return sock


def _enable_ipv6_if_needed(sock: zmq.Socket, endpoint: str) -> None:
    if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://::"):
        sock.setsockopt(zmq.IPV6, 1)
