"""GPU cost models: how long one batch of a given key and size takes, from measured tables.

* ``sdxl-h200`` and ``sd15-h200``: the GPU ceilings of docs/benchmarks.md (one H200, bf16, eager,
  25 steps, CFG on). A batch costs ``steps x step_ms(UNet rows) + vae_ms(images)``, the two
  columns of the table interpolated piecewise-linearly (exact at every measured size). Rows are
  ``batch x 2`` with CFG (guidance > 1) and ``batch`` without; other resolutions count as
  ``pixels / native pixels`` images, so a 512x512 SDXL image is a quarter of a 1024x1024 one.
  Below the smallest measured row count a UNet step costs what it costs there (small batches are
  launch-bound: batch 1 costs what batch 2 does).
* ``sdxl-h100`` and ``sd15-h100``: our own figures, the worker's whole batch call timed per batch
  size on one H100 (bench/batch_costs.py); other keys scale with their work.
* ``sdxl-h100-compiled`` and ``sd15-h100-compiled``: the same with ``TORCH_COMPILE=true``
  (bench/gpu.py).
* ``seed-l40s`` and ``seed-h100``: the throughput the window rule's design claims
  (docs/batching.md): an L40S takes ~15 s for one image, ~30 s for a batch of 4 (its "Batch
  Size 4: ~375 s" for 50 images) and ~40 s for a batch of 8; an H100 is "~3x faster per-GPU than
  L40S" and does a batch of 16 in 25 s (0.64 images/s per GPU). Other keys scale with their work
  (pixels x steps x CFG).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Protocol

from gpu_worker.decisions.batcher import BatchKey
from gpu_worker.decisions.cost_model import work_units

SDXL_1024 = BatchKey(1024, 1024, 25, 5.0)
SD15_512 = BatchKey(512, 512, 25, 7.5)


class CostModel(Protocol):
    name: str
    reference_key: BatchKey  # the key the workloads use unless they mix

    def batch_s(self, key: BatchKey, size: int) -> float: ...


def interpolate(points: Mapping[float, float], x: float, below: str = "clamp") -> float:
    """Piecewise-linear through ``points``; beyond the largest x, the last segment's slope.

    Below the smallest x: ``clamp`` keeps its value, ``proportional`` scales it down with x."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]] if below == "clamp" else points[xs[0]] * x / xs[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    return points[x0] + (x - x0) * (points[x1] - points[x0]) / (x1 - x0)


@dataclass(frozen=True)
class MeasuredTable:
    """steps x UNet step time (by UNet rows) + VAE decode time (by images), from a measured table."""

    name: str
    reference_key: BatchKey
    step_ms_by_rows: Mapping[float, float]
    vae_ms_by_images: Mapping[float, float]

    def batch_s(self, key: BatchKey, size: int) -> float:
        scale = key.pixels / self.reference_key.pixels
        rows = size * scale * (2 if key.guidance_scale > 1.0 else 1)
        step_ms = interpolate(self.step_ms_by_rows, rows, below="clamp")
        vae_ms = interpolate(self.vae_ms_by_images, size * scale, below="proportional")
        return (key.num_inference_steps * step_ms + vae_ms) / 1000.0


@dataclass(frozen=True)
class BatchCurve:
    """Seconds per batch by batch size at the reference key; other keys scale with work units."""

    name: str
    reference_key: BatchKey
    seconds_by_size: Mapping[float, float]

    def batch_s(self, key: BatchKey, size: int) -> float:
        work = work_units(key) / work_units(self.reference_key)
        return work * interpolate(self.seconds_by_size, size, below="proportional")


