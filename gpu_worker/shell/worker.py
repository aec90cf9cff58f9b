"""The GPU worker's shell: the broker link, the GPU thread, PNG encoding and delivery.

Every decision is :class:`gpu_worker.decisions.worker_state.WorkerState`'s, a pure object told each event
with ``now`` from the worker's one injected clock: what is queued (the batching policy, a
:class:`gpu_worker.decisions.batcher.BatchPolicy`) and until when, which batch runs next, which rows of the
running batch nobody waits for any more, what a stopped or failed batch leaves, the limits after an
out-of-memory error, and when to look again. This shell carries out the actions it returns
(:data:`gpu_worker.decisions.worker_state.Action`: send a FAILURE, abandon a row, stop the running batch, a
log line) and moves the bytes.

Tasks on one event-loop thread (only that thread touches the socket; pyzmq sockets are not
thread-safe):

* the link (:mod:`gpu_worker.shell.link`) registers, watches the broker's liveness and reconnects, and
  hands GENERATE and CANCEL messages to this worker;
* the heartbeat task reports queue depth and counters every interval;
* the batch loop takes the next batch from the state whenever the GPU is free, sleeping until its
  next decision instant or the next arrival (queued requests past their deadline fail first, before
  they cost GPU time), and runs the pipeline in a dedicated thread (so heartbeats flow while the GPU
  computes). A batch the batcher marks preemptible (a lone request started instead of held,
  gpu_worker/decisions/preemption.py) is stopped at its next step boundary when a request that could join it
  arrives in time; its request goes back to the queue and runs with the newcomers. Every batch is
  also stopped at its next step boundary when rows nobody waits for any more (a CANCEL from the
  broker, or the row's own deadline passing while it runs) make stopping worth it
  (gpu_worker.decisions.preemption.abandon_decision): its wanted rows go back to the queue and run again;
  otherwise it finishes and only the wanted rows' images are sent. The GPU thread learns of both
  through the batch's :class:`gpu_worker.decisions.preemption.Preemption`, the one object it shares with the
  event loop. While a batch runs, each of its requests gets a PROGRESS message at its start (step 0)
  and then at most one every PROGRESS_INTERVAL_S; a request that asked for previews
  (GenerationParams.preview) also gets a PREVIEW, a small image of its latents
  (gpu_worker/model/previews.py), every PREVIEW_EVERY_STEPS steps.

PNG encoding runs in its own thread pools and overlaps the GPU's work: a batch's images are handed
over part by part as the VAE decodes them (gpu_worker.model.decoding), each part's PNGs are compressed
while the GPU decodes the next part and then runs the next batch, and the results are sent once the
whole batch is done (they all carry the batch's generation time). The GPU never waits for
compression or sockets. Each image is also split into stripes compressed in parallel
(gpu_worker/model/png.py, ISA-L's deflate), so a lone image's PNG costs about a millisecond.
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
from typing import Any, Callable, Protocol, Sequence

from gpu_worker.model import png
from gpu_worker.decisions.batcher import Batch, BatchKey, BatchPolicy, BatchPolicyConfig
from gpu_worker.model.pipelines import GenerationJob
from gpu_worker.decisions.preemption import BatchPreempted, Preemption, ProgressLimiter
from gpu_worker.decisions.sizes import SizeRule, WarmUpPlan, WarmUpUnit, batch_sizes_at, sizes_text
from gpu_worker.decisions.stats import WorkerCounters
from gpu_worker.shell.link import BrokerLink
from gpu_worker.model.oom import OnImages, OomSplittingBackend, is_out_of_memory, release_cached_memory
from gpu_worker.model.previews import DEFAULT_EVERY_STEPS, PreviewPlan
from gpu_worker.decisions.worker_state import (
    AbandonRow,
    Action,
    LogNote,
    Queued,
    RequestPreemption,
    SendFailure,
    UnlistedSize,
    WorkerState,
)
from imagegen import stage_trace
from imagegen.logs import request_fields, request_name
from imagegen.sockets import CurveClientKeys
from imagegen.protocol import (
    BatchingConfig,
    Cancel,
    Disconnect,
    Failure,
    Generate,
    Heartbeat,
    ImageSize,
    Preview,
    Progress,
    Register,
    Result,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 300.0
# At most one PROGRESS message per running request this often (its first, step 0, always goes; the
# last step is never reported: the RESULT follows it).
PROGRESS_INTERVAL_S = 0.5
# PNG encoding (gpu_worker/model/png.py, ISA-L) of one 1024x1024 image takes 1-6 ms of CPU on the GPU
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
    """What the worker needs from a pipeline (gpu_worker.model.pipelines.ImagePipeline is the real one).

    generate may hand images over early, ``on_images(first_index, images)`` from its own thread, for
    consecutive slices of the batch; whatever it did not hand over is taken from its return value.
    With a ``preemption`` it calls ``preemption.before_step(synchronize)`` before every denoising
    step, which raises BatchPreempted when the worker has asked it to stop."""

    def generate(self, jobs: Sequence[GenerationJob], settings: BatchKey,
                 on_images: OnImages | None = None, preemption: Preemption | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class SizeServing:
    """The sizes the worker serves compiled (SIZES), what it does with others (UNLISTED_SIZE), and,
    with TORCH_COMPILE, how it warms those not warm when it registers (gpu_worker/decisions/sizes.py).

    ``warm_up``: (batch sizes, width, height) -> seconds per batch size, run in the GPU thread
    (ImagePipeline.warm_up); None: nothing is warmed after registering (compile off, or
    WORKER_WARMUP=0) and compile_state is "off"."""

    sizes: tuple[ImageSize, ...] = ()
    unlisted: str = "eager"
    warm_at_start: tuple[ImageSize, ...] = ()
    warm_up: Callable[[Sequence[int], int, int], Any] | None = None
    max_defer_s: float = 30.0
    cuda_graph_max_batch: int = 0
    loaded_at: float | None = None  # when the model was loaded, on the worker's clock (for the log)


class BatchLoopFailed(RuntimeError):
    """The worker's batch loop ended with an error: the process must exit and be restarted."""


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
    # ISA-L level 1: the fastest level that still finds repeats (gpu_worker/model/png.py).
    encoded = png.encode_png(image, stripe_threads, stripes=PNG_STRIPE_THREADS, level=1)
    if request_id is not None:
        stage_trace.stage("worker_png_encoded", request_id)
    return encoded


