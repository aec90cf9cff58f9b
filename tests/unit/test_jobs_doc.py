"""docs/jobs.md stays true to gateway/jobs/: its settings, numbers, event tables and links (its receiver
runs in tests/integration/test_webhooks.py)."""

from __future__ import annotations

import dataclasses
import re

from gateway.config import GatewaySettings
from gateway.jobs.store import DEFAULT_MAX_EVENTS, EVENT_TYPES, SQLITE_FILE, TRIMMED_EVENTS
from gateway.jobs.webhooks import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENT_GROUPS, Backoff
from tests.support.paths import REPO

DOC_PATH = REPO / "docs" / "jobs.md"
DOC = DOC_PATH.read_text()
SETTINGS = {f.metadata["env"]: f.default for f in dataclasses.fields(GatewaySettings) if "env" in f.metadata}


def test_every_variable_the_page_names_is_a_gateway_setting():
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)(?:=[^`]*)?`", DOC)) - {"POST"}
    assert named and named <= set(SETTINGS), f"not settings: {sorted(named - set(SETTINGS))}"
    for variable in ("JOB_STORE", "JOB_STORE_URL", "JOB_RETENTION_S", "WEBHOOK_SECRET", "WEBHOOK_SECRET_FILE",
                     "WEBHOOK_ALLOW_PRIVATE", "WEBHOOK_MAX_ATTEMPTS", "WEBHOOK_TIMEOUT_S", "STATE_DIR"):
        assert f"`{variable}" in DOC, f"docs/jobs.md does not explain {variable}"


def test_the_numbers_on_the_page_are_the_codes():
    assert f"STATE_DIR/{SQLITE_FILE}" in DOC
    assert f"`WEBHOOK_TIMEOUT_S` ({SETTINGS['WEBHOOK_TIMEOUT_S']:g} s)" in DOC
    assert f"`WEBHOOK_MAX_ATTEMPTS`\n({SETTINGS['WEBHOOK_MAX_ATTEMPTS']})" in DOC
    assert SETTINGS["JOB_RETENTION_S"] == 86400.0 and "(a day by\ndefault)" in DOC
    backoff = Backoff(jitter=lambda: 1.0)
    assert backoff.max_attempts == SETTINGS["WEBHOOK_MAX_ATTEMPTS"]
    delays = [backoff.delay_s(n) for n in range(1, backoff.max_attempts)]

    def spoken(seconds: float) -> str:
        if seconds < 100:
            return f"{seconds:g} s"
        if seconds < 6000:
            return f"{round(seconds / 60)} min"
        return f"{seconds / 3600:.1f} h"

    schedule = ", ".join(spoken(delay) for delay in delays[:-1]) + f" and {spoken(delays[-1])}"
    assert " ".join(schedule.split()) in " ".join(DOC.split()), schedule


def test_the_event_tables_are_the_codes():
    table = DOC.split("### Which events", 1)[1].split("###", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", table, re.M)[1:])  # after the header row
    assert list(rows) == list(WEBHOOK_EVENT_GROUPS)
    for name, events in WEBHOOK_EVENT_GROUPS.items():
        assert re.findall(r"`(\w+)`", rows[name]) == list(events), name
    assert f"default: `{list(DEFAULT_WEBHOOK_EVENTS)}`".replace("'", '"') in DOC
    for event in EVENT_TYPES:
        assert f"`{event}`" in DOC.split("## Events", 1)[1].split("## Webhooks", 1)[0]
    assert TRIMMED_EVENTS == {"queued", "progress", "preview"}
    flat = " ".join(DOC.split())
    assert f"newest {DEFAULT_MAX_EVENTS} `queued`, `progress` and `preview` events" in flat  # the log's bound
    assert "`queued`, `progress` and `preview` deliveries" in flat  # the outbox's coalescing


def test_links_lead_to_files_of_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", DOC)
    assert links
    for link in links:
        target = (DOC_PATH.parent / link).resolve()
        assert target.is_relative_to(REPO) and target.exists(), link
