"""POST /v1/images/generations, the OpenAI-compatible route (gateway/openai_api.py), in one process.

Two levels: the pure request parser; and the route through aiohttp's test client with a FAKE broker
client (error shapes, Retry-After, cancellation, API keys). The official ``openai`` Python client
against a real cluster of processes: tests/e2e/test_openai_api.py.
"""

from __future__ import annotations

import asyncio
import re
import base64
import io
import random

import pytest
from PIL import Image

from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.openai_api import generate_all, parse_images_request
from gateway.validation import FieldError
from imagegen.bounds import MAX_IMAGES_PER_REQUEST

API_KEY = "test-key-0123456789abcdef"
SETTINGS = GatewaySettings()


def parse(body: dict, settings: GatewaySettings = SETTINGS):
    return parse_images_request(body, settings, random.Random(7))


def field_of(body: dict) -> str | None:
    with pytest.raises(FieldError) as caught:
        parse(body)
    return caught.value.field


# --------------------------------------------------------------------------- the parser (pure)


def test_defaults_one_image_of_the_default_size_as_url():
    parsed = parse({"prompt": "a cat"})
    assert parsed.response_format == "url" and len(parsed.images) == 1
    image = parsed.images[0]
    assert (image.prompt, image.width, image.height) == ("a cat", SETTINGS.default_width, SETTINGS.default_height)
    assert (image.num_inference_steps, image.guidance_scale) == (SETTINGS.default_steps,
                                                                  SETTINGS.default_guidance_scale)
    assert parse({"prompt": "a cat", "size": "auto"}).images[0].width == SETTINGS.default_width


def test_n_images_share_everything_but_the_seed():
    parsed = parse({"prompt": "a cat", "n": 4, "size": "64x128", "response_format": "b64_json", "model": "whatever",
                    "user": "u-1"})
    assert parsed.response_format == "b64_json" and len(parsed.images) == 4
    assert {(i.prompt, i.width, i.height) for i in parsed.images} == {("a cat", 64, 128)}
    assert len({i.seed for i in parsed.images}) == 4


def test_extensions_pass_through_and_seed_counts_up():
    parsed = parse({"prompt": "a cat", "n": 3, "seed": 100, "num_inference_steps": 4, "guidance_scale": 2.0,
                    "negative_prompt": "blurry"})
    assert [i.seed for i in parsed.images] == [100, 101, 102]
    assert {(i.num_inference_steps, i.guidance_scale, i.negative_prompt) for i in parsed.images} == {(4, 2.0, "blurry")}


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": MAX_IMAGES_PER_REQUEST + 1}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "size": "100x100"}, "size"),       # not multiples of 8
    ({"prompt": "x", "size": "8x8"}, "size"),           # below MIN_IMAGE_SIDE
    ({"prompt": "x", "size": "4096x4096"}, "size"),     # above MAX_IMAGE_SIDE
    ({"prompt": "x", "size": "512"}, "size"),
    ({"prompt": "x", "size": "512X512"}, "size"),
    ({"prompt": "x", "size": 512}, "size"),
    ({"prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "quality": "hd"}, "quality"),      # unknown fields are refused, not ignored
    ({"prompt": "x", "width": 64}, "width"),            # /generate's fields are not this route's
    ({"prompt": ""}, "prompt"),
    ({"n": 2}, "prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed"),
])
def test_bad_fields_are_named_as_openai_names_them(body, field):
    assert field_of(body) == field


def test_body_must_be_an_object():
    assert field_of(["prompt"]) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the route, FAKE broker (start_gateway)


def assert_openai_error(body: dict, kind: str, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["param"] == param and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body


async def test_urls_are_stored_images_and_n_requests_reach_the_broker_together(start_gateway):
    client, broker = await start_gateway()
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "n": 3, "size": "64x64"})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert len(body["data"]) == 3 and all(set(item) == {"url"} for item in body["data"])
    assert len({params.seed for params in broker.params}) == 3
    for item in body["data"]:
        image = await client.get(item["url"][item["url"].index("/images/"):])
        assert image.status == 200 and Image.open(io.BytesIO(await image.read())).size == (64, 64)


