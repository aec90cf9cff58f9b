"""Which way of running the UNet (and the VAE decoder) is fastest on this card: one model load, one
batch size, every variant timed on the same captured inputs in the same call.

    python -m bench.unet_variants --model sd15 --size 512 --batch 32 --out $OUT/variants-sd15.json
    python -m bench.unet_variants --model sdxl --size 1024 --batch 16 \\
        --variants eager,compiled,compiled-static --out $OUT/variants-sdxl.json

The UNet's inputs (latents, timestep, text embeddings, SDXL's added conditions: classifier-free
guidance on, so 2 x batch rows) are captured from one real pipeline call of the worker's
ImagePipeline, then each variant is set up from a clean state (dynamo reset, contiguous layout,
unfused projections, default attention and inductor settings), compiled where it compiles, called
three times to warm up and timed over ``--repeats`` calls (median ms per UNet step). Its output is
compared with eager's (relative error), and torch's graph-break count is recorded.

Variants (``--variants``, in order):

* ``eager``: bf16, diffusers' default SDPA attention;
* ``eager-layout``: + channels_last, fused QKV (what TORCH_COMPILE adds before compiling);
* ``eager-cudnn-attention``: eager with the cuDNN SDPA backend only (flash and memory-efficient off);
* ``compiled``: the worker's CompiledUnetForward (layout + torch.compile, batch dimension dynamic);
* ``compiled-nolayout``: the same without channels_last and fused QKV;
* ``compiled-static``: layout + torch.compile without marking the batch dynamic (one size per graph);
* ``compiled-cudnn-attention``: ``compiled`` with the cuDNN attention backend;
* ``compiled-tuned``: ``compiled`` with inductor's conv_1x1_as_mm and coordinate-descent tuning;
* ``compiled-cudnn-benchmark``: ``compiled`` with torch.backends.cudnn.benchmark (cuDNN times its
  convolution algorithms for each new shape and keeps the fastest; inductor calls cuDNN for convs);
* ``compiled-tuned-cudnn-benchmark``: both;
* ``autotuned``: layout + mode max-autotune-no-cudagraphs, static (long compile);
* ``vae``: VAE decode of the batch: eager, + channels_last, + torch.compile (static shape).

Results are written to ``--out`` after every variant, so a call cut off at its time limit still
returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable




@dataclass(frozen=True)
class Variant:
    """How one variant runs the UNet. compile: None (eager), "worker" (the worker's
    CompiledUnetForward: batch dimension dynamic), or a torch.compile mode compiled for the one size."""

    layout: bool = False  # channels_last + fused QKV
    cudnn_attention: bool = False
    tuned_inductor: bool = False
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark: cuDNN times its algorithms per shape
    compile: str | None = None


UNET_VARIANTS = {
    "eager": Variant(),
    "eager-layout": Variant(layout=True),
    "eager-cudnn-attention": Variant(cudnn_attention=True),
    "compiled": Variant(layout=True, compile="worker"),
    "compiled-nolayout": Variant(compile="worker"),
    "compiled-static": Variant(layout=True, compile="default"),
    "compiled-cudnn-attention": Variant(layout=True, cudnn_attention=True, compile="worker"),
    "compiled-tuned": Variant(layout=True, tuned_inductor=True, compile="worker"),
    "compiled-cudnn-benchmark": Variant(layout=True, cudnn_benchmark=True, compile="worker"),
    "compiled-tuned-cudnn-benchmark": Variant(layout=True, tuned_inductor=True, cudnn_benchmark=True,
                                              compile="worker"),
    "autotuned": Variant(layout=True, compile="max-autotune-no-cudagraphs"),
}
VARIANTS = (*UNET_VARIANTS, "vae")
TUNED_INDUCTOR_SETTINGS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}


class Inputs:
    """The positional and keyword arguments of one real UNet call, and of one VAE decode."""

    def __init__(self, unet_args: tuple, unet_kwargs: dict, vae_latents: Any) -> None:
        self.unet_args = unet_args
        self.unet_kwargs = unet_kwargs
        self.vae_latents = vae_latents


def capture_inputs(pipeline: Any, batch: int, size: int, guidance: float) -> Inputs:
    import torch

    from bench.common import benchmark_jobs
    from imagegen.batch_key import BatchKey

    unet = pipeline.diffusers_pipeline.unet
    vae = pipeline.diffusers_pipeline.vae
    seen: dict[str, Any] = {}
    unet_forward, vae_decode = unet.forward, vae.decode

    def record_unet(*args: Any, **kwargs: Any) -> Any:
        seen.setdefault("unet", (tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}))
        return unet_forward(*args, **kwargs)

    def record_vae(latents: Any, *args: Any, **kwargs: Any) -> Any:
        seen.setdefault("vae", []).append(latents.clone())  # the batch is decoded in parts
        return vae_decode(latents, *args, **kwargs)

    unet.forward, vae.decode = record_unet, record_vae
    try:
        jobs = benchmark_jobs(batch)
        pipeline.generate(jobs, BatchKey(size, size, 1, guidance))
    finally:
        unet.forward, vae.decode = unet_forward, vae_decode
    args, kwargs = seen["unet"]
    return Inputs(args, kwargs, torch.cat(seen["vae"]))


def _clone(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def time_ms(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of ``call`` after three warm-up calls; and its last output."""
    import torch

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        output = call()
    synchronize()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        output = call()
        synchronize()
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples), output


