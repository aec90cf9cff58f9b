"""Start-up and shutdown plumbing shared by the three services' ``__main__`` modules."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable

from imagegen.settings import SettingsError

log = logging.getLogger(__name__)


def stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM (what supervisorctl stop sends) or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(name: str, load_settings: Callable[[], object], main: Callable[[object], Awaitable[None]]) -> int:
    """Load settings (exit 2 with the reason if they are wrong), then run ``main`` in an event loop."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(main(settings))
    except KeyboardInterrupt:
        pass
    return 0
