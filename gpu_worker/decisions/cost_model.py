"""An online model of how long one batch takes, learned from the batches a worker runs (pure).

BentoML's adaptive dispatcher fits ``latency = a + b * batch_size`` from the batches it has run;
this does the same job without assuming a line, because real GPUs are not linear at small sizes
(docs/benchmarks.md, GPU ceilings: an SDXL step at batch 1 costs what it costs at batch 2). For each
:class:`~gpu_worker.decisions.batcher.BatchKey` it keeps a moving average of the observed duration per batch
size, and answers for other sizes by interpolating between observed sizes.

Where it has no evidence it assumes the cost is *proportional* to the batch size (batching saves
nothing). That is the cautious side for the policy that asks: it makes waiting for batch-mates look
worthless, so an idle GPU is never held on a guess; only measured savings justify a hold.

A key never seen borrows the shape of the keys that were, scaled by its work (pixels x steps x
classifier-free-guidance rows), so a new size is not treated as free.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from imagegen.batch_key import BatchKey, work_units  # noqa: F401 - work_units re-exported


@dataclass
class SizeTable:
    """Moving-average duration per observed batch size, and interpolation between them."""

    alpha: float
    seconds: dict[int, float] = field(default_factory=dict)

    def observe(self, size: int, seconds: float) -> None:
        old = self.seconds.get(size)
        self.seconds[size] = seconds if old is None else old + self.alpha * (seconds - old)

    def estimate(self, size: int) -> float | None:
        """Seconds for a batch of ``size``; None when nothing was observed.

        Between observed sizes: linear interpolation. Below the smallest or above the largest:
        proportional to size from the nearest observation (no evidence of savings, see module doc)."""
        if not self.seconds:
            return None
        if size in self.seconds:
            return self.seconds[size]
        sizes = sorted(self.seconds)
        i = bisect.bisect_left(sizes, size)
        if i == 0 or i == len(sizes):
            nearest = sizes[0] if i == 0 else sizes[-1]
            return self.seconds[nearest] * size / nearest
        lo, hi = sizes[i - 1], sizes[i]
        frac = (size - lo) / (hi - lo)
        return self.seconds[lo] + frac * (self.seconds[hi] - self.seconds[lo])


@dataclass
class OnlineCostModel:
    """Batch durations per key and size, from observations (``alpha``: weight of the newest)."""

    alpha: float = 0.3
    _per_key: dict[BatchKey, SizeTable] = field(default_factory=dict)
    _per_work: SizeTable | None = None  # seconds per work unit, all keys together

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self._per_work = SizeTable(self.alpha)

    def observe(self, key: BatchKey, size: int, duration_s: float) -> None:
        """Record that a batch of ``size`` requests of ``key`` took ``duration_s`` seconds."""
        if size < 1 or duration_s <= 0.0:
            return  # a failed or empty batch says nothing about cost
        self._per_key.setdefault(key, SizeTable(self.alpha)).observe(size, duration_s)
        assert self._per_work is not None
        self._per_work.observe(size, duration_s / work_units(key))

    def estimate_s(self, key: BatchKey, size: int) -> float | None:
        """Expected seconds for a batch of ``size`` requests of ``key``; None with no evidence at all."""
        table = self._per_key.get(key)
        if table is not None:
            return table.estimate(size)
        assert self._per_work is not None
        per_work = self._per_work.estimate(size)
        return None if per_work is None else per_work * work_units(key)

    def knows(self, key: BatchKey) -> bool:
        """Whether batches of this very key have been observed (not only borrowed from others)."""
        return key in self._per_key
