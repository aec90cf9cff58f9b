"""Reading Server-Sent Events (text/event-stream) in tests: the job API's GET /v1/jobs/{id}/events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class SseEvent:
    id: int | None
    type: str
    data: Any
    comment: bool = False  # a comment line (": heartbeat"), not an event


async def sse_events(content: Any, comments: bool = False) -> AsyncIterator[SseEvent]:
    """The events of a stream (an aiohttp StreamReader, ``response.content``) as they arrive, until it
    ends; with ``comments``, comment lines too (as SseEvent(comment=True))."""
    fields: dict[str, str] = {}
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if "event" in fields or "data" in fields:
                data = fields.get("data")
                yield SseEvent(int(fields["id"]) if "id" in fields else None, fields.get("event", "message"),
                               json.loads(data) if data is not None else None)
            fields = {}
            continue
        if line.startswith(":"):
            if comments:
                yield SseEvent(None, line[1:].strip(), None, comment=True)
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value


async def read_until_end(content: Any) -> list[SseEvent]:
    """Every event of a stream until it ends (the job API ends it after the terminal event)."""
    return [event async for event in sse_events(content)]
