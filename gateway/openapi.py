"""The gateway's OpenAPI 3.1 document, built from its settings so every bound is the one enforced.

``openapi_document(settings)`` describes POST /generate (the request body as
:mod:`gateway.validation` checks it, the response as ``gateway.app._success_body`` builds it, and
every error answer), GET /stats, /healthz, /readyz, /images/{name} and / (the web page), and
POST /v1/images/generations (its schemas come from gateway.openai_api). The schemas are JSON Schema
2020-12 (OpenAPI 3.1's dialect), so the property tests (tests/integration/test_fuzz_gateway.py) generate
request bodies from them and validate the answers against them.

Rules of the validator that JSON Schema cannot state are given as descriptions (two also as
``x-`` extensions): ``width * height <= MAX_IMAGE_PIXELS`` (``x-max-image-pixels``), the body-size
limit MAX_REQUEST_BYTES (413, ``x-max-request-bytes``), strings must be valid Unicode (no lone
surrogates), and game_id/round_id/player_id take integers written without a fraction only (JSON
Schema's "integer" also admits 7.0, which those fields refuse; the numeric fields accept it).

``openapi_handler`` serves it; gateway.app adds the route (``/openapi.json``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.answers import IMAGE_ROUTE
from gateway.config import GatewaySettings
from gateway.context import SETTINGS
from gateway.jobs.routes import openapi_paths as jobs_paths, openapi_schemas as jobs_schemas
from gateway.openai_api import openapi_paths as openai_paths, openapi_schemas as openai_schemas
from imagegen.bounds import IMAGE_SIDE_MULTIPLE, PICKED_SEED_BITS, WIRE
from imagegen.protocol import DEFAULT_PRIORITY, MAX_ID_CHARS, MAX_MODEL_ID_CHARS, PRIORITIES

OPENAPI_VERSION = "3.1.0"
IMAGE_NAME_PATTERN = r"^[0-9a-f]{32}\.png$"
# "At least one character that is not whitespace", whitespace as Python's str.strip() (which the
# validator uses) defines it, spelled out: ECMA-262's \s (JSON Schema's regex dialect) differs
# from Python's on U+001C-U+001F, U+0085 and U+FEFF.
NON_BLANK_PATTERN = r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("imagegen-batching")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable_integer(low: int, high: int, default: Any, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": ["integer", "null"], "minimum": low, "maximum": high, "default": default,
            "description": description, **extra}


def _identifier_schema() -> dict[str, Any]:
    # The validator accepts a string of at most MAX_ID_CHARS characters, or an integer whose
    # decimal form is at most that long (it is echoed back as a string); booleans are refused.
    return {
        "description": f"Your own label for the request, echoed back in the response as a string "
                       f"(an integer is accepted and turned into its decimal string). At most "
                       f"{MAX_ID_CHARS} characters. Integers must be written without a fraction "
                       f"(7, not 7.0). null or absent: null in the response.",
        "anyOf": [
            {"type": "string", "maxLength": MAX_ID_CHARS},
            {"type": "integer", "minimum": -(10 ** (MAX_ID_CHARS - 1) - 1), "maximum": 10 ** MAX_ID_CHARS - 1},
            {"type": "null"},
        ],
    }


def generate_request_schema(settings: GatewaySettings) -> dict[str, Any]:
    """The POST /generate body, exactly as gateway.validation.parse_generate_request accepts it."""
    s = settings
    multiple = IMAGE_SIDE_MULTIPLE
    side = f"must be a multiple of {multiple} (the VAE works on {multiple}x{multiple} blocks)"
    pixels_rule = f"width x height must not exceed {s.max_image_pixels} pixels (MAX_IMAGE_PIXELS)"
    prompt = {
        "type": "string", "minLength": 1, "maxLength": s.max_prompt_chars, "pattern": NON_BLANK_PATTERN,
        "description": f"What to draw: at least one non-whitespace character, at most {s.max_prompt_chars} "
                       "characters (Unicode code points; MAX_PROMPT_LENGTH).",
    }
    negative = {
        "type": ["string", "null"], "maxLength": s.max_prompt_chars,
        "description": f"What to avoid; at most {s.max_prompt_chars} characters. null or absent: none.",
    }
    return {
        "type": "object",
        "title": "GenerateRequest",
        "description": "Unknown fields are refused (400 naming the field), not ignored. A field given as null "
                       f"takes its default. Also: {pixels_rule}. Integer fields accept a number with an integral "
                       "value (512.0 means 512). Strings must be valid Unicode (no lone surrogates).",
        "properties": {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": _nullable_integer(s.min_image_side, s.max_image_side, s.default_width,
                                       f"Image width in pixels; {side}.", multipleOf=multiple),
            "height": _nullable_integer(s.min_image_side, s.max_image_side, s.default_height,
                                        f"Image height in pixels; {side}.", multipleOf=multiple),
            "num_inference_steps": _nullable_integer(WIRE.inference_steps.low, s.max_inference_steps,
                                                     s.default_steps, "Denoising steps (MAX_INFERENCE_STEPS)."),
            "guidance_scale": {
                "type": ["number", "null"], "minimum": WIRE.guidance_scale.low, "maximum": s.max_guidance_scale,
                "default": s.default_guidance_scale,
                "description": "Classifier-free guidance scale (MAX_GUIDANCE_SCALE); NaN and infinities are refused.",
            },
            "seed": _nullable_integer(WIRE.seed.low, WIRE.seed.high, None,
                                      "Random seed, for reproducible images. null or absent: the gateway picks "
                                      f"one in [0, 2**{PICKED_SEED_BITS}) and returns it in the response."),
            "game_id": _identifier_schema(),
            "round_id": _identifier_schema(),
            "player_id": _identifier_schema(),
            "model": {
                "type": ["string", "null"], "minLength": 1, "maxLength": MAX_MODEL_ID_CHARS,
                "description": "The model to draw with: the MODEL_ID of some registered worker (GET /stats lists "
                               "them under models). null or absent: the one model served; when several are "
                               "served it is required (400 model_required). A model no worker serves: 400 "
                               "unknown_model. Both errors list the models served and name the field.",
            },
            "priority": {
                "enum": [*PRIORITIES, None], "default": DEFAULT_PRIORITY,
                "description": "How urgent: high, normal (default) or low. The broker serves higher priorities first; a request "
                               "gains one class for every PRIORITY_AGING_S it waits, so low ones still run. With "
                               "API keys, a key may use up to its max_priority (default normal): above it, 403 "
                               "priority_not_allowed. Anything else: 400 naming the allowed values.",
            },
        },
        "required": ["prompt"],
        "additionalProperties": False,
        "x-max-image-pixels": s.max_image_pixels,
    }


def generate_response_schema(settings: GatewaySettings) -> dict[str, Any]:
    """A 200 answer of POST /generate (gateway.app._success_body). Clients must ignore unknown fields."""
    s = settings
    label = {"type": ["string", "null"], "maxLength": MAX_ID_CHARS,
             "description": "The request's label, as a string; null if none was given."}
    non_negative_ms = {"type": "number", "minimum": 0}
    side = {"type": "integer", "minimum": s.min_image_side, "maximum": s.max_image_side,
            "multipleOf": IMAGE_SIDE_MULTIPLE}  # width and height
    return {
        "type": "object",
        "title": "GenerateResponse",
        "properties": {
            "image_id": {"type": "string", "pattern": r"^[0-9a-f]{32}$"},
            "image_url": {"type": "string", "format": "uri",
                          "description": "Where to GET the PNG: PUBLIC_BASE_URL (or the request's own origin) "
                                         "+ /images/{image_id}.png. Images expire (IMAGE_RETENTION_S)."},
            "duration_ms": {**non_negative_ms, "description": "Time the gateway spent on the request."},
            "game_id": label,
            "round_id": label,
            "player_id": label,
            "width": {**side},
            "height": {**side},
            "num_inference_steps": {"type": "integer", "minimum": WIRE.inference_steps.low,
                                    "maximum": s.max_inference_steps},
            "guidance_scale": {"type": "number", "minimum": WIRE.guidance_scale.low, "maximum": s.max_guidance_scale},
            "seed": {"type": "integer", "minimum": WIRE.seed.low, "maximum": WIRE.seed.high,
                     "description": "The seed used (the one given, or the one the gateway picked)."},
            "batch_id": {"type": "string", "description": "The batch this image was generated in."},
            "batch_size": {"type": "integer", "minimum": 1, "description": "How many requests shared that batch."},
            "gpu_id": {"type": "integer", "minimum": -1, "description": "The worker's GPU (-1: CPU)."},
            "worker": {"type": "string", "description": "The worker's name."},
            "host": {"type": "string", "description": "The worker's host."},
            "queue_wait_ms": {**non_negative_ms, "description": "Time spent queued (broker and worker)."},
            "generation_ms": {**non_negative_ms, "description": "Inference time of the batch."},
            "model": {"type": ["string", "null"],
                      "description": "The model of the worker that made the image (its MODEL_ID); null from "
                                     "a broker that does not say."},
        },
        "required": ["image_id", "image_url", "duration_ms", "game_id", "round_id", "player_id", "width",
                     "height", "num_inference_steps", "guidance_scale", "seed", "batch_id", "batch_size",
                     "gpu_id", "worker", "host", "queue_wait_ms", "generation_ms"],
    }


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": "Every error answer of the gateway (aiohttp's own 404/405/413 included) has this shape.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "minLength": 1,
                         "description": "Machine-readable: invalid_request, not_found, method_not_allowed, "
                                        "too_costly, unknown_model, model_required, size_not_served, overloaded, "
                                        "worker_lost, "
                                        "shutting_down, deadline_exceeded, "
                                        "timeout, storage_unavailable, "
                                        "generation_failed, bad_worker_output, broker_unreachable, ..."},
                "message": {"type": "string", "minLength": 1, "description": "Human-readable explanation."},
                "field": {"type": ["string", "null"],
                          "description": "The request field at fault (400 invalid_request; model for "
                                         "unknown_model and model_required; width for "
                                         "size_not_served); null otherwise."},
            },
            "required": ["code", "message", "field"],
            "additionalProperties": False,
        },
    },
    "required": ["error"],
    "additionalProperties": False,
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref("Error")}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return response


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(settings: GatewaySettings) -> dict[str, Any]:
    s = settings
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "imagegen gateway",
            "version": _version(),
            "description": "Text-to-image generation with dynamic batching over GPU workers. Every error answer "
                           "is JSON: {\"error\": {\"code\", \"message\", \"field\"}}.",
        },
        "paths": {
            "/generate": {
                "post": {
                    "operationId": "generate",
                    "summary": "Generate one image",
                    "description": f"Request bodies larger than {s.max_request_bytes} bytes (MAX_REQUEST_BYTES) "
                                   "are refused with 413. With Prefer: respond-async, a job instead (as POST "
                                   "/v1/jobs, which also takes its body): 202 at once.",
                    "parameters": [{"name": "Prefer", "in": "header", "required": False,
                                    "schema": {"type": "string"},
                                    "description": "respond-async: answer 202 with a job (see POST /v1/jobs) "
                                                   "instead of waiting for the image."}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("GenerateRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("GenerateResponse"), "The image was generated; fetch it at image_url."),
                        "202": _json(_ref("JobAccepted"), "With Prefer: respond-async: the job was submitted "
                                                          "(Preference-Applied: respond-async)."),
                        "400": _error("The body is not JSON, not an object, or a field is wrong (error.field "
                                      "names it); the pipeline refused the inputs; or the request could not "
                                      "finish within its deadline even alone on the fastest worker "
                                      "(too_costly: the message gives the estimate and the limit); or the "
                                      "model is not served (unknown_model) or several are and none was named "
                                      "(model_required): both list the models served, field model; or the "
                                      "worker serves only the sizes it lists and this is not one "
                                      "(size_not_served: the message lists them, field width)."),
                        "403": _error("The priority is above what the API key may use (priority_not_allowed: the "
                                      "message names the highest allowed, field priority)."),
                        "408": _error(f"The body did not arrive within GATEWAY_BODY_TIMEOUT_S={s.body_timeout_s:g}s "
                                      "(body_timeout); the connection is closed."),
                        "413": _error(f"The body exceeds {s.max_request_bytes} bytes (MAX_REQUEST_BYTES)."),
                        "500": _error("Generation failed on the worker (generation_failed) or an unexpected "
                                      "failure code came back."),
                        "502": _error("The worker returned an image of the wrong size (bad_worker_output)."),
                        "503": _error("Overloaded (the queue is full, or the request could finish alone but not "
                                      "behind the work already queued), shutting down, or the worker holding the "
                                      "request was lost; or "
                                      "the image folder cannot take the image (storage_unavailable: full, "
                                      "read-only, not writable, missing; the message names the cause): "
                                      "retry after Retry-After seconds.", retry_after=True),
                        "504": _error(f"No image within REQUEST_TIMEOUT_S={s.request_timeout_s:g}s: the broker's "
                                      "deadline_exceeded says where the request was (queued at the broker or a "
                                      "worker, being generated at step s of S, or no worker registered); timeout "
                                      "when the broker did not answer."),
                    },
                    "x-max-request-bytes": s.max_request_bytes,
                },
            },
            "/stats": {
                "get": {
                    "operationId": "stats",
                    "summary": "Cluster statistics (the broker's /stats document)",
                    "responses": {
                        "200": _json(_ref("Stats"), "The broker's statistics."),
                        "503": _error("The broker did not answer (broker_unreachable).", retry_after=True),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics: the gateway's and the cluster's (docs/metrics.md)",
                    "responses": {"200": {
                        "description": "The Prometheus text format (version 0.0.4).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }},
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: this process serves HTTP",
                    "responses": {"200": _json(_ref("Health"), "Alive.")},
                },
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: the broker answers and at least one GPU worker is registered",
                    "responses": {
                        "200": _json(_ref("Ready"), "Ready to serve."),
                        "503": _json(_ref("NotReady"), "Not ready: the broker does not answer, no worker "
                                                       "accepts work (none registered, or all draining), or the "
                                                       "image folder cannot take images; reason says which."),
                    },
                },
            },
            IMAGE_ROUTE: {
                "get": {
                    "operationId": "image",
                    "summary": "A generated image",
                    "parameters": [{
                        "name": "name", "in": "path", "required": True,
                        "description": "{image_id}.png, as in a generate response's image_url.",
                        "schema": {"type": "string", "pattern": IMAGE_NAME_PATTERN},
                    }],
                    "responses": {
                        "200": {
                            "description": "The PNG.",
                            "headers": {"Cache-Control": {"schema": {"type": "string"},
                                                          "description": "public, max-age=86400"}},
                            "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
                        },
                        "404": _error(f"No such image (not_found); images expire after "
                                      f"{s.image_retention_s:g}s or beyond {s.image_retention_count} images."),
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
                },
            },
            "/": {
                "get": {
                    "operationId": "webPage",
                    "summary": "The web page: prompt, image, live queue and batch stats (needs no key)",
                    "responses": {"200": {"description": "The page.",
                                          "content": {"text/html": {"schema": {"type": "string"}}}}},
                },
            },
            **openai_paths(s),
            **jobs_paths(s),
        },
        "components": {
            "schemas": {
                "GenerateRequest": generate_request_schema(s),
                "GenerateResponse": generate_response_schema(s),
                "Error": ERROR_SCHEMA,
                **openai_schemas(s),
                **jobs_schemas(s, generate_request_schema(s)),
                "Stats": {
                    "type": "object",
                    "description": "num_gpus, total_requests, total_batches, avg_batch_size, current_queue_depth, "
                                   "..., per_gpu_stats[] with two or more workers, models, and a broker section.",
                    "properties": {
                        "num_gpus": {"type": "integer", "minimum": 0},
                        "models": {
                            "type": "object",
                            "description": "Per model served (a worker's MODEL_ID), or asked for and waiting: its "
                                           "workers and queue depths.",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {name: {"type": "integer", "minimum": 0} for name in (
                                    "workers", "accepting_workers", "broker_queue_depth", "current_queue_depth")},
                            },
                        },
                        "priorities": {
                            "type": "object",
                            "description": "Per priority (high, normal, low): requests waiting in the broker's queue "
                                           "now (queued), accepted since start (requests), handed to a worker for "
                                           "the first time (dispatched), and those's wait in the queue "
                                           "(queue_wait_seconds summed, avg_queue_wait_ms).",
                        },
                        "fair_share": {
                            "type": "object",
                            "description": "The fair share between API keys: half_life_s (FAIR_SHARE_HALF_LIFE_S), "
                                           "priority_aging_s (PRIORITY_AGING_S), and owners: per key name "
                                           "(key-<16 hex>), gpu_seconds since start, recent_gpu_seconds (decayed, "
                                           "as the fair share counts them), share and queued.",
                        },
                    },
                },
                "Health": {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]},
                "Ready": {
                    "type": "object",
                    "properties": {"status": {"const": "ready"},
                                   "workers": {"type": "integer", "minimum": 1,
                                               "description": "Workers accepting work (registered, not draining)."},
                                   "registered_workers": {"type": "integer", "minimum": 1},
                                   "image_store": {"const": "ok"}},
                    "required": ["status", "workers", "registered_workers", "image_store"],
                },
                "NotReady": {
                    "type": "object",
                    "properties": {"status": {"const": "not_ready"}, "reason": {"type": "string"},
                                   "workers": {"type": "integer", "minimum": 0},
                                   "registered_workers": {"type": "integer", "minimum": 0},
                                   "image_store": {"enum": ["ok", "disk_full", "read_only", "permission", "missing",
                                                           "io_error"]}},
                    "required": ["status", "reason", "image_store"],
                },
            },
            "headers": {
                "RetryAfter": {
                    "description": "Seconds to wait before retrying (RETRY_AFTER_S).",
                    "schema": {"type": "integer", "minimum": 0, "example": s.retry_after_s},
                },
            },
        },
    }
    if s.public_base_url:
        document["servers"] = [{"url": s.public_base_url.rstrip("/")}]
    return document


async def openapi_handler(request: web.Request) -> web.Response:
    """GET /openapi.json."""
    return web.json_response(openapi_document(request.app[SETTINGS]))