def sample_of(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


def relative_error(output: Any, reference: Any) -> float:
    out, ref = sample_of(output).float(), sample_of(reference).float()
    return round(float((out - ref).norm() / ref.norm().clamp_min(1e-12)), 5)


class Setup:
    """Puts the pipeline into one variant's state and back to the plain eager state."""

    def __init__(self, pipeline: Any) -> None:
        import torch._inductor.config as inductor_config

        self.dp = pipeline.diffusers_pipeline
        self.eager_forward = self.dp.unet.forward
        self.inductor_config = inductor_config
        self.inductor_defaults = {name: getattr(inductor_config, name) for name in TUNED_INDUCTOR_SETTINGS}
        self.fused = False

    def reset(self) -> None:
        import torch
        import torch._dynamo

        torch._dynamo.reset()
        torch.compiler.set_stance("default")
        self.dp.unet.forward = self.eager_forward
        self.dp.unet.to(memory_format=torch.contiguous_format)
        self.dp.vae.to(memory_format=torch.contiguous_format)
        if self.fused:
            self.dp.unfuse_qkv_projections()
            self.fused = False
        for name, value in self.inductor_defaults.items():
            setattr(self.inductor_config, name, value)
        torch.backends.cudnn.benchmark = False
        attention_only(None)

    def layout(self) -> None:
        from gpu_worker.model import acceleration

        acceleration.apply_layout(self.dp, channels_last=True, fuse_qkv=True)
        self.fused = hasattr(self.dp, "fuse_qkv_projections")

    def tuned(self) -> None:
        for name, value in TUNED_INDUCTOR_SETTINGS.items():
            setattr(self.inductor_config, name, value)


def attention_only(backend: str | None) -> None:
    """None: torch's default SDPA backends; "cudnn": the cuDNN backend only (math as the fallback)."""
    import torch

    torch.backends.cuda.enable_flash_sdp(backend is None)
    torch.backends.cuda.enable_mem_efficient_sdp(backend is None)
    torch.backends.cuda.enable_cudnn_sdp(True)


def unet_call(setup: Setup, inputs: Inputs, variant: str) -> Callable[[], Any]:
    """Set the variant up; return a zero-argument call of the UNet in that state."""
    import torch

    from gpu_worker.model.acceleration import CompiledUnetForward

    setup.reset()
    how = UNET_VARIANTS[variant]
    if how.layout:
        setup.layout()
    if how.cudnn_attention:
        attention_only("cudnn")
    if how.tuned_inductor:
        setup.tuned()
    torch.backends.cudnn.benchmark = how.cudnn_benchmark
    eager = setup.dp.unet.forward
    if how.compile == "worker":
        forward = CompiledUnetForward(eager, cuda_graph_max_batch=0)
    elif how.compile:
        forward = torch.compile(eager, mode=how.compile)
    else:
        forward = eager

    def call() -> Any:
        with torch.inference_mode():
            return forward(*inputs.unet_args, **inputs.unet_kwargs)

    return call


def measure_vae(setup: Setup, inputs: Inputs, repeats: int) -> dict:
    import torch

    setup.reset()
    vae = setup.dp.vae
    latents = inputs.vae_latents  # as the pipeline gives them to the decoder (already unscaled)

    def decoder(decode: Callable) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return decode(latents, return_dict=False)
        return call

    eager_ms, reference = time_ms(decoder(vae.decode), repeats)
    vae.to(memory_format=torch.channels_last)
    layout_ms, _ = time_ms(decoder(vae.decode), repeats)
    began = time.perf_counter()
    compiled = torch.compile(vae.decode, mode="default")
    compiled_ms, output = time_ms(decoder(compiled), repeats)
    return {"eager_ms": round(eager_ms, 2), "channels_last_ms": round(layout_ms, 2), "compiled_ms": round(compiled_ms, 2),
            "compile_and_warm_s": round(time.perf_counter() - began, 1),
            "relative_error": relative_error(output, reference)}


def main() -> int:
    import torch
    import torch._dynamo.utils

    from bench.common import card_name, exit_on_sigterm, save_json
    from gpu_worker.model.pipelines import load_pipeline

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images (the UNet sees twice as many rows)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pipeline = load_pipeline(args.model)
    inputs = capture_inputs(pipeline, args.batch, args.size, args.guidance)
    setup = Setup(pipeline)
    rows: dict[str, dict] = {}
    document = {"command": "python -m bench.unet_variants " + " ".join(sys.argv[1:]), "card": card_name(),
                "torch": torch.__version__, "model": args.model, "resolution": f"{args.size}x{args.size}",
                "batch_size": args.batch, "unet_rows": int(inputs.unet_args[0].shape[0]), "variants": rows}
    reference = None
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        began = time.perf_counter()
        try:
            if variant == "vae":
                rows[variant] = measure_vae(setup, inputs, args.repeats)
            else:
                torch._dynamo.utils.counters.clear()
                call = unet_call(setup, inputs, variant)
                step_ms, output = time_ms(call, args.repeats)
                if reference is None:
                    reference = sample_of(output).clone()
                rows[variant] = {"ms_per_step": round(step_ms, 2),
                                 "step_ms_per_image": round(step_ms / args.batch, 3),
                                 "relative_error_vs_first": relative_error(output, reference),
                                 "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
                                 "setup_and_warm_s": round(time.perf_counter() - began, 1)}
        except Exception as exc:  # one failing variant must not cost the others' figures
            rows[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(variant, json.dumps(rows[variant]), file=sys.stderr, flush=True)
        save_json(document, args.out)
    setup.reset()
    print(save_json(document, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
