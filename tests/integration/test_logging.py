"""Logs in one process: the JSON format (imagegen/logs.py), and the X-Request-ID handling of the
gateway (in-process, with a FAKE broker link) and of the broker's state. The one request id found in
the real gateway, broker and worker logs: tests/e2e/test_logging.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from broker.config import BrokerSettings
from broker.state import BrokerPolicy, BrokerState, ToClient
from gateway.config import GatewaySettings
from gpu_worker.config import WorkerSettings
from imagegen import settings as settings_lib
from imagegen.logs import JsonFormatter, make_formatter, parse_log_format
from imagegen.protocol import Failure, Generate, GenerationParams
from tests.support.fake_brokers import ScriptedFakeBroker
from tests.support.gateway import generate_body

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def record(message: str, *args, level: int = logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.LogRecord("broker.server", level, __file__, 1, message, args, exc_info)
    for name, val in extra.items():
        setattr(made, name, val)
    return made


# --------------------------------------------------------------------------- the JSON format


def test_json_lines_carry_time_level_service_pid_logger_message_and_request_id():
    line = JsonFormatter("broker").format(record("request %s dispatched to %s", "abc123", "w0", request_id="abc123"))
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "service", "pid", "logger", "message", "request_id"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry["time"]
    assert (entry["level"], entry["service"], entry["logger"]) == ("INFO", "broker", "broker.server")
    assert entry["pid"] > 0
    assert entry["message"] == "request abc123 dispatched to w0"
    assert entry["request_id"] == "abc123"


def test_json_lines_without_an_id_have_none_and_odd_arguments_never_break_a_line():
    entry = json.loads(JsonFormatter("gateway").format(record("odd: %s", b"\xff\x00", request_ids=[Path("/x")])))
    assert "request_id" not in entry
    assert entry["message"] == "odd: b'\\xff\\x00'"
    assert entry["request_ids"] == ["/x"]


def test_json_lines_carry_the_traceback():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        line = JsonFormatter("gpu_worker").format(record("batch failed", level=logging.ERROR, exc_info=sys.exc_info()))
    entry = json.loads(line)  # one line still: newlines are escaped inside the JSON string
    assert entry["level"] == "ERROR"
    assert "RuntimeError: boom" in entry["exception"] and "Traceback" in entry["exception"]


def test_text_stays_the_default_and_bad_formats_are_refused_naming_log_format():
    assert "INFO broker[" in make_formatter("broker").format(record("hello"))
    assert parse_log_format(" JSON ") == "json"
    for settings_class in (BrokerSettings, GatewaySettings, WorkerSettings):
        assert settings_lib.load(settings_class, environ={}).log_format == "text"
        assert settings_lib.load(settings_class, environ={"LOG_FORMAT": "json"}).log_format == "json"
        with pytest.raises(settings_lib.SettingsError, match="LOG_FORMAT"):
            settings_lib.load(settings_class, environ={"LOG_FORMAT": "xml"})


# --------------------------------------------------------------------------- X-Request-ID at the gateway


@pytest.fixture
def broker() -> ScriptedFakeBroker:
    """Behind the ``client`` fixture (tests/integration/conftest.py) here: it records ids and labels."""
    return ScriptedFakeBroker()


async def test_a_safe_client_id_is_echoed_and_travels_as_a_label_never_as_the_id(client, broker):
    response = await client.post("/generate", json=generate_body(), headers={"X-Request-ID": "trace-7.A_b"})
    assert response.status == 200
    assert response.headers["X-Request-ID"] == "trace-7.A_b"
    assert broker.labels == ["trace-7.A_b"]  # what the broker, and so the worker, write in their logs
    [request_id] = broker.request_ids
    assert HEX32.match(request_id), request_id  # the id that routes the request is the service's own


@pytest.mark.parametrize("header", ["", "has space", "semi;colon", "x" * 65, "ünïcode", "new\\nline"])
async def test_an_unsafe_client_id_is_no_label_and_the_answer_carries_the_service_id(client, broker, header):
    response = await client.post("/generate", json=generate_body(), headers={"X-Request-ID": header})
    assert response.status == 200
    assert HEX32.match(response.headers["X-Request-ID"]), response.headers["X-Request-ID"]
    assert broker.request_ids == [response.headers["X-Request-ID"]] and broker.labels == [""]


async def test_errors_carry_the_id_too(client):
    response = await client.post("/generate", json={"prompt": ""})
    assert response.status == 400 and HEX32.match(response.headers["X-Request-ID"])
    response = await client.get("/no-such-route", headers={"X-Request-ID": "abc"})
    assert response.status == 404 and response.headers["X-Request-ID"] == "abc"


async def test_requests_with_one_label_in_flight_together_get_ids_of_their_own(client, broker):
    """The id is the request's key on the broker link: two requests in flight never share one, whatever
    labels their clients send (the same one, or one another request's id was derived from)."""
    import asyncio

    broker.hold = asyncio.Event()
    first = asyncio.create_task(client.post("/generate", json=generate_body(1), headers={"X-Request-ID": "dup"}))
    while not broker.request_ids:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(client.post("/generate", json=generate_body(2), headers={"X-Request-ID": "dup"}))
    first_id = broker.request_ids[0]
    third = asyncio.create_task(client.post("/generate", json=generate_body(3), headers={"X-Request-ID": first_id}))
    while len(broker.request_ids) < 3:
        await asyncio.sleep(0.01)
    broker.hold.set()
    headers = [(await task).headers["X-Request-ID"] for task in (first, second, third)]
    assert headers == ["dup", "dup", first_id]
    assert len(set(broker.request_ids)) == 3 and sorted(broker.labels) == sorted(headers)


def test_the_broker_refuses_an_id_another_gateway_holds_and_ignores_a_resend():
    state = BrokerState(BrokerPolicy(), epoch="e")
    message = Generate("shared-id", GenerationParams("a cat", 64, 64, 2, 7.5, 1, None), 60.0)
    assert state.submit(b"gateway-1", message, now=0.0) == []  # queued: no worker yet
    assert state.submit(b"gateway-1", message, now=0.1) == []  # a resend after a restart: ignored
    [refusal] = state.submit(b"gateway-2", message, now=0.2)
    assert isinstance(refusal, ToClient) and refusal.client_id == b"gateway-2"
    assert isinstance(refusal.message, Failure) and refusal.message.code == "invalid_request"
    assert state.requests["shared-id"].client_id == b"gateway-1"  # the first request is untouched
