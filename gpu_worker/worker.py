"""The GPU worker's shell: the broker link, the pure :class:`Batcher`, and the pipeline.

Tasks on one event-loop thread (only that thread touches the socket; pyzmq sockets are not
thread-safe):

* the link (:mod:`gpu_worker.link`) registers, watches the broker's liveness and reconnects, and
  hands GENERATE and CANCEL messages to this worker;
* the heartbeat task reports queue depth and counters every interval;
* the batch loop asks the batcher for the next batch whenever the GPU is free, sleeping until
  the batcher's next decision instant or the next arrival, drops requests whose deadline has
  passed before they cost GPU time, and runs the pipeline in a dedicated thread (so heartbeats
  flow while the GPU computes). A batch the batcher marks preemptible (a lone request started
  instead of held, gpu_worker/preemption.py) is stopped at its next step boundary when a request
  that could join it arrives in time; its request goes back to the queue and runs with the
  newcomers. Every batch is also stopped at its next step boundary when rows nobody waits for any
  more (a CANCEL from the broker, or the row's own deadline passing while it runs) make stopping
  worth it (gpu_worker.preemption.abandon_decision): its wanted rows go back to the queue and run
  again; otherwise it finishes and only the wanted rows' images are sent. While a batch runs, each
  of its requests gets a PROGRESS message at its start (step 0) and then at most one every
  PROGRESS_INTERVAL_S.

PNG encoding runs in its own thread pools and overlaps the GPU's work: a batch's images are handed
over part by part as the VAE decodes them (gpu_worker.decoding), each part's PNGs are compressed
while the GPU decodes the next part and then runs the next batch, and the results are sent once the
whole batch is done (they all carry the batch's generation time). The GPU never waits for
compression or sockets. Each image is also split into stripes compressed in parallel
(gpu_worker/png.py, ISA-L's deflate), so a lone image's PNG costs about a millisecond.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

from gpu_worker import png
from gpu_worker.batcher import Batch, Batcher, BatchKey, BatchPolicy, BatchPolicyConfig
from gpu_worker.pipelines import BatchSettings, GenerationJob
from gpu_worker.preemption import AbandonDecision, BatchPreempted, Preemption, ProgressLimiter
from gpu_worker.stats import WorkerCounters
from gpu_worker.link import BrokerLink
from gpu_worker.oom import OnImages, OomSplittingBackend
from imagegen import stage_trace
from imagegen.logs import request_fields, request_name
from imagegen.sockets import CurveClientKeys
from imagegen.protocol import (
    BatchingConfig,
    Cancel,
    Disconnect,
    Failure,
    FailureCode,
    Generate,
    Heartbeat,
    Progress,
    Register,
    Result,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 300.0
# At most one PROGRESS message per running request this often (its first, step 0, always goes; the
# last step is never reported: the RESULT follows it).
PROGRESS_INTERVAL_S = 0.5
# A running row past its deadline is dropped this long after it: the broker answers it first (its
# answer says where the request was) and sends CANCEL, which stops it at once; this is the fallback
# when no CANCEL comes (a broker of an older build, a lost message).
RUNNING_DEADLINE_GRACE_S = 1.0
# PNG encoding (gpu_worker/png.py, ISA-L) of one 1024x1024 image takes 1-6 ms of CPU on the GPU
# hosts: encode a batch's images in parallel so delivery keeps up with the GPU, and split large
# images (png.MIN_STRIPE_BYTES) into stripes on a second pool (a pool's thread never waits on its
# own pool). The stripe pool may use every core but two, for the event loop and the GPU thread (the
# last part of a burst's last batch is compressed after the GPU has finished: its time is the
# burst's tail).
PNG_ENCODER_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))
PNG_STRIPE_THREADS = max(1, min(16, (os.cpu_count() or 2) - 2))
LOGGED_ID_CHARS = 8  # request ids in the per-batch INFO line are cut to this; JSON logs carry them whole


def short_ids(request_ids: Sequence[str], labels: Sequence[str] = ()) -> str:
    """Request ids for a log line a human reads: the first LOGGED_ID_CHARS characters of each, with
    its client's label (X-Request-ID) where it has one, so a grep for the label finds the line."""
    labels = list(labels) or [""] * len(request_ids)
    return " ".join(request_name(request_id[:LOGGED_ID_CHARS], label) for request_id, label in zip(request_ids, labels))


