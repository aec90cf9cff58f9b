"""The GPU worker's shell: one DEALER socket, the pure :class:`Batcher`, and the pipeline.

Three asyncio tasks share one thread (only that thread touches the socket; pyzmq sockets are
not thread-safe):

* the reader takes GENERATE messages into the batcher and handles WELCOME / DISCONNECT;
* the heartbeat task reports queue depth and counters every interval;
* the batch loop asks the batcher for the next batch whenever the GPU is free, sleeping until
  the batcher's next decision instant or the next arrival, and runs the pipeline in a dedicated
  thread (so heartbeats flow while the GPU computes).

PNG encoding runs in its own thread pool and overlaps the next batch's inference: the GPU never
waits for compression or sockets.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import zmq
import zmq.asyncio

from gpu_worker.batcher import Batch, Batcher, BatchKey, BatchPolicyConfig
from gpu_worker.pipelines import BatchSettings, GenerationJob
from gpu_worker.stats import WorkerCounters
from imagegen import protocol
from imagegen.protocol import (
    WORKER_LINK,
    BatchingConfig,
    Disconnect,
    Failure,
    FailureCode,
    Generate,
    Heartbeat,
    ProtocolError,
    Register,
    Result,
    Welcome,
)
from imagegen.sockets import make_dealer

log = logging.getLogger(__name__)

REGISTER_RETRY_S = 3.0
DRAIN_TIMEOUT_S = 300.0


class ImageBackend(Protocol):
    """What the worker needs from a pipeline (gpu_worker.pipelines.ImagePipeline is the real one)."""

    def generate(self, jobs: Sequence[GenerationJob], settings: BatchSettings) -> list[Any]: ...


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    host: str
    gpu_id: int
    model_id: str
    device: str


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 1: ~5x faster than 6, slightly larger
    return buffer.getvalue()


def batch_key(params: protocol.GenerationParams) -> BatchKey:
    return BatchKey(params.width, params.height, params.num_inference_steps, params.guidance_scale)


def batching_report(config: BatchPolicyConfig, auto: bool) -> BatchingConfig:
    return BatchingConfig(
        enable_batching=config.enable_batching,
        max_batch_size=config.max_batch_size if config.enable_batching else 1,
        max_wait_time=config.max_wait_time_s,
        min_batch_size=config.min_batch_size,
        min_wait_time=config.min_wait_time_s,
        adaptive_batching=config.adaptive,
        adaptive_threshold=config.adaptive_threshold,
        max_batch_size_auto=auto,
    )


class Worker:
    def __init__(self, identity: WorkerIdentity, backend: ImageBackend, policy: BatchPolicyConfig,
                 capacity: int, broker_address: str, heartbeat_interval_s: float,
                 max_batch_size_auto: bool = False, clock=time.monotonic, batcher: Batcher | None = None) -> None:
        self.identity = identity
        self.backend = backend
        self.policy = policy
        self.capacity = capacity
        self.broker_address = broker_address
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_batch_size_auto = max_batch_size_auto
        self.clock = clock
        # Any object with Batcher's methods (add, cancel, clear, next_batch, next_decision_at,
        # queue_depth) can decide the batches; the seed's rule is the default.
        self.batcher: Batcher[Generate] = batcher if batcher is not None else Batcher(policy)
        self.counters = WorkerCounters()
        self.running = 0
        self.state = "ready"
        self.registered = asyncio.Event()
        self.arrival = asyncio.Event()
        self.batch_seq = 0
        self.malformed_messages = 0
        self.gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self.encoder_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="png")
        self.delivery_tasks: set[asyncio.Task] = set()
        self.ctx = zmq.asyncio.Context()
        self.sock = make_dealer(self.ctx, broker_address)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._read(), name="reader"),
            asyncio.create_task(self._register_until_welcomed(), name="register"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        batch_loop = asyncio.create_task(self._batch_loop(), name="batches")
        try:
            await stop.wait()
        finally:
            await self._leave(batch_loop, tasks)

    async def _leave(self, batch_loop: asyncio.Task, tasks: list[asyncio.Task]) -> None:
        """Drain: stop taking work, finish the batch on the GPU, deliver it, then say goodbye.

        The broker stops dispatching as soon as it sees state "draining"; the DISCONNECT at the end
        makes it requeue whatever this worker still held but had not started, so nothing is lost."""
        self.state = "draining"
        self._send_status()
        self.arrival.set()  # wake the batch loop so it sees the state and returns
        done, _ = await asyncio.wait([batch_loop], timeout=DRAIN_TIMEOUT_S)
        if not done:
            log.warning("the running batch did not finish within %.0fs; leaving anyway", DRAIN_TIMEOUT_S)
            batch_loop.cancel()
        if self.delivery_tasks:
            await asyncio.wait(self.delivery_tasks, timeout=DRAIN_TIMEOUT_S)
        self._send(Disconnect(f"worker shutting down; {self.batcher.queue_depth} unstarted requests to requeue"))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.gpu_thread.shutdown(wait=False, cancel_futures=True)
        self.encoder_threads.shutdown(wait=False, cancel_futures=True)
        self.sock.close(linger=2000)  # let the goodbye and the last results reach the broker
        self.ctx.term()

    # ------------------------------------------------------------------ broker link

    def _send(self, message: protocol.Message, payload: Sequence[bytes] = ()) -> None:
        # DONTWAIT: the DEALER queues up to its HWM while the broker is away; never block the loop.
        future = self.sock.send_multipart(protocol.encode(WORKER_LINK, message, payload),
                                          flags=zmq.DONTWAIT, copy=False)
        if future.done() and future.exception() is not None:
            log.warning("could not send %s to the broker: %s", type(message).__name__, future.exception())

    def _registration(self) -> Register:
        return Register(
            worker_name=self.identity.name,
            host=self.identity.host,
            gpu_id=self.identity.gpu_id,
            pid=os.getpid(),
            model_id=self.identity.model_id,
            device=self.identity.device,
            capacity=self.capacity,
            batching=batching_report(self.policy, self.max_batch_size_auto),
        )

    async def _register_until_welcomed(self) -> None:
        """Register, and again every few seconds until WELCOME (the broker may not be up yet)."""
        while True:
            if not self.registered.is_set():
                self._send(self._registration())
            await asyncio.sleep(REGISTER_RETRY_S)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                message, _ = protocol.decode(frames, WORKER_LINK)
            except ProtocolError as exc:
                self.malformed_messages += 1
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            self._on_message(message)

    def _on_message(self, message: protocol.Message) -> None:
        if isinstance(message, Generate):
            self._accept(message)
        elif isinstance(message, Welcome):
            if not self.registered.is_set():
                log.info("registered with broker %s at %s", message.broker_epoch[:8], self.broker_address)
            self.registered.set()
            self.heartbeat_interval_s = message.heartbeat_interval_s
        elif isinstance(message, Disconnect):
            # The broker does not know us (it restarted, or declared us dead): whatever we still
            # queue has been requeued elsewhere or is lost with the old broker; running it would
            # only produce duplicates and hide our true load from the new registration.
            dropped = self.batcher.clear()
            log.warning("broker asks us to register again (%s); dropped %d queued requests",
                        message.reason, dropped)
            self.registered.clear()
            self._send(self._registration())
        else:
            self.malformed_messages += 1
            log.warning("ignored unexpected %s from the broker", type(message).__name__)

    def _accept(self, message: Generate) -> None:
        try:
            self.batcher.add(message.request_id, batch_key(message.params), message, self.clock())
        except ValueError:
            return  # the broker resent a request we already hold: one answer will come
        self.counters.observe_queue_depth(self.batcher.queue_depth)
        self.arrival.set()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            if self.registered.is_set():
                self._send_status()

    def _send_status(self) -> None:
        self._send(Heartbeat(self.counters.status(self.state, self.batcher.queue_depth, self.running)))

    # ------------------------------------------------------------------ batches

    async def _batch_loop(self) -> None:
        while self.state != "draining":
            batch = self.batcher.next_batch(self.clock())
            if batch is None:
                await self._sleep_until_next_decision()
                continue
            await self._run(batch)

    async def _sleep_until_next_decision(self) -> None:
        self.arrival.clear()
        wake_at = self.batcher.next_decision_at()
        timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
        try:
            await asyncio.wait_for(self.arrival.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run(self, batch: Batch[Generate]) -> None:
        jobs = [GenerationJob(p.item.params.prompt, p.item.params.negative_prompt, p.item.params.seed)
                for p in batch.requests]
        key = batch.key
        settings = BatchSettings(key.width, key.height, key.num_inference_steps, key.guidance_scale)
        self.batch_seq += 1
        batch_id = f"{self.identity.name}:{self.batch_seq}"
        self.running = len(batch)
        self._send_status()
        started = time.perf_counter()
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                self.gpu_thread, self.backend.generate, jobs, settings)
        except Exception as exc:  # the pipeline's errors end this batch's requests, never the worker
            self._fail_batch(batch, exc)
            return
        finally:
            self.running = 0
        generation_s = time.perf_counter() - started
        self.counters.record_batch([batch.wait_s(p) for p in batch.requests], generation_s)
        log.info("batch %s: %d x %dx%d, %d steps in %.2fs", batch_id, len(batch), key.width, key.height,
                 key.num_inference_steps, generation_s)
        task = asyncio.create_task(self._deliver(batch, batch_id, images, generation_s))
        self.delivery_tasks.add(task)
        task.add_done_callback(self.delivery_tasks.discard)
        self._send_status()

    def _fail_batch(self, batch: Batch[Generate], exc: Exception) -> None:
        code = FailureCode.INVALID_REQUEST if isinstance(exc, ValueError) else FailureCode.GENERATION_FAILED
        log.exception("batch of %d failed", len(batch), exc_info=exc)
        self.counters.record_failed(len(batch))
        for pending in batch.requests:
            self._send(Failure(pending.request_id, code.value, f"{type(exc).__name__}: {exc}"[:4000]))
        self._send_status()

    async def _deliver(self, batch: Batch[Generate], batch_id: str, images: list[Any], generation_s: float) -> None:
        loop = asyncio.get_running_loop()
        for pending, image in zip(batch.requests, images):
            png = await loop.run_in_executor(self.encoder_threads, encode_png, image)
            params = pending.item.params
            self._send(Result(
                request_id=pending.request_id,
                worker_name=self.identity.name,
                host=self.identity.host,
                gpu_id=self.identity.gpu_id,
                batch_id=batch_id,
                batch_size=len(batch),
                queue_wait_ms=batch.wait_s(pending) * 1000.0,
                generation_ms=generation_s * 1000.0,
                width=params.width,
                height=params.height,
                seed=params.seed,
            ), [png])
