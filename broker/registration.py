"""Who may register as a worker, and under which name (pure: no sockets, no files).

A registration is refused when its protocol version is not this build's, and, under CurveZMQ,
when the connection's key may not register the name it claims: a key may register only worker
names equal to its key file's name (its *stem*) or starting with it and a dash, so
``gpu-host-1.key`` admits ``gpu-host-1`` and ``gpu-host-1-gpu0`` but not ``gpu-host-2-gpu0``
(the folder of authorized keys is read by :class:`imagegen.keys.KeyAllowList`; this module only
reads its answer: public key -> stem).
"""

from __future__ import annotations

from typing import Mapping

from imagegen.protocol import PROTOCOL_VERSION, Register


def name_allowed(worker_name: str, stem: str) -> bool:
    return worker_name == stem or worker_name.startswith(stem + "-")


def key_admits(authorized_keys: Mapping[bytes, str], key: bytes | None, worker_name: str) -> bool:
    """Whether ``key`` is authorized (``authorized_keys``: public key -> stem) for ``worker_name``."""
    stem = authorized_keys.get(key or b"")
    return stem is not None and name_allowed(worker_name, stem)


def registration_refusal(message: Register, key: bytes | None,
                         authorized_keys: Mapping[bytes, str] | None) -> str | None:
    """Why this registration is refused, or None. ``key``: the connection's public key (its ZAP
    User-Id; None without authentication); ``authorized_keys``: None without CurveZMQ."""
    if message.protocol_version != PROTOCOL_VERSION:
        return f"protocol version {message.protocol_version} is not {PROTOCOL_VERSION}: upgrade the worker"
    if authorized_keys is None or key_admits(authorized_keys, key, message.worker_name):
        return None
    stem = authorized_keys.get(key or b"")
    claimed_by = stem or (None if key is None else key.decode())
    return (f"key {claimed_by!r} may not register as {message.worker_name!r}: "
            f"name the worker after its key file (NAME or NAME-...)")
