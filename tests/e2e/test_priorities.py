"""Priorities and fair shares with real processes: a broker, a gateway with API keys from a keys file
(one key allowed high priority), and one CPU worker on the fake backend that holds one request at a
time (WORKER_MAX_IN_FLIGHT=1, MAX_BATCH_SIZE=1), so requests wait in the broker's queue and the
worker's batch numbers (batch_id "worker0:N") tell the order in which the broker handed them out."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.key_policies import key_name
from tests.support.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

URGENT = "urgent-key-0123456789abcdef"
PLAIN = "plain-key-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(make_module_cluster, tmp_path_factory) -> Cluster:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# test keys\n{URGENT} max_priority=high share=2\n{PLAIN}\n")
    c = make_module_cluster(GATEWAY_API_KEYS_FILE=str(keys), PRIORITY_AGING_S="2", WORKER_WARMUP="false",
                            MODEL_ID="fake:delay=0.4", WORKER_MAX_IN_FLIGHT="1", MAX_BATCH_SIZE="1",
                            MAX_BATCH_WAIT_TIME="0")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    wait_for(c, lambda s: s.get("num_gpus") == 1, "the worker registered")
    return c


def call(cluster: Cluster, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{cluster.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read().decode()
            return response.status, (json.loads(raw) if path != "/metrics" else raw)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def stats(cluster: Cluster) -> dict:
    status, body = call(cluster, "GET", "/stats", PLAIN)
    assert status == 200, body
    return body


def wait_for(cluster: Cluster, predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate(stats(cluster)):
                return
        except (OSError, AssertionError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")


def body(prompt: str, priority: str | None = None) -> dict:
    extra = {} if priority is None else {"priority": priority}
    return {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1, **extra}


def batch_number(answer: dict) -> int:
    return int(answer["batch_id"].rsplit(":", 1)[1])


def queued(s: dict) -> int:
    return s["broker"]["queue_depth"]


def test_a_high_request_queued_behind_normal_ones_is_dispatched_first(cluster):
    with ThreadPoolExecutor(max_workers=5) as pool:
        busy = pool.submit(call, cluster, "POST", "/generate", PLAIN, body("busy"))
        wait_for(cluster, lambda s: s["broker"]["in_progress"] == 1 and not queued(s), "the first request running")
        normal = [pool.submit(call, cluster, "POST", "/generate", PLAIN, body(f"normal {i}")) for i in range(3)]
        wait_for(cluster, lambda s: queued(s) == 3, "three normal requests queued at the broker")
        urgent = pool.submit(call, cluster, "POST", "/generate", URGENT, body("urgent", "high"))
        answers = {"busy": busy.result(), "urgent": urgent.result(),
                   **{f"normal {i}": future.result() for i, future in enumerate(normal)}}
    assert all(status == 200 for status, _ in answers.values()), (answers, cluster.logs())
    order = sorted(answers, key=lambda name: batch_number(answers[name][1]))
    # The normal ones were sent at once from threads: their own order is the broker's arrival order.
    assert order[:2] == ["busy", "urgent"] and sorted(order[2:]) == ["normal 0", "normal 1", "normal 2"], answers


def test_a_low_request_is_not_starved(cluster):
    with ThreadPoolExecutor(max_workers=10) as pool:
        busy = pool.submit(call, cluster, "POST", "/generate", URGENT, body("busy"))
        wait_for(cluster, lambda s: s["broker"]["in_progress"] == 1 and not queued(s), "the first request running")
        low = pool.submit(call, cluster, "POST", "/generate", URGENT, body("low", "low"))
        wait_for(cluster, lambda s: queued(s) == 1, "the low request queued")
        # Normal requests come faster than the worker serves them (each runs 0.4 s), so without aging
        # the low one would go last; it gains a class every PRIORITY_AGING_S=2 and then goes before
        # the normal ones, all of which came after it.
        normal = []
        for i in range(8):
            normal.append(pool.submit(call, cluster, "POST", "/generate", URGENT, body(f"normal {i}")))
            time.sleep(0.2)
        answers = {"busy": busy.result(), "low": low.result(),
                   **{f"normal {i}": future.result() for i, future in enumerate(normal)}}
    assert all(status == 200 for status, _ in answers.values()), (answers, cluster.logs())
    order = sorted(answers, key=lambda name: batch_number(answers[name][1]))
    assert order.index("low") < len(order) - 1, order  # it did not wait for every normal request
    assert stats(cluster)["priorities"]["low"]["dispatched"] == 1


def test_a_key_cannot_exceed_its_allowed_priority(cluster):
    status, answer = call(cluster, "POST", "/generate", PLAIN, body("cheeky", "high"))
    assert status == 403 and answer["error"]["code"] == "priority_not_allowed", answer
    assert "'normal' at most" in answer["error"]["message"]
    status, answer = call(cluster, "POST", "/v1/jobs", PLAIN, body("cheeky job", "high"))
    assert status == 403 and answer["error"]["code"] == "priority_not_allowed", answer
    status, answer = call(cluster, "POST", "/generate", PLAIN, body("bad", "urgent"))
    assert status == 400 and answer["error"]["field"] == "priority", answer


def test_a_job_shows_its_priority(cluster):
    status, accepted = call(cluster, "POST", "/v1/jobs", URGENT, body("a job", "high"))
    assert status == 202, accepted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, job = call(cluster, "GET", f"/v1/jobs/{accepted['id']}", URGENT)
        if job["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded" and job["priority"] == "high", job


def test_owners_gpu_seconds_appear_in_metrics_and_stats(cluster):
    status, answer = call(cluster, "POST", "/generate", PLAIN, body("counted"))
    assert status == 200, answer
    status, text = call(cluster, "GET", "/metrics", PLAIN)
    assert status == 200
    seconds = dict(re.findall(r'^imagegen_owner_gpu_seconds_total\{owner="([^"]+)"\} (\S+)$', text, re.M))
    assert set(seconds) == {key_name(URGENT), key_name(PLAIN)}, text
    assert float(seconds[key_name(PLAIN)]) > 0 and float(seconds[key_name(URGENT)]) > 0
    assert re.search(r'^imagegen_priority_requests_total\{priority="high"\} [1-9]', text, re.M), text
    owners = stats(cluster)["fair_share"]["owners"]
    assert owners[key_name(URGENT)]["share"] == 2.0 and owners[key_name(PLAIN)]["gpu_seconds"] > 0
