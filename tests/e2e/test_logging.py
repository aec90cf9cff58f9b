"""One request id through the gateway, broker and worker logs: real processes (tests/support/cluster.py:
a broker, a gateway and one worker on the FAKE backend, MODEL_ID=fake:...) with LOG_FORMAT=json; a
request carrying X-Request-ID, and that id found in all three logs. The JSON format and the
X-Request-ID handling in one process: tests/integration/test_logging.py."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, request_body

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def json_lines(path: Path) -> list[dict]:
    """Every line of a service's log, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]


@pytest.mark.timeout(120)
def test_one_grep_for_the_clients_id_finds_the_request_in_the_gateway_broker_and_worker_logs(tmp_path):
    cluster = Cluster(tmp_path, LOG_FORMAT="json")
    try:
        cluster.start("broker", "broker", LOG_LEVEL="DEBUG")  # the broker logs dispatches at DEBUG
        cluster.start("gateway", "gateway")
        cluster.start_worker(0, LOG_LEVEL="DEBUG")
        cluster.wait_for_workers(1)
        label = "checkout-42.retry_1"
        request = urllib.request.Request(f"{cluster.url}/generate", data=json.dumps(request_body(1)).encode(),
                                         headers={"Content-Type": "application/json", "X-Request-ID": label})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and response.headers["X-Request-ID"] == label
    finally:
        cluster.stop()  # stops the processes, so their logs are complete

    logs = {name: json_lines(tmp_path / f"{name}.log") for name in ("gateway", "broker", "worker0")}
    for name, entries in logs.items():
        assert {e["service"] for e in entries} == {"gpu_worker" if name == "worker0" else name}, name
    gateway = [e for e in logs["gateway"] if e.get("label") == label]
    assert any("accepted" in e["message"] for e in gateway), gateway
    assert any(": 200 ok in" in e["message"] for e in gateway), gateway
    [request_id] = {e["request_id"] for e in gateway}
    assert HEX32.match(request_id) and request_id != label  # the service's own id routed it
    broker = [e for e in logs["broker"] if e.get("label") == label]
    assert any(e["level"] == "DEBUG" and "dispatched to worker worker0" in e["message"] for e in broker), broker
    assert {e["request_id"] for e in broker} == {request_id}
    batches = [e for e in logs["worker0"] if label in e.get("labels", [])]
    assert len(batches) == 1 and batches[0]["level"] == "INFO", logs["worker0"]
    assert batches[0]["request_ids"] == [request_id] and batches[0]["batch_id"].startswith("worker0:")
    # In every service's log, the label is in the line's text too: a plain grep finds them all.
    for name in ("gateway", "broker", "worker0"):
        assert label in (tmp_path / f"{name}.log").read_text(), name
