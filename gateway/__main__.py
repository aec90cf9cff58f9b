"""python -m gateway [flags]: serve the HTTP API (every flag also reads an environment variable)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewaySettings
from imagegen import settings as settings_lib
from imagegen import stage_trace
from imagegen.logs import setup_logging

log = logging.getLogger("gateway")


def main(argv: list[str]) -> int:
    try:
        settings = settings_lib.load(GatewaySettings, argv)
    except settings_lib.SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging("gateway", settings.log_level, settings.log_format)
    stage_trace.open_from_environment()  # IMAGEGEN_TRACE_FILE: per-request stage times
    log.info("settings: %s", settings_lib.describe(settings))
    # run_app stops on SIGTERM (supervisorctl stop) and SIGINT: it stops accepting connections,
    # lets requests in progress finish for up to shutdown_timeout, then runs the cleanup contexts.
    # handler_cancellation: a client that disconnects cancels its handler, which tells the broker
    # to drop the request before it costs GPU time.
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                access_log_format='%a "%r" %s %b %Tfs id=%{X-Request-ID}o', handler_cancellation=True,
                shutdown_timeout=settings.shutdown_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