# docs/benchmarks.md, GPU ceilings, SDXL 1024x1024: batch 1/2/4/8/16 with CFG (2x rows).
SDXL_H200 = MeasuredTable(
    "sdxl-h200", SDXL_1024,
    step_ms_by_rows={2: 77.3, 4: 76.3, 8: 143.4, 16: 275.2, 32: 542.8},
    vae_ms_by_images={1: 86.6, 2: 174.5, 4: 302.7, 8: 560.5, 16: 1085.0},
)
# docs/benchmarks.md, GPU ceilings, SD-1.5 512x512: batch 1..64 with CFG.
SD15_H200 = MeasuredTable(
    "sd15-h200", SD15_512,
    step_ms_by_rows={2: 39.9, 4: 27.7, 8: 50.2, 16: 59.3, 32: 93.4, 64: 179.8, 128: 355.3},
    vae_ms_by_images={1: 21.7, 2: 38.9, 4: 62.4, 8: 110.7, 16: 208.5, 32: 415.8, 64: 670.1},
)
SEED_L40S = BatchCurve("seed-l40s", SDXL_1024, {1: 15.0, 4: 30.0, 8: 40.0})
# "~3x faster per-GPU than L40S" up to batch 8, and 0.64 images/s per GPU at batch 16.
SEED_H100 = BatchCurve("seed-h100", SDXL_1024, {1: 5.0, 4: 10.0, 8: 40.0 / 3, 16: 25.0})

# Our own H100 figures: bench/batch_costs.py on one H100 80GB HBM3 (2026-11-27, torch
# 2.11.0+cu130, bf16, eager, random weights): the worker's whole generate() call per batch, median
# of 2 (SDXL) or 3 (SD-1.5) runs after a warm-up. Raw output: docs/scheduling/measured-*.json.
SDXL_H100 = BatchCurve("sdxl-h100", SDXL_1024, {1: 2.3118, 2: 2.3486, 4: 4.2056, 8: 7.9997, 16: 15.7828})
SD15_H100 = BatchCurve("sd15-h100", SD15_512, {1: 1.2316, 2: 0.8269, 4: 1.035, 8: 1.6103, 16: 2.9443,
                                               32: 5.6161})

# With TORCH_COMPILE=true (torch.compile of the UNet, CUDA graphs for batches of 1-2), one H100: the
# raw pipeline's batch call (docs/benchmarks/raw-*-h100.json, variants "graphs" for 1-2 and
# "compiled" above) and the worker's own time for its largest batch in the service
# (service-*-h100-worker-batches.txt: SDXL 21 in 18.04 s, SD-1.5 34 in 4.59 s). Sizes between are
# interpolated linearly: at these sizes the cost per image is nearly flat.
SDXL_H100_COMPILED = BatchCurve("sdxl-h100-compiled", SDXL_1024, {1: 1.0478, 2: 1.8618, 16: 13.7249, 21: 18.04})
SD15_H100_COMPILED = BatchCurve("sd15-h100-compiled", SD15_512, {1: 0.2725, 2: 0.4067, 32: 4.2714, 34: 4.59})

COST_MODELS: dict[str, CostModel] = {
    m.name: m for m in (SDXL_H200, SD15_H200, SDXL_H100, SD15_H100, SDXL_H100_COMPILED, SD15_H100_COMPILED,
                        SEED_L40S, SEED_H100)
}


def get(name: str) -> CostModel:
    try:
        return COST_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown cost model {name!r}; expected one of {', '.join(COST_MODELS)}") from None


def provenance(costs: CostModel, key: BatchKey) -> str:
    """Where ``costs`` gets the time of ``key``'s batches: "measured" for the key its table was measured
    at, else how it is scaled from that key's measurements (work units: megapixels x steps x CFG rows)."""
    ref = costs.reference_key
    if key == ref:
        return "measured"
    size = f"{ref.width}x{ref.height}"
    if isinstance(costs, MeasuredTable):  # UNet rows and VAE images in native-size images, steps apart
        return f"scaled from {size} by work units (one image = {key.pixels / ref.pixels:.3f} measured images)"
    return f"scaled from {size} by work units (x{work_units(key) / work_units(ref):.3f})"


def ideal_packing_s(costs: CostModel, key: BatchKey, n: int, max_batch: int) -> float:
    """Least total GPU time to run ``n`` requests of ``key`` in batches of at most ``max_batch``
    (dynamic programming over batch sizes): the best any policy can do for a burst on one GPU."""
    batch = [0.0] + [costs.batch_s(key, b) for b in range(1, max_batch + 1)]
    best = [0.0] * (n + 1)
    for m in range(1, n + 1):
        best[m] = min(batch[b] + best[m - b] for b in range(1, min(m, max_batch) + 1))
    return best[n]


