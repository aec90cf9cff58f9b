"""Priorities and fair shares through the real gateway and the real broker over ZeroMQ on 127.0.0.1.

The gateway app (aiohttp's test server, API keys on) sends to a real BrokerServer through its real
BrokerClient; the worker is a scripted DEALER socket speaking the real protocol (FakeWorker, a
stand-in: no model) that holds one request at a time and answers only when the test says, so the
order in which the broker hands out queued requests is what the test sees."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio
from aiohttp.test_utils import TestClient, TestServer

from broker.config import BrokerSettings
from broker.server import BrokerServer
from gateway.app import create_app
from gateway.config import ApiKeys, GatewaySettings
from gateway.key_policies import key_name
from imagegen.protocol import Generate
from tests.support.fake_worker import FakeWorker
from tests.support.images import make_png
from tests.support.polling import until
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(60)

URGENT = "urgent-key-0123456789abcdef"
PLAIN = "plain-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"


class PngWorker(FakeWorker):
    """A FakeWorker whose answers are real PNGs of the asked size, so the gateway accepts them."""

    def payload(self, message: Generate) -> bytes:
        return make_png(message.params.width, message.params.height)


def body(prompt: str, priority: str | None = None) -> dict[str, Any]:
    extra = {} if priority is None else {"priority": priority}
    return {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def cluster(tmp_path: Path):
    """``await cluster(**broker_settings)``: (gateway test client, broker server, worker holding one request)."""
    client_port, worker_port = free_port(), free_port()
    made: dict[str, Any] = {}

    async def start(**broker_settings: Any) -> tuple[TestClient, BrokerServer, FakeWorker]:
        settings = BrokerSettings(client_bind=f"tcp://127.0.0.1:{client_port}",
                                  worker_bind=f"tcp://127.0.0.1:{worker_port}", **broker_settings)
        made["stop"] = asyncio.Event()
        made["server"] = BrokerServer(settings)
        made["serve"] = asyncio.create_task(made["server"].serve(made["stop"]))
        made["ctx"] = zmq.asyncio.Context()
        made["worker"] = PngWorker(made["ctx"], f"tcp://127.0.0.1:{worker_port}", "gpu0", capacity=1,
                                   auto_reply=False)
        await made["worker"].start()
        keys = ApiKeys([f"{URGENT} max_priority=high share=2", PLAIN, OTHER])
        gateway = GatewaySettings(image_dir=str(tmp_path / "images"), state_dir=str(tmp_path / "state"),
                                  broker_address=f"tcp://127.0.0.1:{client_port}", api_keys=keys)
        made["client"] = TestClient(TestServer(create_app(gateway)))
        await made["client"].start_server()
        return made["client"], made["server"], made["worker"]

    yield start
    if "client" in made:
        await made["client"].close()
    if "worker" in made:
        await made["worker"].stop()
        made["ctx"].term()
    if "stop" in made:
        made["stop"].set()
        await made["serve"]


def post(client: TestClient, key: str, payload: dict) -> asyncio.Task:
    async def send() -> tuple[int, dict]:
        response = await client.post("/generate", json=payload, headers=bearer(key))
        return response.status, await response.json()
    return asyncio.ensure_future(send())


async def queue_one(client: TestClient, server: BrokerServer, key: str, payload: dict) -> asyncio.Task:
    """POST it, and wait until the broker has queued it (so requests queue in the order sent)."""
    before = len(server.state.queue)
    task = post(client, key, payload)
    await until(lambda: len(server.state.queue) == before + 1, f"{payload['prompt']!r} queued at the broker")
    return task


async def hold_the_worker(client: TestClient, worker: FakeWorker, key: str) -> list[asyncio.Task]:
    """Send "busy" with ``key`` and wait until the worker holds it (its one place is then taken)."""
    tasks = [post(client, key, body("busy"))]
    await until(lambda: len(worker.received) == 1, "the first request at the worker")
    return tasks


async def serve_in_order(worker: FakeWorker, count: int) -> list[str]:
    """Answer the worker's requests one at a time as they come: the prompts, in the order dispatched."""
    for index in range(count):
        await until(lambda: len(worker.received) > index, f"request {index + 1} at the worker")
        await worker.reply(worker.received[index])
    return [message.params.prompt for message in worker.received[:count]]


