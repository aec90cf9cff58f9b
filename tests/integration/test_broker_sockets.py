"""The broker over real ZeroMQ sockets on 127.0.0.1: balancing, overload, stats, hostile frames.

The broker and the gateway's BrokerClient are the real ones. The workers are scripted DEALER
sockets speaking the real protocol (FakeWorker in tests/support/fake_worker.py, a stand-in: no
model, it answers with fixed bytes), so each test controls exactly when a worker answers.
"""

from __future__ import annotations

import asyncio
import uuid

import msgpack
import pytest
import zmq
import zmq.asyncio

from broker.config import BrokerSettings
from broker.server import BrokerServer
from gateway.broker_client import BrokerClient, BrokerFailure
from imagegen import protocol
from imagegen.protocol import CLIENT_LINK, Failure, Generate, Result
from tests.support.fake_worker import FakeWorker, params
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def cluster():
    """A real broker on free ports, a real BrokerClient, and a factory for fake workers."""
    client_port, worker_port = free_port(), free_port()
    made: dict = {"workers": []}

    async def start(strategy: str = "queue-depth", max_queue_size: int = 100):
        settings = BrokerSettings(client_bind=f"tcp://127.0.0.1:{client_port}",
                                  worker_bind=f"tcp://127.0.0.1:{worker_port}",
                                  strategy=strategy, max_queue_size=max_queue_size)
        made["stop"] = asyncio.Event()
        made["server"] = BrokerServer(settings)
        made["serve"] = asyncio.create_task(made["server"].serve(made["stop"]))
        made["client"] = BrokerClient(f"tcp://127.0.0.1:{client_port}")
        await made["client"].start()
        made["ctx"] = zmq.asyncio.Context()
        return made["server"], made["client"]

    async def worker(name: str, **kwargs) -> FakeWorker:
        w = FakeWorker(made["ctx"], f"tcp://127.0.0.1:{worker_port}", name, **kwargs)
        made["workers"].append(w)
        await w.start()
        return w

    made["start"], made["worker"] = start, worker
    made["worker_address"] = f"tcp://127.0.0.1:{worker_port}"
    made["client_address"] = f"tcp://127.0.0.1:{client_port}"
    yield made
    for w in made["workers"]:
        await w.stop()
    if "client" in made:
        await made["client"].close()
        made["ctx"].term()
        made["stop"].set()
        await made["serve"]


async def generate_many(client: BrokerClient, count: int) -> list[tuple[Result, bytes]]:
    return await asyncio.gather(*(client.generate(uuid.uuid4().hex, params(i), 10) for i in range(count)))


async def test_round_robin_spreads_requests_evenly_and_returns_payload_bytes_intact(cluster):
    server, client = await cluster["start"](strategy="round-robin")
    workers = [await cluster["worker"](f"gpu{i}") for i in range(3)]
    replies = []
    for i in range(6):  # one at a time, so the order of dispatch is the round-robin order
        replies.append(await client.generate(uuid.uuid4().hex, params(i), 10))
    assert [len(w.received) for w in workers] == [2, 2, 2]
    assert [r.worker_name for r, _ in replies] == ["gpu0", "gpu1", "gpu2", "gpu0", "gpu1", "gpu2"]
    for i, (result, png) in enumerate(replies):
        assert png == f"{result.worker_name}|prompt {i}".encode() * 1000
        assert result.queue_wait_ms >= 5.0  # the worker's own wait plus the broker's queue time


async def test_queue_depth_sends_work_to_the_worker_holding_the_least(cluster):
    server, client = await cluster["start"](strategy="queue-depth")
    stuck = await cluster["worker"]("gpu0", auto_reply=False)
    fast = await cluster["worker"]("gpu1")
    held = asyncio.ensure_future(client.generate("held", params(0), 10))
    await asyncio.sleep(0.2)
    replies = []
    for i in range(1, 5):
        replies.append(await client.generate(uuid.uuid4().hex, params(i), 10))
    assert [m.request_id for m in stuck.received] == ["held"]
    assert len(fast.received) == 4 and all(r.worker_name == "gpu1" for r, _ in replies)
    await stuck.reply(stuck.received[0])
    result, _ = await held
    assert result.worker_name == "gpu0"


async def test_a_request_the_broker_cannot_read_is_answered_at_once(cluster):
    """A GENERATE beyond the broker's bounds (from a gateway of another build) gets a Failure naming
    the field at once, instead of waiting out its deadline; the worker never sees it."""
    server, client = await cluster["start"]()
    worker = await cluster["worker"]("gpu0")
    gateway = cluster["ctx"].socket(zmq.DEALER)
    gateway.linger = 0
    gateway.connect(cluster["client_address"])
    try:
        frames = protocol.encode(CLIENT_LINK, Generate("too-wide", params(1), 10))
        header = protocol.unpack_header(frames[2])
        header["params"] = {**header["params"], "width": 9000}  # the protocol allows 8192
        frames[2] = msgpack.packb(header, use_bin_type=True)
        await gateway.send_multipart(frames)
        failure, _ = protocol.decode(await asyncio.wait_for(gateway.recv_multipart(), 5), CLIENT_LINK)
    finally:
        gateway.close(linger=0)
    assert isinstance(failure, Failure) and failure.request_id == "too-wide"
    assert failure.code == "generation_failed" and "params.width" in failure.message
    assert worker.received == [] and (await client.stats())["broker"]["malformed_client_messages"] == 1