def capacity_img_s(costs: CostModel, key: BatchKey, max_batch: int) -> float:
    """Most images per second one GPU can sustain for ``key`` (its most efficient batch size)."""
    return max(b / costs.batch_s(key, b) for b in range(1, max_batch + 1))


# ---------------------------------------------------------------------------------------------
# Per-step costs for the step-level engine (BATCH_POLICY=step), derived from the batch tables above


@dataclass(frozen=True)
class StepCostModel:
    """What one step-level operation costs, derived from a batch table so that a cohort of ``n``
    requests of one key, encoded together, stepped together and decoded together, costs exactly
    ``batch_s(key, n)``:

        batch_s(key, n) = encode_s(key, n) + steps x step_s(shape, n, unet_rows) + decode_s(key, n)

    * encode (prompts of newcomers): ``prelude_fraction`` of ``batch_s(key, n)`` (the simulator's
      prelude share, ClusterConfig.prelude_fraction).
    * :class:`MeasuredTable` (UNet step and VAE columns): a step of ``u`` UNet rows (2 per request
      with CFG, 1 without) costs ``(1 - p) x step_ms(u x pixel scale)`` whatever the rows' steps and
      guidance; decoding ``n`` images ``(1 - p) x vae_ms(n x pixel scale)``.
    * :class:`BatchCurve` (whole batch calls): the decode share is the VAE share of the same model's
      H200 table at the same batch size (``decode_table``), and a step of ``n`` rows costs the rest
      over the steps, ``(1 - p - d) x work(shape, cfg) x curve(n) / steps``, its CFG factor the
      rows' mean (exact for rows of one key; rows of mixed guidance in between).
    """

    costs: CostModel
    prelude_fraction: float = 0.01
    decode_table: MeasuredTable | None = None  # None: the H200 table of the costs' model

    def _companion(self) -> MeasuredTable:
        if self.decode_table is not None:
            return self.decode_table
        return SD15_H200 if self.costs.reference_key == SD15_512 else SDXL_H200

    def encode_s(self, key: BatchKey, n: int) -> float:
        return self.prelude_fraction * self.costs.batch_s(key, n) if n else 0.0

    def decode_fraction(self, key: BatchKey, n: int) -> float:
        """BatchCurve tables: the share of a batch of ``n`` that is VAE decoding (companion table's)."""
        table = self._companion()
        scaled = BatchKey(table.reference_key.width, table.reference_key.height, key.num_inference_steps,
                          key.guidance_scale)
        vae_s = interpolate(table.vae_ms_by_images, n, below="proportional") / 1000.0
        return vae_s / table.batch_s(scaled, n)

    def decode_s(self, key: BatchKey, n: int) -> float:
        if n <= 0:
            return 0.0
        p = self.prelude_fraction
        costs = self.costs
        if isinstance(costs, MeasuredTable):
            scale = key.pixels / costs.reference_key.pixels
            return (1 - p) * interpolate(costs.vae_ms_by_images, n * scale, below="proportional") / 1000.0
        return self.decode_fraction(key, n) * costs.batch_s(key, n)

    def step_s(self, shape: tuple[int, int], images: int, unet_rows: float, steps: int | None = None) -> float:
        """One denoising step of ``images`` rows of ``shape`` taking ``unet_rows`` UNet rows.
        ``steps``: the rows' step count where they share one (BatchCurve tables: exact for one key)."""
        if images <= 0:
            return 0.0
        p = self.prelude_fraction
        costs = self.costs
        if isinstance(costs, MeasuredTable):
            scale = shape[0] * shape[1] / costs.reference_key.pixels
            return (1 - p) * interpolate(costs.step_ms_by_rows, unet_rows * scale, below="clamp") / 1000.0
        ref = costs.reference_key
        steps = steps or ref.num_inference_steps
        cfg = unet_rows / images  # 1 (no CFG) .. 2 (CFG), the rows' mean
        key = BatchKey(shape[0], shape[1], steps, 5.0 if cfg > 1 else 1.0)
        whole = costs.batch_s(key, images) * (cfg / (2 if cfg > 1 else 1))
        d = self.decode_fraction(key, images)
        return (1 - p - d) * whole / steps
