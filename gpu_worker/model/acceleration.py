"""Making a loaded pipeline fast: channels_last, fused QKV, torch.compile and CUDA graphs for the UNet,
torch.compile for the VAE decoder and the text encoders.

The UNet runs ~25 times per image and is where the time goes (docs/benchmarks.md, GPU ceilings),
so that is what gets compiled. :func:`accelerate` replaces ``unet.forward`` with a
:class:`CompiledUnetForward`, which picks one of three implementations per call by the shape of the
latents it is given:

* **CUDA graphs** (torch.compile ``mode="reduce-overhead"``) for small batches, up to
  ``cuda_graph_max_batch`` images: a lone SDXL image is launch-bound (a step at batch 1 costs what
  one at batch 2 costs), and replaying a captured graph removes the per-kernel launch cost;
* **compiled** (torch.compile ``mode="default"``) for larger batches: fused element-wise kernels,
  a compute-bound regime where graphs would only cost memory;
* **eager**, the original forward, for any shape that is not warm (not warmed up yet, or not served).

The VAE decoder, run once per batch, is the next cost (an SD-1.5 batch of 32 at 512²: 457 ms eager,
215 ms compiled on an H100, docs/benchmarks.md): :class:`CompiledVaeDecode` compiles it the same way
(batch dimension dynamic, no CUDA graphs), in parts small enough for one compilation to serve every
batch size, and once more for a single image (torch cannot make a dimension of size 1 the dynamic
one), which a lone request would otherwise decode eager.

The text encoders are small, launch-bound calls (two per batch, SDXL four), where the CPU's speed
sets the time: eager, they and the single-image decode made a lone SD-1.5 request 6% slower (SDXL
11%), and 3.6% slower again when the CPU thread had been idle (docs/benchmarks.md, optimisations table).
:class:`CompiledTextEncoderForward` compiles them the same way (batch dynamic from two prompts, a
compilation of its own for one).

The batch dimension is marked dynamic, so one compilation per mode serves every batch size (instead
of one compilation, a minute or two for SDXL, per size; torch may still compile once more for a
larger range of sizes). Image sizes (SIZES, gpu_worker/decisions/sizes.py) compile one of two ways
(:func:`configure_sizes`): per size, each compilation specialised to its height and width
(torch's automatic dynamic shapes off, so a second size does not turn the first one's graph
symbolic), or with height and width marked dynamic, one compilation for every size.
:func:`warm_up_shapes` runs the batch sizes it is given at one size (the worker passes every batch
size it may run, the largest first; and warms its other sizes the same way later, between batches),
which compiles both modes and records a CUDA graph per small size; outside it
:func:`forbid_recompiles` makes torch raise instead of compiling, and any shape that would need
compiling (a size not warm yet, or not listed) runs eager, until a warm-up compiles it.
Compile time therefore never lands in a request.

Compiled artefacts are cached on disk by torch, in STATE_DIR/compile-cache
(:mod:`gpu_worker.model.compile_cache`): a restarted worker warms up in a fraction of the first
start's time, and the cache can be exported to another host with the same GPU and software.

CUDA graphs are recorded per thread: warm up in the thread that will serve (the worker's GPU thread).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

RECOMPILE_REFUSED = "fail_on_recompile"  # in the message torch raises once recompiles are forbidden
# Compilations one function may hold before torch stops compiling it (per mode and size, per batch
# size range); configure_sizes raises it with the number of sizes served.
BASE_CACHE_SIZE_LIMIT = 16


class _Warming:
    """Whether a warm-up runs now (set by warm_up_shapes, in the GPU thread that runs everything):
    then a shape that ran eager before is tried compiled again (and compiles)."""

    active = False
    dynamic_spatial = False  # configure_sizes: height and width symbolic


_WARMING = _Warming()


def configure_sizes(size_count: int, dynamic_spatial: bool) -> None:
    """Before the first compilation: room for ``size_count`` sizes' compilations, and whether they
    share one with symbolic height and width (True) or each get their own (False)."""
    import torch._dynamo

    limit = max(BASE_CACHE_SIZE_LIMIT, 4 * size_count + 8)  # compiled + graphs modes, room for batch ranges
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    torch._dynamo.config.automatic_dynamic_shapes = dynamic_spatial
    _WARMING.dynamic_spatial = dynamic_spatial


@dataclass(frozen=True)
class AccelerationConfig:
    """What to apply. The worker sets compile from TORCH_COMPILE and cuda_graph_max_batch from
    CUDA_GRAPH_MAX_BATCH, and turns channels_last and fuse_qkv on only with TORCH_COMPILE."""

    compile: bool = False
    cuda_graph_max_batch: int = 2  # images; 0 turns CUDA graphs off (used only with compile on CUDA)
    channels_last: bool = True  # NHWC convolutions, the layout cuDNN's fastest kernels use (CUDA only)
    fuse_qkv: bool = True  # one matmul for attention's q, k, v projections (CUDA only)
    # With compile: the text encoders too, and the VAE decoder for a single image (a lone request's
    # launch-bound parts). False: only the UNet and the decoder's batches of two or more, as before
    # (bench.gpu's "compiled" variant, so that its "encoders" variant measures the difference).
    compile_encoders: bool = True


def accelerate(diffusers_pipeline: Any, device: torch.device, config: AccelerationConfig) -> str:
    """Apply ``config`` to the pipeline in place; returns a one-line description for the log.

    On the CPU only ``compile`` applies (no CUDA graphs; channels_last and fused QKV buy nothing there).
    """
    on_cuda = device.type == "cuda"
    applied = apply_layout(diffusers_pipeline, config.channels_last, config.fuse_qkv) if on_cuda else []
    if config.compile:
        graph_max_batch = config.cuda_graph_max_batch if on_cuda else 0
        unet = diffusers_pipeline.unet
        unet.forward = CompiledUnetForward(unet.forward, graph_max_batch)
        vae = diffusers_pipeline.vae
        vae.decode = CompiledVaeDecode(vae.decode, vae.config)
        applied.append("torch.compile of UNet and VAE decoder"
                       + (f" + CUDA graphs up to batch {graph_max_batch}" if graph_max_batch else ""))
        if config.compile_encoders:
            applied.append(compile_encoders(diffusers_pipeline))
    return ", ".join(applied) or "none"


def compile_encoders(diffusers_pipeline: Any) -> str:
    """torch.compile of the text encoders, and of the VAE decoder for single images (after
    :func:`accelerate` with ``compile_encoders=False``, or as part of it). Returns what was applied."""
    for name in TEXT_ENCODERS:
        encoder = getattr(diffusers_pipeline, name, None)
        if encoder is not None and not isinstance(encoder.forward, CompiledTextEncoderForward):
            encoder.forward = CompiledTextEncoderForward(encoder.forward)
    decode = diffusers_pipeline.vae.decode
    if isinstance(decode, CompiledVaeDecode):
        decode.compile_single = True
    return "torch.compile of the text encoders and of single-image VAE decodes"


def apply_layout(diffusers_pipeline: Any, channels_last: bool, fuse_qkv: bool) -> list[str]:
    """channels_last memory format for UNet and VAE; fused q/k/v projections. Same results up to
    rounding (bf16 kernels may sum in another order). Returns what was applied."""
    applied = []
    if channels_last:
        diffusers_pipeline.unet.to(memory_format=torch.channels_last)
        diffusers_pipeline.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if fuse_qkv and hasattr(diffusers_pipeline, "fuse_qkv_projections"):
        diffusers_pipeline.fuse_qkv_projections()
        applied.append("fused QKV")
    return applied


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD-1.5 has the first, SDXL both


def compiled_forward(pipeline_unet: Any) -> "CompiledUnetForward | None":
    forward = getattr(pipeline_unet, "forward", None)
    return forward if isinstance(forward, CompiledUnetForward) else None


class CompiledUnetForward:
    """Stands in for ``UNet2DConditionModel.forward``: graphs, compiled or eager, by input shape."""

    def __init__(self, eager: Callable[..., Any], cuda_graph_max_batch: int) -> None:
        import torch._dynamo  # noqa: F401 - imported here: importing dynamo costs ~1 s

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, BASE_CACHE_SIZE_LIMIT)
        self.eager = eager
        self.compiled = torch.compile(eager, mode="default", fullgraph=False)
        self.graphed = None
        self.enable_cuda_graphs(cuda_graph_max_batch)
        self.eager_shapes: set[tuple[int, ...]] = set()  # shapes torch refused to compile: eager

    def enable_cuda_graphs(self, max_batch: int) -> None:
        """Use CUDA graphs for batches of up to max_batch images from now on (warm them up after)."""
        if self.graphed is None and max_batch > 0:
            self.graphed = torch.compile(self.eager, mode="reduce-overhead")
        self.cuda_graph_max_batch = max_batch

    def mode_for(self, rows: int) -> str:
        """Which implementation a UNet input of ``rows`` rows uses: "eager", "graphs" or "compiled".

        Classifier-free guidance gives the UNet two rows per image, so CUDA graphs cover batches of
        up to cuda_graph_max_batch images with guidance (twice that without)."""
        if rows < 2:
            return "eager"  # torch specialises a dimension of size 1: it cannot be the dynamic one
        if self.graphed is not None and rows <= 2 * self.cuda_graph_max_batch:
            return "graphs"
        return "compiled"

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                 *args: Any, **kwargs: Any) -> Any:
        shape = tuple(sample.shape)
        rows = shape[0]
        mode = self.mode_for(rows)
        if mode == "eager" or (shape in self.eager_shapes and not _WARMING.active):
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        timestep = per_row_timestep(timestep, rows)
        _mark_batch_dynamic(rows, sample, encoder_hidden_states, kwargs, timestep)
        _mark_spatial_dynamic(sample)
        implementation = self.graphed if mode == "graphs" else self.compiled
        return _compiled_or_eager(implementation, self.eager, "UNet", shape, self.eager_shapes,
                                  (sample, timestep, encoder_hidden_states, *args), kwargs)


def per_row_timestep(timestep: Any, rows: int) -> Any:
    """A 0-dim timestep (the stock pipelines' one for all rows) as one per row, the step engine's form,
    so that both batching policies call one compiled UNet: a step worker's compiled engine is then warm
    from the pipeline's own warm-up, and neither compiles the other's. The UNet broadcasts a 0-dim
    timestep to the batch itself, so its result is the same; contiguous, as the engine's stacked one."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 0:
        return timestep.repeat(rows)
    return timestep


INT32_ELEMENTS = 2**31 - 1  # the largest tensor torch's generated kernels index with 32-bit integers


class CompiledTextEncoderForward:
    """Stands in for a CLIP text encoder's ``forward``: compiled, the batch dimension dynamic from two
    prompts (one prompt: a compilation of its own), eager for shapes not warmed up.

    The pipelines tokenize to a fixed length (77 tokens), so the batch is the only varying dimension
    and the warm-up's batch sizes cover every call: prompts and negative prompts, one call each."""

    def __init__(self, eager: Callable[..., Any]) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager, mode="default", fullgraph=False)
        self.eager_shapes: set[tuple[int, ...]] = set()

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(input_ids.shape)
        if shape in self.eager_shapes and not _WARMING.active:
            return self.eager(input_ids, *args, **kwargs)
        if input_ids.shape[0] >= 2:
            import torch._dynamo

            torch._dynamo.maybe_mark_dynamic(input_ids, 0)
        return _compiled_or_eager(self.compiled, self.eager, "text encoder", shape, self.eager_shapes,
                                  (input_ids, *args), kwargs)


