"""OpenAI-compatible image generation: ``POST /v1/images/generations``.

Lets OpenAI's client libraries (``openai.OpenAI(base_url="http://gateway:8080/v1")``) and tools
built on them use the cluster. The request is turned into ``n`` ordinary generate requests, each
checked by :func:`gateway.validation.parse_generate_request` (the same bounds as POST /generate)
and each with its own seed; they go to the broker together, so the worker batches them like any
other concurrent requests. The answer is all ``n`` images or an error, never part of them.

Fields, as in OpenAI's API:

* ``prompt`` (required); ``n``: 1 to ``imagegen.bounds.MAX_IMAGES_PER_REQUEST`` images (default 1);
* ``size``: ``"WxH"`` within the gateway's bounds (multiples of 8, MIN/MAX_IMAGE_SIDE,
  MAX_IMAGE_PIXELS); ``"auto"``, null or absent: DEFAULT_WIDTH x DEFAULT_HEIGHT;
* ``response_format``: ``"url"`` (default; the PNG is stored and served like /generate's) or
  ``"b64_json"`` (the PNG inline, base64; nothing is stored);
* ``model``: which of the cluster's models draws (a worker's MODEL_ID). Absent, or one no worker
  serves while the cluster serves one model: that model (OpenAI clients send names such as
  ``dall-e-3``; ``GenerationParams.model_fallback``). With several models served it must name one: 400
  ``model_required`` or ``unknown_model``, listing them (broker/models.py decides);
  ``user``: any string, ignored.

Extensions beyond OpenAI's fields (send them with the client's ``extra_body``):
``negative_prompt``, ``num_inference_steps``, ``guidance_scale`` (as in /generate) and ``seed``
(image i gets ``seed + i``; without it every image gets a random seed). Any other field is refused
with 400, like /generate's unknown fields.

Answer: ``{"created": <unix seconds>, "data": [{"url": ...} | {"b64_json": ...}, ...]}``. Errors
use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400/413
``invalid_request_error`` with ``param`` naming the field; 5xx ``server_error`` with ``code`` the
gateway's failure code (``overloaded``, ``worker_lost``, ``timeout``, ...), 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from gateway.answers import ErrorAnswer, broker_failure_answer, broker_silent_answer, has_reported_size
from gateway.auth import ranking_of
from gateway.answers import image_url, keep_image, storage_answer, wrong_size_answer
from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.context import BROKER, METRICS, SETTINGS, read_json_body
from gateway.images import StorageUnavailable
from gateway.request_ids import new_request_id, request_label_of
from gateway.validation import FieldError, parse_generate_request
from imagegen.bounds import IMAGE_SIDE_MULTIPLE, MAX_IMAGES_PER_REQUEST, PICKED_SEED_LIMIT, WIRE
from imagegen.protocol import DEFAULT_PRIORITY, MAX_MODEL_ID_CHARS, PRIORITIES, GenerationParams, Result

RESPONSE_FORMATS = ("url", "b64_json")
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
# Fields of POST /generate accepted here too, passed through to its validator unchanged.
EXTENSION_FIELDS = ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "priority")
# Used with fullmatch: "$" would also accept a trailing newline. Any number of digits, so that
# "1000000x5" is told which bound it breaks rather than that its format is wrong.
SIZE_PATTERN = re.compile(r"([0-9]+)x([0-9]+)")
MAX_SIZE_CHARS = 32


class UnknownField(FieldError):
    """A field this route does not accept (OpenAI's code for it: ``unknown_parameter``)."""


@dataclass(frozen=True)
class ImagesRequest:
    """A checked /v1/images/generations request: one GenerationParams per image, seeds distinct."""

    images: tuple[GenerationParams, ...]
    response_format: str
    priority: str = DEFAULT_PRIORITY  # the extension field priority (high, normal, low)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's shape; ``type`` follows from the status as OpenAI's API does."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def answer_openai_error(answer: ErrorAnswer) -> web.Response:
    """A generate error (gateway/answers.py) in OpenAI's shape: its code is OpenAI's ``code``, and a
    field of /generate's is named as OpenAI's (:func:`openai_param`)."""
    return openai_error(answer.status, answer.message, openai_param(answer.field), code=answer.code,
                        headers=answer.headers())


def openai_param(field: str | None) -> str | None:
    """OpenAI's name for a /generate field: ``size`` for width and height, else the same."""
    return "size" if field in ("width", "height") else field


def parse_images_request(body: Any, settings: GatewaySettings, rng: random.Random | None = None) -> ImagesRequest:
    """Check a decoded body (pure but for the random seeds); raises FieldError naming the
    OpenAI field at fault (``size`` for width/height problems)."""
    if not isinstance(body, dict):
        raise FieldError(None, "the request body must be a JSON object")
    accepted = OPENAI_FIELDS + EXTENSION_FIELDS
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        raise UnknownField(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}; accepted: "
                                     f"{', '.join(accepted)}")
    for field in ("model", "user"):
        if body.get(field) is not None and not isinstance(body[field], str):
            raise FieldError(field, f"{field} must be a string")
    n = _count(body.get("n"))
    response_format = body.get("response_format") or "url"
    if response_format not in RESPONSE_FORMATS:
        raise FieldError("response_format", f"response_format must be 'url' or 'b64_json', got {response_format!r}")
    generate_body = {key: body[key] for key in ("prompt", *EXTENSION_FIELDS) if key in body}
    if body.get("model"):  # "" counts as absent, as OpenAI's own default does
        generate_body["model"] = body["model"]
    generate_body.update(_size(body.get("size")))
    try:
        checked = parse_generate_request(generate_body, settings, rng)
        first = checked.params
    except FieldError as exc:
        if exc.field in ("width", "height"):
            raise FieldError("size", f"size {body.get('size')!r}: {exc.message}", exc.status) from None
        raise
    first = replace(first, model_fallback=True)
    return ImagesRequest(_with_seeds(first, n, body.get("seed") is not None, rng), response_format, checked.priority)


