"""One log format for every service, so lines from gateway, broker and workers read alike.

``LOG_FORMAT=text`` (the default) writes one readable line per record::

    2026-11-27 12:00:00,123 INFO broker[4242] broker.server: worker gpu0 registered: ...

``LOG_FORMAT=json`` writes one JSON object per line, for log shippers (Loki, Elasticsearch, ...)::

    {"time": "2026-11-27T12:00:00.123Z", "level": "INFO", "service": "gateway", "pid": 4242,
     "logger": "gateway.app", "message": "request 1f2e...: 200 in 3.21s", "request_id": "1f2e..."}

A log call that passes ``extra={"request_id": ...}`` (or ``request_ids``, ``batch_id``, ``label``,
``labels``) gets that field in the JSON object; the text format shows the id in the message itself.
Each request keeps one service-made id from the gateway through the broker to the worker, and the
client's X-Request-ID travels beside it as its ``label`` (docs/operations.md, "Logs and request ids").
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from imagegen.settings import setting

LOG_FORMATS = ("text", "json")
# Attributes a log call may pass in ``extra`` that the JSON format copies into its object.
EXTRA_FIELDS = ("request_id", "request_ids", "batch_id", "label", "labels")


def request_name(request_id: str, label: str = "") -> str:
    """How a log line names a request: its service-made id, and the client's label (its X-Request-ID)
    when it sent one, so that a grep for either finds the line."""
    return f"{request_id} [{label}]" if label else request_id


def request_fields(request_id: str, label: str = "") -> dict[str, str]:
    """The ``extra`` of a log call about one request: its id, and its label when it has one."""
    return {"request_id": request_id, "label": label} if label else {"request_id": request_id}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, service, pid, logger, message,
    the known extra fields when present, and the formatted traceback as ``exception``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        # default=str: an odd argument (bytes, a Path) must never make a log line disappear.
        return json.dumps(entry, ensure_ascii=False, default=str)


def parse_log_format(text: str) -> str:
    """LOG_FORMAT: ``text`` or ``json`` (case-insensitive)."""
    fmt = text.strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}")
    return fmt


def log_level_setting() -> Any:
    """LOG_LEVEL, the same in every service's settings class."""
    return setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")


def log_format_setting() -> Any:
    """LOG_FORMAT, the same in every service's settings class."""
    return setting("LOG_FORMAT", "text", "text (one readable line per record) or json (one JSON object per line)",
                   parse=parse_log_format)


def make_formatter(service: str, fmt: str = "text") -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(service)
    if fmt == "text":
        return logging.Formatter(f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s")
    raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")


def setup_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record of this process to stderr, at ``level``, as ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(service, fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
