"""Making a loaded pipeline fast: channels_last, fused QKV, torch.compile and CUDA graphs for the UNet.

The UNet runs ~25 times per image and is where the time goes (shared/notes/gpu-measurements.md),
so that is what gets compiled. :func:`accelerate` replaces ``unet.forward`` with a
:class:`CompiledUnetForward`, which picks one of three implementations per call by the shape of the
latents it is given:

* **CUDA graphs** (torch.compile ``mode="reduce-overhead"``) for small batches, up to
  ``cuda_graph_max_batch`` images: a lone SDXL image is launch-bound (a step at batch 1 costs what
  one at batch 2 costs), and replaying a captured graph removes the per-kernel launch cost;
* **compiled** (torch.compile ``mode="default"``) for larger batches: fused element-wise kernels,
  a compute-bound regime where graphs would only cost memory;
* **eager**, the original forward, for any shape that was not warmed up.

The batch dimension is marked dynamic, so one compilation per mode serves every batch size (instead
of one compilation, a minute or two for SDXL, per size; torch may still compile once more for a
larger range of sizes). :func:`warm_up_shapes` runs the batch sizes it is given at the resolution the
worker serves (the worker passes the CUDA-graph sizes, 3, the powers of two and its maximum), which
compiles both modes and records a CUDA graph per small size; then :func:`forbid_recompiles` makes
torch raise instead of compiling, and any shape that would need compiling (another resolution, say)
runs eager from then on.
Compile time therefore never lands in a request.

Compiled artefacts are cached on disk by torch (``TORCHINDUCTOR_CACHE_DIR``, default under /tmp): a
restarted worker on the same machine warms up in a fraction of the first start's time.

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


@dataclass(frozen=True)
class AccelerationConfig:
    """What to apply. The worker sets compile from TORCH_COMPILE and cuda_graph_max_batch from
    CUDA_GRAPH_MAX_BATCH, and turns channels_last and fuse_qkv on only with TORCH_COMPILE."""

    compile: bool = False
    cuda_graph_max_batch: int = 2  # images; 0 turns CUDA graphs off (used only with compile on CUDA)
    channels_last: bool = True  # NHWC convolutions, the layout cuDNN's fastest kernels use (CUDA only)
    fuse_qkv: bool = True  # one matmul for attention's q, k, v projections (CUDA only)


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
        applied.append("torch.compile" + (f" + CUDA graphs up to batch {graph_max_batch}" if graph_max_batch else ""))
    return ", ".join(applied) or "none"


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


def compiled_forward(pipeline_unet: Any) -> "CompiledUnetForward | None":
    forward = getattr(pipeline_unet, "forward", None)
    return forward if isinstance(forward, CompiledUnetForward) else None


class CompiledUnetForward:
    """Stands in for ``UNet2DConditionModel.forward``: graphs, compiled or eager, by input shape."""

    def __init__(self, eager: Callable[..., Any], cuda_graph_max_batch: int) -> None:
        import torch._dynamo  # noqa: F401 - imported here: importing dynamo costs ~1 s

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
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
        if mode == "eager" or shape in self.eager_shapes:
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        _mark_batch_dynamic(rows, sample, encoder_hidden_states, kwargs)
        implementation = self.graphed if mode == "graphs" else self.compiled
        try:
            return implementation(sample, timestep, encoder_hidden_states, *args, **kwargs)
        except RuntimeError as exc:
            if RECOMPILE_REFUSED not in str(exc):
                raise  # out of memory and real errors reach the caller (the OOM splitter)
            log.warning("UNet input %s was not warmed up; it runs eager from now on", shape)
            self.eager_shapes.add(shape)
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)


def _mark_batch_dynamic(rows: int, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        kwargs: dict[str, Any]) -> None:
    """Mark dim 0 dynamic on every input that carries the batch (latents, text embeddings, SDXL's
    added conditions), so one compiled graph serves every batch size."""
    import torch._dynamo

    tensors = [sample, encoder_hidden_states]
    added = kwargs.get("added_cond_kwargs") or {}
    tensors += [value for value in added.values() if isinstance(value, torch.Tensor)]
    for tensor in tensors:
        if tensor.dim() > 0 and tensor.shape[0] == rows:
            torch._dynamo.mark_dynamic(tensor, 0)


def forbid_recompiles() -> None:
    """From now on torch raises instead of compiling (CompiledUnetForward then runs eager)."""
    torch.compiler.set_stance("fail_on_recompile")


def allow_recompiles() -> None:
    torch.compiler.set_stance("default")


def warm_up_shapes(generate: Callable[[int], Any], batch_sizes: list[int]) -> dict[int, float]:
    """Call ``generate(batch_size)`` for each size (compiling and recording on first use); returns
    seconds per size. Recompiles stay allowed during the warm-up and are forbidden afterwards."""
    allow_recompiles()
    try:
        return time_each(generate, batch_sizes)
    finally:
        forbid_recompiles()


def time_each(generate: Callable[[int], Any], batch_sizes: list[int]) -> dict[int, float]:
    """Call ``generate(batch_size)`` for each size; returns seconds per size (rounded to ms)."""
    seconds = {}
    for size in batch_sizes:
        started = time.perf_counter()
        generate(size)
        seconds[size] = round(time.perf_counter() - started, 3)
    return seconds
