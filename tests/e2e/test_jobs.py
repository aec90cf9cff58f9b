"""The job API with real processes: a broker, a gateway and a worker of the FAKE backend with a
per-step delay (MODEL_ID=fake:step_delay=0.1: the serving layer is under test, and the worker
reports each row's steps as it goes), spoken to over HTTP as a client would.

* progress events of rows batched together: each job its own, steps increasing, then succeeded;
* preview events of a job that asked for them, each a picture (JPEG) of its latents;
* cancel of a running job: the worker stops its batch at the next step and serves the request
  queued behind it;
* the gateway killed (SIGKILL) while jobs run, then started again on the same STATE_DIR: the jobs
  finish, one whose answer came while the gateway was away included, and a job that had finished
  keeps its status and result.

No test asserts a duration: each waits (timeouts at least 10x what a step takes) for what must
happen, in order.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.support.cluster import Cluster, call
from tests.support.procs import get_json, wait_until_ready

pytestmark = pytest.mark.timeout(240)

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def cluster(make_cluster):
    """``cluster(**settings)``: a started broker, gateway and worker taking requests of up to 1000 steps,
    with every progress step recorded (PROGRESS_EVENT_INTERVAL_S=0)."""
    def start(**settings: str) -> Cluster:
        return make_cluster(**{"MODEL_ID": "fake:step_delay=0.1", "MAX_INFERENCE_STEPS": "1000",
                               "MAX_BATCH_WAIT_TIME": "0.2", "PROGRESS_EVENT_INTERVAL_S": "0",
                               **settings}).start_all(1, timeout_s=120)

    return start


def body(seed: int, steps: int, size: int = 64) -> dict:
    return {"prompt": f"job {seed}", "width": size, "height": size, "num_inference_steps": steps, "seed": seed}


def submit(c: Cluster, job_body: dict) -> dict:
    status, answer, headers = call(c.url, "/v1/jobs", job_body)
    assert status == 202, (answer, c.logs())
    return answer


def job(c: Cluster, job_id: str) -> dict:
    status, document = get_json(f"{c.url}/v1/jobs/{job_id}")
    assert status == 200, document
    return document


def delete(c: Cluster, job_id: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{c.url}/v1/jobs/{job_id}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for_job(c: Cluster, job_id: str, predicate, what: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            document = job(c, job_id)
            if predicate(document):
                return document
        except (OSError, AssertionError, ValueError):
            pass  # the gateway is restarting
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never {what} within {timeout_s}s\n{c.logs()}")


def read_events(events_url: str, timeout_s: float = 60, headers: dict | None = None) -> list[tuple[int, str, dict]]:
    """Every event of a job's stream, until the stream ends: (id, type, data)."""
    request = urllib.request.Request(events_url, headers=headers or {})
    events: list[tuple[int, str, dict]] = []
    fields: dict[str, str] = {}
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if "event" in fields:
                    events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


def wait_for_worker_log(c: Cluster, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in (c.dir / "worker0.log").read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"worker0 never logged {text!r} within {timeout_s}s\n{c.logs()}")


def in_background(function, *args, **kwargs) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def steps_between_restarts(events: list[tuple[int, str, dict]]) -> list[list[int]]:
    """The progress steps of each attempt (a restarted event starts a new list)."""
    runs: list[list[int]] = [[]]
    for _, kind, data in events:
        if kind == "restarted":
            runs.append([])
        elif kind == "progress":
            runs[-1].append(data["step"])
    return runs


def test_rows_batched_together_each_get_their_own_progress(cluster):
    c = cluster()
    jobs = [submit(c, body(seed, steps=30)) for seed in range(3)]
    readers = [in_background(read_events, accepted["events_url"]) for accepted in jobs]
    for reader in readers:
        reader["thread"].join(90)
    for accepted, reader in zip(jobs, readers):
        events = reader.get("result")
        assert events is not None, (reader, c.logs())
        kinds = [kind for _, kind, _ in events]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
        assert kinds.count("started") == 1 and kinds.index("started") < kinds.index("progress"), kinds
        assert [event_id for event_id, _, _ in events] == sorted(event_id for event_id, _, _ in events)
        for steps in steps_between_restarts(events):
            assert steps == sorted(set(steps)), steps  # increasing: every row its own steps
        assert len([k for k in kinds if k == "progress"]) >= 2, kinds  # 3 s of steps, reported every 0.5 s
        assert all(data.get("steps", 30) == 30 for _, kind, data in events if kind == "progress")
        document = job(c, accepted["id"])
        assert document["status"] == "succeeded" and document["progress"] == {"step": 30, "steps": 30}
        assert document["result"]["seed"] == int(events[-1][2]["seed"]) and document["worker"] == "worker0"
        with urllib.request.urlopen(document["image_url"], timeout=10) as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    batch_sizes = {job(c, accepted["id"])["batch_size"] for accepted in jobs}
    assert max(batch_sizes) >= 2, batch_sizes  # submitted together: batched together


