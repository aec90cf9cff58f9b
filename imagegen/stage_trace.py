"""Where a request's time goes: one timestamped line per request and stage, off unless asked for.

With ``IMAGEGEN_TRACE_FILE=/path/trace.log`` in their environment, the gateway, the broker and the
workers append a line to that file at each stage a request passes (received, forwarded, batch
started and done, PNG encoded and ready, result sent, image saved)::

    <unix time ns> <pid> <stage> <request id>

so that ``bench/trace_stages.py`` can line the stages of each request up across the processes of
one machine (they share its clock) and say how long each hop took. Without the variable, ``stage``
returns at once: the serving path pays one global lookup per stage.

Each line is written with one ``os.write`` on a descriptor opened with ``O_APPEND``: the processes'
lines do not interleave within a line. For benchmarks and debugging, not for production: the file
grows without bound.
"""

from __future__ import annotations

import os
import time

TRACE_FILE_ENV = "IMAGEGEN_TRACE_FILE"

_fd: int | None = None


def open_from_environment(environ: os._Environ | dict = os.environ) -> bool:
    """Start tracing if ``IMAGEGEN_TRACE_FILE`` is set (each process calls this once at start)."""
    global _fd
    path = environ.get(TRACE_FILE_ENV)
    if not path:
        return False
    _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return True


def close() -> None:
    global _fd
    if _fd is not None:
        os.close(_fd)
        _fd = None


def stage(name: str, request_id: str) -> None:
    """Record that request ``request_id`` reached stage ``name`` now (nothing unless tracing)."""
    if _fd is None:
        return
    os.write(_fd, f"{time.time_ns()} {os.getpid()} {name} {request_id}\n".encode())
