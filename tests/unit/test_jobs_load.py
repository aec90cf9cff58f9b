"""bench/jobs_load.py's pure parts: reading an event stream, and what counts as a passing run."""

from __future__ import annotations

import asyncio

from bench import jobs_load


class Lines:
    """What aiohttp's StreamReader gives ``async for``: the stream's lines, as bytes."""

    def __init__(self, text: str) -> None:
        self.lines = [line.encode() for line in text.splitlines(keepends=True)]

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self.lines:
            raise StopAsyncIteration
        return self.lines.pop(0)


async def events(text: str) -> list:
    return [event async for event in jobs_load.sse_events(Lines(text))]


def test_events_are_read_with_their_ids_and_comments_are_skipped():
    text = ("retry: 2000\n\n"
            "id: 1\nevent: queued\ndata: {\"position\":3}\n\n"
            ": heartbeat\n\n"
            "id: 2\nevent: progress\ndata: {\"step\":1,\r\ndata: \"steps\":4}\n\n"
            "id: 3\nevent: succeeded\ndata: {}\n\n")
    assert asyncio.run(events(text)) == [(1, "queued", {"position": 3}), (2, "progress", {"step": 1, "steps": 4}),
                                         (3, "succeeded", {})]


def test_a_run_passes_only_when_every_job_ended_and_every_listener_got_its_end():
    result = {"config": {"jobs": 2}, "jobs": {"submitted": 2, "ended": 2},
              "listeners": {"got_terminal_event": 2, "terminal_matches_status": 2}}
    assert jobs_load.passed(result)
    for section, name, value in (("listeners", "got_terminal_event", 1), ("listeners", "terminal_matches_status", 1),
                                 ("jobs", "ended", 1), ("jobs", "submitted", 1)):
        broken = {key: dict(part) if isinstance(part, dict) else part for key, part in result.items()}
        broken[section][name] = value
        assert not jobs_load.passed(broken), (section, name)
