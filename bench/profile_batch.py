"""Where one batch's time goes: the worker's own ImagePipeline.generate, split by phase.

    python -m bench.profile_batch --model sd15 --size 512 --batch 32 --compile --out $OUT/phases-sd15.json
    python -m bench.profile_batch --model sdxl --size 1024 --batch 16 --compile --trace $OUT/trace-sdxl.json.gz

The pipeline is loaded as the worker loads it (with ``--compile``: TORCH_COMPILE's optimisations)
and warmed up at the batch size. Then:

1. one plain generate call, timed (the batch as the service runs it);
2. one call with every phase timed on its own, the GPU synchronised before and after each: text
   encoders, UNet calls, scheduler steps, VAE decode, 8-bit conversion to images. ``rest`` is the
   call's time minus those phases (prompt handling, CFG arithmetic, latents, Python between them);
3. on CUDA, one more call with torch's sync debug mode on: every place (file:line) where the CPU
   waited for the GPU, and how often (``sync_sites``). A wait stops the CPU from queuing work ahead,
   so the GPU idles while Python prepares the next kernels;
4. with ``--trace``, one more call under torch.profiler: its Chrome trace (open in
   chrome://tracing or ui.perfetto.dev), the 25 kernels with the most GPU time, and the share of
   the call's wall time the GPU was busy (``device_busy_fraction``; the profiler's own cost counts
   against it).

Synchronising around phases stops the CPU from running ahead of the GPU, so the phased call takes
a little longer than the plain one; both are reported.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable



class PhaseTimer:
    """Accumulates seconds and calls per phase; wraps callables so that each call is one sample."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return function(*args, **kwargs)
            self.synchronize()
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.synchronize()
                self.seconds[phase] += time.perf_counter() - began
                self.calls[phase] += 1
        return timed


def instrument(pipeline: Any, timer: PhaseTimer) -> None:
    """Route the pipeline's phases through ``timer`` (in place; instance attributes shadow methods)."""
    from gpu_worker.model import decoding

    dp = pipeline.diffusers_pipeline
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(dp, name, None)
        if encoder is not None:
            encoder.forward = timer.wrap("text_encoders", encoder.forward)
    dp.unet.forward = timer.wrap("unet", dp.unet.forward)
    dp.vae.decode = timer.wrap("vae_decode", dp.vae.decode)
    dp.scheduler.step = timer.wrap("scheduler_step", dp.scheduler.step)
    decoding.to_rgb8 = timer.wrap("to_8bit_images", decoding.to_rgb8)


def main() -> int:
    import torch

    from bench.common import benchmark_jobs, card_name, exit_on_sigterm, save_json
    from gpu_worker.model.acceleration import AccelerationConfig
    from gpu_worker.model.pipelines import load_pipeline
    from imagegen.batch_key import BatchKey

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--compile", action="store_true", help="TORCH_COMPILE's optimisations, as the worker applies them")
    parser.add_argument("--trace", type=Path, help="write a torch.profiler Chrome trace here (.json or .json.gz)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    on_cuda = torch.cuda.is_available()
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    optimizations = AccelerationConfig(compile=args.compile) if args.compile else AccelerationConfig(
        compile=False, channels_last=False, fuse_qkv=False)
    pipeline = load_pipeline(args.model, optimizations=optimizations)
    # Warmed up before instrumenting, as the worker does it (compiling, then recompiles forbidden).
    warm_up_s = pipeline.warm_up([args.batch], args.size, args.size, guidance_scale=args.guidance)[args.batch]
    timer = PhaseTimer(synchronize)
    instrument(pipeline, timer)
    settings = BatchKey(args.size, args.size, args.steps, args.guidance)
    jobs = benchmark_jobs(args.batch)

    def call() -> float:
        synchronize()
        began = time.perf_counter()
        pipeline.generate(jobs, settings)
        synchronize()
        return time.perf_counter() - began

    plain_s = call()
    timer.enabled = True
    phased_s = call()
    timer.enabled = False
    phases = {phase: {"seconds": round(seconds, 4), "calls": timer.calls[phase]}
              for phase, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1])}
    document = {"command": "python -m bench.profile_batch " + " ".join(sys.argv[1:]), "card": card_name(),
                "torch": torch.__version__, "model": args.model, "resolution": f"{args.size}x{args.size}",
                "steps": args.steps, "batch_size": args.batch, "compiled": args.compile,
                "warm_up_s": warm_up_s, "plain_s": round(plain_s, 4), "images_per_s": round(args.batch / plain_s, 3),
                "phased_s": round(phased_s, 4), "phases": phases,
                "rest_s": round(phased_s - sum(timer.seconds.values()), 4)}
    if on_cuda:
        document["sync_sites"] = sync_sites(call)
    if args.trace:
        document.update(trace(call, args.trace, on_cuda))
        document["trace"] = str(args.trace)
    print(save_json(document, args.out))
    return 0


def sync_sites(call: Callable[[], float]) -> dict[str, int]:
    """One call with CUDA sync debug mode on: {"file:line": count} of the places that waited for the GPU."""
    import torch

    counts: dict[str, int] = defaultdict(int)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            counts[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def trace(call: Callable[[], float], path: Path, on_cuda: bool) -> dict:
    """One call under torch.profiler; writes its Chrome trace; returns the top operators by device
    time and (on CUDA) the fraction of the call's wall time the device was busy."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        wall_s = call()
    profiler.export_chrome_trace(str(path))
    events = profiler.key_averages()
    if on_cuda:  # kernels only: an operator's GPU time is its kernels' again
        from torch.autograd import DeviceType

        events = [event for event in events if event.device_type == DeviceType.CUDA]
    device_time = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda event: getattr(event, device_time, 0), reverse=True)[:25]
    result: dict[str, Any] = {"top_gpu_operators": [
        {"name": event.key, "calls": event.count, "self_ms": round(getattr(event, device_time, 0) / 1000, 3)}
        for event in top]}
    if on_cuda:
        busy_s = sum(event.self_device_time_total for event in events) / 1e6
        result.update(profiled_s=round(wall_s, 4), device_busy_s=round(busy_s, 4),
                      device_busy_fraction=round(busy_s / wall_s, 3))
    return result


if __name__ == "__main__":
    sys.exit(main())
