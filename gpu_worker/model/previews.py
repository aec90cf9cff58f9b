"""Live previews: a small picture of a running request's latents every few denoising steps.

A preview is NOT a decode of the image: the VAE is never run. Each latent pixel's 4 channels are
mapped to RGB by one fixed linear map per model family (a 4 x 3 matrix and a bias), the widely used
"latent to RGB" approximation of what the family's VAE decoder makes of a latent. The result is an
image at the latent resolution, 1/8 of the image's side (128 x 128 for SDXL at 1024 x 1024), with
the colours and layout of the picture as it forms, blurred and noisy while the steps are few.

The maps (:data:`LATENT_RGB`): SD-1.5's is the 4 x 3 fit of ComfyUI's ``comfy/latent_formats.py``
(class ``SD15``, no bias); SDXL's the later fit with a bias in the same file (class ``SDXL``). Both
act on the latents as the UNet sees them (already multiplied by the VAE's scaling factor: diffusers'
``latents``) and give values around [-1, 1], mapped to 0..255 as ``(x + 1) * 127.5``, clamped.

Cost, per preview step (``PREVIEW_EVERY_STEPS``, the worker's setting: at most one preview every that
many denoising steps, never at the last step, only for the rows that asked and are still wanted):

* on the device, for all those rows at once: one row gather, one (rows x h x w, 4) x (4, 3) matrix
  product, the clamp and the cast to uint8 (a few small kernels, about 0.2 ms on an H200 for 8 SDXL
  rows), and a copy of ``rows x h x w x 3`` bytes (48 KiB per SDXL row) into pinned host memory that
  does not make the CPU wait;
* in the GPU thread, a step or two later once that copy is done (it never waits for the device for
  it, except for a copy still in flight when denoising ends), JPEG encoding of each row's image
  (a few tenths of a millisecond for 128 x 128).

Measured (python -m bench.previews; docs/benchmarks/previews-*-h200.json, docs/jobs.md "Previews"): on
an H200 a whole preview of 1 to 8 SDXL 1024² rows takes 0.8 to 1.8 ms against 87 to 616 ms for a VAE
decode of the same latents, and 1.3 to 3.8 ms of the GPU thread per preview step, with no measurable
change of the generation's time; on the CPU with the tiny model (tests/integration/test_previews.py
prints the figures) about a hundredth of a VAE decode or less. :class:`LatentPreviewer` keeps its own
time (``plan.seconds``) so the worker can log it.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np
import PIL.Image
import torch

# (factors: 4 rows, one per latent channel, of (R, G, B); bias (R, G, B)) per model family.
# SD-1.5: ComfyUI comfy/latent_formats.py, class SD15 (no bias). SDXL: the same file, class SDXL.
LATENT_RGB: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd15": ((
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ), (0.0, 0.0, 0.0)),
    "sdxl": ((
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ), (0.1084, -0.0175, -0.0011)),
}
PREVIEW_FORMAT = "JPEG"
PREVIEW_MEDIA_TYPE = "image/jpeg"
JPEG_QUALITY = 85
DEFAULT_EVERY_STEPS = 5  # the worker's PREVIEW_EVERY_STEPS default
# The fake backend's previews: flat images of this side (it has no latents).
FAKE_PREVIEW_SIDE = 8

# deliver(step, [(row, encoded image), ...]): called in the GPU thread.
Deliver = Callable[[int, list[tuple[int, bytes]]], None]
# What is done to the gathered rows' latents before the map (the pipeline passes its scheduler's
# input scaling, so a variance-exploding scheduler's noisy latents are not all clamped to black and white).
Prepare = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PreviewPlan:
    """Which rows of a batch get previews and when; made by the worker, read by the GPU thread.

    ``rows``: the batch rows whose request asked (``GenerationParams.preview``). ``every_steps``: a
    preview after every that many denoising steps (step counted as done, 1..steps), never after the
    last (the image follows it). ``deliver(step, images)`` receives each due step's encoded images in
    the GPU thread (hand them to the event loop from there). ``unwanted()``: the rows nobody waits for
    any more (the batch's Preemption.unwanted), skipped. ``seconds`` and ``images`` add up what the
    previews cost the GPU thread, for the worker's log."""

    rows: tuple[int, ...]
    every_steps: int
    steps: int
    deliver: Deliver
    unwanted: Callable[[], Collection[int]] = frozenset
    seconds: float = 0.0
    images: int = 0
    _done_steps: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {self.every_steps}")

    def due(self, step: int) -> bool:
        """Whether step ``step`` (denoising steps done) gets a preview; each step at most once (a
        scheduler whose loop makes one more UNet call than steps reports the last step twice)."""
        if not (0 < step < self.steps and step % self.every_steps == 0) or step in self._done_steps:
            return False
        self._done_steps.add(step)
        return True

    def rows_now(self) -> tuple[int, ...]:
        """The rows that asked and are still wanted."""
        unwanted = self.unwanted()
        return tuple(row for row in self.rows if row not in unwanted)

    def add_cost(self, seconds: float, images: int) -> None:
        with self._lock:
            self.seconds += seconds
            self.images += images


def due_steps(steps: int, every_steps: int) -> list[int]:
    """The steps a request of ``steps`` steps gets previews at: every ``every_steps``, not the last."""
    return [step for step in range(every_steps, steps, every_steps)]


_MAPS: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_MAPS_LOCK = threading.Lock()


def latent_rgb_map(architecture: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's map on ``device`` as float32 (weight (3, 4), bias (3,)), made once per device
    (its copy to the device waits for that device once, at the first preview)."""
    if architecture not in LATENT_RGB:
        raise ValueError(f"no latent-to-RGB map for architecture {architecture!r}; known: {', '.join(LATENT_RGB)}")
    key = (architecture, torch.device(device))
    with _MAPS_LOCK:
        if key not in _MAPS:
            factors, bias = LATENT_RGB[architecture]
            _MAPS[key] = (torch.tensor(factors, dtype=torch.float32).t().contiguous().to(device),
                          torch.tensor(bias, dtype=torch.float32).to(device))
        return _MAPS[key]


def latents_to_rgb(latents: torch.Tensor, architecture: str, rows: Sequence[int] | None = None,
                   prepare: Prepare | None = None) -> torch.Tensor:
    """(B, 4, h, w) latents -> (len(rows), h, w, 3) uint8 RGB on the latents' device: the rows asked
    for (None: all), ``prepare``d if given (the scheduler's input scaling), through the family's
    linear map in one matrix product, clamped to [-1, 1] and scaled to 0..255. The rows are gathered
    by slicing (no index tensor to copy to the device)."""
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"expected latents of shape (B, 4, h, w), got {tuple(latents.shape)}")
    selected = latents if rows is None else torch.stack([latents[row] for row in rows])
    if prepare is not None:
        selected = prepare(selected)
    weight, bias = latent_rgb_map(architecture, latents.device)
    rgb = torch.nn.functional.linear(selected.movedim(1, -1).float(), weight, bias)  # (n, h, w, 3)
    return rgb.clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)


def encode_preview(pixels: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> the preview's bytes (PREVIEW_FORMAT)."""
    out = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(out, PREVIEW_FORMAT, quality=JPEG_QUALITY)
    return out.getvalue()


class _HostCopy:
    """A device tensor's copy into pinned host memory, started without waiting (CUDA); on the CPU the
    tensor itself."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.done: Any = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = tensor.cpu()

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class LatentPreviewer:
    """One batch's previews in the GPU thread: ``on_step_end(step, latents)`` after every denoising
    step (diffusers' ``callback_on_step_end``), ``finish()`` once denoising is done.

    A due step's images are computed on the device and copied to the host without waiting; they are
    encoded and delivered at a later step once the copy is done (on the CPU: at once), in step order.
    ``finish`` waits for a copy still in flight and delivers it."""

    def __init__(self, plan: PreviewPlan, architecture: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.plan = plan
        self.architecture = architecture
        self.clock = clock
        self._pending: list[tuple[int, tuple[int, ...], _HostCopy]] = []

    def on_step_end(self, step: int, latents: torch.Tensor, prepare: Prepare | None = None) -> None:
        began = self.clock()
        count = self._deliver_ready(wait=False)
        if self.plan.due(step):
            rows = self.plan.rows_now()
            if rows:
                rgb = latents_to_rgb(latents, self.architecture, rows, prepare)
                self._pending.append((step, rows, _HostCopy(rgb)))
                count += self._deliver_ready(wait=False)  # on the CPU: now
        self.plan.add_cost(self.clock() - began, count)

    def finish(self) -> None:
        began = self.clock()
        count = self._deliver_ready(wait=True)
        self.plan.add_cost(self.clock() - began, count)

    def _deliver_ready(self, wait: bool) -> int:
        delivered = 0
        while self._pending:
            step, rows, copy = self._pending[0]
            if not copy.ready():
                if not wait:
                    break
                copy.wait()
            self._pending.pop(0)
            unwanted = self.plan.unwanted()
            pixels = copy.host.numpy()
            images = [(row, encode_preview(pixels[index])) for index, row in enumerate(rows) if row not in unwanted]
            if images:
                self.plan.deliver(step, images)
                delivered += len(images)
        return delivered


def flat_previews(plan: PreviewPlan, step: int, width: int, height: int) -> list[tuple[int, bytes]]:
    """The fake backend's previews for a due step: flat images of the latent resolution (capped at
    FAKE_PREVIEW_SIDE), grey rising with the step, for the rows still wanted."""
    side_w = max(1, min(FAKE_PREVIEW_SIDE, width // 8))
    side_h = max(1, min(FAKE_PREVIEW_SIDE, height // 8))
    level = int(255 * step / max(1, plan.steps))
    pixels = np.full((side_h, side_w, 3), level, dtype=np.uint8)
    encoded = encode_preview(pixels)
    return [(row, encoded) for row in plan.rows_now()]


def step_end_callback(previewer: LatentPreviewer, steps: int) -> dict[str, Any]:
    """Keyword arguments for a diffusers pipeline call that hand ``previewer`` the latents after every
    denoising step (``callback_on_step_end``; step = loop index + 1, at most ``steps``: PNDM's loop
    makes one more UNet call than steps), prepared by the scheduler's input scaling, as the UNet's
    next call would see them (Euler's 1 / sqrt(sigma^2 + 1); most schedulers: unchanged)."""

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        scheduler = pipe.scheduler
        prepare = None
        if hasattr(scheduler, "scale_model_input"):
            prepare = lambda rows: scheduler.scale_model_input(rows, timestep)  # noqa: E731
        previewer.on_step_end(min(steps, index + 1), tensors["latents"], prepare)
        return {}  # nothing replaced

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
