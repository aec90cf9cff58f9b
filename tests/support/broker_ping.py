"""A Ping to the broker's gateway socket, as the gateway's link sends it, and the broker's Pong."""

from __future__ import annotations

import zmq

from imagegen import protocol
from imagegen.protocol import CLIENT_LINK, Ping, Pong


def ping(address: str, timeout_ms: int = 10000) -> Pong:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = timeout_ms
        sock.connect(address)
        sock.send_multipart(protocol.encode(CLIENT_LINK, Ping("q-1")))
        message, _ = protocol.decode(sock.recv_multipart(), CLIENT_LINK)
        sock.close()
        assert isinstance(message, Pong), message
        return message
    finally:
        ctx.destroy(linger=0)
