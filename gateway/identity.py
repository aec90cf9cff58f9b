"""The gateway's lasting identity on the broker link (GATEWAY_ID).

The broker sends each request's answer to the connection (ZeroMQ routing id) that sent it. A gateway
that connects under the same routing id every time it starts gets its connection back after a
restart (the broker's gateway socket has ROUTER_HANDOVER on), instead of leaving the broker to send
into a connection nobody reads. The id is GATEWAY_ID when set; otherwise one made at random the
first time and kept in ``STATE_DIR/gateway-id``, so a gateway restarted on the same STATE_DIR has
the same identity.

Two gateways running at once under one identity would take the connection from each other and
receive each other's answers. A gateway that reads its id from the file therefore holds a lock on
it while it runs (flock), and a second gateway started on the same STATE_DIR stops at start
saying so. Nothing checks two explicit GATEWAY_IDs against each other: give each gateway its own.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

GATEWAY_ID_FILE = "gateway-id"
MAX_GATEWAY_ID_CHARS = 64
_GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (MAX_GATEWAY_ID_CHARS - 1))


class GatewayIdentityError(RuntimeError):
    """The gateway cannot take an identity; the message says why and what to do."""


def gateway_id_problem(text: str) -> str | None:
    """Why ``text`` cannot be a gateway id, or None when it can."""
    if _GATEWAY_ID.fullmatch(text) is None:
        return (f"{text[:80]!r} is not a gateway id: 1 to {MAX_GATEWAY_ID_CHARS} letters, digits, '.', '_' or "
                f"'-', starting with a letter or digit")
    return None


@dataclass
class GatewayIdentity:
    """``gateway_id``; ``source``: where it came from (GATEWAY_ID, or the file's path). ``release()``
    lets go of the file's lock (at the broker link's close)."""

    gateway_id: str
    source: str = "GATEWAY_ID"
    _lock_fd: int | None = None

    @property
    def routing_id(self) -> bytes:
        return self.gateway_id.encode("ascii")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file lets go of its flock
            self._lock_fd = None


def resolve_gateway_identity(gateway_id: str | None, state_dir: str) -> GatewayIdentity:
    """GATEWAY_ID when set; else the id in STATE_DIR/gateway-id, made (at random) when the file is
    missing or empty, and locked for as long as this gateway runs. Raises GatewayIdentityError."""
    if gateway_id is not None:
        problem = gateway_id_problem(gateway_id)
        if problem is not None:
            raise GatewayIdentityError(f"GATEWAY_ID: {problem}")
        return GatewayIdentity(gateway_id)
    path = Path(state_dir) / GATEWAY_ID_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise GatewayIdentityError(f"cannot open {path} ({exc}): the gateway keeps its identity there; make "
                                   f"STATE_DIR writable, or set GATEWAY_ID") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GatewayIdentityError(
                f"another gateway is running with the identity in {path}: two gateways under one identity "
                f"would take each other's answers. Give each gateway its own STATE_DIR or GATEWAY_ID") from None
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
        if not text:
            text = "gw-" + secrets.token_hex(16)
            os.write(fd, (text + "\n").encode("ascii"))
            os.fsync(fd)
        problem = gateway_id_problem(text)
        if problem is not None:
            raise GatewayIdentityError(f"{path}: {problem}; delete the file to have a new one made")
    except BaseException:
        os.close(fd)
        raise
    return GatewayIdentity(text, str(path), fd)