def _count(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGES_PER_REQUEST:
        raise FieldError("n", f"n must be an integer between 1 and {MAX_IMAGES_PER_REQUEST}, got {value!r}")
    return value


def _size(value: Any) -> dict[str, int]:
    """``"WxH"`` as /generate's width and height; ``"auto"`` or None: the defaults."""
    if value is None or value == "auto":
        return {}
    match = SIZE_PATTERN.fullmatch(value) if isinstance(value, str) and len(value) <= MAX_SIZE_CHARS else None
    if match is None:
        raise FieldError("size", f"size must be a string 'WIDTHxHEIGHT' such as '512x512' (or 'auto'), got {value!r}")
    return {"width": int(match[1]), "height": int(match[2])}


def _with_seeds(first: GenerationParams, n: int, seeded: bool,
                rng: random.Random | None) -> tuple[GenerationParams, ...]:
    """n copies of ``first``: seed, seed+1, ... when the client gave a seed; otherwise random seeds."""
    if seeded:
        if first.seed + n - 1 > WIRE.seed.high:
            raise FieldError("seed", f"seed + n - 1 must not exceed {WIRE.seed.high}")
        return tuple(replace(first, seed=first.seed + i) for i in range(n))
    pick = rng or random.SystemRandom()
    return (first, *(replace(first, seed=pick.randrange(0, PICKED_SEED_LIMIT)) for _ in range(n - 1)))


async def generate_all(broker: Any, images: tuple[GenerationParams, ...], timeout_s: float,
                       label: str = "", **ranking: Any) -> list[tuple[Result, bytes]]:
    """Send every image's request at once (so they can share a batch) and wait for all of them.

    Each image is a request of its own with a fresh service-made id; all carry the HTTP request's
    label (the client's X-Request-ID), so one grep finds all of them in the broker's and workers'
    logs. The first failure cancels the others (the broker client tells the broker to drop them) and
    is raised; so does cancellation of the caller (its HTTP client went away). ``ranking``: the
    priority, owner and share each request goes with (gateway/auth.py ranking_of)."""
    tasks = [asyncio.ensure_future(broker.generate(new_request_id(), params, timeout_s, label=label, **ranking))
             for params in images]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def images_generations(request: web.Request) -> web.Response:
    """POST /v1/images/generations."""
    settings = request.app[SETTINGS]
    try:
        parsed = parse_images_request(await read_json_body(request, settings.max_request_bytes), settings)
        ranking = ranking_of(request, parsed.priority)
    except FieldError as exc:
        code = exc.code or ("request_too_large" if exc.status == 413 else "unknown_parameter"
                            if isinstance(exc, UnknownField) else "invalid_value" if exc.field else "invalid_json")
        return openai_error(exc.status, exc.message, param=exc.field, code=code)
    try:
        made = await generate_all(request.app[BROKER], parsed.images, settings.request_timeout_s,
                                  request_label_of(request), **ranking)
    except BrokerFailure as exc:
        return answer_openai_error(broker_failure_answer(exc, settings))
    except asyncio.TimeoutError:
        return answer_openai_error(broker_silent_answer(settings))
    for result, _ in made:
        request.app[METRICS].observe_result(result)
    if not all(has_reported_size(png, result) for result, png in made):
        return answer_openai_error(wrong_size_answer("a worker"))
    try:
        data = [await _image_entry(request, parsed.response_format, png) for _, png in made]
    except StorageUnavailable as exc:
        return answer_openai_error(storage_answer(exc, settings))
    return web.json_response({"created": int(time.time()), "data": data})


async def _image_entry(request: web.Request, response_format: str, png: bytes) -> dict[str, str]:
    """One item of the answer's ``data``: the PNG inline, or stored and its URL."""
    if response_format == "b64_json":
        return {"b64_json": base64.b64encode(png).decode("ascii")}
    return {"url": image_url(request, await keep_image(request, png))}


# --------------------------------------------------------------------------- OpenAPI description


def openapi_schemas(settings: GatewaySettings) -> dict[str, Any]:
    """Components for gateway/openapi.py: the request, the answer and the error of this route."""
    s = settings
    nullable_string = {"type": ["string", "null"]}
    return {
        "ImagesRequest": {
            "type": "object",
            "title": "ImagesRequest",
            "description": "OpenAI's images.generate body. Unknown fields are refused (400 naming the field). "
                           "Extensions: negative_prompt, num_inference_steps, guidance_scale, seed and priority, "
                           "as in POST /generate (image i gets seed + i).",
            "properties": {
                "prompt": {"type": "string", "minLength": 1, "maxLength": s.max_prompt_chars,
                           "description": "What to draw: at least one non-whitespace character."},
                "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_IMAGES_PER_REQUEST, "default": 1,
                      "description": "How many images; they are generated together (batched)."},
                "size": {"type": ["string", "null"], "pattern": r"^(auto|[0-9]+x[0-9]+)$",
                         "maxLength": MAX_SIZE_CHARS,
                         "default": f"{s.default_width}x{s.default_height}",
                         "description": f"WIDTHxHEIGHT, each a multiple of {IMAGE_SIDE_MULTIPLE} in "
                                        f"{s.min_image_side}.."
                                        f"{s.max_image_side}, at most {s.max_image_pixels} pixels; "
                                        "auto: the default."},
                "response_format": {"enum": [*RESPONSE_FORMATS, None], "default": "url"},
                "model": {**nullable_string, "maxLength": MAX_MODEL_ID_CHARS,
                          "description": "The model to draw with: a MODEL_ID some worker serves (GET /stats "
                                         "lists them under models). Absent, empty, or one not served while the "
                                         "cluster serves one model: that model. With several served it must "
                                         "name one (400 model_required or unknown_model, listing them)."},
                "user": {**nullable_string, "description": "Ignored."},
                "negative_prompt": {**nullable_string, "maxLength": s.max_prompt_chars},
                "num_inference_steps": {"type": ["integer", "null"], "minimum": WIRE.inference_steps.low,
                                        "maximum": s.max_inference_steps, "default": s.default_steps},
                "guidance_scale": {"type": ["number", "null"], "minimum": WIRE.guidance_scale.low,
                                   "maximum": s.max_guidance_scale, "default": s.default_guidance_scale},
                "seed": {"type": ["integer", "null"], "minimum": WIRE.seed.low, "maximum": WIRE.seed.high},
                "priority": {"enum": [*PRIORITIES, None], "default": DEFAULT_PRIORITY,
                             "description": "high, normal or low, as in POST /generate (403 priority_not_allowed "
                                            "above the API key's max_priority)."},
            },
            "required": ["prompt"],
            "additionalProperties": False,
        },
        "ImagesResponse": {
            "type": "object",
            "title": "ImagesResponse",
            "properties": {
                "created": {"type": "integer", "description": "Unix time, seconds."},
                "data": {"type": "array", "minItems": 1, "maxItems": MAX_IMAGES_PER_REQUEST, "items": {
                    "type": "object",
                    "properties": {"url": {"type": "string", "format": "uri"},
                                   "b64_json": {"type": "string", "contentEncoding": "base64",
                                                "contentMediaType": "image/png"}},
                    "minProperties": 1, "maxProperties": 1,
                }},
            },
            "required": ["created", "data"],
        },
        "OpenAIError": {
            "type": "object",
            "title": "OpenAIError",
            "properties": {"error": {
                "type": "object",
                "properties": {"message": {"type": "string"},
                               "type": {"enum": ["invalid_request_error", "server_error"]},
                               "param": nullable_string, "code": nullable_string},
                "required": ["message", "type", "param", "code"],
            }},
            "required": ["error"],
        },
    }


