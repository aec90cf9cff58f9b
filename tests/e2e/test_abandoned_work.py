"""Abandoned work, admission and honest 504s with real processes (broker, gateway, workers).

The serving-layer tests run the FAKE backend with a per-step delay (gpu_worker/model/fake_backend.py:
``step_delay``, each step preceded by the worker's stop check, as in the real denoising loop): what
is under test is when the worker stops, not the images. The image-identity test and the CPU-default
admission test run the real tiny random-weight pipeline (MODEL_ID=tiny).

No test asserts a duration: each asserts an order (a request queued behind the abandoned one is
served; the worker's log names the stopped batch) with timeouts at least 10x what the step takes.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.support.cluster import Cluster, call


@pytest.fixture
def cluster(make_cluster):
    """``cluster(workers=1, **settings)``: a started cluster that takes requests of up to 1000 steps."""
    def start(workers: int = 1, **settings: str) -> Cluster:
        return make_cluster(**{"MAX_INFERENCE_STEPS": "1000", **settings}).start_all(workers, timeout_s=120)

    return start


def body(seed: int, size: int = 64, steps: int = 2) -> dict:
    return {"prompt": f"request {seed}", "width": size, "height": size, "num_inference_steps": steps, "seed": seed}


def in_background(function, *args, **kwargs) -> dict:
    """Run ``function`` in a thread; the returned dict gets "result" or "error" when it ends."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def worker_log(c: Cluster, index: int = 0) -> str:
    return (c.dir / f"worker{index}.log").read_text(errors="replace")


