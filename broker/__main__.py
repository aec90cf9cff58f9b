"""python -m broker [flags]: run the broker (every flag also reads an environment variable)."""

from __future__ import annotations

import asyncio
import logging
import sys

from broker.config import BrokerSettings
from broker.server import BrokerServer
from imagegen import settings as settings_lib
from imagegen import stage_trace
from imagegen.logs import setup_logging
from imagegen.runner import run_service, stop_event_on_signals

log = logging.getLogger("broker")


async def main(settings: BrokerSettings) -> None:
    setup_logging("broker", settings.log_level, settings.log_format)
    stage_trace.open_from_environment()  # IMAGEGEN_TRACE_FILE: per-request stage times
    log.info("settings: %s", settings_lib.describe(settings))
    server = BrokerServer(settings)
    await server.serve(stop_event_on_signals(asyncio.get_running_loop()), settings.drain_timeout_s)
    log.info("broker stopped")


if __name__ == "__main__":
    sys.exit(run_service("broker", lambda: settings_lib.load(BrokerSettings, sys.argv[1:]), main))
