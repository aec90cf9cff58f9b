"""One GPU, one call: the raw pipeline per optimisation and batch size, then the whole service.

    # raw pipeline only (eager, + channels_last/fused QKV, + torch.compile, + CUDA graphs)
    python -m bench.gpu raw --model sdxl --size 1024 --batches 1,2,16 --out $OUT/raw-sdxl.json
    # the service as users start it, with TORCH_COMPILE on: lone request, burst of 50, 10 users x 5,
    # and the burst with ENABLE_BATCHING=false
    python -m bench.gpu service --model sdxl --size 1024 --set TORCH_COMPILE=true --out $OUT/svc.json
    # some of the service's runs only (of lone, burst50, users10x5, burst50_no_batching)
    python -m bench.gpu service --model sdxl --size 1024 --set TORCH_COMPILE=true --service-runs lone,burst50
    # both, and the summary rows of docs/benchmarks (one per model and setting)
    python -m bench.gpu all --model sd15 --size 512 --batches 1,2,32 --set TORCH_COMPILE=true --out $OUT/sd15.json
    # a lone request against the raw batch of one, paired: 21 alternated rounds, the raw pipeline
    # and the service side by side on the card (no other service runs)
    python -m bench.gpu all --model sd15 --size 512 --batches 1 --variants graphs,encoders,preemptible \
        --repeats 5 --set TORCH_COMPILE=true --paired 21 --service-runs none --trace --out $OUT/paired-sd15.json
    # the summary row of a raw file and a service file measured in separate calls on one card
    python -m bench.gpu summarize --raw-file raw.json --service-file service.json

Raw: the worker's own ImagePipeline.generate (text encoding, denoising with CFG, VAE decode, PIL
conversion) called in a loop, one model load, optimisations applied one after the other so every
variant is measured on the same weights, card and call:

* ``eager``: bf16, SDPA attention (diffusers' default), nothing else;
* ``layout``: + channels_last for UNet and VAE, fused QKV projections;
* ``compiled``: + torch.compile of the UNet and the VAE decoder (dynamic batch dimension, mode
  default; with channels_last and fused QKV even when ``layout`` was not measured, as the worker
  applies them with TORCH_COMPILE);
* ``graphs``: + CUDA graphs (mode reduce-overhead) for batches up to 2 images (listed without
  ``compiled``, the compile is applied untimed first: ``--variants graphs,encoders`` skips the
  minutes of compiling a batch of one that CUDA graphs then replace);
* ``encoders``: + torch.compile of the text encoders and of the VAE decoder for one image (what
  TORCH_COMPILE applies beyond ``graphs``: the launch-bound parts of a lone request);
* ``preemptible``: batch 1 only, the pipeline as the variants before it left it (after ``encoders``:
  what TORCH_COMPILE runs), called as the worker calls it for a lone request on an idle GPU: with a
  preemption window of the default policy's coalescing gap opened at each call, stoppable for rows
  nobody waits for (so the thread waits before every step until the GPU has at most one step queued,
  as the worker's does; no stop comes) and a callback taking the images as they are decoded. Beside
  ``encoders`` (or ``eager``: ``--variants eager,preemptible`` without TORCH_COMPILE) it tells the
  worker's own call, that wait included, from the GPU's state.

Each batch size is warmed up first (a 2-step call: compilation and graph recording land there), then
timed ``--repeats`` times (median). ``--pause-s`` leaves the GPU idle that long before each timed
call, as a lone request finds it on an idle service (the service's lone runs come ~0.65 s apart):
a GPU that has just been busy may run a batch faster than one woken from idle. Several pauses
(``--pause-s 0,0.65``) are interleaved call by call, so both medians see the same machine; the
first is the row's ``seconds``, each is in ``seconds_by_pause_s``. Peak memory above
the loaded weights is recorded per size; the per-image memory is the slope between the smallest and
the largest batch.

``all --paired N`` then, with the raw pipeline still loaded, starts the service beside it and runs
N rounds of one raw batch of one (called the way of the last variant) and one lone request,
alternated (see ``paired``): the lone request's overhead from differences measured seconds apart.

``all`` runs the raw half, then gives its GPU memory back (compiled code dropped, allocator cache
emptied; what stays reserved is ``gpu_memory_held_after_gib``) before the service's worker sizes its
batches from the free memory, then the service half.

Service: bench/service.py's runs (the real processes, the seed's load test over HTTP), plus
the worker's own per-batch generation times from its log, which separate GPU time from serving time,
and the GPU's SM clock, temperature and power as each run finds it (``gpu_before``) and while it runs
(``gpu_during``: the lowest and highest clock, sampled every 0.1 s; from NVML, one session per run).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

VARIANTS = ("eager", "layout", "compiled", "graphs", "encoders", "preemptible")
GRAPH_MAX_BATCH = 2
SERVICE_RUNS = ("lone", "burst50", "users10x5", "burst50_no_batching")
T = TypeVar("T")


class WorkerCall:
    """What the worker passes to the pipeline besides jobs and settings for a lone request (the raw
    ``preemptible`` variant): the handover callback, which counts the images handed over, and a
    preemption window of the default policy's coalescing gap opened now (no stop comes), with the
    batch's rows and steps and a progress callback, as every batch of the worker is stoppable for
    rows nobody waits for: the GPU thread then waits before every step, not only in the window,
    until the GPU has at most one step queued."""

    def __init__(self, steps: int) -> None:
        from gpu_worker.decisions.policies import HoldTuning
        from gpu_worker.decisions.preemption import Preemption

        self.handed_over = 0
        self.preemption = Preemption(time.monotonic() + HoldTuning().coalesce_gap_s, time.monotonic, rows=1,
                                     steps=steps, on_step=lambda step: None)

    def on_images(self, first_index: int, arrays) -> None:
        self.handed_over += len(arrays)

    def report(self) -> dict:
        return {"steps_checked": self.preemption.steps_checked, "images_handed_over": self.handed_over}


def timed(call: Callable[[], T], clock: Callable[[], float] = time.perf_counter) -> tuple[float, T]:
    """The seconds ``call`` took by ``clock``, and what it returned."""
    began = clock()
    returned = call()
    return clock() - began, returned


def timed_after_pauses(ready: Callable[[], Callable[[], T]], pauses: list[float], repeats: int,
                       clock: Callable[[], float] = time.perf_counter,
                       sleep: Callable[[float], None] = time.sleep) -> tuple[dict[float, list[float]], T | None]:
    """``repeats`` rounds of, for each pause in turn, ``sleep(pause)`` (the GPU idle), then a call
    that ``ready()`` makes (untimed), timed by ``clock``: the seconds of each pause's calls, and what
    the last call returned. The pauses are interleaved call by call, so every pause's calls see the
    same machine; the idle stays outside the timing."""
    seconds: dict[float, list[float]] = {pause: [] for pause in pauses}
    returned = None
    for _ in range(repeats):
        for pause in pauses:
            sleep(pause)
            elapsed_s, returned = timed(ready(), clock)
            seconds[pause].append(elapsed_s)
    return seconds, returned


def sizes_for(variant: str, sizes: list[int]) -> list[int]:
    """The batch sizes a variant is timed at: CUDA graphs serve small batches only, and the worker
    starts only a lone request preemptibly."""
    if variant == "graphs":
        return [size for size in sizes if size <= GRAPH_MAX_BATCH]
    if variant == "preemptible":
        return [size for size in sizes if size == 1]
    return sizes


def raw(args: argparse.Namespace, progress) -> tuple[dict, Callable[[], float]]:
    """The raw half's result, and a function that times one more batch of one the way the last
    variant measured was called (``preemptible``: as the worker calls it), for ``--paired``."""
    import torch

    from gpu_worker.model import acceleration
    from gpu_worker.model.acceleration import AccelerationConfig
    from bench.common import benchmark_jobs
    from gpu_worker.model.pipelines import GenerationJob, load_pipeline
    from imagegen.batch_key import BatchKey

    started = time.perf_counter()
    pipeline = load_pipeline(args.model)
    load_s = time.perf_counter() - started
    on_cuda = torch.cuda.is_available()
    weights_bytes = torch.cuda.memory_allocated() if on_cuda else 0
    settings = BatchKey(args.size, args.size, args.steps, args.guidance)
    sizes = [int(b) for b in args.batches.split(",")]
    variants = {}
    result = {"model": args.model, "resolution": f"{args.size}x{args.size}", "steps": args.steps,
              "guidance_scale": args.guidance, "torch": torch.__version__, "load_s": round(load_s, 1),
              "weights_gib": round(weights_bytes / 2**30, 2), "pause_s": args.pause_s[0],
              "pauses_s": args.pause_s, "variants": variants}

    def ready_generate(jobs: list, worker_like: bool) -> Callable[[], WorkerCall | None]:
        """One generate call, GPU work included, readied to be timed; ``worker_like``: called as the
        worker calls a lone request (the WorkerCall it passes, made now, outside the timing, is what
        the call returns)."""
        worker_call = WorkerCall(settings.num_inference_steps) if worker_like else None
        as_worker = (worker_call.on_images, worker_call.preemption) if worker_call else ()

        def call() -> WorkerCall | None:
            pipeline.generate(jobs, settings, *as_worker)
            if on_cuda:
                torch.cuda.synchronize()
            return worker_call
        return call

    def measure(variant: str, batch_sizes: list[int]) -> None:
        rows = variants.setdefault(variant, {})
        warm = pipeline.warm_up(batch_sizes, args.size, args.size, guidance_scale=args.guidance)
        for size in batch_sizes:
            jobs = benchmark_jobs(size)
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seconds, worker_call = timed_after_pauses(
                lambda: ready_generate(jobs, worker_like=variant == "preemptible"), args.pause_s, args.repeats)
            medians = {pause: statistics.median(times) for pause, times in seconds.items()}
            median = medians[args.pause_s[0]]
            rows[size] = {"seconds": round(median, 4), "images_per_s": round(size / median, 4),
                          "seconds_by_pause_s": {f"{pause:g}": round(m, 4) for pause, m in medians.items()},
                          "warm_up_s": warm.get(size),
                          "peak_above_weights_gib": round((torch.cuda.max_memory_allocated() - weights_bytes) / 2**30, 2)
                          if on_cuda else None}
            if worker_call is not None:  # the last call's: it did run the worker's way
                rows[size]["worker_call"] = worker_call.report()
            progress(result)  # what is measured comes back even if the call runs out of time later
            print(f"{variant} batch {size}: {median:.3f} s ({size / median:.3f} images/s)", file=sys.stderr, flush=True)

    layout_applied = compiled = False

    def compile_unet_and_vae() -> None:  # with the layout, as TORCH_COMPILE applies it, if not applied yet
        nonlocal layout_applied, compiled
        acceleration.accelerate(pipeline.diffusers_pipeline, pipeline.device,
                                AccelerationConfig(compile=True, cuda_graph_max_batch=0, compile_encoders=False,
                                                   channels_last=not layout_applied, fuse_qkv=not layout_applied))
        layout_applied = compiled = True

    for variant in args.variants.split(","):
        if variant == "graphs" and not compiled:
            # CUDA graphs need the compiled UNet: applied untimed, as a batch of one compiled without
            # graphs costs minutes of compiling that the graphs then replace
            compile_unet_and_vae()
        if variant == "layout":
            acceleration.accelerate(pipeline.diffusers_pipeline, pipeline.device,
                                    AccelerationConfig(compile=False, channels_last=True, fuse_qkv=True))
            layout_applied = True
        elif variant == "compiled":
            compile_unet_and_vae()
        elif variant == "graphs":
            forward = acceleration.compiled_forward(pipeline.diffusers_pipeline.unet)
            forward.enable_cuda_graphs(GRAPH_MAX_BATCH)
        elif variant == "encoders":
            acceleration.compile_encoders(pipeline.diffusers_pipeline)
        measure(variant, sizes_for(variant, sizes))
    image = pipeline.generate([GenerationJob("png", None, 1)], BatchKey(args.size, args.size, 2, args.guidance))[0]
    result["png_encode_s"] = png_seconds(image)
    worker_like = last_variant(args) == "preemptible"
    return result, lambda: timed(ready_generate(benchmark_jobs(1), worker_like=worker_like))[0]


def last_variant(args: argparse.Namespace) -> str:
    """The raw variant measured last: the pipeline's state, and the way, of --paired's raw calls."""
    return args.variants.split(",")[-1]


def release_gpu_memory() -> float | None:
    """Drop the raw half's compiled code and cached GPU memory; the GiB this process still reserves
    (None without CUDA)."""
    import gc

    import torch

    torch._dynamo.reset()  # compiled code and its guards hold the model's modules
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_reserved() / 2**30, 2)


def png_seconds(image) -> dict:
    """Encoding one output image, in seconds: PIL (the previous encoder) and gpu_worker.model.png, serial
    and striped as the worker stripes (bench/png.py's encoders and timing: medians of 3)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from bench.png import encoders, measure
    from gpu_worker.shell.worker import PNG_STRIPE_THREADS

    stripes = PNG_STRIPE_THREADS
    names = {"pil_level1": "pil_level1", "current": "striped_1", f"current_{stripes}_stripes": f"striped_{stripes}"}
    with ThreadPoolExecutor(stripes) as threads:
        timings = measure(np.asarray(image), encoders(None, threads if stripes > 1 else None, stripes), repeats=3)
    return {names[name]: round(timing["ms"] / 1000, 4) for name, timing in timings.items()}


def per_image_gib(rows: dict) -> float | None:
    sizes = sorted(rows)
    if len(sizes) < 2 or rows[sizes[0]]["peak_above_weights_gib"] is None:
        return None
    low, high = sizes[0], sizes[-1]
    return round((rows[high]["peak_above_weights_gib"] - rows[low]["peak_above_weights_gib"]) / (high - low), 3)


def worker_batch_seconds(log_dir: Path) -> list[tuple]:
    """(batch size, generation seconds[, seconds in the GPU thread]) of every batch the workers logged
    (the third where the log has it: the pipeline call alone, without the event loop's hand-offs)."""
    found = []
    pattern = r"batch \S+: (\d+) x \d+x\d+, \d+ steps in ([\d.]+)s(?: \(GPU thread ([\d.]+)s\))?"
    for path in sorted(log_dir.glob("worker*.log")):
        for match in re.finditer(pattern, path.read_text(errors="replace")):
            seconds = (float(match.group(2)),) + ((float(match.group(3)),) if match.group(3) else ())
            found.append((int(match.group(1)), *seconds))
    return found


def service(args: argparse.Namespace, log_dir: Path, progress) -> dict:
    from bench.service import Service, row

    settings = {"MODEL_ID": args.model, **args.settings}
    rows: list[dict] = []
    result = {"settings": settings, "rows": rows}
    trace, environment = traced_environment(args, log_dir)

    def measured(mode: str, svc: Service, *load_args: str) -> None:
        trace_from = trace.mark() if trace else 0
        with GpuSampler() as gpu:
            load_output = svc.load(*load_args, size=args.size, steps=args.steps)
        # gpu.first: the GPU as this run found it (hot from the warm-up or a burst, or idle)
        rows.append({**row(mode, args, 1, load_output), "gpu_before": gpu.first, "gpu_during": gpu.summary(),
                     **({"stages": trace.hops_since(trace_from)} if trace else {})})
        progress(result)  # each row comes back even if the call runs out of time later

    runs = set(args.service_runs.split(","))
    with Service([0], log_dir, **environment) as svc:
        for _ in range(args.lone_repeats if "lone" in runs else 0):
            measured("lone", svc, "--burst", "1")
        if "burst50" in runs:
            measured("burst50", svc, "--burst", "50")
        if "users10x5" in runs:
            measured("users10x5", svc, "--users", "10", "--requests-per-user", "5")
    result["worker_batches"] = worker_batch_seconds(log_dir)
    if "burst50_no_batching" in runs:
        with Service([0], log_dir, **environment, ENABLE_BATCHING="false") as svc:
            measured("burst50_no_batching", svc, "--burst", "50")
    return result


def traced_environment(args: argparse.Namespace, log_dir: Path) -> tuple[StageTrace | None, dict[str, str]]:
    """The service's settings (MODEL_ID and --set), and with --trace a stage trace in ``log_dir``
    that they point the processes at."""
    trace = StageTrace(log_dir / "stage-trace.log") if args.trace else None
    return trace, {"MODEL_ID": args.model, **args.settings, **(trace.environment() if trace else {})}


PAIR_PAUSE_S = 0.65  # idle before each call of a pair, as the service's lone runs come ~0.65 s apart


def paired(args: argparse.Namespace, log_dir: Path, raw_call: Callable[[], float], progress) -> dict:
    """``--paired N``: N rounds of one raw batch of one (``raw_call``, in this process, the raw
    pipeline still loaded) and one lone request through the service (started beside it), in
    alternating order (raw first, then lone first), each after PAIR_PAUSE_S of idle GPU. Both
    halves of a round find the card in one state (clock, temperature), so a drift of the card
    across the call stays out of the differences (two raw variants of the same GPU work differed
    by -1.5 to +0.9 ms from machine to machine). The service's worker sizes its batches beside the
    raw pipeline's memory."""
    from bench.service import Service

    rounds: list[dict] = []
    result = {"raw_variant": last_variant(args), "pause_s": PAIR_PAUSE_S, "rounds": rounds}
    log_dir.mkdir(parents=True, exist_ok=True)
    trace, environment = traced_environment(args, log_dir)
    with Service([0], log_dir, **environment) as svc:
        for index in range(args.paired):
            measured: dict = {"order": "raw,lone" if index % 2 == 0 else "lone,raw"}
            for half in measured["order"].split(","):
                time.sleep(PAIR_PAUSE_S)
                if half == "raw":
                    measured["raw_s"] = round(raw_call(), 4)
                else:
                    trace_from = trace.mark() if trace else 0
                    lone = svc.load("--burst", "1", size=args.size, steps=args.steps)
                    measured["lone_s"] = round(lone["latency_max_s"], 4)
                    measured["worker_batch_ms"] = (lone.get("median_ms") or {}).get("generation")
                    if trace:
                        measured["stages"] = trace.hops_since(trace_from)
            measured["difference_ms"] = round((measured["lone_s"] - measured["raw_s"]) * 1000, 2)
            rounds.append(measured)
            result.update(paired_summary(rounds))
            progress(result)
    return result


def paired_summary(rounds: list[dict]) -> dict:
    """Medians of the paired rounds: lone over raw, and the median of the rounds' own differences."""
    raw_median = statistics.median(r["raw_s"] for r in rounds)
    lone_median = statistics.median(r["lone_s"] for r in rounds)
    return {"raw_median_s": round(raw_median, 4), "lone_median_s": round(lone_median, 4),
            "lone_over_raw": round(lone_median / raw_median, 4),
            "median_difference_ms": round(statistics.median(r["difference_ms"] for r in rounds), 2),
            "rounds_lone_over_raw_max": round(max(r["lone_s"] / r["raw_s"] for r in rounds), 4)}


class StageTrace:
    """The service's stage trace (imagegen/stage_trace.py) in one file, read run by run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)

    def environment(self) -> dict[str, str]:
        from imagegen.stage_trace import TRACE_FILE_ENV

        return {TRACE_FILE_ENV: str(self.path)}

    def mark(self) -> int:
        """Where the next run's lines will start."""
        return self.path.stat().st_size if self.path.exists() else 0

    def hops_since(self, offset: int) -> dict:
        """Median milliseconds per hop of the requests traced from ``offset`` on."""
        from bench.trace_stages import hops_ms, parse

        if not self.path.exists():
            return hops_ms({})
        with self.path.open("rb") as trace:
            trace.seek(offset)
            return hops_ms(parse(trace.read().decode(errors="replace").splitlines()))


class NvmlReader:
    """GPU ``gpu_index``'s SM clock, temperature and power draw through NVML, initialised once for
    many readings (the sampler reads ten times a second: no driver set-up each time); every reading
    is None without NVML or a GPU.

    A batch's time depends on them: SDXL's lone requests, timed right after the worker's warm-up
    (whose last batches kept the GPU at full power for tens of seconds), ran 902 -> 881 ms one after
    the other on an H200. Recorded beside each service row so such a trend can be told from the
    service's own cost."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.nvml = self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML library or no driver: a CPU machine
            return
        self.nvml = pynvml
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        except Exception:  # noqa: BLE001 - no such GPU: readings are None
            pass

    def read(self) -> dict | None:
        if self.handle is None:
            return None
        nvml, handle = self.nvml, self.handle
        try:
            return {"sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                    "temperature_c": int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                    "power_w": round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1)}  # NVML: milliwatts
        except Exception:  # noqa: BLE001 - a reading this GPU does not support: the row stays usable
            return None

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()
            self.nvml = self.handle = None


class GpuSampler:
    """Reads the GPU (``read``, else an :class:`NvmlReader` open while the run goes on) once on
    entering, before the run starts (``first``: the GPU as the run finds it), then every
    ``interval_s`` in a thread; ``summary`` gives the lowest and highest SM clock, the highest
    temperature and power seen (None without a GPU): whether a batch ran at full clock, or
    throttled by heat or power."""

    def __init__(self, interval_s: float = 0.1, read: Callable[[], dict | None] | None = None) -> None:
        self.interval_s = interval_s
        self.read = read
        self._reader: NvmlReader | None = None
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)

    def __enter__(self) -> "GpuSampler":
        if self.read is None:
            self._reader = NvmlReader()
            self.read = self._reader.read
        first = self.read()
        if first is not None:  # else no GPU here: nothing to sample
            self.samples.append(first)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        if self._reader is not None:
            self._reader.close()

    @property
    def first(self) -> dict | None:
        return self.samples[0] if self.samples else None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            state = self.read()
            if state is None:
                return  # the GPU stopped answering: keep what was read
            self.samples.append(state)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        clocks = [sample["sm_clock_mhz"] for sample in self.samples]
        return {"samples": len(self.samples), "sm_clock_mhz_min": min(clocks), "sm_clock_mhz_max": max(clocks),
                "temperature_c_max": max(sample["temperature_c"] for sample in self.samples),
                "power_w_max": max(sample["power_w"] for sample in self.samples)}


def summary_row(args: argparse.Namespace, raw_result: dict | None, service_result: dict | None) -> dict:
    """The fields docs/benchmarks promises, for one model and setting."""
    out = {"card": args.card, "model": args.model, "resolution": f"{args.size}x{args.size}", "steps": args.steps,
           "gpus": 1, "setting": " ".join(f"{k}={v}" for k, v in sorted(args.settings.items())) or "defaults"}
    if raw_result:
        variants = raw_result["variants"]
        # "graphs" only times the small batches: the best batch comes from what TORCH_COMPILE applies,
        # "encoders" (or "compiled" before it), when measured.
        out["raw_variant"] = next((v for v in ("encoders", "compiled") if v in variants), list(variants)[-1])
        fastest = variants[out["raw_variant"]]
        best_size = max(fastest, key=lambda size: fastest[size]["images_per_s"])
        out["batch_size"] = best_size
        out["raw_images_per_s"] = fastest[best_size]["images_per_s"]
        ones = [variants[v][1]["seconds"] for v in variants if 1 in variants[v]]
        out["raw_batch1_s"] = min(ones) if ones else None
        out["per_image_gib"] = {v: per_image_gib(rows) for v, rows in variants.items()}
    if service_result:
        by_mode: dict[str, list[dict]] = {}
        for r in service_result["rows"]:
            by_mode.setdefault(r["mode"], []).append(r)
        lones = [r["latency_max_s"] for r in by_mode.get("lone", [])]
        out["lone_latency_s"] = round(statistics.median(lones), 3) if lones else None
        burst = by_mode.get("burst50", [{}])[0]
        out["burst50_s"] = burst.get("duration_s")
        out["service_images_per_s"] = burst.get("service_images_per_s")
        out["service_avg_batch_size"] = burst.get("avg_batch_size")
        for mode, field in (("users10x5", "users10x5_images_per_s"),
                            ("burst50_no_batching", "no_batching_images_per_s")):
            out[field] = by_mode[mode][0]["service_images_per_s"] if mode in by_mode else None
        compared = raw_against_service(raw_result, out.get("raw_variant"), out["service_avg_batch_size"])
        if compared is not None and out["service_images_per_s"]:
            variant, same = compared
            out["service_over_raw"] = round(
                out["service_images_per_s"] / raw_result["variants"][variant][same]["images_per_s"], 3)
            out["service_over_raw_batch_size"] = same
            out["service_over_raw_variant"] = variant
        if out.get("raw_batch1_s") and out["lone_latency_s"]:
            out["lone_over_raw_batch1"] = round(out["lone_latency_s"] / out["raw_batch1_s"], 3)
    return out


def raw_against_service(raw_result: dict | None, preferred: str | None,
                        service_batch: float | None) -> tuple[str, int] | None:
    """(variant, batch size) of the raw row to hold the service's throughput against: the preferred
    variant's batch like the service's, else "compiled"'s (a run cut off before "encoders" timed
    its large batches: "encoders" only adds to batch 1 what "compiled" already runs at large ones)."""
    if not raw_result:
        return None
    for variant in dict.fromkeys(v for v in (preferred, "compiled") if v in raw_result["variants"]):
        same = raw_batch_like(raw_result["variants"][variant], service_batch)
        if same is not None:
            return variant, same
    return None


def raw_batch_like(raw_rows: dict, service_batch: float | None) -> int | None:
    """The raw batch size to hold the service's throughput against: the measured size nearest the
    service's average batch, if within 10% of it (a burst of 50 in batches of 17, 17, 16: raw 16);
    None when no raw size is that close (a raw run of batch 1 says nothing about a batch of 50)."""
    if not raw_rows or not service_batch:
        return None
    nearest = min(raw_rows, key=lambda size: abs(size - service_batch))
    return nearest if abs(nearest - service_batch) <= 0.1 * service_batch else None


def summarize(args: argparse.Namespace) -> int:
    """Print the summary row of earlier results (model, size, steps, settings and card from the files)."""
    raw_document = json.loads(args.raw_file.read_text()) if args.raw_file else {}
    service_document = json.loads(args.service_file.read_text()) if args.service_file else {}
    cards = {document["card"] for document in (raw_document, service_document) if document}
    if len(cards) != 1:
        sys.exit(f"compare results of one card only; got {sorted(cards)}")
    raw_result = raw_document.get("raw")
    if raw_result:  # JSON made the batch sizes strings
        raw_result = {**raw_result, "variants": {variant: {int(size): row for size, row in rows.items()}
                                                  for variant, rows in raw_result["variants"].items()}}
    service_result = service_document.get("service")
    reference = raw_result or {}
    args.card = cards.pop()
    args.model = reference.get("model") or service_document["summary"]["model"]
    args.size = int((reference.get("resolution") or service_document["summary"]["resolution"]).split("x")[0])
    args.steps = reference.get("steps") or service_document["summary"]["steps"]
    args.settings = {k: v for k, v in (service_result or {}).get("settings", {}).items() if k != "MODEL_ID"}
    row = summary_row(args, raw_result, service_result)
    row["sources"] = [str(path) for path in (args.raw_file, args.service_file) if path]
    print(json.dumps(row, indent=1))
    return 0


def pause_list(text: str) -> list[float]:
    """--pause-s: one or more idle times in seconds, comma-separated, each >= 0 and listed once."""
    try:
        pauses = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 0 or 0,0.65, got {text!r}") from None
    if any(not 0 <= pause < 3600 for pause in pauses) or len(set(pauses)) != len(pauses):
        raise argparse.ArgumentTypeError(f"each pause must be 0 to 3600 s and listed once, got {text!r}")
    return pauses


def main() -> int:
    from bench.common import card_name, exit_on_sigterm, save_json

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["raw", "service", "all", "summarize"])
    parser.add_argument("--raw-file", type=Path, help="summarize: a raw (or all) result of this script")
    parser.add_argument("--service-file", type=Path, help="summarize: a service (or all) result of this script")
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batches", default="1,2,16", help="raw: batch sizes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="raw: which, in this order")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pause-s", type=pause_list, default=[0.0],
                        help="raw: idle seconds before each timed call; several (0,0.65) are interleaved")
    parser.add_argument("--lone-repeats", type=int, default=3)
    parser.add_argument("--service-runs", default=",".join(SERVICE_RUNS),
                        help="service: which load runs, of " + ", ".join(SERVICE_RUNS) + " (run in that order, "
                             "whatever the order given), or none (all: the raw half and --paired only)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="service: a setting for every process (repeatable)")
    parser.add_argument("--trace", action="store_true",
                        help="service: the processes write a stage trace (IMAGEGEN_TRACE_FILE, in the log dir); "
                             "each row gets its requests' median milliseconds per hop (bench/trace_stages.py)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="all: N rounds of a raw batch of one beside a lone request through the service, "
                             "alternated, before the service's runs (see paired())")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log-dir", type=Path)
    args = parser.parse_args()
    if args.paired and args.mode != "all":
        parser.error("--paired needs mode all (the raw pipeline and the service side by side)")
    args.settings = dict(item.split("=", 1) for item in args.set)
    unknown_runs = set(args.service_runs.split(",")) - set(SERVICE_RUNS) - ({"none"} if args.mode == "all" else set())
    if unknown_runs:
        parser.error(f"--service-runs: unknown {', '.join(sorted(unknown_runs))}; choose from {', '.join(SERVICE_RUNS)}")
    args.card = card_name()
    log_dir = args.log_dir or Path(f"/tmp/bench-gpu-{int(time.time())}")
    log_dir.mkdir(parents=True, exist_ok=True)
    document = {"command": "python -m bench.gpu " + " ".join(sys.argv[1:]), "card": args.card}

    def save() -> str:
        return save_json(document, args.out)

    if args.mode == "summarize":
        return summarize(args)

    def progress_of(part: str):
        """Saves the document with ``part``'s results so far (a call cut off still returns them)."""
        def progress(partial: dict) -> None:
            document[part] = partial
            save()
        return progress

    if args.mode in ("raw", "all"):
        document["raw"], raw_call = raw(args, progress_of("raw"))
        save()
        if args.paired:
            document["paired"] = paired(args, log_dir / "paired", raw_call, progress_of("paired"))
            save()
        del raw_call  # holds the pipeline: the memory below is given back only without it
    if args.mode == "all":
        # The service's worker sizes MAX_BATCH_SIZE from the GPU's free memory: give back what the
        # raw half's model, compiled graphs and allocator cache hold, and say what could not be.
        document["raw"]["gpu_memory_held_after_gib"] = release_gpu_memory()
        save()
    if args.mode == "service" or (args.mode == "all" and args.service_runs != "none"):
        document["service"] = service(args, log_dir, progress_of("service"))
    document["summary"] = summary_row(args, document.get("raw"), document.get("service"))
    if "paired" in document:
        document["summary"]["paired_lone_over_raw"] = document["paired"]["lone_over_raw"]
        document["summary"]["paired_median_difference_ms"] = document["paired"]["median_difference_ms"]
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
