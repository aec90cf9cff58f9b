"""Time the worker's own batch call per batch size, for the simulator's cost model.

    python -m bench.batch_costs --model sdxl --size 1024 --batches 1,2,4,8,16 --out sdxl.json

Loads MODEL_ID the way the worker does (gpu_worker.model.pipelines.load_pipeline: random weights for
``sd15``/``sdxl``, bf16 on CUDA), warms each batch size up once, then times
``ImagePipeline.generate`` (text encoding, denoising, VAE decode and PIL conversion: everything the
worker's GPU thread does per batch) ``--repeats`` times and keeps the median. It also times PNG
encoding of one output image with PIL at compress level 1, on one thread: what the worker did
before gpu_worker/model/png.py (bench/gpu.py times both encoders). Prints JSON; ``--out`` writes
it too. simulator/costs.py holds the figures measured with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import benchmark_jobs, save_json
from gpu_worker.model.pipelines import load_pipeline
from imagegen.batch_key import BatchKey


def time_batch(pipeline, size: int, settings: BatchKey, repeats: int) -> tuple[float, list]:
    jobs = benchmark_jobs(size)
    images = pipeline.generate(jobs, settings)  # warm-up: allocator, cuDNN/cuBLAS heuristics
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        images = pipeline.generate(jobs, settings)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), images


def png_encode_s(image) -> float:
    import io

    started = time.perf_counter()
    for _ in range(3):
        image.save(io.BytesIO(), format="PNG", compress_level=1)
    return (time.perf_counter() - started) / 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    pipeline = load_pipeline(args.model, None, None)
    load_s = time.perf_counter() - started
    settings = BatchKey(args.size, args.size, args.steps, args.guidance)
    result = {
        "model": args.model, "width": args.size, "height": args.size, "steps": args.steps,
        "guidance_scale": args.guidance, "device": str(pipeline.device), "dtype": str(pipeline.dtype),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "load_s": round(load_s, 1), "seconds_by_size": {},
    }
    for size in (int(b) for b in args.batches.split(",")):
        seconds, images = time_batch(pipeline, size, settings, args.repeats)
        result["seconds_by_size"][size] = round(seconds, 4)
        result["png_encode_s"] = round(png_encode_s(images[0]), 4)
        print(f"batch {size}: {seconds:.3f} s ({size / seconds:.3f} images/s)", file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(save_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