class ImageBackend(Protocol):
    """What the worker needs from a pipeline (gpu_worker.pipelines.ImagePipeline is the real one).

    generate may hand images over early, ``on_images(first_index, images)`` from its own thread, for
    consecutive slices of the batch; whatever it did not hand over is taken from its return value.
    With a ``preemption`` it calls ``preemption.before_step(synchronize)`` before every denoising
    step, which raises BatchPreempted when the worker has asked it to stop."""

    def generate(self, jobs: Sequence[GenerationJob], settings: BatchSettings,
                 on_images: OnImages | None = None, preemption: Preemption | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    host: str
    gpu_id: int
    model_id: str
    device: str


def encode_png(image: Any, stripe_threads: Executor | None = None, request_id: str | None = None) -> bytes:
    """The image's PNG, in an encoder thread; with a request id, its start and end go in the stage
    trace (the end apart from when the event loop picks the PNG up: worker_png_ready)."""
    if request_id is not None:
        stage_trace.stage("worker_png_started", request_id)
    # ISA-L level 1: the fastest level that still finds repeats (gpu_worker/png.py).
    encoded = png.encode_png(image, stripe_threads, stripes=PNG_STRIPE_THREADS, level=1)
    if request_id is not None:
        stage_trace.stage("worker_png_encoded", request_id)
    return encoded


def timed_call(call: Any, *args: Any) -> tuple[Any, float]:
    """call(*args) and the seconds it took, timed in the thread that runs it: the worker logs the GPU
    thread's own time beside the batch's time as the event loop sees it (the difference is hand-offs)."""
    began = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - began


def registration(identity: WorkerIdentity, policy: BatchPolicyConfig, capacity: int, auto: bool,
                 seconds_per_work_unit: float = 0.0) -> Register:
    """What the worker registers with (again after every reconnect, with the policy of the moment)."""
    return Register(worker_name=identity.name, host=identity.host, gpu_id=identity.gpu_id, pid=os.getpid(),
                    model_id=identity.model_id, device=identity.device, capacity=capacity,
                    batching=batching_report(policy, auto), seconds_per_work_unit=seconds_per_work_unit)


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


class BatchEncodings:
    """One batch's PNG encodings, started as its images are handed over (by index in the batch).

    The GPU thread hands its images straight to the encoder pool (a lone image's PNG used to wait
    for the event loop to pass it on first: one thread wake-up more, on the lone request's path).
    An image handed over twice (a part retried after an out-of-memory split) is encoded once."""

    def __init__(self, encoder_threads: Executor, stripe_threads: Executor,
                 request_ids: Sequence[str] = ()) -> None:
        self.encoder_threads = encoder_threads
        self.stripe_threads = stripe_threads
        self.request_ids = request_ids  # by index in the batch, for the stage trace only
        self.pngs: dict[int, concurrent.futures.Future[bytes]] = {}
        self.cancelled = False
        self._lock = threading.Lock()  # the GPU thread starts encodings, the event loop reads and cancels

    def encode(self, first_index: int, images: Sequence[Any]) -> None:
        """Start encoding the images not yet started (any thread; the deflate releases the GIL)."""
        with self._lock:
            if self.cancelled:
                return  # the batch failed after handing these over: nobody will send them
            for index, image in enumerate(images, first_index):
                if index not in self.pngs:
                    request_id = self.request_ids[index] if index < len(self.request_ids) else None
                    if request_id is not None:
                        stage_trace.stage("worker_image_handed_over", request_id)
                    self.pngs[index] = self.encoder_threads.submit(encode_png, image, self.stripe_threads, request_id)

    on_images_in_gpu_thread = encode

    async def png(self, index: int) -> bytes:
        return await asyncio.wrap_future(self.pngs[index])

    def cancel(self) -> None:
        """Nobody will send these: encodings not started are dropped, those running are left to end."""
        with self._lock:
            self.cancelled = True
            for future in self.pngs.values():
                future.cancel()


class Worker:
    def __init__(self, identity: WorkerIdentity, backend: ImageBackend, policy: BatchPolicyConfig,
                 capacity: int, broker_address: str, heartbeat_interval_s: float, liveness: int = 5,
                 max_batch_size_auto: bool = False, clock=time.monotonic, batcher: BatchPolicy[Generate] | None = None,
                 curve: CurveClientKeys | None = None, gpu_thread: ThreadPoolExecutor | None = None,
                 seconds_per_work_unit: float = 0.0) -> None:
        self.identity = identity
        self.seconds_per_work_unit = seconds_per_work_unit  # measured at warm-up; reported for admission
        # A batch that runs out of GPU memory is split and retried in halves (gpu_worker/oom.py).
        self.backend = OomSplittingBackend(backend, on_oom=self._out_of_memory_in_gpu_thread)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.policy = policy
        self.capacity = capacity
        self.max_batch_size_auto = max_batch_size_auto
        self.clock = clock
        # Any BatchPolicy decides the batches (gpu_worker/policies.py); the window rule is the default.
        self.batcher: BatchPolicy[Generate] = batcher if batcher is not None else Batcher(policy)
        self.deadlines: dict[str, float] = {}  # request id -> instant (our clock) its client gives up
        self.counters = WorkerCounters()
        self.running_batch: Batch[Generate] | None = None  # the batch in the GPU thread (its status, an OOM report)
        self.preemption: Preemption | None = None  # the running batch's stop signal
        self.cancelled_while_running: set[str] = set()  # ids of the running batch nobody waits for any more
        self.running_rows: dict[str, int] = {}  # request id -> its row in the running batch
        self.running_deadlines: dict[str, float] = {}  # the running rows' deadlines (our clock)
        self.progress_limiter = ProgressLimiter(PROGRESS_INTERVAL_S, clock)
        self.state = "ready"
        self.arrival = asyncio.Event()
        self.batch_seq = 0
        # One thread runs every generation (CUDA graphs are recorded per thread): pass the one that
        # ran the warm-up.
        self.gpu_thread = gpu_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self.encoder_threads = ThreadPoolExecutor(max_workers=PNG_ENCODER_THREADS, thread_name_prefix="png")
        self.stripe_threads = ThreadPoolExecutor(max_workers=PNG_STRIPE_THREADS, thread_name_prefix="png-stripe")
        self.delivery_tasks: set[asyncio.Task] = set()
        self.link = BrokerLink(broker_address, self._registration, self._on_message, self._forget_queue,
                               heartbeat_interval_s, liveness, clock, curve)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.link.start()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        batch_loop = asyncio.create_task(self._batch_loop(), name="batches")
        try:
            await stop.wait()
        finally:
            await self._leave(batch_loop, heartbeat)

    async def _leave(self, batch_loop: asyncio.Task, heartbeat: asyncio.Task) -> None:
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
        self.link.send(Disconnect(f"worker shutting down; {self.batcher.queue_depth} unstarted requests to requeue"))
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        self.gpu_thread.shutdown(wait=False, cancel_futures=True)
        self.encoder_threads.shutdown(wait=False, cancel_futures=True)
        self.stripe_threads.shutdown(wait=False, cancel_futures=True)
        await self.link.close()

    def _out_of_memory_in_gpu_thread(self, failed_size: int, succeeded_size: int) -> None:
        """Called by OomSplittingBackend in the GPU thread: hand over to the event loop (with the
        running batch's key, which the loop set before handing the batch to this thread)."""
        if self.loop is not None:
            running = self.running_batch
            self.loop.call_soon_threadsafe(self.lower_max_batch_size, failed_size, succeeded_size,
                                           running.key if running is not None else None)

    def lower_max_batch_size(self, failed_size: int, succeeded_size: int, key: BatchKey | None = None) -> None:
        """After an out-of-memory split: never form batches larger than what succeeded again (for
        images of the failed batch's size: see BatchPolicyConfig.after_out_of_memory)."""
        pixels = key.pixels if key is not None else None
        new_size = self.batcher.lower_max_batch_size(succeeded_size, pixels)
        self.policy = self.policy.after_out_of_memory(succeeded_size, pixels)  # what the registration reports
        where = f" at {key.width}x{key.height}" if key is not None else ""
        budget = (f" (pixel budget {self.policy.max_batch_pixels}: {key.width}x{key.height} batches of at most "
                  f"{max(1, self.policy.max_batch_pixels // key.pixels)})"
                  if key is not None and self.policy.max_batch_pixels is not None else "")
        log.warning("out of GPU memory on a batch of %d%s: max batch size lowered to %d%s", failed_size, where,
                    new_size, budget)
        self._send_status()

    # ------------------------------------------------------------------ broker link

    def _registration(self) -> Register:
        return registration(self.identity, self.policy, self.capacity, self.max_batch_size_auto,
                            self.seconds_per_work_unit)

    def _on_message(self, message: object) -> None:
        if isinstance(message, Generate):
            self._accept(message)
        elif isinstance(message, Cancel):
            if self.batcher.cancel(message.request_id):
                self.deadlines.pop(message.request_id, None)
                log.info("request %s cancelled before its batch started", message.request_id,
                         extra={"request_id": message.request_id})
            elif message.request_id in self.running_rows:
                self._abandon(message.request_id, "cancelled")
        else:
            log.warning("ignored unexpected %s from the broker", type(message).__name__)

    def _abandon(self, request_id: str, why: str) -> None:
        """Nobody waits for this running row any more: the batch decides at its next step whether to
        stop (gpu_worker.preemption.abandon_decision); its image is never sent, nor is it requeued."""
        if request_id in self.cancelled_while_running or self.preemption is None:
            return
        self.cancelled_while_running.add(request_id)
        self.running_deadlines.pop(request_id, None)
        self.preemption.abandon(self.running_rows[request_id])
        log.info("request %s %s while its batch runs (step %d of %d): dropped from the batch", request_id, why,
                 self.preemption.steps_done, self.preemption.steps, extra={"request_id": request_id})

    def _forget_queue(self, why: str) -> None:
        """The broker no longer counts on what we queued (it requeued it, or it restarted)."""
        dropped = self.batcher.clear()
        self.deadlines.clear()
        log.warning("%s; dropped %d queued requests", why, dropped)

    def _accept(self, message: Generate) -> None:
        now = self.clock()
        stage_trace.stage("worker_got_request", message.request_id)
        key = BatchKey.of(message.params)
        try:
            self.batcher.add(message.request_id, key, message, now)
        except ValueError:
            return  # the broker resent a request we already hold: one answer will come
        self.deadlines[message.request_id] = now + message.deadline_s
        log.debug("request %s queued: %dx%d, %d steps", request_name(message.request_id, message.label),
                  message.params.width, message.params.height, message.params.num_inference_steps,
                  extra=request_fields(message.request_id, message.label))
        self.counters.observe_queue_depth(self.batcher.queue_depth)
        self._maybe_preempt(key, now)
        self.arrival.set()

    def _maybe_preempt(self, key: BatchKey, now: float) -> None:
        """Ask the running batch to stop at its next step if the batcher says this arrival should join it."""
        running, preemption = self.running_batch, self.preemption
        if (running is None or preemption is None or preemption.requested
                or not self.batcher.should_preempt(running, key, now)):
            return
        preemption.request()
        log.debug("a request that can join batch of %d arrived %.1f ms after it started: stopping it at its "
                  "next step", len(running), (now - running.formed_at) * 1000.0)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.link.heartbeat_interval_s)
            if self.link.registered.is_set():
                self._send_status()

    def _send_status(self) -> None:
        max_batch = self.batcher.config.max_batch_size
        running = len(self.running_batch) if self.running_batch is not None else 0
        status = self.counters.status(self.state, self.batcher.queue_depth, running)
        self.link.send(Heartbeat(replace(status, max_batch_size=max_batch)))

    # ------------------------------------------------------------------ batches

    async def _batch_loop(self) -> None:
        while self.state != "draining":
            self._drop_expired(self.clock())
            batch = self.batcher.next_batch(self.clock())
            if batch is None:
                await self._sleep_until_next_decision()
                continue
            self.running_deadlines = {p.request_id: self.deadlines.pop(p.request_id, float("inf"))
                                      for p in batch.requests}
            await self._run(batch)

    def _drop_expired(self, now: float) -> None:
        """Answer deadline_exceeded for queued requests whose client has given up: no GPU for them."""
        late = [rid for rid, deadline in self.deadlines.items() if deadline < now]
        for request_id in late:
            del self.deadlines[request_id]
            if self.batcher.cancel(request_id):
                log.info("request %s failed: its deadline passed while it waited for a batch", request_id,
                         extra={"request_id": request_id})
                self.link.send(Failure(request_id, FailureCode.DEADLINE_EXCEEDED.value,
                                       "the request's deadline passed while it waited for a batch"))

    def _drop_expired_running(self, now: float) -> None:
        """Running rows whose deadline passed: nobody waits for them (the broker answers their client)."""
        for request_id in [rid for rid, deadline in self.running_deadlines.items()
                           if deadline + RUNNING_DEADLINE_GRACE_S < now]:
            self._abandon(request_id, "passed its deadline")
            self.link.send(Failure(request_id, FailureCode.DEADLINE_EXCEEDED.value,
                                   "the request's deadline passed while it was being generated"))

    async def _await_batch(self, running: asyncio.Future) -> Any:
        """The GPU thread's answer; meanwhile, rows whose deadline passes are abandoned at once."""
        while True:
            wake_at = min(self.running_deadlines.values(), default=float("inf")) + RUNNING_DEADLINE_GRACE_S
            timeout = None if wake_at == float("inf") else max(0.0, wake_at - self.clock()) + 0.001
            done, _ = await asyncio.wait([running], timeout=timeout)
            if done:
                return running.result()
            self._drop_expired_running(self.clock())

    def _progress_in_gpu_thread(self, request_ids: Sequence[str], step: int, steps: int) -> None:
        """Called by the GPU thread before each step: hand the due PROGRESS messages to the event loop."""
        due = [rid for rid in request_ids
               if rid not in self.cancelled_while_running and self.progress_limiter.allow(rid)]
        if due and self.loop is not None:
            self.loop.call_soon_threadsafe(self._send_progress, due, step, steps)

    def _send_progress(self, request_ids: Sequence[str], step: int, steps: int) -> None:
        for request_id in request_ids:
            self.link.send(Progress(request_id, min(step, steps), steps))

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
        self.running_batch = batch
        request_ids = [p.request_id for p in batch.requests]
        self.running_rows = {rid: index for index, rid in enumerate(request_ids)}
        steps = key.num_inference_steps
        # Every batch is stoppable at a step boundary: for newcomers while it is preemptible, and for
        # rows nobody waits for any more until its last step.
        self.preemption = Preemption(batch.preemptible_until, self.clock, rows=len(batch), steps=steps,
                                     on_step=lambda step: self._progress_in_gpu_thread(request_ids, step, steps))
        for pending in batch.requests:
            stage_trace.stage("worker_batch_started", pending.request_id)
        self._send_progress([rid for rid in request_ids if self.progress_limiter.allow(rid)], 0, steps)
        started = time.perf_counter()
        splits_before = self.backend.oom_splits
        encodings = BatchEncodings(self.encoder_threads, self.stripe_threads, [p.request_id for p in batch.requests])
        try:
            running = asyncio.get_running_loop().run_in_executor(
                self.gpu_thread, timed_call, self.backend.generate, jobs, settings, encodings.on_images_in_gpu_thread,
                self.preemption)
            self._send_status()  # the broker sees the batch running; sent once the GPU thread has it
            self._drop_expired_running(self.clock())  # a row that arrived already late
            images, gpu_thread_s = await self._await_batch(running)
        except BatchPreempted:
            encodings.cancel()
            self._requeue(batch, batch_id, time.perf_counter() - started, self.preemption)
            return
        except Exception as exc:  # the pipeline's errors end this batch's requests, never the worker
            encodings.cancel()
            self._fail_batch(batch, exc)
            return
        finally:
            unwanted = self.cancelled_while_running
            self.running_batch = None
            self.preemption = None
            self.cancelled_while_running = set()
            self.running_rows = {}
            self.running_deadlines = {}
            for request_id in request_ids:
                self.progress_limiter.forget(request_id)
        encodings.encode(0, images)  # those not handed over early
        generation_s = time.perf_counter() - started
        for pending in batch.requests:
            stage_trace.stage("worker_batch_done", pending.request_id)
        self._observe_batch_time(key, len(batch), generation_s, splits_before)
        self.counters.record_batch([batch.wait_s(p) for p in batch.requests], generation_s)
        labels = [p.item.label for p in batch.requests]
        log.info("batch %s: %d x %dx%d, %d steps in %.3fs (GPU thread %.3fs); requests %s%s", batch_id, len(batch),
                 key.width, key.height, key.num_inference_steps, generation_s, gpu_thread_s,
                 short_ids(request_ids, labels),
                 f" ({len(unwanted)} no longer wanted: images dropped)" if unwanted else "",
                 extra={"batch_id": batch_id, "request_ids": request_ids, "labels": labels})
        task = asyncio.create_task(self._deliver(batch, batch_id, encodings, generation_s, frozenset(unwanted)))
        self.delivery_tasks.add(task)
        task.add_done_callback(self.delivery_tasks.discard)
        self._send_status()

    def _requeue(self, batch: Batch[Generate], batch_id: str, ran_s: float, preemption: Preemption | None) -> None:
        """A stopped batch: its wanted requests wait again, with their arrival times and deadlines,
        for the next batch (not a failure, and not a batch time to learn from). Requests nobody
        waits for any more are dropped (the broker has answered or forgotten them)."""
        kept = tuple(p for p in batch.requests if p.request_id not in self.cancelled_while_running)
        self.batcher.requeue(replace(batch, requests=kept))
        for pending in kept:
            self.deadlines[pending.request_id] = pending.arrived_at + pending.item.deadline_s
        self.counters.record_stopped(ran_s)
        step = f" at step {preemption.steps_done} of {preemption.steps}" if preemption is not None else ""
        if preemption is not None and preemption.decision is AbandonDecision.STOP:
            why = "no request in it is wanted any more"
        elif preemption is not None and preemption.decision is AbandonDecision.STOP_AND_REQUEUE:
            why = "most of it is no longer wanted: its wanted requests restart without the others"
        else:
            why = "so that newer requests can join it"
        log.info("batch %s: stopped after %.3fs%s, %s; requests %s go back to the queue%s",
                 batch_id, ran_s, step, why, short_ids([p.request_id for p in kept]) or "(none)",
                 f" ({len(batch) - len(kept)} cancelled meanwhile)" if len(kept) < len(batch) else "",
                 extra={"batch_id": batch_id, "request_ids": [p.request_id for p in kept]})
        self._send_status()

    def _observe_batch_time(self, key: BatchKey, size: int, generation_s: float, splits_before: int) -> None:
        """Teach a learning policy (BATCH_POLICY=default) what this batch cost; a batch that was split
        after running out of memory is skipped, since its time is not that of one call of its size."""
        if self.backend.oom_splits == splits_before:
            self.batcher.observe_batch(key, size, generation_s, self.clock())

    def _fail_batch(self, batch: Batch[Generate], exc: Exception) -> None:
        code = FailureCode.INVALID_REQUEST if isinstance(exc, ValueError) else FailureCode.GENERATION_FAILED
        request_ids = [p.request_id for p in batch.requests]
        log.error("batch of %d failed (%s); requests %s", len(batch), code.value, " ".join(request_ids),
                  exc_info=exc, extra={"request_ids": request_ids})
        self.counters.record_failed(len(batch))
        for pending in batch.requests:
            self.link.send(Failure(pending.request_id, code.value, f"{type(exc).__name__}: {exc}"[:4000]))
        self._send_status()

    async def _deliver(self, batch: Batch[Generate], batch_id: str, encodings: BatchEncodings,
                       generation_s: float, unwanted: frozenset[str] = frozenset()) -> None:
        for index, pending in enumerate(batch.requests):
            if pending.request_id in unwanted:
                continue  # nobody waits for it: the broker has answered or forgotten it
            png = await encodings.png(index)
            stage_trace.stage("worker_png_ready", pending.request_id)
            params = pending.item.params
            result = Result(
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
            )
            # Before the send: the gateway may answer the request before this loop runs on.
            stage_trace.stage("worker_sent_result", pending.request_id)
            self.link.send(result, [png])