def wait_for_log(c: Cluster, text: str, timeout_s: float, index: int = 0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in worker_log(c, index):
            return
        time.sleep(0.05)
    raise AssertionError(f"worker{index} never logged {text!r} within {timeout_s}s\n{c.logs()}")


# A slow request: 600 steps of 0.1 s (a minute); one step is 0.1 s, every timeout below is >= 10x that.
SLOW = body(1, steps=600)
FAKE_SLOW_STEPS = "fake:step_delay=0.1"


@pytest.mark.timeout(180)
def test_a_client_that_disconnects_frees_the_worker_at_the_next_step(cluster):
    c = cluster(MODEL_ID=FAKE_SLOW_STEPS)
    slow = in_background(call, c.url, "/generate", SLOW, timeout_s=2.0)  # the client gives up after 2 s
    time.sleep(0.5)
    queued = in_background(call, c.url, "/generate", body(2), timeout_s=50)  # queued behind it at the worker
    slow["thread"].join(30)
    assert isinstance(slow.get("error"), OSError), slow  # the client went away
    queued["thread"].join(55)
    status, answer, _ = queued["result"]
    assert status == 200, (answer, c.logs())
    log = worker_log(c)
    assert "no request in it is wanted any more" in log and "cancelled while its batch runs" in log, log
    stats = c.stats()
    assert stats["broker"]["cancelled"] >= 1 and stats["worker"]["stopped_batches"] >= 1, stats


@pytest.mark.timeout(180)
def test_a_late_request_is_answered_by_the_broker_saying_where_it_was_and_the_worker_is_freed(cluster):
    c = cluster(MODEL_ID=FAKE_SLOW_STEPS, REQUEST_TIMEOUT_S="3")
    slow = in_background(call, c.url, "/generate", SLOW, timeout_s=60)
    time.sleep(0.5)
    queued = in_background(call, c.url, "/generate", body(2, size=72), timeout_s=60)  # another key: not batched
    slow["thread"].join(60)
    queued["thread"].join(60)
    status, answer, _ = slow["result"]
    assert status == 504 and answer["error"]["code"] == "deadline_exceeded", answer
    assert "being generated on worker worker0 (step " in answer["error"]["message"], answer
    # Queued behind it at the worker, with a deadline 0.5 s later: served once the late one stopped.
    status, answer, _ = queued["result"]
    assert status == 200, (answer, c.logs())
    assert "no request in it is wanted any more" in worker_log(c), c.logs()


@pytest.mark.timeout(120)
def test_sigterm_during_an_abandoned_batch_exits_promptly(cluster):
    c = cluster(MODEL_ID=FAKE_SLOW_STEPS)
    slow = in_background(call, c.url, "/generate", SLOW, timeout_s=1.5)
    slow["thread"].join(30)
    assert isinstance(slow.get("error"), OSError), slow
    c.signal("worker0", signal.SIGTERM)
    worker = c.processes["worker0"]
    try:
        worker.wait(timeout=20)  # the batch alone would run a minute more; a step is 0.1 s
    except Exception:
        raise AssertionError(f"the worker did not exit within 20 s of SIGTERM\n{c.logs()}") from None
    assert worker.returncode == 0, c.logs()


@pytest.mark.timeout(180)
def test_requests_that_cannot_finish_in_time_are_refused_at_once(cluster):
    c = cluster(MODEL_ID="fake:step_delay=0.5", REQUEST_TIMEOUT_S="5", GATEWAY_MAX_PENDING="1000")
    status, answer, _ = call(c.url, "/generate", body(1))  # 2 steps, 1 s: the broker learns the cost
    assert status == 200, answer
    status, answer, _ = call(c.url, "/generate", body(2, size=2048, steps=150), timeout_s=4)
    assert status == 400 and answer["error"]["code"] == "too_costly", answer
    assert "REQUEST_TIMEOUT_S" in answer["error"]["message"] and "fewer steps" in answer["error"]["message"]
    status, answer, _ = call(c.url, "/v1/images/generations",
                             {"prompt": "x", "n": 10, "size": "2048x2048", "num_inference_steps": 150}, timeout_s=4)
    assert status == 400 and answer["error"]["code"] == "too_costly", answer
    # 8 steps (4 s) fit a 5 s deadline alone, not behind two or three others.
    calls = [in_background(call, c.url, "/generate", body(10 + i, steps=8), timeout_s=60) for i in range(8)]
    for outcome in calls:
        outcome["thread"].join(60)
    answers = [outcome["result"] for outcome in calls]
    busy = [(a, h) for s, a, h in answers if s == 503]
    assert busy, answers
    for answer, headers in busy:
        assert answer["error"]["code"] == "overloaded" and "queued ahead" in answer["error"]["message"], answer
        assert int(headers["Retry-After"]) >= 1
    assert not [a for s, a, _ in answers if s == 400], answers  # a small request is never too costly


# ------------------------------------------------------------------ the real tiny pipeline


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def open_request(url: str, path: str, payload: dict) -> socket.socket:
    """Send a POST and leave its answer unread: the test closes the socket to play a client that goes away."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.timeout(300)
def test_tiny_cpu_default_refuses_a_huge_request_at_once(cluster):
    c = cluster(MODEL_ID="tiny", REQUEST_TIMEOUT_S="30")
    # The worker measured its cost at warm-up: a 2048x2048, 150-step request is refused before it runs
    # (too_costly comes only from admission; a run would end in 200 or in a timeout). The client's
    # limits are generous: a loaded 2-core machine answered the first call after more than 10 s.
    status, answer, _ = call(c.url, "/generate", body(9, size=2048, steps=150), timeout_s=120)
    assert status == 400 and answer["error"]["code"] == "too_costly", answer
    status, answer, _ = call(c.url, "/v1/images/generations",
                             {"prompt": "x", "n": 10, "size": "2048x2048", "num_inference_steps": 150}, timeout_s=120)
    assert status == 400 and answer["error"]["code"] == "too_costly", answer
    assert "REQUEST_TIMEOUT_S" in answer["error"]["message"]
    status, answer, _ = call(c.url, "/generate", body(1), timeout_s=300)  # a small request is served
    assert status == 200, answer


@pytest.mark.timeout(400)
def test_the_wanted_row_of_a_half_abandoned_batch_restarts_alone_with_its_solo_image(cluster):
    # No warm-up, so no measured cost: admission refuses nothing (the machine's load does not matter).
    c = cluster(MODEL_ID="tiny", WORKER_WARMUP="0", BATCH_POLICY="window", MAX_BATCH_SIZE="2", MIN_BATCH_SIZE="2",
                MAX_BATCH_WAIT_TIME="5")
    wanted = body(5, steps=150)
    gone = open_request(c.url, "/generate", body(4, steps=150))
    try:
        kept = in_background(call, c.url, "/generate", wanted, timeout_s=300)
        # The two form one batch (MIN_BATCH_SIZE=2); as soon as it runs, one client goes away.
        c.wait_for(lambda s: s["worker"]["running"] == 2, 60, "the batch of two to start")
    finally:
        gone.close()
    kept["thread"].join(300)
    status, first, _ = kept["result"]
    assert status == 200, (first, c.logs())
    assert "restart without the others" in worker_log(c), c.logs()
    assert first["batch_size"] == 1
    # Its image is the one it gets alone.
    status, solo, _ = call(c.url, "/generate", wanted, timeout_s=300)
    assert status == 200, solo
    assert fetch(first["image_url"]) == fetch(solo["image_url"])
