"""A scripted GPU worker over a real DEALER socket (FAKE: no model): it registers with the broker,
records the requests it is sent and answers them with fixed bytes, at once or when a test says."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from imagegen import protocol
from imagegen.protocol import (
    WORKER_LINK,
    BatchingConfig,
    Cancel,
    Generate,
    GenerationParams,
    Progress,
    Register,
    Result,
    Welcome,
)


def params(i: int = 0) -> GenerationParams:
    return GenerationParams(prompt=f"prompt {i}", width=64, height=64, num_inference_steps=2,
                            guidance_scale=7.5, seed=i)


class FakeWorker:
    """A scripted worker (FAKE: no model): registers, records requests (and the ids it is told to
    cancel), answers and reports progress when told to."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, name: str, capacity: int = 4,
                 auto_reply: bool = True) -> None:
        self.name = name
        self.capacity = capacity
        self.auto_reply = auto_reply
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.received: list[Generate] = []
        self.cancelled: list[str] = []
        self.welcomed = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        batching = BatchingConfig(enable_batching=True, max_batch_size=self.capacity, max_wait_time=5.0,
                                  min_batch_size=1, min_wait_time=0.5, adaptive_batching=True,
                                  adaptive_threshold=10)
        register = Register(worker_name=self.name, host="test-host", gpu_id=int(self.name[-1]), pid=1,
                            model_id="fake", device="cpu", capacity=self.capacity, batching=batching)
        await self.sock.send_multipart(protocol.encode(WORKER_LINK, register))
        self.task = asyncio.create_task(self._loop())
        await asyncio.wait_for(self.welcomed.wait(), 5)

    async def _loop(self) -> None:
        while True:
            message, _ = protocol.decode(await self.sock.recv_multipart(), WORKER_LINK)
            if isinstance(message, Welcome):
                self.welcomed.set()
            elif isinstance(message, Generate):
                self.received.append(message)
                if self.auto_reply:
                    await self.reply(message)
            elif isinstance(message, Cancel):
                self.cancelled.append(message.request_id)

    async def progress(self, message: Generate, step: int, steps: int) -> None:
        await self.sock.send_multipart(protocol.encode(WORKER_LINK, Progress(message.request_id, step, steps)))

    async def reply(self, message: Generate) -> None:
        result = Result(request_id=message.request_id, worker_name=self.name, host="test-host",
                        gpu_id=int(self.name[-1]), batch_id=f"{self.name}:1", batch_size=1, queue_wait_ms=5.0,
                        generation_ms=10.0, width=64, height=64, seed=message.params.seed)
        await self.sock.send_multipart(protocol.encode(WORKER_LINK, result, [self.payload(message)]))

    def payload(self, message: Generate) -> bytes:
        return f"{self.name}|{message.params.prompt}".encode() * 1000

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(linger=0)
