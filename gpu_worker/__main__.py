"""python -m gpu_worker [flags]: serve one GPU (every flag also reads an environment variable)."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from gpu_worker.model.acceleration import AccelerationConfig, configure_sizes
from gpu_worker.model.compile_cache import holds_artefacts, use_compile_cache
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.model.oom import is_out_of_memory, release_cached_memory
from gpu_worker.decisions.policies import STEP, make_batcher
from gpu_worker.config import DYNAMIC, WorkerSettings
from gpu_worker.decisions.sizes import batch_sizes_at, default_sizes, parse_sizes, sizes_text, warm_up_batch_sizes
from gpu_worker.model.pipelines import (
    ImagePipeline,
    ModelLoadError,
    auto_max_batch_size,
    free_gpu_memory_bytes,
    load_pipeline,
    seconds_per_work_unit,
)
from gpu_worker.model.fake_backend import is_fake_model_id, parse_fake_model_id
from gpu_worker.shell.worker import BatchLoopFailed, SizeServing, Worker, WorkerIdentity, registration
from imagegen import protocol
from imagegen.protocol import ImageSize
from imagegen import settings as settings_lib
from imagegen import stage_trace
from imagegen.logs import setup_logging
from imagegen.runner import run_service, stop_event_on_signals

log = logging.getLogger("gpu_worker")

EXIT_MODEL_LOAD_FAILED = 3
EXIT_BATCH_LOOP_FAILED = 4  # supervisord's autorestart starts a new worker
STEP_NEEDS_AN_ENGINE = ("BATCH_POLICY=step needs a model with a step-level engine, and the fake backend "
                        "(MODEL_ID=fake...) has none: set BATCH_POLICY=run-to-completion (the default) or window, "
                        "or a real MODEL_ID (tiny runs on the CPU)")


def optimizations(settings: WorkerSettings) -> AccelerationConfig:
    """TORCH_COMPILE: torch.compile, CUDA graphs, channels_last and fused QKV (measured together).
    Eager, channels_last and fused QKV stay off: on an H100 they made eager batches 9-12% slower
    (docs/benchmarks.md)."""
    return AccelerationConfig(compile=settings.torch_compile, cuda_graph_max_batch=settings.cuda_graph_max_batch,
                              channels_last=settings.torch_compile, fuse_qkv=settings.torch_compile)


def batch_policy(settings: WorkerSettings, pipeline: ImagePipeline) -> tuple[BatchPolicyConfig, bool]:
    """The batching policy, with MAX_BATCH_SIZE auto-detected when unset (returns whether it was)."""
    size = settings.max_batch_size
    max_batch_pixels = None
    auto = size is None
    if auto:
        native = pipeline.native_size
        size = auto_max_batch_size(pipeline, free_gpu_memory_bytes(), native, native)
        if pipeline.device.type == "cuda":
            # Memory grows with pixels: larger images form proportionally smaller batches.
            max_batch_pixels = size * native * native
        log.info("MAX_BATCH_SIZE unset: auto-detected %d for %s at %dx%d on %s",
                 size, settings.model_id, native, native, pipeline.device)
    size = size if settings.enable_batching else 1
    policy = BatchPolicyConfig(
        enable_batching=settings.enable_batching,
        max_batch_size=size,
        max_wait_time_s=settings.max_batch_wait_s,
        min_batch_size=min(settings.min_batch_size, size),
        min_wait_time_s=min(settings.min_batch_wait_s, settings.max_batch_wait_s),
        adaptive=settings.adaptive_batching,
        adaptive_threshold=settings.adaptive_threshold,
        max_batch_pixels=max_batch_pixels,
    )
    return policy, auto


def served_sizes(settings: WorkerSettings, pipeline: ImagePipeline) -> tuple[ImageSize, ...]:
    """SIZES, or the architecture's buckets at the model's native size (SIZES=auto)."""
    listed = parse_sizes(settings.sizes)
    return listed if listed is not None else default_sizes(pipeline.architecture, pipeline.native_size)


def first_size(sizes: tuple[ImageSize, ...], native_size: int) -> ImageSize:
    """The size warmed before registering: the native square when listed, else the first listed."""
    native = ImageSize(native_size, native_size)
    return native if native in sizes else sizes[0]


def warm_up(pipeline: ImagePipeline, policy: BatchPolicyConfig, compiled: bool,
            cuda_graph_max_batch: int = 0, image_size: ImageSize | None = None) -> BatchPolicyConfig:
    """Generate at ``image_size`` (the native square by default) before registering; returns the
    policy, with a smaller max batch size if the auto-detected one ran out of memory (then the
    largest that fit)."""
    width, height = ((image_size.width, image_size.height) if image_size is not None
                     else (pipeline.native_size, pipeline.native_size))
    started = time.perf_counter()
    graph_max = cuda_graph_max_batch if compiled else 0
    sizes = batch_sizes_at(ImageSize(width, height), policy.max_batch_size, policy.max_batch_pixels, graph_max)
    log.info("warm-up at %dx%d, batch sizes %s%s", width, height, sizes,
             " (TORCH_COMPILE: compiling takes minutes on a cold cache)" if compiled else "")
    try:
        seconds = pipeline.warm_up(sizes, width, height)
    except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is survivable here
        if not is_out_of_memory(exc) or policy.max_batch_size == 1:
            raise
        release_cached_memory()
        smaller = max(1, policy.max_batch_size // 2)
        log.warning("warm-up: a batch of %d ran out of GPU memory at %dx%d; MAX_BATCH_SIZE %d",
                    policy.max_batch_size, width, height, smaller)
        smaller_policy = policy.with_max_batch_size(smaller)
        if policy.max_batch_pixels is not None:  # auto-detected: the pixel budget is the same batch at this size
            smaller_policy = replace(smaller_policy, max_batch_pixels=smaller * width * height)
        return warm_up(pipeline, smaller_policy, compiled, cuda_graph_max_batch, image_size)
    log.info("warm-up at %dx%d took %.1fs (seconds per batch size: %s)", width, height,
             time.perf_counter() - started, seconds)
    return policy


def measure_cost(pipeline: ImagePipeline) -> float:
    """Seconds per work unit (gpu_worker.decisions.cost_model.work_units) for the broker's admission rule: one
    step's time at the native size and at twice its side, the marginal cost between them
    (pipelines.seconds_per_work_unit). 0 (not measured) if the larger size does not fit or fails:
    the broker then refuses nothing before it has seen this worker's results."""
    native = pipeline.native_size
    try:
        small_s = pipeline.step_seconds(native, native)
        large_s = pipeline.step_seconds(2 * native, 2 * native)
    except Exception as exc:  # noqa: BLE001 - a measurement that fails only leaves admission to the results
        if is_out_of_memory(exc):
            release_cached_memory()
        log.warning("could not measure the cost of a step (%s: %s); the broker will learn it from results",
                    type(exc).__name__, exc)
        return 0.0
    cost = seconds_per_work_unit(native * native, small_s, 4 * native * native, large_s)
    log.info("a denoising step takes %.4fs at %dx%d and %.4fs at %dx%d: %.4g s per work unit (megapixel x CFG row "
             "x step), reported for admission", small_s, native, native, large_s, 2 * native, 2 * native, cost)
    return cost


