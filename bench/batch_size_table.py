"""The seed's VRAM table (RTX 3060 ... H100) recomputed from measured memory per image.

    python -m bench.batch_size_table            # markdown, for docs/benchmarks.md

For each card and model: what the worker's automatic MAX_BATCH_SIZE picks
(gpu_worker.model.pipelines.auto_max_batch_size, the very function the worker calls, with its per-image
reference figures) and the largest batch the measured memory says fits (weights + batch-1
activations + slope x (batch - 1) <= the card's memory), both from the H100 measurements committed
in docs/benchmarks/raw-*-h100.json (bf16, whole pipeline: text encoders, UNet with CFG, VAE decode).
A card's usable memory is its total less ~0.5 GiB of CUDA context.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from gpu_worker.model.pipelines import auto_max_batch_size, estimate_per_image_memory_bytes

REPO = Path(__file__).resolve().parent.parent

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5
# Total memory as the cards report it (MiB), and the seed's auto-detected figure.
CARDS = [
    ("RTX 3060 (12 GB)", 12288, "2"),
    ("RTX 3090 (24 GB)", 24576, "4-5"),
    ("RTX 4090 (24 GB)", 24564, "8"),
    ("L40S (48 GB)", 46068, "12-13"),
    ("A100 (80 GB)", 81920, "20+"),
    ("H100 (80 GB)", 81559, "20+"),
    ("H200 (141 GB)", 143771, "—"),
]
MODELS = [("sdxl", 1024, "SDXL 1024²"), ("sd15", 512, "SD-1.5 512²")]


def measured(model: str) -> dict:
    raw = json.loads((REPO / "docs" / "benchmarks" / f"raw-{model}-h100.json").read_text())["raw"]
    eager = raw["variants"]["eager"]
    sizes = sorted(int(size) for size in eager)
    low, high = sizes[0], sizes[-1]
    peak = {size: eager[str(size)]["peak_above_weights_gib"] for size in (low, high)}
    return {"weights_gib": raw["weights_gib"], "batch1_gib": peak[low] - (peak[high] - peak[low]) / (high - low) * (low - 1),
            "per_image_gib": (peak[high] - peak[low]) / (high - low)}


def rows() -> list[str]:
    lines = ["| card | " + " | ".join(f"{label}: auto / fits" for _, _, label in MODELS) + " | seed says |",
             "|---|" + "---|" * len(MODELS) + "---|"]
    figures = {model: measured(model) for model, _, _ in MODELS}
    for name, total_mib, seed in CARDS:
        cells = []
        for model, size, _ in MODELS:
            m = figures[model]
            free_gib = total_mib / 1024 - CUDA_CONTEXT_GIB - m["weights_gib"]
            stub = SimpleNamespace(per_image_memory_bytes=lambda w, h, model=model: estimate_per_image_memory_bytes(
                model, torch.bfloat16, w, h))
            auto = auto_max_batch_size(stub, int(free_gib * GIB), size, size) if free_gib > 0 else 0
            fits = max(0, 1 + math.floor((free_gib - m["batch1_gib"]) / m["per_image_gib"])) if free_gib > 0 else 0
            cells.append(f"{auto} / {fits}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seed} |")
    return lines


def main() -> int:
    for model, size, label in MODELS:
        m = measured(model)
        print(f"- {label}: weights {m['weights_gib']:.2f} GiB, batch 1 {m['batch1_gib']:.2f} GiB above them, "
              f"{m['per_image_gib']:.2f} GiB per extra image (measured); the worker plans with "
              f"{estimate_per_image_memory_bytes(model, torch.bfloat16, size, size) / GIB:.2f} GiB per image")
    print()
    print("\n".join(rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
