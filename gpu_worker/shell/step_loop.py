"""The worker under BATCH_POLICY=step: one denoising step at a time, decided by the step scheduler.

:class:`StepWorker` is :class:`gpu_worker.shell.worker.Worker` (the broker link, heartbeats, PNG
encoder threads, drain) with another batch loop. Every decision is
:class:`gpu_worker.decisions.step_scheduler.StepScheduler`'s; the rows' state on the device is
:class:`gpu_worker.model.step_engine.StepEngine`'s. At each step boundary the loop asks the scheduler
for a plan and carries it out in the GPU thread, in this order: drop the rows nobody waits for
(CANCEL, deadline), pause the rows the plan leaves out, decode the finished rows (their PNGs are
compressed in the encoder threads, off the GPU thread), admit the new rows (their prompts encoded,
their latents made) and advance the plan's rows by one step (one UNet call); the step's time goes
back to the scheduler (:meth:`StepScheduler.step_done`).

What each request is told:

* PROGRESS per row, with its own step (rows that joined at different boundaries are at different
  steps): step 0 when it is admitted, then at most one every PROGRESS_INTERVAL_S, never its last
  step (the RESULT follows); ``batch_size`` is the rows of the step it took. A row the plan pauses
  gets PROGRESS ``paused`` at once, and its first step after that a PROGRESS at once (running
  again), whatever the interval;
* PREVIEW every PREVIEW_EVERY_STEPS of its own steps, from its own latents, when it asked;
* RESULT: ``batch_id`` names the cohort it first stepped in (rows that joined a running cohort share
  its id), ``batch_size`` the rows of its last step, ``queue_wait_ms`` its arrival to its first step
  and ``generation_ms`` its first step to its decode;
* FAILURE ``deadline_exceeded`` when its deadline passes (waiting or running: the scheduler drops it
  at the next boundary), the pipeline's error (``invalid_request`` or ``generation_failed``) for the
  rows of a boundary that raised.

Draining (SIGTERM) finishes and delivers every row that has been admitted; rows never admitted are
let go (the broker requeues what the worker held when it disconnects, as under the other policies).

Scheduler steps count UNet calls: a request's step count as the engine runs it (PNDM makes one call
more than its steps), so that the scheduler's "finished" is the engine's. PROGRESS and PREVIEW report
the request's own steps.

Out of memory: a step whose UNet call runs out of GPU memory changes no row; the scheduler halves
the rows a step of that shape may take (StepScheduler.out_of_memory) and the next plan pauses the
rows beyond it, which run when places free up (from then on a paused row waits in CPU memory:
its latents, prompt embeddings and scheduler state off the GPU); a lone row that does not fit fails
(``generation_failed``). Other errors of a boundary fail its rows.

With TORCH_COMPILE the first size is warm before the worker registers (:func:`warm_up_engine`); the
other listed sizes warm in the background (:func:`warm_up_engine_size`, one unit at a time from the
plan of :class:`gpu_worker.decisions.sizes.WarmUpPlan`, as under the other policies): between steps
when no request is held, or when the last unit is WARM_UP_MAX_DEFER_S old; a size that requests ask
for goes next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from gpu_worker.decisions.sizes import WarmUpUnit
from gpu_worker.decisions.step_scheduler import StepPlan, StepRequest, StepScheduler, StepTuning
from gpu_worker.decisions.worker_state import failure_code, MAX_FAILURE_TEXT_CHARS
from gpu_worker.model import acceleration, previews, schedulers
from gpu_worker.model.pipelines import GenerationJob
from gpu_worker.model.oom import release_cached_memory
from gpu_worker.model.step_engine import RowSpec, StepEngine, UNetOutOfMemory
from gpu_worker.shell.worker import BatchEncodings, Worker, short_ids
from imagegen import stage_trace
from imagegen.batch_key import BatchKey
from imagegen.logs import request_fields, request_name
from imagegen.protocol import Cancel, FailureCode, Failure, Generate, Heartbeat, ImageSize, Preview, Progress

log = logging.getLogger(__name__)

IDLE_LOOK_S = 1.0  # with nothing to run, the loop looks again at least this often (besides arrivals)
WARM_UP_ROW = "warm-up"


def graphed_image_limit(engine: StepEngine) -> int:
    """The most guided rows a step runs through the UNet's CUDA graphs (CUDA_GRAPH_MAX_BATCH; 0: none,
    or nothing compiled). More rows run the compiled UNet: a compilation of its own, warmed up apart."""
    forward = acceleration.compiled_forward(engine.pipeline.diffusers_pipeline.unet)
    if forward is None or forward.graphed is None:
        return 0
    return forward.cuda_graph_max_batch


def warm_up_row_counts(cuda_graph_max_batch: int) -> list[int]:
    """Guided rows of the engine's warm-up steps, one step each: with CUDA graphs, one more row than
    they take (the compiled UNet, every larger row count) and one row (the graphs, every smaller
    count); without, one row compiles the UNet for every count. A warm-up that stepped only rows the
    graphs take would leave the compiled UNet cold, and every fuller step would run eager."""
    return [cuda_graph_max_batch + 1, 1] if cuda_graph_max_batch > 0 else [1]


def warm_up_engine(engine: StepEngine, size: ImageSize) -> float:
    """Compile the engine's UNet call (a timestep per row, the batch dimension dynamic) at ``size``,
    in the GPU thread, with TORCH_COMPILE: a step of guided rows per count of
    :func:`warm_up_row_counts`; returns the seconds it took. One compilation serves every row count
    of its kind (tests/e2e/test_step_engine_compiled.py)."""
    began = time.perf_counter()
    key = BatchKey(size.width, size.height, 2, 7.5)
    acceleration.warm_up_shapes(lambda count: step_warm_up_rows(engine, key, count, decode=False),
                                warm_up_row_counts(graphed_image_limit(engine)))
    return time.perf_counter() - began


def step_warm_up_rows(engine: StepEngine, key: BatchKey, count: int, decode: bool) -> None:
    """Admit ``count`` warm-up rows of ``key``, take one step of them (and decode them, if asked), then
    leave the engine as it was."""
    rows = [RowSpec(f"{WARM_UP_ROW}-{index}", GenerationJob("warm-up", None, index), key) for index in range(count)]
    engine.admit(rows)
    try:
        engine.step([row.row_id for row in rows])
        if decode:
            engine.decode([row.row_id for row in rows])
    finally:
        for row in rows:
            if row.row_id in engine.row_ids():
                engine.drop(row.row_id)


def size_warm_up_images(cuda_graph_max_batch: int) -> list[int]:
    """A further size's warm-up: the images it steps and decodes, one count after the other. Two or
    more images compile the VAE decoder with a dynamic batch and one image compiles its single-image
    case; the first count also steps past the CUDA graphs' rows (the compiled UNet), the last inside
    them (the graphs)."""
    return [max(2, cuda_graph_max_batch + 1), 1]


def warm_up_engine_size(engine: StepEngine, batch_sizes: Sequence[int], width: int, height: int) -> dict[int, float]:
    """Make ``width`` x ``height`` warm for the step loop, in the GPU thread (its background warm-up
    under TORCH_COMPILE, :class:`gpu_worker.shell.worker.SizeServing` ``warm_up``): for each count in
    ``batch_sizes`` (:func:`size_warm_up_images`), that many guided rows of one step are admitted,
    stepped and decoded, so the engine's UNet call and the VAE decoder compile at this size now rather
    than run eager later. Returns seconds per count."""
    key = BatchKey(width, height, 1, 7.5)
    return acceleration.warm_up_shapes(lambda count: step_warm_up_rows(engine, key, count, decode=True),
                                       list(batch_sizes))


@dataclass
class RowLog:
    """What the shell keeps of one held request, for its messages (the decisions are the scheduler's)."""

    request: Generate
    steps: int  # the request's own denoising steps (PROGRESS, PREVIEW)
    arrived_at: float
    first_step_at: float | None = None
    batch_id: str = ""  # the cohort it first stepped in
    last_step_rows: int = 0
    steps_done: int = 0  # UNet calls made for it
    paused: bool = False  # its row waits (latents kept) while better-priority rows run; its client knows


@dataclass
class BoundaryOutcome:
    """What the GPU thread did with one plan."""

    step_s: float = 0.0  # the advance's seconds (0: no step)
    progress: dict[str, int] | None = None  # row -> UNet calls done, after the step
    previews: list[tuple[str, int, bytes]] | None = None  # (row, step, image)
    decoded: tuple[str, ...] = ()
    encodings: BatchEncodings | None = None
    out_of_memory: UNetOutOfMemory | None = None  # the step ran out of memory; no row changed


class StepWorker(Worker):
    """A worker whose batch loop is the step loop (module docstring). ``engine``: the model's step
    engine; ``tuning``: the step policy's knobs (max_rows from MAX_BATCH_SIZE)."""

    def __init__(self, *args: Any, engine: StepEngine, tuning: StepTuning | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.scheduler: StepScheduler[Generate] = StepScheduler(
            tuning or StepTuning(max_rows=self.decisions.policy.max_batch_size))
        self.held: dict[str, RowLog] = {}
        self._unet_calls: dict[int, int] = {}
        self._last_advance: tuple[str, ...] = ()
        self._cohort_id = ""
        self._let_go: set[str] = set()  # rows never admitted, let go by a drain or a broker that forgot them

    # ------------------------------------------------------------------ messages

    def _on_message(self, message: object) -> None:
        if isinstance(message, Generate):
            stage_trace.stage("worker_got_request", message.request_id)
            self._accept(message)
        elif isinstance(message, Cancel):
            if message.request_id in self.held and self.scheduler.cancel(message.request_id, self.clock()):
                self.arrival.set()
        else:
            log.warning("ignored unexpected %s from the broker", type(message).__name__)

    def _accept(self, request: Generate) -> None:
        if request.request_id in self.held:
            return  # a resent id: one answer will come
        params = request.params
        decision = self.decisions.sizes.decide(params.width, params.height)
        if decision.refusal is not None:
            self.counters.unlisted_refused += 1
            self.link.send(Failure(request.request_id, FailureCode.SIZE_NOT_SERVED.value, decision.refusal))
            return
        if decision.size is not None:
            self.counters.unlisted_snapped += 1
            request = replace(request, params=replace(params, width=decision.size.width, height=decision.size.height))
            params = request.params
        key = BatchKey.of(params)
        try:  # refused alone now, rather than failing the rows admitted beside it
            self.engine.pipeline.check_settings(key)
        except ValueError as exc:
            self.link.send(Failure(request.request_id, FailureCode.INVALID_REQUEST.value,
                                   str(exc)[:MAX_FAILURE_TEXT_CHARS]))
            return
        now = self.clock()
        if self.warm_up is not None:
            self.warm_up.note_demand(ImageSize(params.width, params.height))
        # The scheduler counts UNet calls: the engine's steps of this request.
        counted = replace(key, num_inference_steps=self.unet_calls(key.num_inference_steps))
        self.scheduler.add(StepRequest(request.request_id, counted, request, priority=request.priority,
                                       owner=request.owner, deadline_at=now + request.deadline_s), now)
        self.held[request.request_id] = RowLog(request, params.num_inference_steps, now)
        log.debug("request %s queued: %dx%d, %d steps", request_name(request.request_id, request.label),
                  params.width, params.height, params.num_inference_steps,
                  extra=request_fields(request.request_id, request.label))
        self.counters.observe_queue_depth(max(0, self.scheduler.queue_depth - self.scheduler.running))
        self.arrival.set()

    def _batch_sizes_at(self, size: ImageSize) -> list[int]:
        """A size's warm-up under the step loop: the rows it steps and decodes (warm_up_engine_size)."""
        return size_warm_up_images(graphed_image_limit(self.engine))

    def _warm_up_unit_due(self) -> WarmUpUnit | None:
        if self.warm_up is None:
            return None
        return self.warm_up.next_unit(self.clock(), queue_empty=not self.scheduler.rows)

    def unet_calls(self, steps: int) -> int:
        """The UNet calls the engine makes for ``steps`` steps (its scheduler's timesteps)."""
        calls = self._unet_calls.get(steps)
        if calls is None:
            scheduler = schedulers.fresh_copy(self.engine.scheduler)
            scheduler.set_timesteps(steps, device="cpu")
            calls = self._unet_calls[steps] = len(scheduler.timesteps)
        return calls

    def _forget_queue(self, why: str) -> None:
        """The broker no longer counts on what is queued: the rows not admitted go."""
        dropped = self._let_unstarted_go()
        log.warning("%s; dropped %d queued requests", why, dropped)

    def _let_unstarted_go(self) -> int:
        now = self.clock()
        unstarted = [row.request_id for row in self.scheduler.rows.values() if not row.admitted]
        for request_id in unstarted:
            if self.scheduler.cancel(request_id, now):
                self._let_go.add(request_id)
        return len(unstarted)

    def _send_status(self) -> None:
        # As under the other policies: queue_depth leaves out the rows running (the broker adds them).
        running = self.scheduler.running
        status = self.counters.status(self.state, max(0, self.scheduler.queue_depth - running), running)
        self.link.send(Heartbeat(replace(status, max_batch_size=self.decisions.max_batch_size,
                                         compile_state=self.compile_state, warm_sizes=self.warm_sizes)))

    # ------------------------------------------------------------------ the step loop

    async def _batch_loop(self) -> None:
        try:
            await self._step_loop()
        except Exception:
            log.exception("the step loop failed: this worker hands its requests back and exits")
            raise

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.state == "draining":
                self._let_unstarted_go()  # the broker requeues them when this worker disconnects
            # A warm-up unit when nothing is held, or when the last unit is old enough (never in a drain).
            unit = None if self.state == "draining" else self._warm_up_unit_due()
            if unit is not None:
                await self._warm(unit)
                continue
            plan = self.scheduler.plan(self.clock())
            self._dropped(plan)
            if plan.idle:
                if plan.drop:  # nothing to run, but the dropped rows' memory is freed now
                    await loop.run_in_executor(self.gpu_thread, self._forget_rows_in_gpu_thread,
                                               [request_id for request_id, _ in plan.drop])
                if self.state == "draining" and not self.scheduler.rows:
                    return
                await self._sleep(plan.wake_at)
                continue
            admitted = [self._row_spec(request_id) for request_id in plan.admit]
            self._start_rows(plan)
            try:
                outcome: BoundaryOutcome = await loop.run_in_executor(
                    self.gpu_thread, self._boundary_in_gpu_thread, plan, admitted, self._memory_pressed())
            except Exception as exc:  # the pipeline's errors end this boundary's rows, never the worker
                self._fail_rows(list(dict.fromkeys(plan.decode + plan.admit + plan.advance)), exc)
                continue
            now = self.clock()
            if outcome.out_of_memory is not None:
                self._out_of_memory(plan.advance, outcome.out_of_memory)
            elif plan.advance:
                self.scheduler.step_done(plan.advance, outcome.step_s, now)
                for request_id in plan.advance:
                    held = self.held[request_id]
                    held.last_step_rows = len(plan.advance)
                    held.steps_done += 1
            self._send_paused(plan.pause)
            if outcome.progress:
                self._send_row_progress(outcome.progress, len(plan.advance))
            for request_id, step, image in outcome.previews or ():
                held = self.held.get(request_id)
                if held is not None:
                    self.link.send(Preview(request_id, step, held.steps), [image])
            if outcome.decoded:
                self._deliver_rows(outcome.decoded, outcome.encodings, now)
            if plan.admit or not plan.advance or outcome.decoded:
                self._send_status()

    def _row_spec(self, request_id: str) -> RowSpec:
        params = self.held[request_id].request.params
        return RowSpec(request_id, GenerationJob(params.prompt, params.negative_prompt, params.seed),
                       BatchKey.of(params))

    def _start_rows(self, plan: StepPlan) -> None:
        """Before the GPU runs the plan: admitted rows get PROGRESS step 0; rows stepping for the first
        time are timed from now and named after their cohort (a new one unless the plan continues the
        last one)."""
        now = self.clock()
        for request_id in plan.admit:
            stage_trace.stage("worker_batch_started", request_id)
            if self.progress_limiter.allow(request_id):
                self.link.send(Progress(request_id, 0, self.held[request_id].steps,
                                        batch_size=len(plan.advance) or len(plan.admit)))
        if not plan.advance:
            return
        if not set(plan.advance) & set(self._last_advance) or not self._cohort_id:
            self.batch_seq += 1
            self._cohort_id = f"{self.identity.name}:{self.batch_seq}"
        self._last_advance = plan.advance
        for request_id in plan.advance:
            held = self.held[request_id]
            if held.first_step_at is None:
                held.first_step_at = now
                held.batch_id = self._cohort_id

    def _memory_pressed(self) -> bool:
        """Whether a step has run out of GPU memory (the scheduler then limits some shape's rows): paused
        rows then wait in CPU memory, their latents and scheduler state off the GPU."""
        return bool(self.scheduler.row_limits)

    def _boundary_in_gpu_thread(self, plan: StepPlan, admitted: Sequence[RowSpec],
                                offload_paused: bool = False) -> BoundaryOutcome:
        engine = self.engine
        self._forget_rows_in_gpu_thread([request_id for request_id, _ in plan.drop])
        present = set(engine.row_ids())
        for request_id in plan.pause:
            if request_id in present and (offload_paused or not engine.is_paused(request_id)):
                engine.pause(request_id, offload=offload_paused)  # a row paused before the pressure moves now
        outcome = BoundaryOutcome()
        if plan.decode:
            outcome.encodings = BatchEncodings(self.encoder_threads, self.stripe_threads, plan.decode)
            engine.decode(plan.decode, outcome.encodings.on_images_in_gpu_thread)
            outcome.decoded = plan.decode
        engine.admit(admitted)
        if plan.advance:
            for request_id in plan.advance:
                if engine.is_paused(request_id):
                    engine.resume(request_id)
            began = self.clock()
            try:
                engine.step(plan.advance)
            except UNetOutOfMemory as exc:
                release_cached_memory()
                outcome.out_of_memory = exc
                return outcome
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            outcome.step_s = self.clock() - began
            outcome.progress = {request_id: engine.progress(request_id)[0] for request_id in plan.advance}
            outcome.previews = self._previews_in_gpu_thread(outcome.progress)
        return outcome

    def _previews_in_gpu_thread(self, progress: dict[str, int]) -> list[tuple[str, int, bytes]]:
        """Previews of the rows that asked and are at one of their due steps (previews.due_steps)."""
        images = []
        for request_id, done in progress.items():
            held = self.held.get(request_id)
            if held is None or not held.request.params.preview:
                continue
            if done in previews.due_steps(held.steps, self.preview_every_steps):
                rgb = previews.latents_to_rgb(self.engine.scaled_latents([request_id]),
                                              self.engine.pipeline.architecture)
                images.append((request_id, done, previews.encode_preview(rgb[0].cpu().numpy())))
        return images

    def _send_paused(self, request_ids: Sequence[str]) -> None:
        """Rows the plan paused: each one's client hears it at once (PROGRESS ``paused``, whatever the
        rate limit), at the step it reached."""
        for request_id in request_ids:
            held = self.held.get(request_id)
            if held is None or held.paused:
                continue
            held.paused = True
            self.progress_limiter.sent(request_id)
            self.link.send(Progress(request_id, min(held.steps_done, held.steps), held.steps, paused=True))

    def _send_row_progress(self, progress: dict[str, int], rows: int) -> None:
        for request_id, done in progress.items():
            held = self.held.get(request_id)
            if held is None or done >= held.steps:
                continue  # its last step (and PNDM's extra call): the RESULT follows
            resumed = held.paused  # a paused row that ran again: its client hears it at once
            held.paused = False
            if resumed:
                self.progress_limiter.sent(request_id)
            if resumed or self.progress_limiter.allow(request_id):
                self.link.send(Progress(request_id, min(done, held.steps), held.steps, batch_size=rows))

    def _dropped(self, plan: StepPlan) -> None:
        """Rows the scheduler dropped: a passed deadline fails the request; a cancelled one ends quietly."""
        for request_id, why in plan.drop:
            held = self.held.pop(request_id, None)
            self.progress_limiter.forget(request_id)
            if held is None:
                continue
            if request_id in self._let_go:
                self._let_go.discard(request_id)
                log.info("request %s let go before it started: the broker requeues it", request_id,
                         extra={"request_id": request_id})
                continue
            if why == "deadline":
                self.link.send(Failure(request_id, FailureCode.DEADLINE_EXCEEDED.value,
                                       "the request's deadline passed before its image was made"))
            log.info("request %s %s: dropped at step %d", request_id,
                     "cancelled" if why == "cancelled" else "passed its deadline",
                     held.steps_done, extra={"request_id": request_id})

    def _out_of_memory(self, advance: Sequence[str], exc: UNetOutOfMemory) -> None:
        """A step ran out of GPU memory, every row as it was: steps of that shape take half the rows
        from now on (the scheduler pauses the others, latents kept); a lone row cannot be split and fails."""
        limit = self.scheduler.out_of_memory(advance)
        if limit is None:
            self._fail_rows(list(advance), exc)
            return
        log.warning("a step of %d rows ran out of GPU memory (%s); steps of that size take at most %d rows from "
                    "now on, the others wait their turn", len(advance), exc.__cause__ or exc, limit)

    def _fail_rows(self, request_ids: Sequence[str], exc: Exception) -> None:
        request_ids = [i for i in request_ids if i in self.held]
        code = failure_code(exc)
        text = f"{type(exc).__name__}: {exc}"[:MAX_FAILURE_TEXT_CHARS]
        log.error("step of %d rows failed (%s); requests %s", len(request_ids), code.value, " ".join(request_ids),
                  exc_info=exc, extra={"request_ids": request_ids})
        for request_id in request_ids:
            self.link.send(Failure(request_id, code.value, text))
            self.held.pop(request_id, None)
            self.progress_limiter.forget(request_id)
        self.scheduler.decoded(request_ids)
        self.gpu_thread.submit(self._forget_rows_in_gpu_thread, request_ids)
        self.counters.record_failed(len(request_ids))
        self._send_status()

    def _forget_rows_in_gpu_thread(self, request_ids: Sequence[str]) -> None:
        present = set(self.engine.row_ids())
        gone = [request_id for request_id in request_ids if request_id in present]
        for request_id in gone:
            self.engine.drop(request_id)
        if gone:
            log.debug("dropped %d rows from the step engine; %d rows left in it", len(gone), len(present) - len(gone))

    async def _sleep(self, wake_at: float | None = None) -> None:
        """Nothing for the GPU now: wait for an arrival or a CANCEL, or until ``wake_at`` (the plan holds
        rows for batch-mates until then, StepPlan.wake_at), looking again every IDLE_LOOK_S all the same."""
        self.arrival.clear()
        timeout_s = IDLE_LOOK_S if wake_at is None else min(IDLE_LOOK_S, max(0.0, wake_at - self.clock()))
        try:
            await asyncio.wait_for(self.arrival.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ delivery

    def _deliver_rows(self, request_ids: Sequence[str], encodings: BatchEncodings | None, now: float) -> None:
        self.scheduler.decoded(request_ids)
        rows = [(index, self.held.pop(request_id)) for index, request_id in enumerate(request_ids)
                if request_id in self.held]
        for _, held in rows:
            self.progress_limiter.forget(held.request.request_id)
        waits = [(held.first_step_at or now) - held.arrived_at for _, held in rows]
        generation = [now - (held.first_step_at or now) for _, held in rows]
        self.counters.record_batch(waits, max(generation, default=0.0))
        labels = [held.request.label for _, held in rows]
        log.info("decoded %d rows: requests %s", len(rows), short_ids(list(request_ids), labels),
                 extra={"request_ids": list(request_ids), "labels": labels})
        assert encodings is not None
        task = asyncio.create_task(self._send_results(rows, encodings, now))
        self.delivery_tasks.add(task)
        task.add_done_callback(self.delivery_tasks.discard)

    async def _send_results(self, rows: Sequence[tuple[int, RowLog]], encodings: BatchEncodings,
                            decoded_at: float) -> None:
        for index, held in rows:
            image = await encodings.png(index)
            request = held.request
            stage_trace.stage("worker_png_ready", request.request_id)
            first = held.first_step_at if held.first_step_at is not None else decoded_at
            self._send_result(request, image, held.batch_id, held.last_step_rows, first - held.arrived_at,
                              decoded_at - first)
