"""Logs: the JSON format (imagegen/logs.py) and one request id through gateway, broker and worker.

The first tests check the formatter and the X-Request-ID handling in-process (the gateway with a
FAKE broker link, see FakeBroker in tests/test_metrics.py). The last one starts real processes
(tests/cluster.py: a broker, a gateway and one worker on the FAKE backend, MODEL_ID=fake:...) with
LOG_FORMAT=json, sends a request carrying X-Request-ID, and finds that id in all three logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from broker.config import BrokerSettings
from broker.state import BrokerPolicy, BrokerState, ToClient
from cluster import Cluster, request_body
from gateway.config import GatewaySettings
from gpu_worker.config import WorkerSettings
from imagegen import settings as settings_lib
from imagegen.logs import JsonFormatter, make_formatter, parse_log_format
from imagegen.protocol import Failure, Generate, GenerationParams
from test_gateway import start_client
from test_metrics import FakeBroker, generate_body

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
async def gateway(tmp_path):
    broker = FakeBroker()
    client = await start_client(GatewaySettings(image_dir=str(tmp_path / "images")), broker)
    try:
        yield client, broker
    finally:
        await client.close()


async def test_a_safe_client_id_is_used_end_to_end_and_echoed(gateway):
    client, broker = gateway
    response = await client.post("/generate", json=generate_body(), headers={"X-Request-ID": "trace-7.A_b"})
    assert response.status == 200
    assert response.headers["X-Request-ID"] == "trace-7.A_b"
    assert broker.request_ids == ["trace-7.A_b"]  # the id the broker, and so the worker, receive


@pytest.mark.parametrize("header", ["", "has space", "semi;colon", "x" * 65, "ünïcode", "new\\nline"])
async def test_an_unsafe_client_id_is_replaced_by_a_fresh_one(gateway, header):
    client, broker = gateway
    response = await client.post("/generate", json=generate_body(), headers={"X-Request-ID": header})
    assert response.status == 200
    assert HEX32.match(response.headers["X-Request-ID"]), response.headers["X-Request-ID"]
    assert broker.request_ids == [response.headers["X-Request-ID"]]


async def test_errors_carry_the_id_too(gateway):
    client, _ = gateway
    response = await client.post("/generate", json={"prompt": ""})
    assert response.status == 400 and HEX32.match(response.headers["X-Request-ID"])
    response = await client.get("/no-such-route", headers={"X-Request-ID": "abc"})
    assert response.status == 404 and response.headers["X-Request-ID"] == "abc"


async def test_a_client_id_already_in_flight_gets_a_suffix(gateway):
    """The id is the request's key on the broker link: two requests in flight must not share one."""
    import asyncio

    client, broker = gateway
    broker.hold = asyncio.Event()
    first = asyncio.create_task(client.post("/generate", json=generate_body(1), headers={"X-Request-ID": "dup"}))
    while not broker.request_ids:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(client.post("/generate", json=generate_body(2), headers={"X-Request-ID": "dup"}))
    while len(broker.request_ids) < 2:
        await asyncio.sleep(0.01)
    broker.hold.set()
    headers = [(await first).headers["X-Request-ID"], (await second).headers["X-Request-ID"]]
    assert headers[0] == "dup" and re.fullmatch(r"dup-[0-9a-f]{8}", headers[1]), headers
    assert broker.request_ids == headers


def test_the_broker_refuses_an_id_another_gateway_holds_and_ignores_a_resend():
    state = BrokerState(BrokerPolicy(), epoch="e")
    message = Generate("shared-id", GenerationParams("a cat", 64, 64, 2, 7.5, 1, None), 60.0)
    assert state.submit(b"gateway-1", message, now=0.0) == []  # queued: no worker yet
    assert state.submit(b"gateway-1", message, now=0.1) == []  # a resend after a restart: ignored
    [refusal] = state.submit(b"gateway-2", message, now=0.2)
    assert isinstance(refusal, ToClient) and refusal.client_id == b"gateway-2"
    assert isinstance(refusal.message, Failure) and refusal.message.code == "invalid_request"
    assert state.requests["shared-id"].client_id == b"gateway-1"  # the first request is untouched


# --------------------------------------------------------------------------- real processes


def json_lines(path: Path) -> list[dict]:
    """Every line of a service's log, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_one_request_id_in_the_gateway_broker_and_worker_json_logs(tmp_path):
    cluster = Cluster(tmp_path, LOG_FORMAT="json")
    try:
        cluster.start("broker", "broker", LOG_LEVEL="DEBUG")  # the broker logs dispatches at DEBUG
        cluster.start("gateway", "gateway")
        cluster.start_worker(0)
        cluster.wait_for_workers(1)
        request_id = "checkout-42.retry_1"
        request = urllib.request.Request(f"{cluster.url}/generate", data=json.dumps(request_body(1)).encode(),
                                         headers={"Content-Type": "application/json", "X-Request-ID": request_id})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and response.headers["X-Request-ID"] == request_id
    finally:
        cluster.stop()  # stops the processes, so their logs are complete

    logs = {name: json_lines(tmp_path / f"{name}.log") for name in ("gateway", "broker", "worker0")}
    for name, entries in logs.items():
        assert {e["service"] for e in entries} == {"gpu_worker" if name == "worker0" else name}, name
    gateway = [e["message"] for e in logs["gateway"] if e.get("request_id") == request_id]
    assert any("accepted" in m for m in gateway) and any(": 200 ok in" in m for m in gateway), gateway
    broker = [e for e in logs["broker"] if e.get("request_id") == request_id]
    assert any(e["level"] == "DEBUG" and "dispatched to worker worker0" in e["message"] for e in broker), broker
    batches = [e for e in logs["worker0"] if request_id in e.get("request_ids", [])]
    assert len(batches) == 1 and batches[0]["level"] == "INFO", logs["worker0"]
    assert request_id[:8] in batches[0]["message"] and batches[0]["batch_id"].startswith("worker0:")
