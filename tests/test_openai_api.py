"""POST /v1/images/generations, the OpenAI-compatible route (gateway/openai_api.py).

Three levels: the pure request parser; the route through aiohttp's test client with the FAKE broker
client of tests/test_gateway.py (error shapes, Retry-After, cancellation, API keys); and the
official ``openai`` Python client against a real cluster of processes (tests/cluster.py: broker,
gateway, one worker on the FAKE image backend, since the serving layer is what is under test).
"""

from __future__ import annotations

import asyncio
import re
import base64
import io
import json
import random
import time
import urllib.request

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from cluster import Cluster
from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.openai_api import generate_all, parse_images_request
from gateway.validation import FieldError
from imagegen.bounds import MAX_IMAGES_PER_REQUEST
from test_gateway import FakeBrokerClient, start_client

openai = pytest.importorskip("openai", reason="the official client is in the test extra: pip install -e '.[test]'")

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


# --------------------------------------------------------------------------- the route, FAKE broker


@pytest.fixture
async def gateway(tmp_path):
    """(client, broker): the gateway app with the FAKE broker client, and API keys when asked."""
    started: list[TestClient] = []

    async def start(**settings) -> tuple[TestClient, FakeBrokerClient]:
        broker = FakeBrokerClient()
        client = await start_client(GatewaySettings(image_dir=str(tmp_path / "images"), **settings), broker)
        started.append(client)
        return client, broker

    yield start
    for client in started:
        await client.close()


def assert_openai_error(body: dict, kind: str, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["param"] == param and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body


async def test_urls_are_stored_images_and_n_requests_reach_the_broker_together(gateway):
    client, broker = await gateway()
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "n": 3, "size": "64x64"})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert len(body["data"]) == 3 and all(set(item) == {"url"} for item in body["data"])
    assert len({params.seed for params in broker.params}) == 3
    for item in body["data"]:
        image = await client.get(item["url"][item["url"].index("/images/"):])
        assert image.status == 200 and Image.open(io.BytesIO(await image.read())).size == (64, 64)


async def test_each_image_has_a_service_made_id_and_carries_the_client_label(gateway):
    client, broker = await gateway()
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


async def test_b64_json_answers_the_pngs_inline(gateway):
    client, _ = await gateway()
    response = await client.post("/v1/images/generations",
                                 json={"prompt": "a cat", "n": 2, "size": "64x128", "response_format": "b64_json"})
    data = (await response.json())["data"]
    assert [set(item) for item in data] == [{"b64_json"}] * 2
    assert Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (64, 128)


async def test_invalid_requests_answer_400_in_openai_shape(gateway):
    client, broker = await gateway()
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
async def test_failures_answer_in_openai_shape_with_retry_after_on_503(gateway, failure, status, code):
    client, broker = await gateway(retry_after_s=7)
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

        async def generate(self, request_id, params, timeout_s, label=""):
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


async def test_api_keys_guard_the_route_with_openai_shaped_401(gateway):
    client, broker = await gateway(api_keys=(API_KEY,))
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


async def test_route_is_in_the_openapi_document(gateway):
    client, _ = await gateway()
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "401", "503"} <= set(operation["responses"])
    assert "ImagesRequest" in document["components"]["schemas"]


# --------------------------------------------------------------------------- the official client, real processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Broker, gateway and one worker (FAKE backend), API keys on; a 0.5 s window so n images batch."""
    c = Cluster(tmp_path_factory.mktemp("openai"), GATEWAY_API_KEYS=API_KEY, MAX_BATCH_WAIT_TIME="0.5",
                MAX_BATCH_SIZE="4", MODEL_ID="fake:delay=0.1")
    try:
        c.start("broker", "broker")
        c.start("gateway", "gateway")
        c.start_worker(0)
        deadline = time.monotonic() + 60
        while stats(c).get("num_gpus") != 1:
            assert time.monotonic() < deadline, f"no worker registered\n{c.logs()}"
            time.sleep(0.1)
        yield c
    finally:
        c.stop()


def stats(c: Cluster) -> dict:
    request = urllib.request.Request(f"{c.url}/stats", headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return {}


def official_client(c: Cluster, api_key: str = API_KEY):
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key=api_key, max_retries=0, timeout=30)


@pytest.mark.e2e
def test_official_client_b64_json_three_images_in_one_batch(cluster):
    client = official_client(cluster)
    before = stats(cluster)
    result = client.images.generate(prompt="a lighthouse", n=3, size="64x64", response_format="b64_json",
                                    model="anything")
    assert isinstance(result, openai.types.ImagesResponse) and result.created > 0
    pngs = [base64.b64decode(image.b64_json) for image in result.data]
    assert len(pngs) == 3 and len(set(pngs)) == 3  # distinct seeds, distinct images
    assert all(Image.open(io.BytesIO(png)).size == (64, 64) for png in pngs)
    after = stats(cluster)
    assert after["total_requests"] - before["total_requests"] == 3
    assert after["total_batches"] - before["total_batches"] == 1, (before, after)


@pytest.mark.e2e
def test_official_client_urls_load_without_a_key(cluster):
    result = official_client(cluster).images.generate(prompt="a lighthouse", n=2, size="64x128")
    assert [image.b64_json for image in result.data] == [None, None]
    for image in result.data:
        with urllib.request.urlopen(image.url, timeout=10) as response:  # image URLs need no key
            assert Image.open(io.BytesIO(response.read())).size == (64, 128)


@pytest.mark.e2e
def test_official_client_sees_openai_errors(cluster):
    with pytest.raises(openai.BadRequestError) as bad:
        official_client(cluster).images.generate(prompt="a lighthouse", size="100x100")
    assert bad.value.param == "size" and bad.value.type == "invalid_request_error"
    assert "multiple of 8" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        official_client(cluster).images.generate(prompt="a lighthouse", n=11, size="64x64")
    assert bad.value.param == "n"
    with pytest.raises(openai.AuthenticationError) as denied:
        official_client(cluster, api_key="wrong-key-0123456789").images.generate(prompt="x", size="64x64")
    assert denied.value.code == "invalid_api_key" and denied.value.status_code == 401
