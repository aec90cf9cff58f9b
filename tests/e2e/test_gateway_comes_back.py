"""Requests outlive the gateway that sent them, with real processes: a broker and a worker of the FAKE
backend with a per-step delay (MODEL_ID=fake:step_delay=0.2, so a 10-step request takes 2 s and
reports progress as it goes), and the gateway's real broker link (BrokerClient) in this process,
closed and opened again as a gateway restart would; and a real gateway process keeping its identity
in STATE_DIR.

No test asserts a duration: each waits (with generous timeouts) for what must happen, in order.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from gateway.broker_client import BrokerClient
from gateway.identity import GATEWAY_ID_FILE
from imagegen.protocol import GenerationParams, Progress, Queued
from tests.support import polling
from tests.support.procs import free_port, get_json, wait_until_ready

pytestmark = pytest.mark.timeout(180)

STEPS = 10


def params(seed: int, steps: int = STEPS) -> GenerationParams:
    return GenerationParams(prompt=f"request {seed}", width=64, height=64, num_inference_steps=steps,
                            guidance_scale=7.5, seed=seed)


@pytest.fixture
def cluster(make_cluster):
    """A broker and one worker (no gateway process): the test speaks to the broker itself."""
    c = make_cluster(MODEL_ID="fake:step_delay=0.2", MAX_BATCH_WAIT_TIME="0.01")
    c.start("broker", "broker")
    c.start_worker(0)
    return c


async def link(cluster, identity: bytes | None) -> BrokerClient:
    client = BrokerClient(cluster.env["BROKER_CLIENT_ADDRESS"], identity=identity)
    await client.start()
    return client


def until(predicate, what: str, cluster, timeout_s: float = 60.0):
    """Wait until ``predicate()`` (a plain function, or a coroutine function) holds, or fail with the logs."""
    return polling.until(predicate, what, timeout_s, describe_failure=cluster.logs)


async def stats(client: BrokerClient) -> dict:
    try:
        return await client.stats(5.0)
    except asyncio.TimeoutError:
        return {}


def progressed(events: list, step: int = 1) -> bool:
    return any(isinstance(e, Progress) and e.step >= step for e in events)


async def test_a_gateway_back_under_its_identity_collects_what_finished_while_it_was_away(cluster):
    observer = await link(cluster, None)
    try:
        await until(lambda: observer.broker.workers == 1, "the worker to register", cluster)
        gateway = await link(cluster, b"gateway-g")
        events: list = []
        waiting = asyncio.create_task(gateway.generate("job-1", params(1), 120, on_event=events.append, watch=True))
        await until(lambda: progressed(events), "the request to start", cluster)
        await gateway.close()  # the gateway goes away while its request runs
        with pytest.raises(asyncio.CancelledError):
            await waiting
        progress = [e for e in events if isinstance(e, Progress)]
        steps = [e.step for e in progress]
        assert steps == sorted(steps) and len(set(steps)) == len(steps) and {e.attempt for e in progress} == {1}
        assert all(e.steps == STEPS and e.worker_name == "worker0" and e.batch_size == 1 for e in progress)

        async def kept() -> bool:
            return (await stats(observer)).get("broker", {}).get("unclaimed_results") == 1
        await until(kept, "the broker to keep the finished request's image", cluster)
        back = await link(cluster, b"gateway-g")  # restarted: the same identity
        try:
            result, png = await back.collect("job-1", 30)
        finally:
            await back.close()
        assert result.request_id == "job-1" and png.startswith(b"\x89PNG")
        broker = (await stats(observer))["broker"]
        assert broker["unclaimed_results"] == 0 and broker["unclaimed_claimed"] == 1
    finally:
        await observer.close()


async def test_another_gateway_collects_a_running_request_and_a_third_cancels_one(cluster):
    a = await link(cluster, b"gateway-a")
    b = await link(cluster, b"gateway-b")
    c = await link(cluster, b"gateway-c")
    try:
        await until(lambda: a.broker.workers == 1, "the worker to register", cluster)
        first_events: list = []
        sent = asyncio.create_task(a.generate("job-1", params(1), 120, on_event=first_events.append,
                                              cancel_on_exit=False))
        await until(lambda: progressed(first_events, 0), "the request to start", cluster)
        events: list = []
        collected = asyncio.create_task(b.collect("job-1", 120, on_event=events.append))
        await until(lambda: progressed(events, 2), "progress at the collecting gateway", cluster)
        result, png = await collected
        assert png.startswith(b"\x89PNG") and not sent.done()  # the answer went to the collector
        sent.cancel()
        steps = [e.step for e in events if isinstance(e, Progress)]
        assert steps == sorted(steps) and steps[-1] >= 2
        assert all(isinstance(e, (Progress, Queued)) for e in events)

        # 1000 steps: 200 s of work. The request sent after the cancel waits 60 s at most, so it is
        # served only if the worker stopped the long one's batch.
        sender_events: list = []
        doomed = asyncio.create_task(a.generate("job-2", params(2, steps=1000), 300, on_event=sender_events.append))
        await until(lambda: progressed(sender_events, 0), "the long request to start", cluster)
        started: list = []
        watching = asyncio.create_task(b.collect("job-2", 300, on_event=started.append))
        await until(lambda: started, "the collector to hear where the long request is", cluster)
        c.cancel("job-2")  # from a third gateway: the worker drops it at its next step

        async def cancel_heard() -> bool:
            return (await stats(c)).get("broker", {}).get("cancelled") == 1
        # The cancel and the next request travel on different gateways' sockets: sent before the
        # broker has the cancel, the next one would be refused (200 s of work ahead, 60 s deadline).
        await until(cancel_heard, "the broker to hear the cancel", cluster)
        result, _ = await a.generate("job-3", params(3, steps=2), 60)
        assert result.request_id == "job-3"
        document = await stats(c)
        assert document["broker"]["cancelled"] == 1 and document["worker"]["stopped_batches"] >= 1
        assert not doomed.done() and not watching.done()  # a cancelled request gets no answer
        for task in (doomed, watching):
            task.cancel()
    finally:
        for client in (a, b, c):
            await client.close()


def test_a_gateway_keeps_its_identity_in_state_dir_and_a_second_one_there_is_refused(make_cluster):
    cluster = make_cluster()
    cluster.start("broker", "broker")
    state_dir = cluster.dir / "state"
    cluster.start("gateway", "gateway", STATE_DIR=str(state_dir))
    wait_until_ready(f"{cluster.url}/healthz", 60, cluster.logs)
    identity = (state_dir / GATEWAY_ID_FILE).read_text().strip()
    assert f"gateway id {identity}" in (cluster.dir / "gateway.log").read_text()

    second = subprocess.run([sys.executable, "-m", "gateway"], cwd=cluster.dir, capture_output=True, text=True,
                            timeout=60, env={**cluster.env, "STATE_DIR": str(state_dir), "GATEWAY_PORT": str(free_port())})
    assert second.returncode == 2, second.stderr
    assert "another gateway is running" in second.stderr and "GATEWAY_ID" in second.stderr

    cluster.processes["gateway"].terminate()
    cluster.processes["gateway"].wait(30)
    cluster.start("gateway", "gateway", STATE_DIR=str(state_dir))  # restarted: the same identity
    wait_until_ready(f"{cluster.url}/healthz", 60, cluster.logs)
    status, _ = get_json(f"{cluster.url}/healthz")
    assert status == 200 and (state_dir / GATEWAY_ID_FILE).read_text().strip() == identity
    assert (cluster.dir / "gateway.log").read_text().count(f"gateway id {identity}") == 2
