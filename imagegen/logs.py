"""One log format for every service, so lines from gateway, broker and workers read alike."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