async def test_each_image_has_a_service_made_id_and_carries_the_client_label(start_gateway):
    client, broker = await start_gateway()
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "size": "64x64"},
                                 headers={"X-Request-ID": "round-7.player-3"})
    assert response.status == 200, await response.text()
    assert response.headers["X-Request-ID"] == "round-7.player-3"
    request_ids = [request_id for request_id, _, _ in broker.calls]
    assert len(set(request_ids)) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in request_ids), request_ids
    assert broker.labels == ["round-7.player-3"] * 2
    metrics = await (await client.get("/metrics")).text()
    counts = [line for line in metrics.splitlines() if line.startswith("imagegen_queue_wait_seconds_count")]
    assert counts and sum(float(line.rsplit(" ", 1)[1]) for line in counts) == 2, metrics


async def test_b64_json_answers_the_pngs_inline(start_gateway):
    client, _ = await start_gateway()
    response = await client.post("/v1/images/generations",
                                 json={"prompt": "a cat", "n": 2, "size": "64x128", "response_format": "b64_json"})
    data = (await response.json())["data"]
    assert [set(item) for item in data] == [{"b64_json"}] * 2
    assert Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (64, 128)


async def test_invalid_requests_answer_400_in_openai_shape(start_gateway):
    client, broker = await start_gateway()
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "100x100"})
    assert response.status == 400
    assert_openai_error(await response.json(), "invalid_request_error", "size", "invalid_value")
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "style": "vivid"})
    assert_openai_error(await response.json(), "invalid_request_error", "style", "unknown_parameter")
    response = await client.post("/v1/images/generations", data=b"{not json")
    assert response.status == 400
    assert_openai_error(await response.json(), "invalid_request_error", None)
    response = await client.post("/v1/images/generations", data=b"x" * (SETTINGS.max_request_bytes + 10))
    assert response.status == 413
    assert_openai_error(await response.json(), "invalid_request_error", None, "request_too_large")
    assert broker.calls == []


@pytest.mark.parametrize("failure, status, code", [
    (BrokerFailure("overloaded", "the queue is full"), 503, "overloaded"),
    (BrokerFailure("worker_lost", "workers died"), 503, "worker_lost"),
    (BrokerFailure("generation_failed", "boom"), 500, "generation_failed"),
    ("timeout", 504, "timeout"),
])
async def test_failures_answer_in_openai_shape_with_retry_after_on_503(start_gateway, failure, status, code):
    client, broker = await start_gateway(retry_after_s=7)
    broker.failure = failure
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "size": "64x64"})
    assert response.status == status
    assert_openai_error(await response.json(), "server_error", None, code)
    assert response.headers.get("Retry-After") == ("7" if status == 503 else None)


async def test_one_failed_image_cancels_the_others():
    class HalfBroken:
        def __init__(self) -> None:
            self.cancelled = 0
            self.count = 0

        async def generate(self, request_id, params, timeout_s, label="", **ranking):
            self.count += 1
            if self.count == 2:
                raise BrokerFailure("generation_failed", "boom")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    broker = HalfBroken()
    images = parse({"prompt": "a cat", "n": 4, "size": "64x64"}).images
    with pytest.raises(BrokerFailure):
        await asyncio.wait_for(generate_all(broker, images, 60), 5)
    assert broker.count == 4 and broker.cancelled == 3


async def test_api_keys_guard_the_route_with_openai_shaped_401(start_gateway):
    client, broker = await start_gateway(api_keys=(API_KEY,))
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(await response.json(), "invalid_request_error", None, "invalid_api_key")
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"},
                                 headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert response.status == 401
    assert broker.calls == []
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"},
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status == 200, await response.text()
    # The gateway's own routes keep the gateway's error shape.
    assert (await (await client.get("/stats")).json())["error"]["code"] == "unauthorized"


async def test_route_is_in_the_openapi_document(start_gateway):
    client, _ = await start_gateway()
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "401", "503"} <= set(operation["responses"])
    assert "ImagesRequest" in document["components"]["schemas"]