async def main(settings: WorkerSettings) -> None:
    setup_logging("gpu_worker", settings.log_level, settings.log_format)
    stage_trace.open_from_environment()  # IMAGEGEN_TRACE_FILE: per-request stage times
    log.info("settings: %s", settings_lib.describe(settings))
    try:
        curve = settings.curve_keys()
    except (OSError, ValueError) as exc:
        log.error("cannot load the CurveZMQ keys (WORKER_CURVE_SECRET_KEY, BROKER_CURVE_PUBLIC_KEY): %s", exc)
        sys.exit(2)
    if settings.torch_compile:
        directory = use_compile_cache(settings.state_dir)
        log.info("torch.compile cache: %s (%s)", directory, "compiling reuses what it holds"
                 if holds_artefacts(directory) else "empty: the first compile takes minutes")
    if settings.batch_policy == STEP and is_fake_model_id(settings.model_id):
        log.error("%s", STEP_NEEDS_AN_ENGINE)
        sys.exit(2)
    started = time.perf_counter()
    try:
        # MODEL_ID=fake[:...] is the test backend of gpu_worker/model/fake_backend.py (no model at all).
        pipeline = parse_fake_model_id(settings.model_id) or load_pipeline(
            settings.model_id, settings.device, settings.dtype, optimizations(settings))
    except (ModelLoadError, ValueError) as exc:  # ValueError: a malformed fake id
        log.error("%s", exc)
        sys.exit(EXIT_MODEL_LOAD_FAILED)
    loaded_at = time.monotonic()  # the worker's clock: ready and warm times count from here
    log.info("loaded MODEL_ID=%s (%s) on %s as %s in %.1fs", settings.model_id, pipeline.architecture,
             pipeline.device, pipeline.dtype, time.perf_counter() - started)
    sizes = served_sizes(settings, pipeline)
    first = first_size(sizes, pipeline.native_size)
    fake = is_fake_model_id(settings.model_id)
    if settings.torch_compile and not fake:
        configure_sizes(len(sizes), dynamic_spatial=settings.size_compilation == DYNAMIC)
    policy, auto = batch_policy(settings, pipeline)
    # One thread runs every generation, the warm-up's too: CUDA graphs are recorded per thread.
    gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
    if settings.torch_compile and not settings.warmup:
        log.warning("TORCH_COMPILE without WORKER_WARMUP: the first request of each batch size will wait "
                    "for torch.compile (minutes for SDXL)")
    cost_per_unit = 0.0
    # The fake backend warms up only to stand in for compiling (fake:warm_delay) with TORCH_COMPILE.
    warms = settings.warmup and (settings.torch_compile or not fake)
    if warms:
        policy = await asyncio.get_running_loop().run_in_executor(
            gpu_thread, warm_up, pipeline, policy, settings.torch_compile, settings.cuda_graph_max_batch,
            first if settings.torch_compile else None)
        if settings.torch_compile:
            log.info("size %s warm %.1fs after the model loaded (1 of %d sizes warm); the others warm in the "
                     "background: %s", first, time.monotonic() - loaded_at, len(sizes),
                     sizes_text(size for size in sizes if size != first) or "none")
            # Compiled, a step at twice the native side would run eager (recompiles are forbidden outside
            # a warm-up): leave the figure to the first results.
            log.info("TORCH_COMPILE: the cost of a step is not measured at warm-up; the broker learns it from "
                     "this worker's results")
        else:
            cost_per_unit = await asyncio.get_running_loop().run_in_executor(gpu_thread, measure_cost, pipeline)
    gpu_id = settings.resolved_gpu_id(pipeline.device.type == "cuda")
    host = settings.resolved_host()
    identity = WorkerIdentity(
        name=settings.worker_name or (f"{host}-gpu{gpu_id}" if gpu_id >= 0 else f"{host}-cpu"),
        host=host,
        gpu_id=gpu_id,
        model_id=settings.model_id,
        device=str(pipeline.device),
    )
    capacity = settings.max_in_flight or 2 * policy.max_batch_size
    compiled_sizes = settings.torch_compile and warms
    step = settings.batch_policy == STEP
    engine = None
    size_warm_up = pipeline.warm_up
    if step:
        from gpu_worker.model.step_engine import StepEngine
        from gpu_worker.shell.step_loop import warm_up_engine, warm_up_engine_size

        engine = StepEngine(pipeline)
        size_warm_up = functools.partial(warm_up_engine_size, engine)
        if compiled_sizes:
            # The engine gives the UNet a timestep per row, an input the pipeline's warm-up did not compile.
            seconds = await asyncio.get_running_loop().run_in_executor(gpu_thread, warm_up_engine, engine, first)
            log.info("BATCH_POLICY=step with TORCH_COMPILE: the step engine is warm at %s (%.1fs); the other "
                     "sizes warm in the background", first, seconds)
    size_serving = SizeServing(
        sizes=sizes, unlisted=settings.unlisted_size, warm_at_start=(first,) if compiled_sizes else (),
        warm_up=size_warm_up if compiled_sizes else None, max_defer_s=settings.warm_up_max_defer_s,
        cuda_graph_max_batch=settings.cuda_graph_max_batch, loaded_at=loaded_at)
    why = protocol.refusal(protocol.WORKER_LINK, registration(identity, policy, capacity, auto, sizes=size_serving))
    if why is not None:  # the broker would drop every registration: never serve, silently
        log.error("the broker would refuse this worker's registration as malformed (%s); its name is WORKER_NAME, "
                  "or WORKER_HOST-gpuGPU_ID when unset: shorten what is too long", why)
        sys.exit(2)
    common = dict(max_batch_size_auto=auto, curve=curve, gpu_thread=gpu_thread, seconds_per_work_unit=cost_per_unit,
                  sizes=size_serving, preview_every_steps=settings.preview_every_steps)
    if engine is not None:
        from gpu_worker.shell.step_loop import StepWorker

        worker: Worker = StepWorker(identity, pipeline, policy, capacity, settings.broker_address,
                                    settings.heartbeat_interval_s, settings.heartbeat_liveness,
                                    engine=engine, **common)
    else:
        worker = Worker(identity, pipeline, policy, capacity, settings.broker_address,
                        settings.heartbeat_interval_s, settings.heartbeat_liveness,
                        batcher=make_batcher(settings.batch_policy, policy), **common)
    log.info("worker %s: max batch %d, capacity %d, batch policy %s, broker %s; sizes %s (others: %s)",
             identity.name, policy.max_batch_size, capacity, settings.batch_policy, settings.broker_address,
             sizes_text(sizes), settings.unlisted_size)
    try:
        await worker.serve(stop_event_on_signals(asyncio.get_running_loop()))
    except BatchLoopFailed as exc:
        log.critical("worker %s: its batch loop failed (%s); it handed its requests back to the broker and "
                     "exits with status %d to be restarted", identity.name, exc, EXIT_BATCH_LOOP_FAILED)
        sys.exit(EXIT_BATCH_LOOP_FAILED)
    log.info("worker %s stopped", identity.name)


if __name__ == "__main__":
    sys.exit(run_service("gpu_worker", lambda: settings_lib.load(WorkerSettings, sys.argv[1:]), main))
