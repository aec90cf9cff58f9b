"""Built-in model architectures, built from configs with deterministic random weights.

No hub is reachable from our machines, so the built-in models (``tiny``, ``tiny-sdxl``, ``sd15``,
``sdxl``) are assembled here from component configs. ``sd15`` and ``sdxl`` carry the real
architectures' configs (values from the public config.json files), so they cost the same compute
and memory as the released checkpoints: honest for speed benchmarks, useless for image quality.
``tiny`` and ``tiny-sdxl`` keep the same layouts (and the VAE's 4 levels, so pixels = 8 x latents)
at a size that runs in well under a second on a CPU.

Weights are drawn from a fixed seed, so every process that builds the same model on the same kind
of device gets the same weights, and a request gives the same image on any worker.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BUILTIN_MODELS = ("tiny", "tiny-sdxl", "sd15", "sdxl")
# Family of each built-in model: what the memory model and the pipeline class go by.
ARCHITECTURE_OF = {"tiny": "sd15", "tiny-sdxl": "sdxl", "sd15": "sd15", "sdxl": "sdxl"}
WEIGHT_SEED = 0
REAL_VOCAB_SIZE = 49408  # CLIP's vocabulary size: keeps the real text encoders' parameter counts
TINY_VOCAB_SIZE = 514  # 256 byte symbols, the same with "</w>", then BOS and EOS

_SCALED_LINEAR_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", steps_offset=1)
# SD-1.5's released scheduler is PNDM; SDXL's is Euler with "leading" spacing.
_SD15_SCHEDULER = dict(_SCALED_LINEAR_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
_SDXL_SCHEDULER = dict(_SCALED_LINEAR_BETAS, timestep_spacing="leading",
                       interpolation_type="linear", prediction_type="epsilon")

# UNets. SD-1.5 is UNet2DConditionModel's defaults with 768-wide cross-attention (859,520,964
# parameters); SDXL is 2,567,463,684 parameters. cross_attention_dim of an SDXL UNet is the sum of
# both text encoders' widths; projection_class_embeddings_input_dim = 6 * addition_time_embed_dim
# + text_encoder_2's projection_dim (6 micro-conditioning numbers plus the pooled prompt).
_UNETS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 attention_head_dim=[2, 4], cross_attention_dim=32, norm_num_groups=8),
    "tiny-sdxl": dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                      transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4],
                      cross_attention_dim=64, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                 cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}

_REAL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4)
_TINY_VAE = dict(_REAL_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
                 norm_num_groups=8)
_VAES: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY_VAE, sample_size=64, scaling_factor=0.18215),
    "tiny-sdxl": dict(_TINY_VAE, sample_size=64, scaling_factor=0.13025, force_upcast=True),
    "sd15": dict(_REAL_VAE, sample_size=512, scaling_factor=0.18215),
    "sdxl": dict(_REAL_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
}

# Text encoders: (first, second or None). CLIP-L is 123,060,480 parameters, OpenCLIP bigG
# (with projection) 694,659,840.
_CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768)
_CLIP_BIG_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                   intermediate_size=5120, hidden_act="gelu", projection_dim=1280)
_CLIP_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="quick_gelu", projection_dim=32)
_TEXT_ENCODERS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "tiny": (_CLIP_TINY, None),
    "tiny-sdxl": (_CLIP_TINY, _CLIP_TINY),
    "sd15": (_CLIP_L, None),
    "sdxl": (_CLIP_L, _CLIP_BIG_G),
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses, in id order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tokenizer(vocab_size: int) -> CLIPTokenizer:
    """A CLIP tokenizer built in memory: byte-level, no merges, BOS/EOS as the last two ids.

    Any text encodes (one token per UTF-8 byte); prompts are padded to 77 tokens, so the text
    encoder's compute is the same as with CLIP's real vocabulary. Ids 512..vocab_size-3 are unused
    fillers, so a real-size text encoder keeps its real embedding table (and parameter count).
    """
    if vocab_size < TINY_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {TINY_VOCAB_SIZE}, got {vocab_size}")
    symbols = _byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + i for i, symbol in enumerate(symbols)})
    vocab.update({f"<|unused{i}|>": i for i in range(512, vocab_size - 2)})
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    # model_max_length: without it the pipeline pads to a huge default and overflows.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(settings: dict[str, Any], tokenizer: CLIPTokenizer,
                  with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random CLIP text encoder whose vocabulary and special ids match ``tokenizer``."""
    config = CLIPTextConfig(**settings, vocab_size=len(tokenizer), max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly built module to ``dtype`` and put it in eval mode.

    A no-op cast is skipped because diffusers' ModelMixin.to logs a "should be kept in float32"
    warning whenever a dtype is passed, even when (as here) no module needs float32.
    """
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval()


def build_components(name: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32,
                     seed: int = WEIGHT_SEED) -> dict[str, Any]:
    """Build the pipeline components of built-in model ``name`` with random weights.

    Each module is created under ``with torch.device(device)`` (so a real-size model initialises
    on the GPU, or costs nothing on ``meta``) and cast to ``dtype`` at once, so at most one module
    is ever held in float32. Weights come from torch's RNG seeded with ``seed`` inside a forked RNG
    state: deterministic for a given device type, and the caller's RNG state is left untouched.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {BUILTIN_MODELS}")
    device = torch.device(device)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    vocab_size = TINY_VOCAB_SIZE if name.startswith("tiny") else REAL_VOCAB_SIZE
    first, second = _TEXT_ENCODERS[name]
    components: dict[str, Any] = {}
    with torch.random.fork_rng(devices=fork_devices), torch.device(device):
        torch.manual_seed(seed)
        components["unet"] = _cast(UNet2DConditionModel(**_UNETS[name]), dtype)
        components["vae"] = _cast(AutoencoderKL(**_VAES[name]), dtype)
        components["tokenizer"] = build_tokenizer(vocab_size)
        components["text_encoder"] = _cast(
            _text_encoder(first, components["tokenizer"], with_projection=False), dtype)
        if second is not None:
            components["tokenizer_2"] = build_tokenizer(vocab_size)
            components["text_encoder_2"] = _cast(
                _text_encoder(second, components["tokenizer_2"], with_projection=True), dtype)
    scheduler_config = _SDXL_SCHEDULER if second is not None else _SD15_SCHEDULER
    scheduler_class = EulerDiscreteScheduler if second is not None else PNDMScheduler
    components["scheduler"] = scheduler_class(**scheduler_config)
    return components


def build_pipeline(name: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Assemble built-in model ``name`` as a StableDiffusion(XL)Pipeline on ``device``.

    Tiny models are built on the CPU and then moved, so their weights are bit-identical on every
    machine whatever its GPU; real-size ones are built on ``device`` itself (CPU init of SDXL takes
    about a minute and 14 GiB of RAM).
    """
    build_device = torch.device("cpu") if name.startswith("tiny") else torch.device(device)
    components = build_components(name, build_device, dtype)
    if ARCHITECTURE_OF[name] == "sdxl":
        pipe: DiffusionPipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipe.to(device)
