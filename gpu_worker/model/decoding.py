"""Latents to 8-bit images, part by part, each part handed over as soon as it is on the host.

The diffusers pipeline denoises the batch and returns its latents (``output_type="latent"``);
:func:`decode_in_parts` then does what the pipeline would have done next (unscale, VAE decode,
denormalise, round to 8 bits: the same operations, so the same bytes) in parts of at most
``images_per_part`` latents, and calls ``on_images(first_index, arrays)`` for each part. That lets the
worker start compressing a part's PNGs while the GPU decodes the next part, instead of after the whole
batch: the last batch of a burst otherwise adds all its PNG encoding (0.2-0.3 s for 50 SD-1.5 images
on 8 cores) after the GPU has finished.

Per part, on the GPU: decode, denormalise, convert to (N, H, W, C) uint8, and start a copy into
pinned host memory that does not make the CPU wait. The part before it is handed over only once the
next part's work is queued, so the GPU never idles while the CPU hands over or converts.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from gpu_worker.model.acceleration import equal_parts, images_per_decode
from gpu_worker.model.oom import OnImages  # on_images(first_index, images): here (H, W, 3) uint8 arrays

# Latents per VAE decode: small enough that the first part's images are ready early (PNG encoding
# of a part overlaps the decode of the next), large enough that the decode stays efficient (a
# decode of 8 SDXL latents costs 3% more per image than one of 16 on an H200, docs/benchmarks.md).
IMAGES_PER_PART = 8


def to_rgb8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) pixels in [0, 1] -> (N, H, W, C) uint8, contiguous, on the same device.

    diffusers' own ``output_type="pil"`` arithmetic (float32, x 255, round half to even), so the bytes
    are the same; done where the tensor is, so only a quarter of the bytes cross to the host, already
    in the layout images use (a permuted tensor would be transposed by numpy on the CPU instead)."""
    return (pixels.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class _HostCopy:
    """A device tensor's copy into host memory, started without waiting; ``arrays()`` waits for it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)  # pinned memory: a true asynchronous copy
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host = tensor.cpu()
            self.done = None

    def arrays(self) -> list[np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return list(self.host.numpy())  # views: each keeps the host tensor alive


def is_sdxl(diffusers_pipeline: Any) -> bool:
    """SDXL's pipeline decodes a little differently from SD-1.5's (float16 upcast, latent statistics,
    watermark, denormalisation by configuration); its second text encoder tells them apart."""
    return hasattr(diffusers_pipeline, "text_encoder_2")


def unscale_latents(diffusers_pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """What the pipeline does to its latents before the VAE: divide by the scaling factor, and for a
    VAE with per-channel statistics (honoured by SDXL's pipeline only) rescale and shift by those."""
    config = diffusers_pipeline.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None and is_sdxl(diffusers_pipeline):
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


def decode_in_parts(diffusers_pipeline: Any, latents: torch.Tensor, on_images: OnImages | None = None,
                    images_per_part: int = IMAGES_PER_PART,
                    before_part: Callable[[], None] | None = None) -> list[np.ndarray]:
    """The batch's images as (H, W, 3) uint8 arrays, in order; ``on_images`` gets each part first.

    ``before_part()`` is called before each part's decode: it may raise to stop the decoding (the
    worker's stop signal, when nobody wants the batch's images any more)."""
    vae = diffusers_pipeline.vae
    most = min(images_per_part, images_per_decode(vae.config, latents.shape[-2], latents.shape[-1]))
    upcast = is_sdxl(diffusers_pipeline) and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # SDXL's pipeline decodes float16 latents in float32 (its VAE overflows in float16)
        diffusers_pipeline.upcast_vae()
        latents = latents.float()
    try:
        latents = unscale_latents(diffusers_pipeline, latents)
        images: list[np.ndarray] = []
        waiting: tuple[int, _HostCopy] | None = None
        first = 0
        for part in equal_parts(latents, most):
            if before_part is not None:
                before_part()
            copy = _HostCopy(to_rgb8(_decode(diffusers_pipeline, part)))
            if waiting is not None:
                images += _hand_over(*waiting, on_images)
            waiting = (first, copy)
            first += part.shape[0]
        if waiting is not None:
            images += _hand_over(*waiting, on_images)
        return images
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def _decode(diffusers_pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in [0, 1], (N, C, H, W): the pipeline's decode and postprocessing."""
    pixels = diffusers_pipeline.vae.decode(latents, return_dict=False)[0]
    if not is_sdxl(diffusers_pipeline):
        return diffusers_pipeline.image_processor.denormalize(pixels)  # SD-1.5's pipeline always does
    watermark = getattr(diffusers_pipeline, "watermark", None)  # set when invisible-watermark is installed
    if watermark is not None:
        pixels = watermark.apply_watermark(pixels)
    processor = diffusers_pipeline.image_processor
    return processor.denormalize(pixels) if processor.config.do_normalize else pixels


def _hand_over(first: int, copy: _HostCopy, on_images: OnImages | None) -> list[np.ndarray]:
    arrays = copy.arrays()
    if on_images is not None:
        on_images(first, arrays)
    return arrays