def timed_call(clock: Callable[[], float], call: Any, *args: Any) -> tuple[Any, float]:
    """call(*args) and the seconds it took on ``clock`` (the worker's), timed in the thread that runs
    it: the worker logs the GPU thread's own time beside the batch's time as the event loop sees it
    (the difference is hand-offs)."""
    began = clock()
    result = call(*args)
    return result, clock() - began


def registration(identity: WorkerIdentity, policy: BatchPolicyConfig, capacity: int, auto: bool,
                 seconds_per_work_unit: float = 0.0, sizes: SizeServing = SizeServing(),
                 warm_sizes: Sequence[ImageSize] = ()) -> Register:
    """What the worker registers with (again after every reconnect, with the policy and warm sizes of
    the moment)."""
    return Register(worker_name=identity.name, host=identity.host, gpu_id=identity.gpu_id, pid=os.getpid(),
                    model_id=identity.model_id, device=identity.device, capacity=capacity,
                    batching=batching_report(policy, auto), seconds_per_work_unit=seconds_per_work_unit,
                    sizes=tuple(sizes.sizes), warm_sizes=tuple(warm_sizes), unlisted_size=sizes.unlisted)


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
                 seconds_per_work_unit: float = 0.0, sizes: SizeServing = SizeServing(),
                 preview_every_steps: int = DEFAULT_EVERY_STEPS) -> None:
        self.identity = identity
        self.preview_every_steps = preview_every_steps  # PREVIEW_EVERY_STEPS
        self.seconds_per_work_unit = seconds_per_work_unit  # measured at warm-up; reported for admission
        # A batch that runs out of GPU memory is split and retried in halves (gpu_worker/model/oom.py).
        self.backend = OomSplittingBackend(backend, on_oom=self._out_of_memory_in_gpu_thread)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.capacity = capacity
        self.max_batch_size_auto = max_batch_size_auto
        self.clock = clock  # the one clock: decisions, deadlines and every duration the worker reports
        # Every decision: the queue (any BatchPolicy, gpu_worker/decisions/policies.py; the window rule by
        # default), deadlines, the running batch's rows.
        self.decisions = WorkerState(policy, batcher, SizeRule(sizes.sizes, sizes.unlisted))
        self.sizes = sizes
        # The sizes still to warm, with TORCH_COMPILE (gpu_worker/decisions/sizes.py); None: compile off.
        self.warm_up: WarmUpPlan | None = None
        if sizes.warm_up is not None:
            self.warm_up = WarmUpPlan([size for size in sizes.sizes if size not in sizes.warm_at_start],
                                      self._batch_sizes_at, sizes.max_defer_s, warm=list(sizes.warm_at_start),
                                      last_unit_at=clock())
        self.counters = WorkerCounters()
        self.preemption: Preemption | None = None  # the running batch's stop signal, shared with the GPU thread
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
        """Serve until ``stop`` is set, then drain. If the batch loop fails, leave as a drain does (the
        broker requeues what this worker held) and raise :class:`BatchLoopFailed`: a worker whose GPU
        loop is gone must exit, so that its supervisor starts a new one, rather than heartbeat on
        while holding requests it will never run."""
        self.loop = asyncio.get_running_loop()
        self.link.start()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        batch_loop = asyncio.create_task(self._batch_loop(), name="batches")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait([stopping, batch_loop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await self._leave(batch_loop, heartbeat)
        failure = None if batch_loop.cancelled() else batch_loop.exception()
        if failure is not None:
            raise BatchLoopFailed(f"{type(failure).__name__}: {failure}") from failure

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
        self.link.send(Disconnect(f"worker shutting down; {self.decisions.queue_depth} unstarted requests to requeue"))
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
            running = self.decisions.running_batch
            self.loop.call_soon_threadsafe(self.lower_max_batch_size, failed_size, succeeded_size,
                                           running.key if running is not None else None)

    def lower_max_batch_size(self, failed_size: int, succeeded_size: int, key: BatchKey | None = None) -> None:
        """After an out-of-memory split (WorkerState.out_of_memory decides the new limits)."""
        self._execute([self.decisions.out_of_memory(failed_size, succeeded_size, key, self.clock())])
        self._send_status()

    # ------------------------------------------------------------------ broker link

    def _registration(self) -> Register:
        return registration(self.identity, self.decisions.policy, self.capacity, self.max_batch_size_auto,
                            self.seconds_per_work_unit, self.sizes, self.warm_sizes)

    @property
    def warm_sizes(self) -> tuple[ImageSize, ...]:
        return tuple(self.warm_up.warm) if self.warm_up is not None else ()

    @property
    def compile_state(self) -> str:
        return self.warm_up.state if self.warm_up is not None else "off"

    def _batch_sizes_at(self, size: ImageSize) -> list[int]:
        """The batch sizes a warm-up of ``size`` runs, under the limits of the moment."""
        policy = self.decisions.policy
        return batch_sizes_at(size, policy.max_batch_size, policy.max_batch_pixels, self.sizes.cuda_graph_max_batch)

    def _on_message(self, message: object) -> None:
        if isinstance(message, Generate):
            stage_trace.stage("worker_got_request", message.request_id)
            self._execute(self.decisions.accept(message, self.clock()))
        elif isinstance(message, Cancel):
            self._execute(self.decisions.cancel(message.request_id, self.clock()))
        else:
            log.warning("ignored unexpected %s from the broker", type(message).__name__)

    def _forget_queue(self, why: str) -> None:
        """The broker no longer counts on what we queued (it requeued it, or it restarted)."""
        self._execute(self.decisions.forget_queue(why, self.clock()))

    def _execute(self, actions: Sequence[Action]) -> None:
        """Carry out what WorkerState decided, in order."""
        for action in actions:
            if isinstance(action, SendFailure):
                self.link.send(Failure(action.request_id, action.code.value, action.text))
            elif isinstance(action, AbandonRow):
                self._abandon_row(action)
            elif isinstance(action, Queued):
                self._queued(action.request)
            elif isinstance(action, RequestPreemption):
                self._request_preemption(action)
            elif isinstance(action, UnlistedSize):
                self._unlisted_size(action)
            elif isinstance(action, LogNote):
                log.log(action.level, action.text, exc_info=action.error, extra=dict(action.fields))
            else:
                raise TypeError(f"unknown worker action {action!r}")

    def _unlisted_size(self, action: UnlistedSize) -> None:
        if action.outcome == "refused":
            self.counters.unlisted_refused += 1
        elif action.outcome == "snapped":
            self.counters.unlisted_snapped += 1
        log.debug("request %s: a size SIZES does not list, %s%s", action.request_id, action.outcome,
                  f" to {action.size}" if action.size else "", extra={"request_id": action.request_id})

    def _queued(self, request: Generate) -> None:
        params = request.params
        if self.warm_up is not None:
            self.warm_up.note_demand(ImageSize(params.width, params.height))
        log.debug("request %s queued: %dx%d, %d steps", request_name(request.request_id, request.label),
                  params.width, params.height, params.num_inference_steps,
                  extra=request_fields(request.request_id, request.label))
        self.counters.observe_queue_depth(self.decisions.queue_depth)
        self.arrival.set()

    def _request_preemption(self, action: RequestPreemption) -> None:
        if self.preemption is None:
            return
        self.preemption.request()
        log.debug("a request that can join batch of %d arrived %.1f ms after it started: stopping it at its "
                  "next step", action.batch_size, action.since_formed_s * 1000.0)

    def _abandon_row(self, action: AbandonRow) -> None:
        """Hand the row to the GPU thread's stop signal, which decides at the next step."""
        preemption = self.preemption
        if preemption is None:
            return
        preemption.abandon(action.row)
        log.info("request %s %s while its batch runs (step %d of %d): dropped from the batch", action.request_id,
                 action.why, preemption.steps_done, preemption.steps, extra={"request_id": action.request_id})

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.link.heartbeat_interval_s)
            if self.link.registered.is_set():
                self._send_status()

    def _send_status(self) -> None:
        status = self.counters.status(self.state, self.decisions.queue_depth, self.decisions.running_size)
        self.link.send(Heartbeat(replace(status, max_batch_size=self.decisions.max_batch_size,
                                         compile_state=self.compile_state, warm_sizes=self.warm_sizes)))

    # ------------------------------------------------------------------ batches

    async def _batch_loop(self) -> None:
        while self.state != "draining":
            self._execute(self.decisions.expire_queued(self.clock()))
            unit = self._warm_up_unit_due()
            if unit is not None:
                await self._warm(unit)
                continue
            batch = self.decisions.start_batch(self.clock())
            if batch is None:
                await self._sleep_until_next_decision()
                continue
            await self._run(batch)

    def _warm_up_unit_due(self) -> WarmUpUnit | None:
        if self.warm_up is None:
            return None
        return self.warm_up.next_unit(self.clock(), queue_empty=self.decisions.queue_depth == 0)

    async def _warm(self, unit: WarmUpUnit) -> None:
        """Run one warm-up unit in the GPU thread (the event loop goes on: heartbeats, arrivals)."""
        plan = self.warm_up
        assert plan is not None and self.sizes.warm_up is not None
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.gpu_thread, self.sizes.warm_up, [unit.batch_size], unit.size.width, unit.size.height)
        except Exception as exc:  # noqa: BLE001 - a size that cannot be warmed runs eager; the worker serves on
            if is_out_of_memory(exc):
                release_cached_memory()
            plan.unit_failed(unit, self.clock())
            log.warning("warming %s at batch %d failed (%s: %s): requests of that size run eager",
                        unit.size, unit.batch_size, type(exc).__name__, exc)
            return
        if plan.unit_done(unit, self.clock()):
            since = "" if self.sizes.loaded_at is None else f" {self.clock() - self.sizes.loaded_at:.1f}s after the model loaded"
            log.info("size %s warm%s (%d of %d sizes warm)", unit.size, since, len(plan.warm), len(self.sizes.sizes))
            if plan.done:
                log.info("every listed size is warm%s: %s%s", since, sizes_text(plan.warm),
                         f"; could not warm {sizes_text(plan.failed)}" if plan.failed else "")
            self._send_status()

    async def _await_batch(self, running: asyncio.Future) -> Any:
        """The GPU thread's answer; meanwhile, rows whose deadline passes are abandoned at once."""
        while True:
            wake_at = self.decisions.next_wake_at(self.clock())
            # Expiry is strictly after wake_at: look a millisecond past it.
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock()) + 0.001
            done, _ = await asyncio.wait([running], timeout=timeout)
            if done:
                return running.result()
            self._execute(self.decisions.expire_running(self.clock()))

    def _progress_in_gpu_thread(self, request_ids: Sequence[str], unwanted_rows: frozenset[int], step: int,
                                steps: int) -> None:
        """Called by the GPU thread before each step: hand the due PROGRESS messages to the event loop."""
        due = [rid for row, rid in enumerate(request_ids)
               if row not in unwanted_rows and self.progress_limiter.allow(rid)]
        if due and self.loop is not None:
            self.loop.call_soon_threadsafe(self._send_progress, due, step, steps, len(request_ids))

    def _send_progress(self, request_ids: Sequence[str], step: int, steps: int, batch_size: int) -> None:
        for request_id in request_ids:
            self.link.send(Progress(request_id, min(step, steps), steps, batch_size=batch_size))

    def _preview_plan(self, batch: Batch[Generate], steps: int,
                      unwanted: Callable[[], frozenset[int]]) -> PreviewPlan | None:
        """The batch's previews (gpu_worker/model/previews.py): the rows whose request asked, every
        PREVIEW_EVERY_STEPS steps; None when no row asked."""
        rows = tuple(row for row, pending in enumerate(batch.requests) if pending.item.params.preview)
        if not rows:
            return None
        request_ids = [pending.request_id for pending in batch.requests]
        return PreviewPlan(rows, self.preview_every_steps, steps, unwanted=unwanted,
                           deliver=lambda step, images: self._previews_in_gpu_thread(request_ids, step, steps, images))

    def _previews_in_gpu_thread(self, request_ids: Sequence[str], step: int, steps: int,
                                images: Sequence[tuple[int, bytes]]) -> None:
        """Called by the GPU thread with a due step's encoded previews: hand them to the event loop
        (before the batch's answer, which the loop learns of later, so a preview never follows its RESULT)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._send_previews, [(request_ids[row], image) for row, image in images],
                                           step, steps)

    def _send_previews(self, images: Sequence[tuple[str, bytes]], step: int, steps: int) -> None:
        for request_id, image in images:
            self.link.send(Preview(request_id, step, steps), [image])

    async def _sleep_until_next_decision(self) -> None:
        self.arrival.clear()
        wake_at = self.decisions.next_wake_at(self.clock())
        due_at = self.warm_up.next_due_at() if self.warm_up is not None else None
        if due_at is not None:  # a warm-up unit comes due even while requests wait
            wake_at = due_at if wake_at is None else min(wake_at, due_at)
        timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
        try:
            await asyncio.wait_for(self.arrival.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run(self, batch: Batch[Generate]) -> None:
        jobs = [GenerationJob(p.item.params.prompt, p.item.params.negative_prompt, p.item.params.seed)
                for p in batch.requests]
        key = batch.key
        self.batch_seq += 1
        batch_id = f"{self.identity.name}:{self.batch_seq}"
        request_ids = [p.request_id for p in batch.requests]
        steps = key.num_inference_steps
        # Every batch is stoppable at a step boundary: for newcomers while it is preemptible, and for
        # rows nobody waits for any more until its last step. The GPU thread reads which rows those
        # are from the stop signal itself (thread-safe), never from the event loop's state.
        preemption = Preemption(batch.preemptible_until, self.clock, rows=len(batch), steps=steps,
                                on_step=lambda step: self._progress_in_gpu_thread(request_ids, preemption.unwanted,
                                                                                  step, steps),
                                previews=self._preview_plan(batch, steps, lambda: preemption.unwanted))
        self.preemption = preemption
        for pending in batch.requests:
            stage_trace.stage("worker_batch_started", pending.request_id)
        self._send_progress([rid for rid in request_ids if self.progress_limiter.allow(rid)], 0, steps,
                            len(request_ids))
        started = self.clock()
        splits_before = self.backend.oom_splits
        encodings = BatchEncodings(self.encoder_threads, self.stripe_threads, request_ids)
        try:
            running = asyncio.get_running_loop().run_in_executor(
                self.gpu_thread, timed_call, self.clock, self.backend.generate, jobs, key,
                encodings.on_images_in_gpu_thread, preemption)
            self._send_status()  # the broker sees the batch running; sent once the GPU thread has it
            self._execute(self.decisions.expire_running(self.clock()))  # a row that arrived already late
            images, gpu_thread_s = await self._await_batch(running)
        except BatchPreempted:
            encodings.cancel()
            self._requeue(batch_id, self.clock() - started, preemption)
            return
        except Exception as exc:  # the pipeline's errors end this batch's requests, never the worker
            encodings.cancel()
            self._fail_batch(batch, exc)
            return
        finally:
            unwanted = self.decisions.end_batch(self.clock())
            self.preemption = None
            for request_id in request_ids:
                self.progress_limiter.forget(request_id)
        encodings.encode(0, images)  # those not handed over early
        generation_s = self.clock() - started
        for pending in batch.requests:
            stage_trace.stage("worker_batch_done", pending.request_id)
        self.decisions.observe_batch(key, len(batch), generation_s, self.backend.oom_splits != splits_before,
                                     self.clock())
        self.counters.record_batch([batch.wait_s(p) for p in batch.requests], generation_s)
        if self.warm_up is not None and not self.warm_up.is_warm(ImageSize(key.width, key.height)):
            self.counters.record_eager(len(batch))
        labels = [p.item.label for p in batch.requests]
        log.info("batch %s: %d x %dx%d, %d steps in %.3fs (GPU thread %.3fs); requests %s%s", batch_id, len(batch),
                 key.width, key.height, key.num_inference_steps, generation_s, gpu_thread_s,
                 short_ids(request_ids, labels),
                 f" ({len(unwanted)} no longer wanted: images dropped)" if unwanted else "",
                 extra={"batch_id": batch_id, "request_ids": request_ids, "labels": labels})
        if preemption.previews is not None:
            log.debug("batch %s: %d previews, %.1f ms in the GPU thread", batch_id, preemption.previews.images,
                      preemption.previews.seconds * 1000.0, extra={"batch_id": batch_id})
        task = asyncio.create_task(self._deliver(batch, batch_id, encodings, generation_s, unwanted))
        self.delivery_tasks.add(task)
        task.add_done_callback(self.delivery_tasks.discard)
        self._send_status()

    def _requeue(self, batch_id: str, ran_s: float, preemption: Preemption) -> None:
        """A stopped batch (not a failure, and not a batch time to learn from): WorkerState queues its
        wanted requests again; this logs it."""
        requeued = self.decisions.batch_stopped(preemption.decision, self.clock())
        self.counters.record_stopped(ran_s)
        log.info("batch %s: stopped after %.3fs at step %d of %d, %s; requests %s go back to the queue%s",
                 batch_id, ran_s, preemption.steps_done, preemption.steps, requeued.why,
                 short_ids(requeued.request_ids) or "(none)",
                 f" ({requeued.dropped} cancelled meanwhile)" if requeued.dropped else "",
                 extra={"batch_id": batch_id, "request_ids": list(requeued.request_ids)})
        self._send_status()

    def _fail_batch(self, batch: Batch[Generate], exc: Exception) -> None:
        self._execute(self.decisions.batch_failed(exc, self.clock()))
        self.counters.record_failed(len(batch))
        self._send_status()

    def _send_result(self, request: Generate, png: bytes, batch_id: str, batch_size: int, queue_wait_s: float,
                     generation_s: float) -> None:
        """One image's RESULT (its PNG in the payload frame), with how and where it was made."""
        params = request.params
        result = Result(request_id=request.request_id, worker_name=self.identity.name, host=self.identity.host,
                        gpu_id=self.identity.gpu_id, batch_id=batch_id, batch_size=batch_size,
                        queue_wait_ms=queue_wait_s * 1000.0, generation_ms=generation_s * 1000.0,
                        width=params.width, height=params.height, seed=params.seed)
        # Before the send: the gateway may answer the request before the caller runs on.
        stage_trace.stage("worker_sent_result", request.request_id)
        self.link.send(result, [png])

    async def _deliver(self, batch: Batch[Generate], batch_id: str, encodings: BatchEncodings,
                       generation_s: float, unwanted: frozenset[str] = frozenset()) -> None:
        for index, pending in enumerate(batch.requests):
            if pending.request_id in unwanted:
                continue  # nobody waits for it: the broker has answered or forgotten it
            png = await encodings.png(index)
            stage_trace.stage("worker_png_ready", pending.request_id)
            self._send_result(pending.item, png, batch_id, len(batch), batch.wait_s(pending), generation_s)
