"""A FAKE image backend: no model, no diffusers, no GPU. For tests of the serving layer only.

This is NOT an image model. It exists so that the gateway -> broker -> worker path (batching,
delivery, failure handling, fault injection such as out-of-memory errors) can be exercised quickly
and deterministically without loading diffusers or owning a GPU. Never use it as a stand-in in
tests that are named for, or claim to check, the real pipeline (gpu_worker.model.pipelines).

It offers the surface the worker uses from :class:`gpu_worker.model.pipelines.ImagePipeline`:
``model_id``, ``architecture`` ("fake"), ``device`` (cpu), ``dtype`` (float32), ``native_size``
(64), ``generate(jobs, settings)`` and ``per_image_memory_bytes(width, height)``.

It is chosen with a MODEL_ID of the form ``fake`` or ``fake:key=value,key=value``::

    fake                         instant images
    fake:delay=0.5               sleep 0.5 s per generate call (per batch), to simulate GPU time
    fake:step_delay=0.1          sleep 0.1 s per denoising step (a 25-step batch: 2.5 s; with delay: added)
    fake:oom_above=2             raise torch.OutOfMemoryError for a batch of more than 2 images
    fake:fail=1                  raise RuntimeError("fake failure") on every generate call
    fake:cell=1                  one random colour per pixel (PNGs as large as a random-weight model's)
    fake:warm_delay=0.5          with TORCH_COMPILE, each warm-up call (one batch size of one size) sleeps
                                 0.5 s, standing in for compiling: the worker's warming of SIZES without a model
    fake:delay=0.2,oom_above=2   options combine

:func:`parse_fake_model_id` returns None for any MODEL_ID that is not a fake id, and raises
ValueError for a malformed one. Importing this module imports torch, numpy and PIL, never diffusers.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

from gpu_worker.model.oom import OUT_OF_MEMORY_ERROR, OnImages
from gpu_worker.model.pipelines import GenerationJob
from gpu_worker.model.previews import flat_previews
from gpu_worker.decisions.preemption import Preemption
from imagegen.batch_key import BatchKey
from imagegen.settings import parse_bool

FAKE_PREFIX = "fake"
FAKE_ARCHITECTURE = "fake"
FAKE_NATIVE_SIZE = 64
# Width and height must be multiples of this, as with the real pipelines' VAE scale factor (8).
FAKE_SIZE_MULTIPLE = 8
# Images are a grid of flat colour cells of this many pixels a side by default: distinct per job, yet
# cheap to build and to compress as PNG. ``cell=1`` draws per-pixel noise instead, which compresses as
# badly as a random-weight model's output (a 1024x1024 PNG of about 3 MB): for timing the serving
# path's PNG encoding, transfer and file write at their real size (python -m bench.gpu service --trace).
DEFAULT_CELL_PX = 8

_KEYS = ("delay", "oom_above", "fail", "cell", "step_delay", "warm_delay")


class FakeBackend:
    """A fake text-to-image backend (no model): deterministic coloured-grid images.

    delay_s: seconds slept per generate call (whatever the batch size). oom_above: raise
    torch.OutOfMemoryError when a call asks for more than this many images (None: never).
    fail: raise RuntimeError("fake failure") on every call. The checks run in this order: empty
    batch / bad settings (ValueError), fail, oom_above, then the delay, then the images; so
    failures are instant.

    ``batch_sizes`` records the size of every generate call, including those that raised (for
    tests; appended from whichever thread calls generate).
    """

    def __init__(self, model_id: str = FAKE_PREFIX, delay_s: float = 0.0,
                 oom_above: int | None = None, fail: bool = False, cell_px: int = DEFAULT_CELL_PX,
                 step_delay_s: float = 0.0, warm_delay_s: float = 0.0) -> None:
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay_s}")
        if not (math.isfinite(step_delay_s) and step_delay_s >= 0):
            raise ValueError(f"step_delay must be a finite number of seconds >= 0, got {step_delay_s}")
        if oom_above is not None and oom_above < 0:
            raise ValueError(f"oom_above must be >= 0, got {oom_above}")
        if cell_px < 1:
            raise ValueError(f"cell must be >= 1 pixel, got {cell_px}")
        self.model_id = model_id
        self.architecture = FAKE_ARCHITECTURE
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.native_size = FAKE_NATIVE_SIZE
        self.delay_s = float(delay_s)
        self.step_delay_s = float(step_delay_s)  # per denoising step: a batch of more steps takes longer
        self.oom_above = oom_above
        self.fail = fail
        self.cell_px = cell_px
        self.warm_delay_s = float(warm_delay_s)
        self.batch_sizes: list[int] = []
        self.warmed: list[tuple[int, int, int]] = []  # (width, height, batch size) of every warm-up call
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"FakeBackend(model_id={self.model_id!r}, delay_s={self.delay_s}, "
                f"oom_above={self.oom_above}, fail={self.fail}, cell_px={self.cell_px})")

    def generate(self, jobs: Sequence[GenerationJob], settings: BatchKey,
                 on_images: OnImages | None = None, preemption: Preemption | None = None) -> list[Any]:
        """One RGB image of settings.width x settings.height per job, in job order.

        Each image depends only on the job (seed, prompt, negative prompt) and the settings, never
        on its batch-mates: generating a job alone or in any batch gives the same pixels. Like the
        real pipeline, hands the images to ``on_images(0, arrays)`` as (H, W, 3) uint8 arrays and
        then returns those arrays, or, without ``on_images``, PIL images (so the worker's PNG path
        sees what it sees in service). With a
        ``preemption`` the delay is slept in num_inference_steps equal steps, each preceded by
        ``preemption.before_step`` (which may raise BatchPreempted), as the real denoising loop does.
        When the preemption carries a preview plan (gpu_worker/model/previews.py) with rows, the steps
        run as a loop even without a delay, and each due step delivers a small flat image per row
        still wanted (gpu_worker.model.previews.flat_previews), standing in for the latents' preview.
        """
        jobs = list(jobs)
        with self._lock:
            self.batch_sizes.append(len(jobs))
        if not jobs:
            raise ValueError("a batch needs at least one job")
        _check_settings(settings)
        if self.fail:
            raise RuntimeError("fake failure")
        if self.oom_above is not None and len(jobs) > self.oom_above:
            raise OUT_OF_MEMORY_ERROR(
                f"CUDA out of memory (fake: a batch of {len(jobs)} images is more than "
                f"oom_above={self.oom_above})")
        delay_s = self.delay_s + self.step_delay_s * settings.num_inference_steps
        plan = getattr(preemption, "previews", None)
        plan = plan if plan is not None and plan.rows else None
        if preemption is not None and (delay_s or plan is not None):
            began, steps = time.monotonic(), settings.num_inference_steps
            for step in range(steps):  # steps end at fixed instants: no drift from 25 sleeps
                preemption.before_step(lambda: None)  # nothing queued on a device to wait for
                time.sleep(max(0.0, began + delay_s * (step + 1) / steps - time.monotonic()))
                if plan is not None and plan.due(step + 1):  # no latents: flat images, as small as previews get
                    images = flat_previews(plan, step + 1, settings.width, settings.height)
                    if images:
                        plan.deliver(step + 1, images)
        elif delay_s:
            time.sleep(delay_s)
        arrays = [fake_pixels(job, settings, self.cell_px) for job in jobs]
        if on_images is not None:
            on_images(0, arrays)
            return arrays
        return [PIL.Image.fromarray(pixels) for pixels in arrays]

    def warm_up(self, batch_sizes: Sequence[int], width: int, height: int) -> dict[int, float]:
        """Stands in for ImagePipeline.warm_up with TORCH_COMPILE: sleeps warm_delay per batch size
        (no compiling happens); returns seconds per batch size as the real one does."""
        seconds = {}
        for size in batch_sizes:
            time.sleep(self.warm_delay_s)
            with self._lock:
                self.warmed.append((width, height, size))
            seconds[size] = self.warm_delay_s
        return seconds

    def per_image_memory_bytes(self, width: int, height: int) -> int:
        """A nominal figure (one float32 RGB image): positive, growing with pixels, not measured."""
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        return width * height * 3 * 4


def fake_pixels(job: GenerationJob, settings: BatchKey, cell_px: int = DEFAULT_CELL_PX) -> np.ndarray:
    """The fake's pixels for one job, (height, width, 3) uint8: a grid of cell_px x cell_px-pixel
    cells of random colours.

    The colours come from a numpy RNG seeded with SHA-256 of (seed, prompt, negative prompt,
    steps, guidance scale), so the image is the same in every process and run, and two jobs that
    differ in seed or prompt get different images (64x64 already has 64 cells x 3 random bytes).
    """
    key = repr((job.seed, job.prompt, job.negative_prompt, settings.num_inference_steps,
                float(settings.guidance_scale))).encode("utf-8")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))
    rows, cols = -(-settings.height // cell_px), -(-settings.width // cell_px)
    cells = rng.integers(0, 256, size=(rows, cols, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(cells, cell_px, axis=0), cell_px, axis=1) if cell_px > 1 else cells
    return np.ascontiguousarray(pixels[:settings.height, :settings.width])  # uint8 (h, w, 3): RGB


def _check_settings(settings: BatchKey) -> None:
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value <= 0 or value % FAKE_SIZE_MULTIPLE:
            raise ValueError(
                f"{name} must be a positive multiple of {FAKE_SIZE_MULTIPLE}, got {value}")
    if settings.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {settings.num_inference_steps}")


def is_fake_model_id(model_id: str) -> bool:
    """True for ``fake`` and ``fake:...`` (whether or not the options are valid)."""
    return model_id == FAKE_PREFIX or model_id.startswith(FAKE_PREFIX + ":")


def parse_fake_model_id(model_id: str) -> FakeBackend | None:
    """A FakeBackend for a fake MODEL_ID (``fake`` or ``fake:key=value,...``), else None.

    Keys: ``delay`` (seconds per batch, float >= 0), ``step_delay`` (seconds per denoising step, float
    >= 0), ``warm_delay`` (seconds per warm-up call, float >= 0), ``oom_above`` (int >= 0), ``fail``
    (1/0, true/false, yes/no, on/off), ``cell`` (pixels per side of a flat-colour cell, int >= 1).
    A malformed fake id (unknown or repeated key, missing ``=``, bad value, empty option list)
    raises ValueError naming the id and the problem.
    """
    if not is_fake_model_id(model_id):
        return None
    if model_id == FAKE_PREFIX:
        return FakeBackend(model_id)
    spec = model_id[len(FAKE_PREFIX) + 1:]
    options: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise _bad(model_id, f"option {item.strip()!r} is not key=value")
        if key not in _KEYS:
            raise _bad(model_id, f"unknown option {key!r}")
        if key in options:
            raise _bad(model_id, f"option {key!r} is given twice")
        options[key] = value
    delay_s = 0.0
    step_delay_s = 0.0
    oom_above: int | None = None
    fail = False
    if "delay" in options:
        try:
            delay_s = float(options["delay"])
        except ValueError:
            raise _bad(model_id, f"delay must be a number of seconds, got "
                                 f"{options['delay']!r}") from None
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise _bad(model_id, f"delay must be a finite number >= 0, got {options['delay']!r}")
    if "step_delay" in options:
        try:
            step_delay_s = float(options["step_delay"])
        except ValueError:
            raise _bad(model_id, f"step_delay must be a number of seconds, got {options['step_delay']!r}") from None
        if not (math.isfinite(step_delay_s) and step_delay_s >= 0):
            raise _bad(model_id, f"step_delay must be a finite number >= 0, got {options['step_delay']!r}")
    if "oom_above" in options:
        try:
            oom_above = int(options["oom_above"])
        except ValueError:
            raise _bad(model_id, f"oom_above must be an integer, got "
                                 f"{options['oom_above']!r}") from None
        if oom_above < 0:
            raise _bad(model_id, f"oom_above must be >= 0, got {oom_above}")
    if "fail" in options:
        try:
            fail = parse_bool(options["fail"])
        except ValueError:
            raise _bad(model_id, f"fail must be 1 or 0, got {options['fail']!r}") from None
    warm_delay_s = 0.0
    if "warm_delay" in options:
        try:
            warm_delay_s = float(options["warm_delay"])
        except ValueError:
            raise _bad(model_id, f"warm_delay must be a number of seconds, got {options['warm_delay']!r}") from None
        if not (math.isfinite(warm_delay_s) and warm_delay_s >= 0):
            raise _bad(model_id, f"warm_delay must be a finite number >= 0, got {options['warm_delay']!r}")
    cell_px = DEFAULT_CELL_PX
    if "cell" in options:
        try:
            cell_px = int(options["cell"])
        except ValueError:
            raise _bad(model_id, f"cell must be an integer number of pixels, got {options['cell']!r}") from None
        if cell_px < 1:
            raise _bad(model_id, f"cell must be >= 1, got {cell_px}")
    return FakeBackend(model_id, delay_s=delay_s, oom_above=oom_above, fail=fail, cell_px=cell_px,
                       step_delay_s=step_delay_s, warm_delay_s=warm_delay_s)


def _bad(model_id: str, problem: str) -> ValueError:
    return ValueError(
        f"bad fake MODEL_ID {model_id!r}: {problem}. Expected 'fake' or "
        f"'fake:key=value,...' with keys delay (seconds per batch, >= 0), step_delay (seconds per "
        f"denoising step, >= 0), warm_delay (seconds per warm-up call, >= 0), oom_above (integer >= 0), "
        f"fail (1 or 0) and cell (pixels, >= 1), "
        f"e.g. 'fake:delay=0.2,oom_above=2'")
