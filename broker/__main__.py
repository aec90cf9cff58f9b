"""python -m broker [flags]: run the broker (every flag also reads an environment variable)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys

from broker.config import BrokerSettings
from broker.server import BrokerServer
from imagegen import settings as settings_lib
from imagegen import stage_trace
from imagegen.logs import setup_logging
from imagegen.runner import run_service, stop_event_on_signals

log = logging.getLogger("broker")


# supervisord restarts the broker after any exit but 0; this status says it ran out of memory.
EXIT_OUT_OF_MEMORY = 3


def apply_memory_limit(limit_bytes: int) -> str:
    """Cap the broker's data memory (RLIMIT_DATA: heap and private mappings, what a flood of message
    parts fills) and say what was set. RLIMIT_DATA rather than RLIMIT_AS: the address space also
    counts reservations never touched (thread stacks, glibc's per-thread malloc arenas), which vary
    from host to host. Past the limit, libzmq cannot store an incoming part: it closes that
    connection and the broker carries on; a Python allocation that fails raises MemoryError, which
    ends the broker (exit 3) for supervisord to restart it."""
    if limit_bytes == 0:
        return "no memory limit (BROKER_MEMORY_LIMIT_BYTES=0)"
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return f"data memory limited to {soft >> 20} MiB (BROKER_MEMORY_LIMIT_BYTES)"


def restrict_ipc_socket(endpoint: str) -> None:
    """An ipc:// socket file is for this user only (the umask set at start already made it so;
    this keeps it so whatever the umask was)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):  # @: abstract, no file
        os.chmod(endpoint[len("ipc://"):], 0o600)


async def main(settings: BrokerSettings) -> None:
    setup_logging("broker", settings.log_level, settings.log_format)
    stage_trace.open_from_environment()  # IMAGEGEN_TRACE_FILE: per-request stage times
    log.info("settings: %s", settings_lib.describe(settings))
    log.info("%s", apply_memory_limit(settings.memory_limit_bytes))
    if settings.allow_unauthenticated_clients:
        log.warning("BROKER_ALLOW_UNAUTHENTICATED_CLIENTS=true: %s has no authentication; whoever reaches it "
                    "can submit work and exhaust the broker's memory", settings.client_bind)
    os.umask(0o077)  # the ipc:// socket files bind creates: this user only, from their first instant
    server = BrokerServer(settings)
    restrict_ipc_socket(settings.client_bind)
    restrict_ipc_socket(settings.worker_bind)
    try:
        await server.serve(stop_event_on_signals(asyncio.get_running_loop()), settings.drain_timeout_s)
    except MemoryError:
        log.critical("out of memory (BROKER_MEMORY_LIMIT_BYTES=%d): exiting, to be restarted",
                     settings.memory_limit_bytes)
        raise SystemExit(EXIT_OUT_OF_MEMORY)
    log.info("broker stopped")


if __name__ == "__main__":
    sys.exit(run_service("broker", lambda: settings_lib.load(BrokerSettings, sys.argv[1:]), main))