class CompiledVaeDecode:
    """Stands in for ``AutoencoderKL.decode``: compiled for two or more latents, and with
    ``compile_single`` for one (a compilation of its own); eager otherwise.

    Large batches are decoded in equal parts of at most :func:`images_per_decode` latents, so that no
    activation reaches 2**31 elements, past which generated kernels need 64-bit indexing. Whole
    batches, on an H100, SD-1.5 at 512²: torch compiled the decoder once more for 32 latents (the
    first size past that limit) and failed to compile it for 64 with the batch marked dynamic. Below
    the limit one compilation, made at the warm-up, serves every batch size. Smaller decodes cost
    little: SDXL 8 images at a time costs 3% more per image than 16 at a time, 4 at a time 12%
    (eager, H200: docs/benchmarks.md, GPU ceilings), beside compiling's 2x; and they lower the peak memory.
    """

    def __init__(self, eager: Callable[..., Any], vae_config: Any, max_elements: int = INT32_ELEMENTS) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager, mode="default", fullgraph=False)
        self.vae_config = vae_config
        self.max_elements = max_elements
        self.compile_single = False  # set by compile_encoders
        self.eager_shapes: set[tuple[int, ...]] = set()

    def __call__(self, latents: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        # AutoencoderKL.decode ignores ``generator``; SD-1.5's pipeline passes its list of generators,
        # and torch would guard on the list's length: one compilation per batch size. Not passed on.
        per_decode = images_per_decode(self.vae_config, latents.shape[-2], latents.shape[-1], self.max_elements)
        parts = [self._decode(part) for part in equal_parts(latents, per_decode)]
        decoded = parts[0] if len(parts) == 1 else torch.cat(parts)
        if not return_dict:
            return (decoded,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=decoded)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        single = latents.shape[0] < 2
        if (single and not self.compile_single) or (tuple(latents.shape) in self.eager_shapes
                                                    and not _WARMING.active):
            return self.eager(latents, return_dict=False)[0]
        _mark_spatial_dynamic(latents)
        if not single:  # a size of 1 cannot be the dynamic one: torch specialises it (its own compilation)
            import torch._dynamo

            # "maybe": should torch still specialise the size, that size compiles at the warm-up (or
            # runs eager after it) instead of failing.
            torch._dynamo.maybe_mark_dynamic(latents, 0)
        return _compiled_or_eager(self.compiled, self.eager, "VAE decoder", tuple(latents.shape), self.eager_shapes,
                                  (latents,), {"return_dict": False})[0]


def images_per_decode(vae_config: Any, latent_height: int, latent_width: int,
                      max_elements: int = INT32_ELEMENTS) -> int:
    """How many latents one VAE decode may take before its largest activation passes max_elements:
    31 for SD-1.5 at 512², 7 for SDXL at 1024²."""
    return max(1, max_elements // largest_decoder_activation(vae_config, latent_height, latent_width))


def largest_decoder_activation(vae_config: Any, latent_height: int, latent_width: int) -> int:
    """Elements of the VAE decoder's largest activation for one image.

    The decoder's up blocks run at the latent resolution doubled once per block (the last block
    stays at the output resolution); each block's channels (block_out_channels, reversed) are
    upsampled to the next resolution before its successor narrows them: SD-1.5 at 512² peaks at
    256 x 512 x 512 elements per image, SDXL at 1024² at 256 x 1024 x 1024.
    """
    channels = list(reversed(vae_config.block_out_channels))
    largest = 0
    for index, width in enumerate(channels):
        scale = 2 ** min(index + 1, len(channels) - 1)
        largest = max(largest, width * latent_height * scale * latent_width * scale)
    return largest


def equal_parts(batch: torch.Tensor, most: int) -> list[torch.Tensor]:
    """batch split along dim 0 into the fewest parts of at most ``most`` rows, sizes differing by at
    most one (50 by 31: 25 + 25, not 31 + 19)."""
    count = -(-batch.shape[0] // most)
    base, extra = divmod(batch.shape[0], count)
    return list(batch.split([base + 1] * extra + [base] * (count - extra)))


def _compiled_or_eager(implementation: Callable[..., Any], eager: Callable[..., Any], name: str,
                       shape: tuple[int, ...], eager_shapes: set[tuple[int, ...]], args: tuple,
                       kwargs: dict[str, Any]) -> Any:
    """Call the compiled implementation; where torch refuses to compile a new shape (recompiles are
    forbidden after the warm-up), remember the shape and run it eager from then on."""
    try:
        result = implementation(*args, **kwargs)
    except RuntimeError as exc:
        if RECOMPILE_REFUSED not in str(exc):
            raise  # out of memory and real errors reach the caller (the OOM splitter)
        if shape not in eager_shapes:
            log.info("%s input %s is not warm; it runs eager until a warm-up compiles it", name, shape)
        eager_shapes.add(shape)
        return eager(*args, **kwargs)
    eager_shapes.discard(shape)  # compiled by a warm-up: no longer eager
    return result


def _mark_batch_dynamic(rows: int, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        kwargs: dict[str, Any], timestep: Any = None) -> None:
    """Mark dim 0 dynamic on every input that carries the batch (latents, text embeddings, SDXL's
    added conditions, and a per-row timestep: gpu_worker.model.step_engine gives the UNet one
    timestep per row, the stock pipelines one for all), so one compiled graph serves every batch size."""
    import torch._dynamo

    tensors = [sample, encoder_hidden_states]
    if isinstance(timestep, torch.Tensor):
        tensors.append(timestep)  # a 0-dim one (the stock pipelines') is left alone below
    added = kwargs.get("added_cond_kwargs") or {}
    tensors += [value for value in added.values() if isinstance(value, torch.Tensor)]
    for tensor in tensors:
        if tensor.dim() > 0 and tensor.shape[0] == rows:
            torch._dynamo.mark_dynamic(tensor, 0)


def _mark_spatial_dynamic(latents: torch.Tensor) -> None:
    """With SIZE_COMPILATION=dynamic: height and width symbolic (the last two dimensions)."""
    if _WARMING.dynamic_spatial and latents.dim() == 4:
        import torch._dynamo

        torch._dynamo.maybe_mark_dynamic(latents, 2)
        torch._dynamo.maybe_mark_dynamic(latents, 3)


def forbid_recompiles() -> None:
    """From now on torch raises instead of compiling (CompiledUnetForward then runs eager)."""
    torch.compiler.set_stance("fail_on_recompile")


def allow_recompiles() -> None:
    torch.compiler.set_stance("default")


def warm_up_shapes(generate: Callable[[int], Any], batch_sizes: list[int]) -> dict[int, float]:
    """Call ``generate(batch_size)`` for each size (compiling and recording on first use); returns
    seconds per size. Recompiles stay allowed during the warm-up and are forbidden afterwards."""
    allow_recompiles()
    _WARMING.active = True
    try:
        return time_each(generate, batch_sizes)
    finally:
        _WARMING.active = False
        forbid_recompiles()


def time_each(generate: Callable[[int], Any], batch_sizes: list[int]) -> dict[int, float]:
    """Call ``generate(batch_size)`` for each size; returns seconds per size (rounded to ms)."""
    seconds = {}
    for size in batch_sizes:
        started = time.perf_counter()
        generate(size)
        seconds[size] = round(time.perf_counter() - started, 3)
        log.info("warm-up: batch of %d took %.1fs", size, seconds[size])  # progress while compiling
    return seconds
