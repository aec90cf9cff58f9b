"""What a live preview costs (gpu_worker/model/previews.py), against what it replaces and what it rides on.

For each image size and batch size:

* ``preview_ms``: one preview of every row of a batch's latents as the worker makes it (the map on the
  device, the copy to the host, JPEG encoding of each row, in the calling thread), waited for to the
  end; ``map_ms``: the device part alone (map, clamp, cast, copied to the host); against
  ``vae_decode_ms``: a full VAE decode of the same latents to 8-bit images (gpu_worker.model.decoding,
  what the finished image costs). The fastest of ``--repeats``.
* ``generate_ms`` with previews for every row every ``--every`` steps against ``plain_ms`` without
  (the same batch, ``--steps`` steps, stoppable as the worker runs it: the GPU waited for before each
  step), the median of ``--repeats`` alternating runs each; ``extra_per_preview_ms`` spreads the
  difference over the preview steps (run-to-run noise of a lone image's steps is of the same order:
  a few percent), ``gpu_thread_ms_per_preview`` is what the previews took in the generating thread
  per preview step (measured directly: the device's own part runs while that thread waits anyway).

    python -m bench.previews                                       # CPU: the tiny model
    python -m bench.previews --model sdxl --sizes 1024 --batches 1 8 --steps 25 --every 5 --out r.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import benchmark_jobs, card_name, save_json
from gpu_worker.decisions.preemption import Preemption
from gpu_worker.model import decoding, previews
from gpu_worker.model.pipelines import ImagePipeline, load_pipeline
from imagegen.batch_key import BatchKey


def fastest_ms(call: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - began)
    return best * 1000.0


def syncer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_preview(pipeline: ImagePipeline, side: int, batch: int, repeats: int) -> dict:
    """One preview of a batch's latents against a full VAE decode of them."""
    sync = syncer(pipeline.device)
    latent_side = side // pipeline.vae_scale_factor
    latents = torch.randn(batch, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(pipeline.device, pipeline.dtype)
    rows = tuple(range(batch))

    def preview() -> None:
        plan = previews.PreviewPlan(rows, 1, 2, lambda step, images: None)
        previewer = previews.LatentPreviewer(plan, pipeline.architecture)
        previewer.on_step_end(1, latents)
        previewer.finish()

    def device_part() -> None:
        previews.latents_to_rgb(latents, pipeline.architecture, rows).cpu()

    def vae_decode() -> None:
        with torch.inference_mode():
            decoding.decode_in_parts(pipeline.diffusers_pipeline, latents, None, pipeline.images_per_part, None)

    preview(), vae_decode()  # first calls: allocations, the map's copy to the device
    figures = {"preview_ms": fastest_ms(preview, sync, repeats), "map_ms": fastest_ms(device_part, sync, repeats),
               "vae_decode_ms": fastest_ms(vae_decode, sync, repeats)}
    figures["decode_over_preview"] = figures["vae_decode_ms"] / figures["preview_ms"]
    return figures


def measure_generation(pipeline: ImagePipeline, side: int, batch: int, steps: int, every: int, repeats: int) -> dict:
    """A whole generation with previews for every row against the same without."""
    sync = syncer(pipeline.device)
    jobs = benchmark_jobs(batch)
    settings = BatchKey(side, side, steps, 7.5)
    made: list[int] = []
    plans: list[previews.PreviewPlan] = []
    preview_steps = len(previews.due_steps(steps, every))

    def run(with_previews: bool) -> None:
        plan = (previews.PreviewPlan(tuple(range(batch)), every, steps, lambda step, images: made.append(len(images)))
                if with_previews else None)
        if plan is not None:
            plans.append(plan)
        preemption = Preemption(None, time.monotonic, rows=batch, steps=steps, previews=plan)
        pipeline.generate(jobs, settings, on_images=lambda first, images: None, preemption=preemption)

    run(True), run(False)  # warm
    plain, with_previews, in_thread = [], [], []
    for _ in range(repeats):
        plain.append(fastest_ms(lambda: run(False), sync, 1))
        made.clear()
        with_previews.append(fastest_ms(lambda: run(True), sync, 1))
        assert sum(made) == preview_steps * batch, (made, preview_steps, batch)
        in_thread.append(plans[-1].seconds * 1000.0)
    plain_ms, previews_ms = statistics.median(plain), statistics.median(with_previews)
    return {"plain_ms": plain_ms, "generate_ms": previews_ms, "preview_steps": preview_steps,
            "gpu_thread_ms_per_preview": statistics.median(in_thread) / max(1, preview_steps),
            "extra_per_preview_ms": (previews_ms - plain_ms) / preview_steps if preview_steps else 0.0,
            "extra_percent": 100.0 * (previews_ms - plain_ms) / plain_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=previews.DEFAULT_EVERY_STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-generation", action="store_true", help="time the preview and the decode only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.model, args.device, args.dtype)
    rows = []
    for side in args.sizes:
        for batch in args.batches:
            row = {"side": side, "batch": batch, **measure_preview(pipeline, side, batch, args.repeats)}
            if not args.no_generation:
                row.update(measure_generation(pipeline, side, batch, args.steps, args.every, args.repeats))
            rows.append(row)
    document = {"model": args.model, "device": str(pipeline.device), "dtype": str(pipeline.dtype),
                "card": card_name() if pipeline.device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "steps": args.steps, "every": args.every, "rows": rows}
    print(save_json(document, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
