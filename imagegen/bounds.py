"""The bounds of a generation request, in one table that every check and every description reads.

Two layers:

* :data:`WIRE`, what every hop accepts: imagegen/protocol.py ``GenerationParams`` refuses anything
  beyond it as malformed. The gateway's settings may narrow these bounds, never widen them
  (gateway/config.py ``GatewaySettings.validate()``), or the broker would drop what the gateway
  accepted.
* :data:`GATEWAY_DEFAULTS`, what the gateway allows out of the box: the defaults of its settings
  (MAX_PROMPT_LENGTH, MIN_IMAGE_SIDE, ... DEFAULT_GUIDANCE_SCALE). gateway/validation.py checks
  requests against the settings, gateway/openapi.py describes them, and the form of
  gateway/static/index.html starts from these defaults (tests/unit/test_bounds.py keeps it so).

Rules no setting changes are here too: a side is a multiple of :data:`IMAGE_SIDE_MULTIPLE`, the
seed the gateway picks, and how many images one OpenAI-style request may ask for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """An inclusive range of numbers, [low, high]."""

    low: int | float
    high: int | float


@dataclass(frozen=True)
class WireBounds:
    """What the protocol accepts in a request's parameters."""

    prompt_chars: int  # the longest prompt, and the longest negative prompt
    image_side: Span  # width and height, pixels
    inference_steps: Span
    guidance_scale: Span
    seed: Span


WIRE = WireBounds(
    prompt_chars=4000,
    image_side=Span(8, 8192),
    inference_steps=Span(1, 1000),
    guidance_scale=Span(0.0, 100.0),
    seed=Span(0, 2**63 - 1),
)


@dataclass(frozen=True)
class GatewayLimits:
    """The gateway's limits and defaults; the field names are those of gateway/config.py
    ``GatewaySettings``, whose defaults they are."""

    max_prompt_chars: int
    min_image_side: int
    max_image_side: int
    max_image_pixels: int
    max_inference_steps: int
    max_guidance_scale: float
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float


GATEWAY_DEFAULTS = GatewayLimits(
    max_prompt_chars=2000,
    min_image_side=64,
    max_image_side=2048,
    max_image_pixels=2048 * 2048,
    max_inference_steps=150,
    max_guidance_scale=30.0,
    default_width=512,
    default_height=512,
    default_steps=25,
    default_guidance_scale=7.5,
)

# The VAE works on 8x8 blocks: the gateway refuses a width or height that is not a multiple of it.
IMAGE_SIDE_MULTIPLE = 8
# A request without a seed gets one in [0, 2**PICKED_SEED_BITS), returned so the image can be made again.
PICKED_SEED_BITS = 32
PICKED_SEED_LIMIT = 2**PICKED_SEED_BITS
# The most images one POST /v1/images/generations may ask for (its ``n``).
MAX_IMAGES_PER_REQUEST = 10
