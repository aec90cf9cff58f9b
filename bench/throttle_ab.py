"""What the worker's wait before each denoising step costs a lone request: the raw pipeline called
several ways, interleaved call by call on one loaded model, so every way sees the same machine.

    python -m bench.throttle_ab --model sd15 --size 512 --steps 25 --rounds 15 --out throttle.json

Ways (each a call of the worker's ImagePipeline.generate for one image, the GPU synchronised after):

* ``plain``: no preemption (no check, no wait);
* ``window``: the default policy's preemption window (HoldTuning.coalesce_gap_s) opened at the call,
  no rows: the GPU thread waits (StepThrottle) only inside the window;
* ``every_step``: as the worker calls every batch now (gpu_worker/shell/worker.py): the window, the batch's
  rows and steps and a progress callback, so it waits before every step until the GPU has at most
  one step queued;
* ``every_step_blocking``: the same, the marks made with ``torch.cuda.Event(blocking=True)`` (the
  thread sleeps in the wait instead of spinning); on the CPU the same as ``every_step``.

The result: each way's seconds per round, their medians, each way's median difference from
``plain`` within a round (ms), and the card, versions and command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path


WAYS = ("plain", "window", "every_step", "every_step_blocking")


def preemption_for(way: str, steps: int, clock=time.monotonic):
    """The Preemption the way passes (None for ``plain``)."""
    from gpu_worker.decisions.policies import HoldTuning
    from gpu_worker.decisions.preemption import Preemption

    if way == "plain":
        return None
    window_until = clock() + HoldTuning().coalesce_gap_s
    if way == "window":
        return Preemption(window_until, clock)
    return Preemption(window_until, clock, rows=1, steps=steps, on_step=lambda step: None)


def rotated(ways: list[str], index: int) -> list[str]:
    """Round ``index``'s order: the ways rotated by one each round, so none is always first."""
    shift = index % len(ways)
    return ways[shift:] + ways[:shift]


def summary(rounds: list[dict], ways: list[str]) -> dict:
    medians = {way: round(statistics.median(r[way] for r in rounds), 4) for way in ways}
    out = {"median_s": medians}
    if "plain" in ways:
        out["median_difference_from_plain_ms"] = {
            way: round(statistics.median((r[way] - r["plain"]) * 1000 for r in rounds), 2)
            for way in ways if way != "plain"}
        out["over_plain"] = {way: round(medians[way] / medians["plain"], 4) for way in ways if way != "plain"}
    return out


def main() -> int:
    from bench.common import benchmark_jobs, card_name, exit_on_sigterm, save_json

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pause-s", type=float, default=0.2, help="idle before each call")
    parser.add_argument("--ways", default=",".join(WAYS), help="of " + ", ".join(WAYS))
    parser.add_argument("--compile", action="store_true",
                        help="as TORCH_COMPILE=true runs it: torch.compile, CUDA graphs for batches up to 2, "
                             "channels_last and fused QKV (gpu_worker/__main__.py optimizations)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ways = args.ways.split(",")
    if set(ways) - set(WAYS):
        parser.error(f"--ways: choose from {', '.join(WAYS)}")

    import torch

    from gpu_worker.model import pipelines
    from gpu_worker.model.pipelines import load_pipeline
    from imagegen.batch_key import BatchKey

    from gpu_worker.model.acceleration import AccelerationConfig

    acceleration = (AccelerationConfig(compile=True, cuda_graph_max_batch=2, channels_last=True, fuse_qkv=True)
                    if args.compile else None)
    pipeline = load_pipeline(args.model, optimizations=acceleration)
    on_cuda = torch.cuda.is_available()
    settings = BatchKey(args.size, args.size, args.steps, args.guidance)
    jobs = benchmark_jobs(1)
    rounds: list[dict] = []
    document = {"command": "python -m bench.throttle_ab " + " ".join(sys.argv[1:]), "card": card_name(),
                "versions": {"torch": torch.__version__, "diffusers": metadata.version("diffusers")},
                "model": args.model, "torch_compile": args.compile, "resolution": f"{args.size}x{args.size}", "steps": args.steps,
                "guidance_scale": args.guidance, "pause_s": args.pause_s, "rounds": rounds}
    pipeline.warm_up([1], args.size, args.size, guidance_scale=args.guidance)
    plain_event = pipelines.torch.cuda.Event if on_cuda else None

    def call(way: str) -> float:
        if on_cuda:
            torch.cuda.synchronize()
        time.sleep(args.pause_s)
        blocking = way == "every_step_blocking" and on_cuda
        if blocking:  # the throttle makes its marks through torch.cuda.Event
            pipelines.torch.cuda.Event = lambda: plain_event(blocking=True)
        try:
            began = time.perf_counter()
            pipeline.generate(jobs, settings, lambda first, images: None, preemption_for(way, args.steps))
            if on_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - began
        finally:
            if blocking:
                pipelines.torch.cuda.Event = plain_event

    for way in ways:  # one untimed call each: nothing first-time in the rounds
        call(way)
    for index in range(args.rounds):
        rounds.append({way: round(call(way), 4) for way in rotated(ways, index)})
        document.update(summary(rounds, ways))
        save_json(document, args.out)  # what is measured comes back even if the call is cut off
        print(f"round {index}: {rounds[-1]}", file=sys.stderr, flush=True)
    print(save_json(document, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
