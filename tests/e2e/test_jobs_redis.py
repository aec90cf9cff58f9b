"""Two gateways sharing jobs through a real redis-server (JOB_STORE=redis, tests/support/redis_server.py):
the gateway apps run in this process on aiohttp's test servers, each with its own link to one fake
broker (tests/support/fake_job_broker.py), as two gateways of one cluster would be.

A job submitted to one is seen, followed and cancelled through the other (whose event stream polls
the store, the job not being run there), and a gateway that starts again collects its own jobs,
not the other's."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.jobs.routes import JOBS
from gateway.jobs.store import parse_store_url
from tests.support import polling
from tests.support.fake_job_broker import JobFakeBroker
from tests.support.redis_server import RedisServer
from tests.support.sse import read_until_end, sse_events

BODY = {"prompt": "a heron", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def gateways(tmp_path, redis_server):
    """``await gateways(name, link)``: a gateway app on the shared Redis store, with its own folders."""
    started: list[TestClient] = []

    async def start(name: str, link: JobFakeBroker) -> TestClient:
        settings = GatewaySettings(image_dir=str(tmp_path / "images"), state_dir=str(tmp_path / name),
                                   job_store="redis", job_store_url=parse_store_url(redis_server.url),
                                   progress_event_interval_s=0.0)
        client = TestClient(TestServer(create_app(settings, broker_client=link)))
        await client.start_server()
        started.append(client)
        return client

    yield start
    for client in started:
        await client.close()


def until(check, what: str, timeout_s: float = 20.0):
    return polling.until(check, what, timeout_s)


async def status_of(client: TestClient, job_id: str) -> dict:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200, await response.text()
    return await response.json()


async def test_a_job_submitted_to_one_gateway_is_followed_through_another(gateways):
    broker = JobFakeBroker(auto=False, gateway_id="gw-a")
    a = await gateways("a", broker)
    b = await gateways("b", broker.for_gateway("gw-b"))
    accepted = await (await a.post("/v1/jobs", json=BODY)).json()
    await broker.wait_for_requests(1)
    assert not b.server.app[JOBS].runs_here(accepted["id"])
    response = await b.get(f"/v1/jobs/{accepted['id']}/events")
    stream = sse_events(response.content)
    assert (await asyncio.wait_for(anext(stream), 10)).type == "queued"
    broker.request(0).step(0).step(1)
    seen = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
    assert [event.type for event in seen] == ["started", "progress"]
    broker.request(0).step(4).succeed()
    rest = await asyncio.wait_for(read_until_end(response.content), 10)
    assert [event.type for event in rest] == ["progress", "succeeded"]
    on_b = await status_of(b, accepted["id"])
    assert on_b["status"] == "succeeded" and on_b["image_url"].startswith(str(b.make_url("")).rstrip("/"))


async def test_another_gateway_cancels_a_running_job(gateways):
    broker = JobFakeBroker(auto=False, gateway_id="gw-a")
    a = await gateways("a", broker)
    b = await gateways("b", broker.for_gateway("gw-b"))
    accepted = await (await a.post("/v1/jobs", json=BODY)).json()
    await broker.wait_for_requests(1)
    broker.request(0).step(0).step(1)
    await until(lambda: _status_is(a, accepted["id"], "running"), "running")
    listening = await a.get(f"/v1/jobs/{accepted['id']}/events")
    response = await b.delete(f"/v1/jobs/{accepted['id']}")
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    assert broker.cancelled == [broker.order[0]]  # the broker was told, by gateway b
    events = await asyncio.wait_for(read_until_end(listening.content), 10)
    assert events[-1].type == "cancelled"  # gateway a's stream ends too
    await until(lambda: not a.server.app[JOBS].runs_here(accepted["id"]), "gateway a let the job go")
    assert (await status_of(a, accepted["id"]))["status"] == "cancelled"


async def _status_is(client: TestClient, job_id: str, status: str) -> bool:
    return (await status_of(client, job_id))["status"] == status


async def test_a_gateway_starting_again_collects_its_own_jobs_only(gateways):
    broker = JobFakeBroker(auto=False, gateway_id="gw-a")
    a = await gateways("a", broker)
    link_b = broker.for_gateway("gw-b")
    b = await gateways("b", link_b)
    on_a = await (await a.post("/v1/jobs", json=BODY)).json()
    on_b = await (await b.post("/v1/jobs", json={**BODY, "seed": 6})).json()
    await broker.wait_for_requests(2)
    await b.close()
    again = await gateways("b-again", broker.for_gateway("gw-b"))
    request_of = {on_a["id"]: broker.order[0], on_b["id"]: broker.order[1]}
    await until(lambda: broker.collected, "gateway b collected its job")
    assert broker.collected == [request_of[on_b["id"]]]
    broker.request(1).step(0).step(4).succeed()
    await until(lambda: _status_is(again, on_b["id"], "succeeded"), "b's job succeeded")
    assert (await status_of(again, on_a["id"]))["status"] == "queued"  # still a's, untouched
    assert not again.server.app[JOBS].runs_here(on_a["id"])
