"""The job API (gateway/jobs/routes.py, gateway/jobs/runner.py) on aiohttp's test server, with a
fake broker link that reports queue positions and steps (tests/support/fake_job_broker.py) and a
real SQLite job store in the test's folder: submit, status, the event stream and its resumption,
the rate limit, restarts of a row, idempotency, owners, cancel, Prefer: respond-async, webhooks to
a receiver in this process, and a gateway closed and opened again on the same store."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import ApiKeys, GatewaySettings
from gateway.jobs import routes
from gateway.jobs.routes import JOBS
from gateway.jobs.runner import JobRunner
from gateway.jobs.webhooks import Backoff, generate_secret, parse_webhook_secret, verify
from gateway.openapi import openapi_document
from tests.support.clock import Clock
from tests.support.fake_job_broker import JobFakeBroker
from tests.support.polling import until
from tests.support.sse import TERMINAL, SseEvent, read_until_end, sse_events

BODY = {"prompt": "a fox in the snow", "width": 64, "height": 64, "num_inference_steps": 6, "seed": 11}
KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"


def job_settings(tmp_path: Path, **fields: Any) -> GatewaySettings:
    fields.setdefault("progress_event_interval_s", 0.0)
    return GatewaySettings(image_dir=str(tmp_path / "images"), state_dir=str(tmp_path / "state"), **fields)


@pytest.fixture
async def start_gateway():
    """``await start_gateway(settings, broker, configure=None)``: the gateway app on a test server;
    ``configure(runner)`` runs before it starts. Each is closed after the test (if the test did not)."""
    started: list[TestClient] = []

    async def start(settings: GatewaySettings, broker: Any, configure: Callable[[JobRunner], None] | None = None,
                    **server_options: Any) -> TestClient:
        app = create_app(settings, broker_client=broker)
        if configure is not None:
            configure(app[JOBS])
        client = TestClient(TestServer(app, **server_options))
        await client.start_server()
        started.append(client)
        return client

    yield start
    for client in started:
        await client.close()


async def submit(client: TestClient, body: dict | None = None, headers: dict | None = None) -> dict:
    response = await client.post("/v1/jobs", json=body or BODY, headers=headers)
    document = await response.json()
    assert response.status == 202, document
    return document


async def status(client: TestClient, job_id: str, headers: dict | None = None) -> dict:
    response = await client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


async def events_of(client: TestClient, job_id: str, headers: dict | None = None) -> list[SseEvent]:
    response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    return await asyncio.wait_for(read_until_end(response.content), 10)


def progress_steps(events: list[SseEvent]) -> list[int]:
    return [event.data["step"] for event in events if event.type == "progress"]


async def status_is(client: TestClient, job_id: str, wanted: str) -> dict:
    async def check() -> dict | None:
        document = await status(client, job_id)
        return document if document["status"] == wanted else None

    return await until(check, f"job {job_id} {wanted}")


# --------------------------------------------------------------------------- submit, status, events


async def test_a_job_is_answered_at_once_and_its_events_come_in_order(tmp_path, start_gateway):
    fake = JobFakeBroker()
    client = await start_gateway(job_settings(tmp_path), fake)
    response = await client.post("/v1/jobs", json=BODY)
    accepted = await response.json()
    assert response.status == 202 and set(accepted) == {"id", "status", "status_url", "events_url"}
    assert accepted["status"] == "queued"
    assert response.headers["Location"] == accepted["status_url"] == str(client.make_url(f"/v1/jobs/{accepted['id']}"))
    assert accepted["events_url"] == accepted["status_url"] + "/events"

    events = await events_of(client, accepted["id"])
    types = [event.type for event in events]
    assert types[0] == "queued" and types[-1] == "succeeded", types
    assert types.index("started") < types.index("progress") and types.count("started") == 1
    assert [e.data["position"] for e in events if e.type == "queued"][1:] == [2, 1]
    assert progress_steps(events) == [1, 2, 3, 4, 5, 6]  # no rate limit in this test: every step
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert all(event.data["at"].endswith("Z") for event in events)
    # The broker was asked to report (watch) under a service-made id, not the job's.
    request_id = fake.order[0]
    assert fake.requests[request_id].watch and request_id != accepted["id"] and len(request_id) == 32

    document = await status(client, accepted["id"])
    assert document["status"] == "succeeded" and document["attempt"] == 1
    assert document["progress"] == {"step": 6, "steps": 6}
    for stamp in ("created_at", "started_at", "finished_at"):
        assert document[stamp].endswith("Z") and "T" in document[stamp]
    assert document["created_at"] <= document["started_at"] <= document["finished_at"]
    assert document["image_url"] == document["result"]["image_url"] == events[-1].data["image_url"]
    image = await client.get("/images/" + document["image_url"].rsplit("/", 1)[1])
    assert image.status == 200 and (await image.read()).startswith(b"\x89PNG")
    assert document["worker"] == "fake-worker-1" and document["batch_size"] == 3


async def test_a_succeeded_job_holds_what_generate_answers(tmp_path, start_gateway):
    """The job's result has the fields of POST /generate's answer, with the same values for the same request."""
    client = await start_gateway(job_settings(tmp_path), JobFakeBroker())
    generated = await client.post("/generate", json=BODY)
    direct = await generated.json()
    job = await submit(client)
    await events_of(client, job["id"])
    result = (await status(client, job["id"]))["result"]
    assert set(result) == set(direct)
    for name in ("width", "height", "seed", "num_inference_steps", "guidance_scale", "game_id", "worker", "host",
                 "batch_id", "batch_size", "gpu_id", "queue_wait_ms", "generation_ms", "model"):
        assert result[name] == direct[name], name
    assert result["image_id"] != direct["image_id"]


async def test_status_says_where_the_job_is(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)

    request.queued(3, 2.0)
    queued = await until(lambda: _field_is(client, job["id"], "queue_position", 3), "queue position 3")
    assert queued["status"] == "queued" and 0 <= queued["estimated_start_s"] <= 2.0
    assert queued["started_at"] is None and "progress" not in queued

    request.step(0).step(2)
    running = await until(lambda: _field_is(client, job["id"], "progress", {"step": 2, "steps": 6}), "step 2")
    assert running["status"] == "running" and running["started_at"] is not None
    assert "queue_position" not in running and "estimated_start_s" not in running

    request.fail("generation_failed", "CUDA error: out of memory")
    failed = await status_is(client, job["id"], "failed")
    assert failed["error"] == {"code": "generation_failed", "message": "CUDA error: out of memory"}
    assert failed["finished_at"] is not None and "image_url" not in failed
    events = await events_of(client, job["id"])
    assert events[-1].type == "failed" and events[-1].data["error"]["code"] == "generation_failed"


async def _field_is(client: TestClient, job_id: str, name: str, value: Any) -> dict | None:
    document = await status(client, job_id)
    return document if document.get(name) == value else None


async def test_a_restarted_row_says_so_and_counts_its_steps_again(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    request.step(0).step(1).step(2).step(3)
    request.queued(1)  # its worker was lost: back in the queue
    request.step(0, attempt=2).step(1, attempt=2).step(2, attempt=1)  # a late report of attempt 1: ignored
    for step in range(2, 7):
        request.step(step, attempt=2)
    request.succeed()
    events = await events_of(client, job["id"])
    types = [event.type for event in events]
    assert types.count("started") == 1 and types.count("restarted") == 1
    restart = types.index("restarted")
    assert events[restart].data == {"attempt": 2, "at": events[restart].data["at"]}
    assert progress_steps(events[:restart]) == [1, 2, 3]
    assert progress_steps(events[restart:]) == [1, 2, 3, 4, 5, 6]
    assert "queued" in types[types.index("started"):restart]  # requeued between its two attempts
    assert (await status(client, job["id"]))["attempt"] == 2


async def test_a_paused_row_says_so_and_resumes_where_it_stopped(tmp_path, start_gateway):
    """Under BATCH_POLICY=step a row waits, its latents kept, while higher-priority rows run: status
    paused, a paused event at the step it reached, then resumed and its steps go on (no restart)."""
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    request.step(0).step(1).step(2).step(2, paused=True)
    paused = await status_is(client, job["id"], "paused")
    assert paused["progress"] == {"step": 2, "steps": 6} and paused["attempt"] == 1
    assert "worker" in paused and "batch_size" in paused
    request.step(2, paused=True)  # said again (a collected request's last report): one event only
    request.step(3)
    running = await status_is(client, job["id"], "running")
    assert running["progress"] == {"step": 3, "steps": 6}
    request.step(4).step(4, paused=True).step(5).step(6).succeed()
    events = await events_of(client, job["id"])
    types = [event.type for event in events if event.type != "queued"]
    assert types == ["started", "progress", "progress", "paused", "resumed", "progress", "paused", "resumed",
                     "progress", "succeeded"], types
    pauses = [(event.type, event.data["step"]) for event in events if event.type in ("paused", "resumed")]
    assert pauses == [("paused", 2), ("resumed", 3), ("paused", 4), ("resumed", 5)]
    assert (await status(client, job["id"]))["attempt"] == 1


async def test_a_job_whose_first_report_is_paused_starts_then_pauses(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    fake.request(0).step(0, paused=True)
    paused = await status_is(client, job["id"], "paused")
    assert paused["started_at"] is not None and paused["progress"] == {"step": 0, "steps": 6}
    fake.request(0).step(1).step(6).succeed()
    types = [event.type for event in await events_of(client, job["id"]) if event.type != "queued"]
    assert types == ["started", "paused", "resumed", "progress", "succeeded"], types


async def test_a_job_that_asks_for_previews_gets_them_as_events(tmp_path, start_gateway):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    with_previews = await submit(client, {**BODY, "preview": True})
    without = await submit(client, {**BODY, "seed": 12})
    await fake.wait_for_requests(2)
    asked, plain = fake.request(0), fake.request(1)
    assert asked.params.preview and not plain.params.preview  # the worker is asked for them
    for request in (asked, plain):  # (a worker sends none to a request that did not ask)
        request.step(0).step(1).step(2).preview(2, jpeg).step(3).preview(4, jpeg).step(6).succeed()
    events = await events_of(client, with_previews["id"])
    previews = [event for event in events if event.type == "preview"]
    assert [(event.data["step"], event.data["steps"]) for event in previews] == [(2, 6), (4, 6)]
    prefix = "data:image/jpeg;base64,"
    assert all(event.data["image"].startswith(prefix) for event in previews)
    picture = Image.open(io.BytesIO(base64.b64decode(previews[0].data["image"][len(prefix):])))
    assert picture.size == (8, 8)
    assert [event.type for event in events].index("preview") > [event.type for event in events].index("started")
    assert "preview" not in [event.type for event in await events_of(client, without["id"])]


async def test_a_preempted_batch_restarts_under_the_same_attempt(tmp_path, start_gateway):
    """Preemption runs the batch again on the same worker from step 0, under the same attempt number."""
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    for step in (0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6):
        request.step(step)
    request.succeed()
    events = await events_of(client, job["id"])
    types = [event.type for event in events]
    restart = types.index("restarted")
    assert types.count("restarted") == 1 and events[restart].data["attempt"] == 1
    assert progress_steps(events[:restart]) == [1, 2, 3]
    assert progress_steps(events[restart:]) == [1, 2, 3, 4, 5, 6]


async def test_a_stream_resumes_after_last_event_id(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    request.queued(1).step(0).step(1)

    response = await client.get(f"/v1/jobs/{job['id']}/events")
    seen: list[SseEvent] = []
    async for event in sse_events(response.content):
        seen.append(event)
        if event.type == "progress":
            break
    response.close()  # the client goes away mid-job
    last = seen[-1].id

    request.step(2).step(3).step(4).step(5).step(6).succeed()
    await status_is(client, job["id"], "succeeded")
    resumed = await events_of(client, job["id"], headers={"Last-Event-ID": str(last)})
    assert resumed[0].id == last + 1 and resumed[-1].type == "succeeded"
    assert progress_steps(resumed) == [2, 3, 4, 5, 6]
    everything = await events_of(client, job["id"])
    assert [event.id for event in seen + resumed] == [event.id for event in everything]

    by_query = await client.get(f"/v1/jobs/{job['id']}/events?last_event_id={everything[-2].id}")
    assert [event.type for event in await read_until_end(by_query.content)] == ["succeeded"]
    # After the terminal event there is nothing more: the stream ends at once.
    after_end = await events_of(client, job["id"], headers={"Last-Event-ID": str(everything[-1].id)})
    assert after_end == []
    bad = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "seven"})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "Last-Event-ID"


async def test_a_live_stream_gets_events_as_they_happen(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    stream = sse_events(response.content)
    assert (await anext(stream)).type == "queued"
    request.step(0)
    assert (await asyncio.wait_for(anext(stream), 10)).type == "started"
    request.step(1)
    event = await asyncio.wait_for(anext(stream), 10)
    assert (event.type, event.data["step"]) == ("progress", 1)
    request.step(6).succeed()
    rest = [event async for event in stream]
    assert [event.type for event in rest] == ["progress", "succeeded"]


# --------------------------------------------------------------------------- the rate limit


async def test_progress_is_rate_limited_but_the_last_step_and_the_end_are_kept(tmp_path, start_gateway):
    """A clock that stands still: every step after the first comes within the interval."""
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path, progress_event_interval_s=30.0), fake,
                                 configure=lambda runner: setattr(runner, "monotonic", Clock(100.0)))
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    for step in range(7):
        request.step(step)
    request.succeed()
    events = await events_of(client, job["id"])
    assert [event.type for event in events] == ["queued", "started", "progress", "progress", "succeeded"]
    assert progress_steps(events) == [1, 6]


async def test_a_held_back_step_is_written_when_the_interval_ends(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path, progress_event_interval_s=0.05), fake,
                                 configure=lambda runner: setattr(runner, "monotonic", Clock(100.0)))
    job = await submit(client)
    await fake.wait_for_requests(1)
    fake.request(0).step(0).step(1).step(2).step(3)  # 2 and 3 are held; 3 replaces 2
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    stream = sse_events(response.content)
    seen = [await asyncio.wait_for(anext(stream), 10) for _ in range(4)]
    assert [event.type for event in seen] == ["queued", "started", "progress", "progress"]
    assert progress_steps(seen) == [1, 3]
    response.close()


async def test_a_moving_clock_lets_every_step_through(tmp_path, start_gateway):
    ticks = itertools.count(0.0, 1.0)
    fake = JobFakeBroker()
    client = await start_gateway(job_settings(tmp_path, progress_event_interval_s=0.5), fake,
                                 configure=lambda runner: setattr(runner, "monotonic", lambda: next(ticks)))
    job = await submit(client)
    assert progress_steps(await events_of(client, job["id"])) == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- idempotency, owners


async def test_an_idempotency_key_gives_the_same_job_for_the_same_body(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    first = await submit(client, headers={"Idempotency-Key": "order-1"})
    again = await submit(client, headers={"Idempotency-Key": "order-1"})
    assert again["id"] == first["id"]
    await fake.wait_for_requests(1)
    other = await client.post("/v1/jobs", json={**BODY, "seed": 12}, headers={"Idempotency-Key": "order-1"})
    error = await other.json()
    assert other.status == 409 and error["error"]["code"] == "idempotency_conflict"
    assert set(error["error"]) == {"code", "message", "field"} and first["id"] in error["error"]["message"]
    different_key = await submit(client, headers={"Idempotency-Key": "order-2"})
    assert different_key["id"] != first["id"]
    await fake.wait_for_requests(2)
    await asyncio.sleep(0.05)
    assert len(fake.order) == 2  # the repeat started nothing
    bad = await client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "has spaces"})
    assert bad.status == 400


async def test_with_api_keys_a_job_belongs_to_its_key(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path, api_keys=ApiKeys([KEY_A, KEY_B])), fake)
    a, b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    job = await submit(client, headers={**a, "Idempotency-Key": "k"})
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        response = await client.request(method, f"/v1/jobs/{job['id']}{path}", headers=b)
        body = await response.json()
        assert response.status == 404 and body["error"]["code"] == "not_found", (method, path)
    assert (await status(client, job["id"], headers=a))["status"] == "queued"
    # The same idempotency key under another API key is another key: another job.
    other = await submit(client, headers={**b, "Idempotency-Key": "k"})
    assert other["id"] != job["id"]
    # Without a key: 401 in the gateway's error shape (the job API is not the OpenAI one).
    response = await client.get(f"/v1/jobs/{job['id']}")
    body = await response.json()
    assert response.status == 401 and body["error"]["code"] == "unauthorized" and "field" in body["error"]


# --------------------------------------------------------------------------- cancel


async def test_cancelling_a_queued_job(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    fake.request(0).queued(4)
    await until(lambda: _field_is(client, job["id"], "queue_position", 4), "queued at 4")
    response = await client.delete(f"/v1/jobs/{job['id']}")
    document = await response.json()
    assert response.status == 200 and document["status"] == "cancelled" and document["finished_at"]
    assert fake.cancelled == [fake.order[0]]
    assert (await status(client, job["id"]))["status"] == "cancelled"
    events = await events_of(client, job["id"])
    assert events[-1].type == "cancelled"
    again = await client.delete(f"/v1/jobs/{job['id']}")
    assert again.status == 200 and (await again.json())["status"] == "cancelled"  # idempotent


async def test_cancelling_a_running_job_ignores_what_comes_after(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    await fake.wait_for_requests(1)
    request = fake.request(0)
    request.step(0).step(2)
    await until(lambda: _field_is(client, job["id"], "status", "running"), "running")
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    stream = sse_events(response.content)
    cancelled = await client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status == 200 and (await cancelled.json())["status"] == "cancelled"
    rest = [event async for event in stream]
    assert rest[-1].type == "cancelled"
    request.step(3).succeed()  # too late: the job's end is written
    await asyncio.sleep(0.05)
    document = await status(client, job["id"])
    assert document["status"] == "cancelled" and "image_url" not in document
    assert [e.type for e in await events_of(client, job["id"])].count("cancelled") == 1


async def test_a_finished_job_cannot_be_cancelled(tmp_path, start_gateway):
    client = await start_gateway(job_settings(tmp_path), JobFakeBroker())
    job = await submit(client)
    await events_of(client, job["id"])
    response = await client.delete(f"/v1/jobs/{job['id']}")
    body = await response.json()
    assert response.status == 409 and body["error"]["code"] == "job_finished"
    assert (await status(client, job["id"]))["status"] == "succeeded"
    missing = await client.delete("/v1/jobs/no-such-job")
    assert missing.status == 404


# --------------------------------------------------------------------------- Prefer: respond-async


async def test_generate_with_prefer_respond_async_makes_a_job(tmp_path, start_gateway):
    fake = JobFakeBroker()
    client = await start_gateway(job_settings(tmp_path), fake)
    response = await client.post("/generate", json=BODY, headers={"Prefer": "wait=5, respond-async"})
    body = await response.json()
    assert response.status == 202 and response.headers["Preference-Applied"] == "respond-async"
    assert set(body) == {"id", "status", "status_url", "events_url"}
    assert (await events_of(client, body["id"]))[-1].type == "succeeded"
    plain = await client.post("/generate", json=BODY)
    assert plain.status == 200 and "image_url" in await plain.json()  # unchanged without the header


# --------------------------------------------------------------------------- checks of the body


@pytest.mark.parametrize("extra, field", [
    ({"num_steps": 3}, "num_steps"),
    ({"preview": "yes"}, "preview"),
    ({"webhook_events": ["completed"]}, "webhook_events"),
    ({"webhook": "http://example.com/hook"}, "webhook"),  # no WEBHOOK_SECRET on this gateway
    ({"width": 65}, "width"),
])
async def test_a_wrong_body_is_refused_naming_the_field(tmp_path, start_gateway, extra, field):
    fake = JobFakeBroker()
    client = await start_gateway(job_settings(tmp_path), fake)
    response = await client.post("/v1/jobs", json={**BODY, **extra})
    body = await response.json()
    assert response.status == 400 and body["error"]["field"] == field, body
    if field == "num_steps":
        assert "webhook_events" in body["error"]["message"]
    assert fake.order == []


async def test_webhook_urls_are_checked_at_submission(tmp_path, start_gateway):
    settings = job_settings(tmp_path, webhook_secret=parse_webhook_secret(generate_secret()))
    client = await start_gateway(settings, JobFakeBroker())
    for url in ("http://127.0.0.1:9/hook", "ftp://example.com/", "http://10.0.0.1/x"):
        response = await client.post("/v1/jobs", json={**BODY, "webhook": url})
        assert response.status == 400 and (await response.json())["error"]["field"] == "webhook", url
    response = await client.post("/v1/jobs", json={**BODY, "webhook": "http://1.1.1.1/hook",
                                                   "webhook_events": ["nonsense"]})
    assert response.status == 400 and (await response.json())["error"]["field"] == "webhook_events"


async def test_the_job_paths_answer_in_the_gateways_error_shape(tmp_path, start_gateway):
    client = await start_gateway(job_settings(tmp_path), JobFakeBroker())
    response = await client.put("/v1/jobs")
    body = await response.json()
    assert response.status == 405 and set(body["error"]) == {"code", "message", "field"}
    response = await client.get("/v1/jobs/x/y/z")
    assert response.status == 404 and set((await response.json())["error"]) == {"code", "message", "field"}
    response = await client.get("/v1/jobs/unknown")
    body = await response.json()
    assert response.status == 404 and body["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- event streams: bounds, heartbeats


@pytest.mark.parametrize("handler_cancellation", [False, True])  # python -m gateway cancels handlers
async def test_event_streams_are_bounded_and_freed_when_their_clients_leave(tmp_path, start_gateway,
                                                                            handler_cancellation):
    fake = JobFakeBroker(auto=False)
    settings = job_settings(tmp_path, job_event_streams_per_job=1, job_event_streams_max=2)
    client = await start_gateway(settings, fake, handler_cancellation=handler_cancellation)
    runner = client.server.app[JOBS]
    first, second, third = [await submit(client) for _ in range(3)]
    one = await client.get(f"/v1/jobs/{first['id']}/events")
    assert one.status == 200
    refused = await client.get(f"/v1/jobs/{first['id']}/events")
    body = await refused.json()
    assert refused.status == 429 and body["error"]["code"] == "too_many_streams"
    two = await client.get(f"/v1/jobs/{second['id']}/events")
    assert two.status == 200
    full = await client.get(f"/v1/jobs/{third['id']}/events")
    assert full.status == 503 and "Retry-After" in full.headers
    assert runner.hub.count == 2
    one.close()
    two.close()
    await until(lambda: runner.hub.count == 0, "the streams of clients that left closed")
    again = await client.get(f"/v1/jobs/{first['id']}/events")
    assert again.status == 200
    again.close()


async def test_an_idle_stream_gets_heartbeats(tmp_path, start_gateway, monkeypatch):
    monkeypatch.setattr(routes, "HEARTBEAT_S", 0.02)
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    stream = sse_events(response.content, comments=True)
    assert (await anext(stream)).type == "queued"
    beat = await asyncio.wait_for(anext(stream), 10)
    assert beat.comment and beat.type == "heartbeat"
    response.close()


async def test_stopping_the_gateway_ends_its_streams(tmp_path, start_gateway):
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path), fake)
    job = await submit(client)
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    reading = asyncio.ensure_future(read_until_end(response.content))
    await until(lambda: client.server.app[JOBS].hub.count == 1, "the stream open")
    await client.server.close()
    events = await asyncio.wait_for(reading, 10)
    assert [event.type for event in events] == ["queued"]


# --------------------------------------------------------------------------- webhooks


class Receiver:
    """A webhook receiver on 127.0.0.1 that verifies every delivery, and answers 500 to the first."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: list[tuple[dict, bytes, bool]] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.secret, request.headers, body)
            verified = True
        except ValueError:
            verified = False
        self.deliveries.append((dict(request.headers), body, verified))
        return web.Response(status=500 if len(self.deliveries) == 1 else 204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return f"http://127.0.0.1:{self.server.port}/hook"


async def test_a_webhook_gets_signed_events_and_the_retry_of_a_failed_one(tmp_path, start_gateway):
    import json

    secret = generate_secret()
    receiver = Receiver(secret)
    url = await receiver.start()
    try:
        settings = job_settings(tmp_path, webhook_secret=parse_webhook_secret(secret), webhook_allow_private=True)

        def quick(runner: JobRunner) -> None:
            runner.sender_options = {"backoff": Backoff(max_attempts=4, base_s=0.05, jitter=lambda: 1.0),
                                     "poll_interval_s": 0.02}

        client = await start_gateway(settings, JobFakeBroker(), configure=quick)
        job = await submit(client, {**BODY, "webhook": url})
        assert (await status(client, job["id"]))["webhook"] == url

        def delivered() -> set[str]:
            return {json.loads(body)["type"] for headers, body, _ in receiver.deliveries[1:]}

        await until(lambda: delivered() >= {"job.started", "job.succeeded"}, "started and succeeded delivered")
        assert all(verified for _, _, verified in receiver.deliveries)
        first_id = receiver.deliveries[0][0]["webhook-id"]
        retried = [headers for headers, _, _ in receiver.deliveries if headers["webhook-id"] == first_id]
        assert len(retried) == 2  # answered 500, then sent again with the same id
        types = {json.loads(body)["type"] for _, body, _ in receiver.deliveries}
        assert types == {"job.started", "job.succeeded"}  # the default filter: start and completed
        succeeded = next(json.loads(body) for _, body, _ in receiver.deliveries
                         if json.loads(body)["type"] == "job.succeeded")
        assert succeeded["data"]["job_id"] == job["id"] and succeeded["data"]["image_url"].endswith(".png")
    finally:
        await receiver.server.close()


# --------------------------------------------------------------------------- the gateway's restart


async def test_jobs_survive_the_gateway_closing_and_opening_again(tmp_path, start_gateway):
    """The same SQLite file and the same broker: a finished job keeps its status and result; one
    running at the close is collected and finishes; one the broker lost fails saying so; one whose
    request never reached the broker (no report came for it) is sent at the next start."""
    fake = JobFakeBroker(auto=False)
    settings = job_settings(tmp_path)
    first = await start_gateway(settings, fake)
    done = await submit(first)
    await fake.wait_for_requests(1)
    fake.request(0).default_script()
    await events_of(first, done["id"])
    done_before = await status(first, done["id"])

    running = await submit(first)
    await fake.wait_for_requests(2)
    fake.request(1).queued(1).step(0).step(1).step(2)
    await until(lambda: _field_is(first, running["id"], "progress", {"step": 2, "steps": 6}), "step 2")
    lost = await submit(first)
    await fake.wait_for_requests(3)
    fake.request(2).queued(1)
    await until(lambda: _field_is(first, lost["id"], "queue_position", 1), "the broker reported the third")
    unsent = await submit(first)
    await fake.wait_for_requests(4)
    await first.close()
    assert (await asyncio.to_thread(_stored_status, settings, running["id"])) == "running"
    del fake.requests[fake.order[2]]  # the broker restarted meanwhile and forgot this one
    del fake.requests[fake.order[3]]  # as if the gateway had stopped before sending this one
    unsent_request = fake.order[3]
    fake.auto = True  # what is sent from now on runs to its end

    second = await start_gateway(settings, fake)
    assert sorted(fake.collected) == sorted(fake.order[1:4])
    done_after = await status(second, done["id"])

    def without_urls(document: dict) -> dict:  # the test servers' ports differ
        kept = {k: v for k, v in document.items() if not k.endswith("_url")}
        return {**kept, "result": {k: v for k, v in document["result"].items() if k != "image_url"}}

    assert without_urls(done_after) == without_urls(done_before)
    image = await second.get("/images/" + done_after["image_url"].rsplit("/", 1)[1])
    assert image.status == 200

    fake.request(1).step(3).step(6).succeed()
    finished = await status_is(second, running["id"], "succeeded")
    assert finished["progress"] == {"step": 6, "steps": 6} and finished["result"]["seed"] == BODY["seed"]
    events = await events_of(second, running["id"])
    assert progress_steps(events) == [1, 2, 3, 6] and events[-1].type == "succeeded"
    failed = await status_is(second, lost["id"], "failed")
    assert failed["error"]["code"] == "job_lost" and "submit it again" in failed["error"]["message"]
    sent = await status_is(second, unsent["id"], "succeeded")
    assert fake.order[4:] == [unsent_request] and sent["result"]["seed"] == BODY["seed"]


def _stored_status(settings: GatewaySettings, job_id: str) -> str:
    from gateway.jobs.store import open_job_store

    store = open_job_store(settings)
    try:
        return store.load(job_id).status
    finally:
        store.close()


# --------------------------------------------------------------------------- docs/api.md's client


async def test_the_sse_client_in_docs_api_md_follows_a_job_to_its_end(tmp_path, start_gateway):
    from tests.support.paths import REPO

    text = (REPO / "docs" / "api.md").read_text()
    code = next(block for block in text.split("```python\n")[1:] if "async def watch(" in block).split("```")[0]
    namespace: dict[str, Any] = {"__name__": "docs_api_client"}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    fake = JobFakeBroker(auto=False)
    client = await start_gateway(job_settings(tmp_path, api_keys=ApiKeys([KEY_A])), fake)
    job = await submit(client, headers={"Authorization": f"Bearer {KEY_A}"})
    await fake.wait_for_requests(1)
    fake.request(0).step(0).step(1)
    seen: list[tuple[str, dict]] = []
    async for event, data in namespace["watch"](job["events_url"], api_key=KEY_A):
        seen.append((event, data))
        if event == "progress" and data["step"] == 1:
            fake.request(0).step(6).succeed()
    assert [event for event, _ in seen] == ["queued", "started", "progress", "progress", "succeeded"]
    assert seen[-1][1]["image_url"].endswith(".png")


# --------------------------------------------------------------------------- OpenAPI


def test_the_openapi_document_describes_the_job_routes():
    document = openapi_document(GatewaySettings())
    paths = document["paths"]
    assert set(paths["/v1/jobs"]) == {"post"} and set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "text/event-stream" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    request = document["components"]["schemas"]["JobRequest"]
    generate = document["components"]["schemas"]["GenerateRequest"]
    assert set(request["properties"]) == set(generate["properties"]) | {"webhook", "webhook_events", "preview"}
    assert "202" in paths["/generate"]["post"]["responses"]
