"""A worker whose batch loop fails hands its requests back and ends, instead of heartbeating on.

Real sockets on 127.0.0.1: a real BrokerServer, the gateway's real BrokerClient, and two real
``Worker`` objects in this process with the fake backend (no model). The first worker's batch loop
is replaced by one that raises once a request has reached it (standing in for a bug in the loop);
its ``serve`` must end with :class:`BatchLoopFailed` (``python -m gpu_worker`` then exits with status
4 for supervisord to restart it), and the request it held must be served by the second worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.config import BrokerSettings
from broker.server import BrokerServer
from gateway.broker_client import BrokerClient
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.decisions.policies import make_batcher
from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.shell.worker import BatchLoopFailed, Worker, WorkerIdentity
from imagegen.protocol import Disconnect, GenerationParams
from tests.support.polling import until
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(60)

CONFIG = BatchPolicyConfig(max_batch_size=4, max_wait_time_s=0.01, min_wait_time_s=0.0)


def worker(name: str, broker_address: str) -> Worker:
    return Worker(WorkerIdentity(name, "h", 0, "fake", "cpu"), FakeBackend(), CONFIG, capacity=8,
                  broker_address=broker_address, heartbeat_interval_s=0.2,
                  batcher=make_batcher("run-to-completion", CONFIG))


def close(w: Worker) -> None:
    """What serve() leaves open when it never ran or stopped early: the link's socket and context, the pools."""
    if not w.link.ctx.closed:
        w.link.sock.close(linger=0)
        w.link.ctx.term()
    for pool in (w.gpu_thread, w.encoder_threads, w.stripe_threads):
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
async def broker() -> Any:
    client_port, worker_port = free_port(), free_port()
    settings = BrokerSettings(client_bind=f"tcp://127.0.0.1:{client_port}",
                              worker_bind=f"tcp://127.0.0.1:{worker_port}")
    stop = asyncio.Event()
    server = BrokerServer(settings)
    serving = asyncio.create_task(server.serve(stop))
    yield server, f"tcp://127.0.0.1:{client_port}", f"tcp://127.0.0.1:{worker_port}"
    stop.set()
    await serving


async def test_a_failed_batch_loop_ends_the_worker_and_its_request_is_served_elsewhere(broker):
    server, client_address, worker_address = broker
    broken = worker("broken", worker_address)
    sent: list = []
    send = broken.link.send

    def record(message: Any, payload: Any = ()) -> None:
        sent.append(message)
        send(message, payload)
    broken.link.send = record

    async def failing_loop() -> None:
        while broken.decisions.queue_depth == 0:
            await asyncio.sleep(0.01)
        raise RuntimeError("a bug in the batch loop")
    broken._batch_loop = failing_loop  # type: ignore[method-assign]

    client = BrokerClient(client_address)
    await client.start()
    healthy = worker("healthy", worker_address)
    healthy_stop = asyncio.Event()
    try:
        serving = asyncio.create_task(broken.serve(asyncio.Event()))
        await until(lambda: server.state.workers and len(server.state.workers) == 1, "the broken worker to register")
        params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=7.5, seed=1)
        answer = asyncio.create_task(client.generate("request-1", params, 30))
        with pytest.raises(BatchLoopFailed, match="a bug in the batch loop"):
            await asyncio.wait_for(serving, 20)
        assert any(isinstance(message, Disconnect) for message in sent)  # it said goodbye: its work is requeued
        assert not answer.done()

        healthy_serving = asyncio.create_task(healthy.serve(healthy_stop))
        result, png = await asyncio.wait_for(answer, 20)
        assert result.request_id == "request-1" and result.worker_name == "healthy"
        assert png.startswith(b"\x89PNG")
        assert server.state.counters.requeued == 1
        healthy_stop.set()
        await healthy_serving
    finally:
        await client.close()
        close(broken)
        close(healthy)
