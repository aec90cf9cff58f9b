"""python -m gateway [flags]: serve the HTTP API (every flag also reads an environment variable)."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.app import create_app
from gateway.config import GatewaySettings, listens_unauthenticated_beyond_loopback
from gateway.identity import GatewayIdentityError
from gateway.serving import check_open_files_limit, serve
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
    if listens_unauthenticated_beyond_loopback(settings):
        # validate() let this through only because GATEWAY_ALLOW_UNAUTHENTICATED=true: say so every start.
        log.warning("GATEWAY_HOST=%s is reachable from other machines and no API key is configured: anyone who "
                    "can reach port %d can use the GPUs (GATEWAY_ALLOW_UNAUTHENTICATED=true); set GATEWAY_API_KEYS "
                    "to require a key", settings.host, settings.port)
    check_open_files_limit(settings)  # every connection is a file: the soft limit is often 1024
    # serve stops on SIGTERM (supervisorctl stop) and SIGINT: it stops accepting connections,
    # lets requests in progress finish for up to GATEWAY_SHUTDOWN_TIMEOUT_S, then runs the cleanup
    # contexts. handler_cancellation: a client that disconnects cancels its handler, which tells
    # the broker to drop the request before it costs GPU time.
    try:
        asyncio.run(serve(create_app(settings), settings,
                          access_log_format='%a "%r" %s %b %Tfs id=%{X-Request-ID}o', handler_cancellation=True))
    except GatewayIdentityError as exc:  # at start, before it listens: STATE_DIR/gateway-id (gateway/identity.py)
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