async def test_worker_credit_caps_what_one_worker_holds(cluster):
    server, client = await cluster["start"]()
    worker = await cluster["worker"]("gpu0", capacity=2, auto_reply=False)
    pending = [asyncio.ensure_future(client.generate(f"r{i}", params(i), 10)) for i in range(5)]
    await asyncio.sleep(0.3)
    assert len(worker.received) == 2
    stats = await client.stats()
    assert stats["broker"]["queue_depth"] == 3 and stats["current_queue_depth"] == 5
    for _ in range(5):
        while not worker.received:
            await asyncio.sleep(0.01)
        await worker.reply(worker.received.pop(0))
    assert len(await asyncio.gather(*pending)) == 5


async def test_full_queue_is_refused_with_overloaded(cluster):
    server, client = await cluster["start"](max_queue_size=2)
    waiting = [asyncio.ensure_future(client.generate(f"r{i}", params(i), 10)) for i in range(2)]
    await asyncio.sleep(0.2)
    with pytest.raises(BrokerFailure) as refused:
        await client.generate("one-too-many", params(9), 10)
    assert refused.value.code == "overloaded"
    await cluster["worker"]("gpu0")  # a worker arrives and drains the queue
    assert len(await asyncio.gather(*waiting)) == 2


async def test_stats_switch_from_single_to_multi_gpu_shape(cluster):
    server, client = await cluster["start"]()
    await cluster["worker"]("gpu0")
    single = await client.stats()
    assert single["num_gpus"] == 1 and "per_gpu_stats" not in single
    assert set(single["config"]) >= {"max_batch_size", "max_wait_time", "adaptive_batching"}
    await cluster["worker"]("gpu1")
    multi = await client.stats()
    assert multi["num_gpus"] == 2 and multi["gpu_ids"] == [0, 1]
    assert multi["load_balance_strategy"] == "queue-depth"
    assert [g["worker"] for g in multi["per_gpu_stats"]] == ["gpu0", "gpu1"]


@pytest.mark.parametrize("link", ["client", "worker"])
async def test_malformed_and_oversized_frames_are_dropped_and_counted(cluster, link):
    server, client = await cluster["start"]()
    await cluster["worker"]("gpu0")
    address = cluster[f"{link}_address"]
    tag = protocol.CLIENT_LINK if link == "client" else protocol.WORKER_LINK
    attacker = cluster["ctx"].socket(zmq.DEALER)
    attacker.linger = 0
    attacker.connect(address)
    hostile = [
        [b"garbage"],
        [b"IGX9", b"\x03", b"\x80"],
        [tag, b"\x7f", b"\x80"],
        [tag, protocol.Command.GENERATE.value, b"\xdd\xff\xff\xff\xff"],  # msgpack array-of-2^32 bomb
        [tag, protocol.Command.GENERATE.value, b"\x91" * 100_000],  # nesting bomb
        [tag, protocol.Command.GENERATE.value, b"\xc1"],  # never-used msgpack byte
        [tag, protocol.Command.GENERATE.value, protocol.encode(tag, Generate("x", params(), 5))[2][:-3]],
    ]
    for frames in hostile:
        await attacker.send_multipart(frames)
    # An oversized frame makes libzmq drop the sender's connection (ZMQ_MAXMSGSIZE) before we see it.
    await attacker.send_multipart([tag, protocol.Command.GENERATE.value, b"\x00" * (protocol.MAX_FRAME_BYTES + 1)])
    await asyncio.sleep(0.5)
    stats = await client.stats()
    assert stats["broker"][f"malformed_{link}_messages"] == len(hostile)
    result, _ = await client.generate("still-serving", params(1), 10)
    assert result.request_id == "still-serving"
    attacker.close(linger=0)


def test_a_broker_that_cannot_bind_its_second_socket_releases_the_first():
    """The worker port is taken: BrokerServer raises, and the client socket it had already bound is
    closed with its context (left open, the context's term() at garbage collection waits forever)."""
    client_port = free_port()
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.ROUTER)
    worker_port = squatter.bind_to_random_port("tcp://127.0.0.1")
    try:
        settings = BrokerSettings(client_bind=f"tcp://127.0.0.1:{client_port}",
                                  worker_bind=f"tcp://127.0.0.1:{worker_port}")
        with pytest.raises(zmq.ZMQError) as caught:
            BrokerServer(settings)
        # The traceback keeps the half-built server alive (as a crash report or a logger would), so
        # only an explicit close frees the port, not garbage collection.
        assert caught.traceback
        again = ctx.socket(zmq.ROUTER)
        try:
            again.bind(f"tcp://127.0.0.1:{client_port}")  # free again: the first socket was closed
        finally:
            again.close(linger=0)
    finally:
        squatter.close(linger=0)
        ctx.term()