def test_a_job_with_previews_streams_pictures_of_its_latents(cluster):
    import base64
    import io

    from PIL import Image

    c = cluster()
    accepted = submit(c, {**body(7, steps=20), "preview": True})
    plain = submit(c, body(8, steps=20))
    events = read_events(accepted["events_url"])
    previews = [data for _, kind, data in events if kind == "preview"]
    assert [data["step"] for data in previews] == [5, 10, 15], (events, c.logs())  # PREVIEW_EVERY_STEPS=5
    for data in previews:
        jpeg = base64.b64decode(data["image"].removeprefix("data:image/jpeg;base64,"))
        assert Image.open(io.BytesIO(jpeg)).size == (8, 8)  # 1/8 of the image's side
    assert events[-1][1] == "succeeded"
    assert "preview" not in [kind for _, kind, _ in read_events(plain["events_url"])]


def test_cancelling_a_running_job_frees_the_worker_at_the_next_step(cluster):
    c = cluster()
    slow = submit(c, body(1, steps=600))  # a minute of steps
    wait_for_job(c, slow["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1, "running")
    behind = submit(c, body(2, steps=2, size=72))  # another size: not batched with it, waits behind it
    status, cancelled = delete(c, slow["id"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    events = read_events(slow["events_url"])
    assert events[-1][1] == "cancelled"
    done = wait_for_job(c, behind["id"], lambda d: d["status"] in TERMINAL, "finished", timeout_s=50)
    assert done["status"] == "succeeded", (done, c.logs())
    log = (c.dir / "worker0.log").read_text(errors="replace")
    assert "no request in it is wanted any more" in log, c.logs()
    assert job(c, slow["id"])["status"] == "cancelled"
    assert delete(c, slow["id"])[0] == 200  # idempotent
    assert delete(c, behind["id"])[0] == 409  # finished: nothing to cancel


def test_a_gateway_killed_and_started_again_finishes_its_jobs(cluster):
    c = cluster()
    finished = submit(c, body(1, steps=2))
    before = wait_for_job(c, finished["id"], lambda d: d["status"] == "succeeded", "succeeded")

    long = submit(c, body(2, steps=60, size=72))  # 6 s of steps
    wait_for_job(c, long["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1, "running")
    short = submit(c, body(3, steps=5, size=80))  # queued behind it: ends while the gateway is away
    # The broker has it (it reported its place in the queue) before the gateway dies.
    wait_for_job(c, short["id"], lambda d: d.get("queue_position") is not None, "queued at the broker")
    c.signal("gateway", signal.SIGKILL)
    c.processes["gateway"].wait(10)
    # The short job's batch ends while no gateway is there: its answer waits at the broker.
    wait_for_worker_log(c, "x 80x80, 5 steps in", timeout_s=60)
    c.start("gateway", "gateway")
    wait_until_ready(f"{c.url}/readyz", 60, c.logs)

    done_long = wait_for_job(c, long["id"], lambda d: d["status"] in TERMINAL, "finished", timeout_s=90)
    assert done_long["status"] == "succeeded", (done_long, c.logs())
    assert done_long["progress"] == {"step": 60, "steps": 60} and done_long["result"]["seed"] == 2
    done_short = wait_for_job(c, short["id"], lambda d: d["status"] in TERMINAL, "finished", timeout_s=60)
    assert done_short["status"] == "succeeded", (done_short, c.logs())
    events = read_events(long["events_url"])
    assert events[-1][1] == "succeeded"
    for steps in steps_between_restarts(events):
        assert steps == sorted(set(steps)), steps
    after = job(c, finished["id"])
    assert after == before  # status and result intact (same host and port: the same URLs)
    with urllib.request.urlopen(after["image_url"], timeout=10) as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