def openapi_paths(settings: GatewaySettings) -> dict[str, Any]:
    """The /v1/images/generations path item for gateway/openapi.py."""
    def answer(description: str, schema: str, retry_after: bool = False) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
        if retry_after:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
        return response

    return {"/v1/images/generations": {"post": {
        "operationId": "openaiImagesGenerations",
        "summary": "OpenAI-compatible image generation (n images, batched)",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ImagesRequest"}}}},
        "responses": {
            "200": answer("All n images.", "ImagesResponse"),
            "400": answer("A field is wrong; error.param names it (code unknown_model or model_required: the "
                          "models served are listed; size_not_served: the sizes served are listed, param "
                          "size).", "OpenAIError"),
            "401": answer("API keys are configured and none valid was sent (code invalid_api_key).", "OpenAIError"),
            "403": answer("The priority is above what the API key may use (code priority_not_allowed, param "
                          "priority).", "OpenAIError"),
            "408": answer(f"The body did not arrive within GATEWAY_BODY_TIMEOUT_S={settings.body_timeout_s:g}s "
                          "(code body_timeout).", "OpenAIError"),
            "413": answer(f"The body exceeds {settings.max_request_bytes} bytes.", "OpenAIError"),
            "500": answer("Generation failed (code generation_failed).", "OpenAIError"),
            "502": answer("A worker returned an image of the wrong size.", "OpenAIError"),
            "503": answer("Overloaded, shutting down, worker lost, or the image folder cannot take the images "
                          "(storage_unavailable; b64_json stores nothing) (code says which).", "OpenAIError", True),
            "504": answer("No images within REQUEST_TIMEOUT_S.", "OpenAIError"),
        },
    }}}
