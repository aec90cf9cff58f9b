"""Which image sizes a worker serves at compiled speed, what it does with the others, and the order
in which it warms them: pure rules, no torch, no clock of their own (every method takes ``now``).

**Sizes.** SIZES lists the sizes served compiled; its default (``auto``) is the architecture's
standard aspect-ratio buckets (:data:`BUCKETS`), scaled to the model's native size: a model of the
SD-1.5 family with another native size (the built-in ``tiny`` draws 64 x 64) gets the same shapes at
its own scale. A request of a size the list does not name is handled by UNLISTED_SIZE
(:class:`SizeRule`): ``eager`` runs it uncompiled (counted in the worker's ``eager_batches``),
``refuse`` answers ``size_not_served`` with the sizes served, ``snap`` draws it at the listed size
nearest in aspect ratio, then in area (the result says which size it has).

**Warming.** A size is *warm* when a request of that size runs compiled at every batch size up to
the limit without compiling (CUDA graphs included). The worker warms its first size (the native
square when listed) before it registers, and the rest afterwards, one (size, batch size) unit at a
time between batches (:class:`WarmUpPlan`): whenever its queue is empty, and otherwise at least one
unit every ``max_defer_s``, so that steady traffic of warm sizes cannot keep the others eager for
ever. A size that requests ask for goes to the front of what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from imagegen.bounds import IMAGE_SIDE_MULTIPLE, WIRE
from imagegen.protocol import MAX_SIZES, UNLISTED_SIZE_RULES, ImageSize

AUTO = "auto"

# Each family's standard aspect-ratio buckets at its native size (width, height): SDXL's are the
# ones it was trained on (about a megapixel each); SD-1.5's are the portrait and landscape sizes its
# users pick most besides the square.
BUCKETS: dict[str, tuple[tuple[int, int], ...]] = {
    "sdxl": ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)),
    "sd15": ((512, 512), (512, 768), (768, 512), (576, 448), (448, 576)),
}
FAMILY_NATIVE_SIZE = {"sdxl": 1024, "sd15": 512}


def default_sizes(architecture: str, native_size: int) -> tuple[ImageSize, ...]:
    """The family's buckets scaled to ``native_size`` (sides rounded to IMAGE_SIDE_MULTIPLE, repeats
    dropped); an unknown family gets its native square alone."""
    buckets = BUCKETS.get(architecture)
    if buckets is None:
        return (ImageSize(native_size, native_size),)
    scale = native_size / FAMILY_NATIVE_SIZE[architecture]
    sizes: list[ImageSize] = []
    for width, height in buckets:
        size = ImageSize(_round_side(width * scale), _round_side(height * scale))
        if size not in sizes:
            sizes.append(size)
    return tuple(sizes)


def _round_side(pixels: float) -> int:
    return max(IMAGE_SIDE_MULTIPLE, IMAGE_SIDE_MULTIPLE * round(pixels / IMAGE_SIDE_MULTIPLE))


def parse_sizes(text: str) -> tuple[ImageSize, ...] | None:
    """SIZES: ``auto`` (None: the architecture's buckets, known once the model is loaded) or a comma
    list of WIDTHxHEIGHT. Raises ValueError saying what is wrong."""
    text = text.strip()
    if text.lower() == AUTO:
        return None
    sizes: list[ImageSize] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        width_text, separator, height_text = item.lower().partition("x")
        if not separator or not width_text.strip().isdigit() or not height_text.strip().isdigit():
            raise ValueError(f"{item!r} is not WIDTHxHEIGHT (for example 1024x1024)")
        size = ImageSize(int(width_text), int(height_text))
        for side in (size.width, size.height):
            if side % IMAGE_SIDE_MULTIPLE or not WIRE.image_side.low <= side <= WIRE.image_side.high:
                raise ValueError(f"{item}: each side must be a multiple of {IMAGE_SIDE_MULTIPLE} between "
                                 f"{WIRE.image_side.low} and {WIRE.image_side.high}")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise ValueError(f"lists no size: give {AUTO} or sizes such as 1024x1024,1152x896")
    if len(sizes) > MAX_SIZES:
        raise ValueError(f"lists {len(sizes)} sizes; at most {MAX_SIZES}")
    return tuple(sizes)


def warm_up_batch_sizes(max_batch_size: int, cuda_graph_max_batch: int = 0) -> list[int]:
    """Every batch size the worker may run, the largest first, unless every size runs with CUDA graphs
    (max_batch_size <= cuda_graph_max_batch, with TORCH_COMPILE): then the smallest first.

    Every size: a size's first batch pays one-off costs besides compiling (likely cuDNN's choice of
    convolution plans per input shape and the allocator's growth; not profiled): on an H100 the
    first SD-1.5 batch of 6 took 1.44 s and later ones 0.83-0.90 s, the first batch of 50 ran 0.7 s
    slower than the raw pipeline's rate (docs/benchmarks.md). With TORCH_COMPILE this also compiles
    both graphs and records a CUDA graph per small size. The largest first: an auto-detected
    maximum that runs out of memory is found before the others are warmed up. But the CUDA-graph
    mode's one compilation (batch dimension dynamic) serves all its sizes and is made at the first
    size it sees: with the largest first, a lone request's batch of one runs code compiled at
    another size. Likely why, with MAX_BATCH_SIZE=2 (order [2, 1]), the worker's lone SD-1.5 batch
    ran 3% slower than the raw pipeline on two H200s, and within 1% with the automatic size (order
    [64, 1, 2, ...]) on three (docs/benchmarks.md, SD-1.5 on the H200; not yet measured with this
    order). So there batch 1 comes first, as in the raw benchmark."""
    if max_batch_size <= cuda_graph_max_batch:
        return list(range(1, max_batch_size + 1))
    return [max_batch_size, *range(1, max_batch_size)]


def batch_sizes_at(size: ImageSize, max_batch_size: int, max_batch_pixels: int | None,
                   cuda_graph_max_batch: int = 0) -> list[int]:
    """The batch sizes that make ``size`` warm: every size the worker may run at it (MAX_BATCH_SIZE,
    and the pixel budget of an auto-detected one), in warm_up_batch_sizes' order."""
    most = max_batch_size
    if max_batch_pixels is not None:
        most = min(most, max(1, max_batch_pixels // (size.width * size.height)))
    return warm_up_batch_sizes(most, cuda_graph_max_batch)


def sizes_text(sizes: Iterable[ImageSize]) -> str:
    return ", ".join(str(size) for size in sizes)


def nearest_size(width: int, height: int, sizes: Sequence[ImageSize]) -> ImageSize:
    """The listed size closest in aspect ratio, then in area (both compared as logarithms, so 2:1
    and 1:2 are as far from 1:1), then the first listed."""
    def distance(size: ImageSize) -> tuple[float, float]:
        aspect = abs(math.log(size.width / size.height) - math.log(width / height))
        area = abs(math.log(size.width * size.height) - math.log(width * height))
        return round(aspect, 9), round(area, 9)

    return min(sizes, key=distance)


@dataclass(frozen=True)
class SizeDecision:
    """What to do with a request's size: run it as asked (``size`` is None), run it at ``size``
    (snapped), or refuse it (``refusal`` says why and lists the sizes served)."""

    size: ImageSize | None = None
    refusal: str | None = None
    unlisted: bool = False  # the size asked for is not listed (eager, snapped or refused)


@dataclass(frozen=True)
class SizeRule:
    """SIZES and UNLISTED_SIZE, applied to each request as it reaches the worker."""

    sizes: tuple[ImageSize, ...]
    unlisted: str = "eager"

    def __post_init__(self) -> None:
        if self.unlisted not in UNLISTED_SIZE_RULES:
            raise ValueError(f"UNLISTED_SIZE must be one of {', '.join(UNLISTED_SIZE_RULES)}, got {self.unlisted!r}")

    def decide(self, width: int, height: int) -> SizeDecision:
        if not self.sizes or ImageSize(width, height) in self.sizes:
            return SizeDecision()
        if self.unlisted == "refuse":
            return SizeDecision(refusal=f"{width}x{height} is not a size this service draws; ask for one of "
                                        f"{sizes_text(self.sizes)}", unlisted=True)
        if self.unlisted == "snap":
            return SizeDecision(size=nearest_size(width, height, self.sizes), unlisted=True)
        return SizeDecision(unlisted=True)


@dataclass(frozen=True)
class WarmUpUnit:
    """One call of the warm-up: a batch of ``batch_size`` images of ``size``."""

    size: ImageSize
    batch_size: int


@dataclass
class WarmUpPlan:
    """The sizes still to warm after the first, a unit at a time (see the module's docstring).

    ``batch_sizes_for(size)``: the batch sizes that make ``size`` warm, in the order to run them
    (gpu_worker.__main__.warm_up_batch_sizes, limited by the pixel budget at that size)."""

    pending: list[ImageSize]
    batch_sizes_for: Callable[[ImageSize], list[int]]
    max_defer_s: float
    warm: list[ImageSize] = field(default_factory=list)
    failed: list[ImageSize] = field(default_factory=list)
    last_unit_at: float | None = None  # when the last unit ended (or the plan began)
    _current: list[WarmUpUnit] = field(default_factory=list)  # the size being warmed: its units left

    @classmethod
    def after_first(cls, sizes: Sequence[ImageSize], first: ImageSize,
                    batch_sizes_for: Callable[[ImageSize], list[int]], max_defer_s: float, now: float) -> "WarmUpPlan":
        """The plan once ``first`` is warm (the worker registers then)."""
        return cls([size for size in sizes if size != first], batch_sizes_for, max_defer_s, warm=[first],
                   last_unit_at=now)

    @property
    def done(self) -> bool:
        return not self.pending and not self._current

    @property
    def state(self) -> str:
        """WorkerStatus.compile_state: "warming" while sizes are left, then "warm"."""
        return "warm" if self.done else "warming"

    def is_warm(self, size: ImageSize) -> bool:
        return size in self.warm

    def note_demand(self, size: ImageSize) -> None:
        """A request of ``size`` arrived: if it is waiting to be warmed, it goes next."""
        if size in self.pending and self.pending[0] != size:
            self.pending.remove(size)
            self.pending.insert(0, size)

    def next_unit(self, now: float, queue_empty: bool) -> WarmUpUnit | None:
        """The unit to run now, or None: when the queue is empty, or when the last unit is
        ``max_defer_s`` old (requests then wait behind one unit)."""
        if self.done or not (queue_empty or self.overdue(now)):
            return None
        if not self._current:
            size = self.pending.pop(0)
            self._current = [WarmUpUnit(size, batch) for batch in self.batch_sizes_for(size)]
        return self._current[0]

    def overdue(self, now: float) -> bool:
        return self.last_unit_at is None or now - self.last_unit_at >= self.max_defer_s

    def next_due_at(self) -> float | None:
        """When a unit is due even with requests queued (None: nothing left to warm)."""
        if self.done:
            return None
        return (self.last_unit_at or 0.0) + self.max_defer_s

    def unit_done(self, unit: WarmUpUnit, now: float) -> bool:
        """``unit`` ran; True when its size is now warm."""
        self.last_unit_at = now
        if self._current and self._current[0] == unit:
            self._current.pop(0)
        if self._current or unit.size in self.warm:
            return False
        self.warm.append(unit.size)
        return True

    def unit_failed(self, unit: WarmUpUnit, now: float) -> None:
        """``unit`` raised (out of memory, say): its size stays eager, the plan goes on."""
        self.last_unit_at = now
        self._current = []
        if unit.size not in self.failed:
            self.failed.append(unit.size)
