"""Time the worker's PNG encoder (gpu_worker/model/png.py) against PIL and, optionally, an earlier version.

    python -m bench.png --sizes 512,1024 --baseline c4fa84b --out docs/benchmarks/png-cpu.json

For each size, two images: noise (what the random-weight models draw, and the worst case: it does
not compress) and a smooth gradient (compresses like a real picture). Each encoder runs on the same
image, one call after the other in a new random order each repeat, ``--repeats`` times; medians in
milliseconds and the file sizes.
Encoders: ``pil_level1`` (what the worker used before png.py), ``current`` (this checkout's
png.encode_png on one thread, and with ``--stripes`` threads when above 1), and with ``--baseline
REV`` the png.py of git revision REV, loaded from ``git show``, or of a png.py file at the path REV
(a before/after comparison in one run, on one machine). Every encoder's PNG must decode to the same
pixels, which the script checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image

from bench.common import card_name, save_json
from gpu_worker.model import png

REPO = Path(__file__).resolve().parents[1]


def test_images(size: int) -> dict[str, np.ndarray]:
    noise = np.random.default_rng(size).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * 255 // (2 * size - 2 or 1)
    smooth = np.stack([ramp, ramp.T, 255 - ramp], axis=-1).astype(np.uint8)
    return {"noise": noise, "smooth": smooth}


def png_module_at(revision: str):
    """gpu_worker/model/png.py as it was at git ``revision`` (or the file at that path: machines that get
    a copy of the working tree without its git history), imported as a module of its own."""
    if revision.endswith(".py") and Path(revision).is_file():
        source = Path(revision).read_text()
    else:
        source = subprocess.run(["git", "show", f"{revision}:gpu_worker/model/png.py"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"png_at_{Path(revision).stem}", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pil_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encoders(baseline, stripe_threads: ThreadPoolExecutor | None, stripes: int) -> dict[str, Callable]:
    found: dict[str, Callable] = {"pil_level1": pil_png, "current": png.encode_png}
    if stripe_threads is not None:
        found[f"current_{stripes}_stripes"] = lambda pixels: png.encode_png(pixels, stripe_threads, stripes)
    if baseline is not None:
        found["baseline"] = baseline.encode_png
        if stripe_threads is not None:
            found[f"baseline_{stripes}_stripes"] = lambda pixels: baseline.encode_png(pixels, stripe_threads, stripes)
    return found


def measure(pixels: np.ndarray, named: dict[str, Callable], repeats: int) -> dict[str, dict]:
    """Median milliseconds and bytes per encoder, the encoders interleaved call by call."""
    seconds: dict[str, list[float]] = {name: [] for name in named}
    outputs = {name: encode(pixels) for name, encode in named.items()}  # first calls: allocations, imports
    for name, data in outputs.items():
        decoded = np.asarray(PIL.Image.open(io.BytesIO(data)))
        if not np.array_equal(decoded, pixels):
            raise SystemExit(f"{name}: the PNG does not decode to the image's pixels")
    shuffler = random.Random(0)
    for _ in range(repeats):
        # A new order each repeat: the encoder run after PIL (which evicts the caches and allocates
        # megabytes) measured up to 30% slower in a fixed order, even a rotated one (the same neighbours).
        order = list(named)
        shuffler.shuffle(order)
        for name in order:
            began = time.perf_counter()
            named[name](pixels)
            seconds[name].append(time.perf_counter() - began)
    return {name: {"ms": round(statistics.median(times) * 1000, 3), "bytes": len(outputs[name])}
            for name, times in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024", help="square image sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--stripes", type=int, default=1, help="also time this many stripes in parallel (> 1)")
    parser.add_argument("--baseline", help="a git revision whose gpu_worker/model/png.py to time beside this one, or "
                                               "the path of such a file (a .py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    baseline = png_module_at(args.baseline) if args.baseline else None
    threads = ThreadPoolExecutor(args.stripes) if args.stripes > 1 else None
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            for kind, pixels in test_images(size).items():
                timings = measure(pixels, encoders(baseline, threads, args.stripes), args.repeats)
                row = {"size": size, "image": kind, "encoders": timings}
                if baseline is not None:
                    row["current_over_baseline"] = round(timings["current"]["ms"] / timings["baseline"]["ms"], 3)
                rows.append(row)
                print(f"{size}² {kind}: " + ", ".join(f"{name} {t['ms']} ms ({t['bytes']} B)"
                                                      for name, t in timings.items()), file=sys.stderr)
    finally:
        if threads is not None:
            threads.shutdown()
    document = {"command": "python -m bench.png " + " ".join(sys.argv[1:]), "card": card_name(),
                "machine_cores": len(os.sched_getaffinity(0)), "baseline": args.baseline,
                "repeats": args.repeats, "rows": rows}
    print(save_json(document, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