async def test_a_high_request_queued_behind_normal_ones_is_dispatched_first(cluster):
    client, server, worker = await cluster(high_priority_reserve=0)  # the queue's order under test
    tasks = await hold_the_worker(client, worker, PLAIN)
    tasks += [await queue_one(client, server, PLAIN, body(f"normal {i}")) for i in range(3)]
    tasks.append(await queue_one(client, server, URGENT, body("urgent", "high")))
    order = await serve_in_order(worker, 5)
    assert order == ["busy", "urgent", "normal 0", "normal 1", "normal 2"]
    answers = await asyncio.gather(*tasks)
    assert all(status == 200 for status, _ in answers), answers
    # What the worker got says who it was for and how urgent.
    urgent = next(m for m in worker.received if m.params.prompt == "urgent")
    assert (urgent.priority, urgent.owner, urgent.share) == ("high", key_name(URGENT), 2.0)


async def test_a_high_request_reaches_a_full_worker_through_its_reserved_place(cluster):
    client, server, worker = await cluster()  # BROKER_HIGH_PRIORITY_RESERVE: its default, 2
    tasks = await hold_the_worker(client, worker, PLAIN)
    tasks.append(await queue_one(client, server, PLAIN, body("normal")))  # waits: the one place is held
    tasks.append(post(client, URGENT, body("urgent", "high")))
    await until(lambda: len(worker.received) == 2, "the high request at the worker")
    assert [m.params.prompt for m in worker.received] == ["busy", "urgent"]
    order = await serve_in_order(worker, 3)
    assert order == ["busy", "urgent", "normal"]
    answers = await asyncio.gather(*tasks)
    assert all(status == 200 for status, _ in answers), answers


@pytest.mark.parametrize("aging_s, order", [
    (0.3, ["busy", "low", "normal 0", "normal 1"]),  # aged: the low request goes before later normal ones
    (0.0, ["busy", "normal 0", "normal 1", "low"]),  # no aging: it waits behind them
], ids=["aged", "without-aging"])
async def test_a_low_request_goes_before_later_normal_ones_only_once_it_has_aged(cluster, aging_s, order):
    client, server, worker = await cluster(priority_aging_s=aging_s)
    tasks = await hold_the_worker(client, worker, URGENT)
    tasks.append(await queue_one(client, server, URGENT, body("low", "low")))
    # The low request waits past PRIORITY_AGING_S (no duration is asserted: only the order that follows).
    await asyncio.sleep(0.4)
    tasks += [await queue_one(client, server, URGENT, body(f"normal {i}")) for i in range(2)]
    assert await serve_in_order(worker, 4) == order
    await asyncio.gather(*tasks)


async def test_a_key_cannot_exceed_its_allowed_priority(cluster):
    client, server, worker = await cluster()
    response = await client.post("/generate", json=body("cheeky", "high"), headers=bearer(PLAIN))
    answer = await response.json()
    assert response.status == 403 and answer["error"]["code"] == "priority_not_allowed", answer
    assert "'normal' at most" in answer["error"]["message"]
    assert server.state.counters.requests_received == 0 and not worker.received


async def test_owners_share_the_worker_and_their_gpu_seconds_appear_in_metrics(cluster):
    client, server, worker = await cluster()
    tasks = await hold_the_worker(client, worker, PLAIN)
    tasks += [await queue_one(client, server, PLAIN, body(f"plain {i}")) for i in range(3)]
    tasks += [await queue_one(client, server, OTHER, body(f"other {i}")) for i in range(2)]
    order = await serve_in_order(worker, 6)
    # The other key, below its share, goes before the plain key's older requests.
    assert order == ["busy", "other 0", "plain 0", "other 1", "plain 1", "plain 2"]
    await asyncio.gather(*tasks)
    text = await (await client.get("/metrics", headers=bearer(PLAIN))).text()
    seconds = {owner: float(value) for owner, value in
               re.findall(r'^imagegen_owner_gpu_seconds_total\{owner="([^"]+)"\} (\S+)$', text, re.M)}
    # FakeWorker's results: 10 ms each, batches of one.
    assert seconds == {key_name(PLAIN): pytest.approx(0.04), key_name(OTHER): pytest.approx(0.02),
                       key_name(URGENT): 0.0}
    assert re.search(r'^imagegen_priority_dispatched_total\{priority="normal"\} 6\.0$', text, re.M), text
    stats = await (await client.get("/stats", headers=bearer(PLAIN))).json()
    assert stats["fair_share"]["owners"][key_name(OTHER)]["gpu_seconds"] == pytest.approx(0.02)
    assert stats["priorities"]["normal"]["dispatched"] == 6
