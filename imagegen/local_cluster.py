"""A whole cluster on one machine's loopback: fresh ports and the settings that join the pieces.

Tests, benchmarks and demos start broker, gateway and workers as separate processes on 127.0.0.1;
:func:`loopback_settings` gives each run its own free ports so runs never collide with each other or
with a service already listening on the defaults.
"""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_settings(image_dir: str | Path) -> tuple[dict[str, str], str]:
    """(environment for every process of one cluster, the gateway's base URL)."""
    client_port, worker_port, gateway_port = free_port(), free_port(), free_port()
    settings = {
        "PYTHONUNBUFFERED": "1",
        "BROKER_CLIENT_BIND": f"tcp://127.0.0.1:{client_port}",
        "BROKER_CLIENT_ADDRESS": f"tcp://127.0.0.1:{client_port}",
        "BROKER_WORKER_BIND": f"tcp://127.0.0.1:{worker_port}",
        "BROKER_WORKER_ADDRESS": f"tcp://127.0.0.1:{worker_port}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gateway_port),
        "IMAGE_DIR": str(image_dir),
    }
    return settings, f"http://127.0.0.1:{gateway_port}"
