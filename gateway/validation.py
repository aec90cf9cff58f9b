"""Validation of POST /generate bodies (pure): every rule names the field it is about.

Anything the gateway forwards has passed these checks, so the broker and workers only ever see
well-formed, bounded requests. Unknown fields are refused rather than ignored: a typo such as
``num_steps`` should fail loudly, not silently fall back to the default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewaySettings
from imagegen.bounds import IMAGE_SIDE_MULTIPLE, PICKED_SEED_LIMIT, WIRE
from imagegen.protocol import DEFAULT_PRIORITY, MAX_ID_CHARS, MAX_MODEL_ID_CHARS, PRIORITIES, GenerationParams

KNOWN_FIELDS = (
    "prompt", "negative_prompt", "game_id", "round_id", "player_id",
    "width", "height", "num_inference_steps", "guidance_scale", "seed", "model", "priority",
)


class FieldError(ValueError):
    """A request field is missing or wrong; ``field`` names it (None: the body as a whole)."""

    def __init__(self, field: str | None, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status  # 400, 413 for a body over the size limit, 408 for a body that stopped arriving
        self.code = code  # the error code when it is not the route's usual one for a bad field


@dataclass(frozen=True)
class GenerateRequest:
    params: GenerationParams
    game_id: str | None
    round_id: str | None
    player_id: str | None
    # How urgent (one of PRIORITIES; default normal): the broker serves higher ones first, with aging
    # (broker/priorities.py). Whether the API key may use it is the route's check (gateway/key_policies.py).
    priority: str = DEFAULT_PRIORITY


def parse_generate_request(body: Any, settings: GatewaySettings, rng: random.Random | None = None) -> GenerateRequest:
    """Check a decoded JSON body and fill in defaults; raises FieldError on the first problem."""
    if not isinstance(body, dict):
        raise FieldError(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(KNOWN_FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}; accepted fields: {', '.join(KNOWN_FIELDS)}")
    width = _side(body, "width", settings.default_width, settings)
    height = _side(body, "height", settings.default_height, settings)
    if width * height > settings.max_image_pixels:
        raise FieldError("width", f"width x height = {width * height} pixels exceeds the limit of "
                                  f"{settings.max_image_pixels} (MAX_IMAGE_PIXELS)")
    # No seed: pick one and return it, so the user can reproduce the image.
    default_seed = (rng or random.SystemRandom()).randrange(0, PICKED_SEED_LIMIT)
    params = GenerationParams(
        prompt=_prompt(body, "prompt", settings, required=True),
        negative_prompt=_prompt(body, "negative_prompt", settings, required=False),
        width=width,
        height=height,
        num_inference_steps=_integer(body, "num_inference_steps", settings.default_steps,
                                     WIRE.inference_steps.low, settings.max_inference_steps),
        guidance_scale=_number(body, "guidance_scale", settings.default_guidance_scale,
                               WIRE.guidance_scale.low, settings.max_guidance_scale),
        seed=_integer(body, "seed", default_seed, WIRE.seed.low, WIRE.seed.high),
        model=_model(body),
    )
    return GenerateRequest(params, _identifier(body, "game_id"), _identifier(body, "round_id"),
                           _identifier(body, "player_id"), _priority(body))


def _priority(body: dict) -> str:
    """high, normal or low; absent or null: normal."""
    value = body.get("priority")
    if value is None:
        return DEFAULT_PRIORITY
    if value not in PRIORITIES:
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else _json_type(value)
        raise FieldError("priority", f"priority must be one of {', '.join(PRIORITIES)} (default "
                                     f"{DEFAULT_PRIORITY}), got {shown}")
    return value


def _prompt(body: dict, field: str, settings: GatewaySettings, required: bool) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise FieldError(field, f"{field} is required: a non-empty string describing the image")
        return None
    if not isinstance(value, str):
        raise FieldError(field, f"{field} must be a string, got {_json_type(value)}")
    _check_unicode(field, value)
    if required and not value.strip():
        raise FieldError(field, f"{field} must not be empty")
    if len(value) > settings.max_prompt_chars:
        raise FieldError(field, f"{field} is {len(value)} characters; the limit is {settings.max_prompt_chars}")
    return value


def _model(body: dict) -> str | None:
    """The model asked for, a worker's MODEL_ID; None (absent or null): the one model served. Whether
    it is served is the broker's answer (unknown_model, model_required: broker/models.py)."""
    value = body.get("model")
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError("model", f"model must be a string, got {_json_type(value)}")
    _check_unicode("model", value)
    if not value:
        raise FieldError("model", "model must not be empty; leave it out to use the one model served")
    if len(value) > MAX_MODEL_ID_CHARS:
        raise FieldError("model", f"model is {len(value)} characters; the limit is {MAX_MODEL_ID_CHARS}")
    return value


def _identifier(body: dict, field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError(field, f"{field} must be a string, got {_json_type(value)}")
    value = _check_unicode(field, str(value))
    if len(value) > MAX_ID_CHARS:
        raise FieldError(field, f"{field} is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    return value


def _check_unicode(field: str, value: str) -> str:
    """Refuse lone surrogates: JSON's "\\ud800" escape decodes to one, which UTF-8 (and so msgpack, on
    the way to the broker) cannot encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(field, f"{field} is not valid Unicode: lone surrogate at character {exc.start}") from None
    return value


def _integer(body: dict, field: str, default: int, low: int, high: int) -> int:
    value = _get(body, field, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 512.0 means 512
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"{field} must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise FieldError(field, f"{field} must be between {low} and {high}, got {value}")
    return value


def _side(body: dict, field: str, default: int, settings: GatewaySettings) -> int:
    value = _integer(body, field, default, float("-inf"), float("inf"))  # the bounds are checked below, named
    if not settings.min_image_side <= value <= settings.max_image_side:
        raise FieldError(field, f"{field} must be between {settings.min_image_side} and {settings.max_image_side} "
                                f"(MIN_IMAGE_SIDE..MAX_IMAGE_SIDE), got {value}")
    if value % IMAGE_SIDE_MULTIPLE:
        raise FieldError(field, f"{field} must be a multiple of {IMAGE_SIDE_MULTIPLE} (the VAE works on "
                                f"{IMAGE_SIDE_MULTIPLE}x{IMAGE_SIDE_MULTIPLE} blocks), got {value}")
    return value


def _number(body: dict, field: str, default: float, low: float, high: float) -> float:
    value = _get(body, field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(field, f"{field} must be a number, got {_json_type(value)}")
    if not low <= value <= high:  # also rejects NaN
        raise FieldError(field, f"{field} must be between {low} and {high}, got {value}")
    return float(value)


def _get(body: dict, field: str, default: Any) -> Any:
    """The field's value; absent or null means the default."""
    value = body.get(field)
    return default if value is None else value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
