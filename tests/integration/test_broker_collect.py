"""Gateways that come and go, over real ZeroMQ sockets on 127.0.0.1: lasting identities (the broker's
gateway socket hands an identity's connection over to a newcomer), answers kept while a gateway is
away and collected by id from any gateway, cancels from any gateway, PROGRESS and QUEUED reports.

The broker and the gateway's BrokerClient are the real ones, in this process; the workers are
scripted DEALER sockets (FakeWorker, tests/support/fake_worker.py: a stand-in with no model), so
each test decides when a worker reports progress and answers. No test asserts a duration.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import zmq.asyncio

from broker.config import BrokerSettings
from broker.server import BrokerServer, send_now
from gateway.broker_client import BrokerClient, BrokerFailure
from imagegen import protocol
from imagegen.protocol import CLIENT_LINK, Pong, Progress, Queued
from tests.support.fake_worker import FakeWorker, params
from tests.support.polling import until
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(60)


class Cluster:
    """A broker on free ports, fake workers and BrokerClients with chosen identities, all stopped
    at the end (``close``)."""

    def __init__(self) -> None:
        self.client_address = f"tcp://127.0.0.1:{free_port()}"
        self.worker_address = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.asyncio.Context()
        self.workers: list[FakeWorker] = []
        self.clients: list[BrokerClient] = []
        self.server: BrokerServer | None = None

    async def start_broker(self, **policy) -> BrokerServer:
        settings = BrokerSettings(client_bind=self.client_address, worker_bind=self.worker_address)
        self.server = BrokerServer(settings)
        if policy:
            self.server.state.policy = replace(self.server.state.policy, **policy)
        self.stop = asyncio.Event()
        self.serving = asyncio.create_task(self.server.serve(self.stop))
        return self.server

    async def stop_broker(self) -> None:
        self.stop.set()
        await self.serving
        self.server = None

    async def worker(self, name: str = "gpu0", **kwargs) -> FakeWorker:
        worker = FakeWorker(self.ctx, self.worker_address, name, auto_reply=False, **kwargs)
        self.workers.append(worker)
        await worker.start()
        return worker

    async def client(self, identity: bytes | None = None, **kwargs) -> BrokerClient:
        client = BrokerClient(self.client_address, identity=identity, **kwargs)
        self.clients.append(client)
        await client.start()
        return client

    async def close(self) -> None:
        for client in self.clients:
            if not client._closing:
                await client.close()
        for worker in self.workers:
            await worker.stop()
        self.ctx.term()
        if self.server is not None:
            await self.stop_broker()


@pytest.fixture
async def cluster():
    made = Cluster()
    try:
        yield made
    finally:
        await made.close()


async def gone(server: BrokerServer, identity: bytes) -> None:
    """Wait until the broker's gateway socket has no connection for ``identity`` any more (a send to
    it fails), so what the test sends next cannot go into a connection that is closing."""
    probe = protocol.encode(CLIENT_LINK, Pong("probe", "-", 0))
    await until(lambda: send_now(server.client_sock, [identity, *probe]) is not None,
                f"the broker to see {identity!r} disconnect")


async def test_a_gateway_back_under_its_identity_collects_the_answer_that_came_while_it_was_away(cluster):
    server = await cluster.start_broker()
    worker = await cluster.worker()
    first = await cluster.client(b"gateway-g")
    waiting = asyncio.create_task(first.generate("r1", params(1), 30, watch=True))
    await until(lambda: worker.received, "the worker to get the request")
    await first.close()  # the gateway stops: its request stays at the broker
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await gone(server, b"gateway-g")
    await worker.reply(worker.received[0])
    observer = await cluster.client()
    await until(lambda: server.state.unclaimed.counters.kept == 1, "the broker to keep the answer")
    stats = (await observer.stats())["broker"]
    assert stats["unclaimed_results"] == 1 and stats["unclaimed_kept"] == 1 and worker.cancelled == []
    again = await cluster.client(b"gateway-g")  # restarted: the same identity
    result, png = await again.collect("r1", 10)
    assert result.request_id == "r1" and png == worker.payload(worker.received[0])
    with pytest.raises(BrokerFailure) as unknown:  # collected once: forgotten
        await again.collect("r1", 10)
    assert unknown.value.code == "unknown_request"
    assert (await observer.stats())["broker"]["unclaimed_results"] == 0


async def test_another_gateway_collects_a_running_request_and_gets_its_reports_and_answer(cluster):
    await cluster.start_broker()
    worker = await cluster.worker()
    first, second = await cluster.client(b"gateway-a"), await cluster.client(b"gateway-b")
    first_events: list = []
    waiting = asyncio.create_task(first.generate("r1", params(1), 30, on_event=first_events.append))
    await until(lambda: worker.received, "the worker to get the request")
    await worker.progress(worker.received[0], 0, 4)
    await until(lambda: first_events, "the first gateway's progress")
    second_events: list = []
    collecting = asyncio.create_task(second.collect("r1", 30, on_event=second_events.append))
    await until(lambda: second_events, "the collector's first report")
    assert second_events == [Progress("r1", 0, 4, 1, "gpu0")]  # where it is now: its latest progress
    for step in (1, 2, 3):
        await worker.progress(worker.received[0], step, 4)
    await until(lambda: len(second_events) == 4, "the collector's progress")
    await worker.reply(worker.received[0])
    result, png = await collecting
    assert png == worker.payload(worker.received[0])
    assert [e.step for e in second_events] == [0, 1, 2, 3] and {e.attempt for e in second_events} == {1}
    assert first_events == [Progress("r1", 0, 4, 1, "gpu0")]  # nothing more once the other gateway took it
    assert not waiting.done()
    waiting.cancel()


async def test_a_cancel_from_another_gateway_stops_a_running_request(cluster):
    await cluster.start_broker()
    worker = await cluster.worker()
    first, second = await cluster.client(b"gateway-a"), await cluster.client(b"gateway-b")
    waiting = asyncio.create_task(first.generate("r1", params(1), 30))
    await until(lambda: worker.received, "the worker to get the request")
    second.cancel("r1")
    await until(lambda: worker.cancelled == ["r1"], "the worker to be told to drop the request")
    assert (await second.stats())["broker"]["cancelled"] == 1
    waiting.cancel()


async def test_progress_reaches_the_caller_in_order_and_plain_requests_get_no_queue_reports(cluster):
    await cluster.start_broker()
    worker = await cluster.worker(capacity=1)
    client = await cluster.client(b"gateway-a")
    plain_events: list = []
    plain = asyncio.create_task(client.generate("plain", params(1), 30, on_event=plain_events.append))
    await until(lambda: worker.received, "the worker to get the first request")
    watched_events: list = []
    watched = asyncio.create_task(client.generate("watched", params(2), 30, on_event=watched_events.append,
                                                  watch=True))
    await until(lambda: watched_events, "the watched request's queue report")
    assert watched_events[0] == Queued("watched", 1, 1, watched_events[0].ahead_units, None)
    for step in range(5):
        await worker.progress(worker.received[0], step, 5)
    await worker.reply(worker.received[0])
    await plain
    assert [(e.step, e.steps, e.attempt) for e in plain_events] == [(step, 5, 1) for step in range(5)]
    await until(lambda: len(worker.received) == 2, "the watched request to reach the worker")
    await until(lambda: watched_events[-1].position == 0, "the watched request's report: at the worker")
    await worker.reply(worker.received[1])
    await watched
    assert all(isinstance(e, Queued) for e in watched_events)


async def test_a_gateway_that_fell_silent_asks_again_and_gets_the_answer_kept_meanwhile(cluster):
    server = await cluster.start_broker(client_silence_s=0.5)
    worker = await cluster.worker()
    client = await cluster.client(b"gateway-a", ping_interval_s=0.1)
    waiting = asyncio.create_task(client.generate("r1", params(1), 30))
    await until(lambda: worker.received, "the worker to get the request")
    pinging = client._tasks[1]
    pinging.cancel()  # the gateway stalls: no pings
    await until(lambda: server.state.client_silent(b"gateway-a", server.clock()), "the broker to find it silent")
    await worker.reply(worker.received[0])
    await until(lambda: server.state.unclaimed.counters.kept == 1, "the broker to keep the answer")
    assert not waiting.done()
    client._tasks[1] = asyncio.create_task(client._ping())  # it comes back
    result, png = await waiting
    assert png == worker.payload(worker.received[0]) and client.asked_again_after_gap == 1
    assert len(worker.received) == 1  # the request ran once: its resend got the kept answer


async def test_a_newcomer_with_a_connected_gateways_identity_takes_its_connection_over(cluster):
    await cluster.start_broker()
    worker = await cluster.worker()
    old = await cluster.client(b"gateway-a")
    await until(lambda: old.broker.epoch is not None, "the first connection to be up")
    new = await cluster.client(b"gateway-a")  # the old one's connection is still open
    waiting = asyncio.create_task(new.generate("r1", params(1), 30))
    await until(lambda: worker.received, "the worker to get the newcomer's request")
    await worker.reply(worker.received[0])
    result, _ = await waiting
    assert result.request_id == "r1"


async def test_collect_of_an_unknown_id_or_across_a_broker_restart_is_unknown_request(cluster):
    await cluster.start_broker()
    worker = await cluster.worker()
    client = await cluster.client(b"gateway-a", ping_interval_s=0.1)
    other = await cluster.client(b"gateway-b")
    with pytest.raises(BrokerFailure) as unknown:
        await client.collect("never-sent", 10)
    assert unknown.value.code == "unknown_request"
    generating = asyncio.create_task(client.generate("r1", params(1), 30))
    asyncio.create_task(other.generate("r2", params(2), 30))
    await until(lambda: len(worker.received) == 2, "the worker to get both requests")
    events: list = []
    collecting = asyncio.create_task(client.collect("r2", 30, on_event=events.append))
    await until(lambda: events, "the broker to take the collect")
    await cluster.stop_broker()
    await cluster.start_broker()  # a new broker: it knows nothing of r2
    with pytest.raises(BrokerFailure) as lost:
        await collecting
    assert lost.value.code == "unknown_request" and "while this request was being collected" in lost.value.message
    assert not generating.done()  # a GENERATE is sent again to the new broker instead
    await until(lambda: client.resent_after_restart == 1, "the request to be sent again")
    generating.cancel()


async def test_an_answer_that_comes_before_the_restarted_gateway_collects_is_kept_for_its_collect(cluster):
    server = await cluster.start_broker()
    worker = await cluster.worker()
    first = await cluster.client(b"gateway-g")
    waiting = asyncio.create_task(first.generate("r1", params(1), 30, cancel_on_exit=False))
    await until(lambda: worker.received, "the worker to get the request")
    await first.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await gone(server, b"gateway-g")
    again = await cluster.client(b"gateway-g")
    await until(lambda: again.broker.epoch is not None, "the restarted gateway to be connected")
    await worker.reply(worker.received[0])  # goes to the restarted gateway, which waits for nothing yet
    await until(lambda: "r1" in again._orphans, "the answer to reach the restarted gateway")
    result, png = await again.collect("r1", 10)
    assert png == worker.payload(worker.received[0]) and not again._orphans
