"""Tests of the HTTP gateway (gateway/): routes, validation, error shapes, images on disk.

The gateway runs in-process on aiohttp's TestServer with a `RecordingFakeBroker`
(tests/support/fake_brokers.py, the ``client`` fixture of tests/integration/conftest.py) in place of
the ZeroMQ broker link, so these tests need no broker, no worker, no GPU and no model.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.images import ImageStore, new_image_id, png_size
from gateway.validation import FieldError, parse_generate_request
from imagegen import protocol
from imagegen import settings as settings_lib
from imagegen.protocol import CLIENT_LINK, MAX_ID_CHARS, MAX_SEED, Generate, GenerationParams
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client
from tests.support.images import make_png

HEX32 = re.compile(r"^[0-9a-f]{32}$")


# --------------------------------------------------------------------------- helpers


async def raw_request(client: TestClient, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send exactly these bytes (no URL normalisation by a client library); returns status, headers, body."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        # Read one response by its framing, not to EOF: after a 413 the server may keep the
        # connection open for a while to drain a body that is never coming.
        header_blob = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = header_blob.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            payload = b""
            while True:
                size = int((await asyncio.wait_for(reader.readline(), 10)).strip(), 16)
                chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
                if size == 0:
                    break
                payload += chunk[:-2]
        else:
            payload = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    finally:
        writer.close()
    return status, headers, payload


def assert_error(status: int, body: Any, expected_status: int, code: str, field: Any = "<any>") -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if field != "<any>":
        assert error["field"] == field, error


async def post_generate(client: TestClient, body: Any) -> tuple[int, Any, Any]:
    response = await client.post("/generate", json=body)
    return response.status, await response.json(), response


# --------------------------------------------------------------------------- success


async def test_generate_success_full_response(client: TestClient, broker: RecordingFakeBroker, settings):
    body = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "width": 128, "height": 64,
            "num_inference_steps": 12, "guidance_scale": 5.5, "seed": 1234,
            "game_id": "game-1", "round_id": 7, "player_id": "alice"}
    status, data, response = await post_generate(client, body)
    assert status == 200, data
    assert response.content_type == "application/json"

    assert HEX32.match(data["image_id"])
    origin = str(client.make_url("/").origin())
    assert data["image_url"] == f"{origin}/images/{data['image_id']}.png"
    assert isinstance(data["duration_ms"], (int, float)) and data["duration_ms"] >= 0
    assert (data["game_id"], data["round_id"], data["player_id"]) == ("game-1", "7", "alice")
    assert (data["width"], data["height"]) == (128, 64)
    assert data["num_inference_steps"] == 12
    assert data["guidance_scale"] == 5.5
    assert data["seed"] == 1234
    assert data["batch_id"] == "batch-42"
    assert data["batch_size"] == 4
    assert data["gpu_id"] == 3
    assert data["worker"] == "fake-worker-3"
    assert data["host"] == "fake-host"
    assert data["queue_wait_ms"] == 12.3
    assert data["generation_ms"] == 678.9

    # The broker got exactly the validated parameters, with the request timeout.
    assert len(broker.calls) == 1
    request_id, params, timeout_s = broker.calls[0]
    assert HEX32.match(request_id)
    assert params == GenerationParams(prompt="a red fox in the snow", negative_prompt="blurry", width=128,
                                      height=64, num_inference_steps=12, guidance_scale=5.5, seed=1234)
    assert timeout_s == settings.request_timeout_s

    # The image is served at image_url, as a PNG of the requested size, and stored on disk.
    image = await client.get(f"/images/{data['image_id']}.png")
    assert image.status == 200
    assert image.headers["Content-Type"] == "image/png"
    content = await image.read()
    with Image.open(io.BytesIO(content)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (128, 64)
    assert (Path(settings.image_dir) / f"{data['image_id']}.png").read_bytes() == content


async def test_generate_defaults_and_random_seed(client: TestClient, broker: RecordingFakeBroker, settings):
    status, data, _ = await post_generate(client, {"prompt": "a lighthouse at dusk"})
    assert status == 200, data
    params = broker.params[0]
    assert (params.width, params.height) == (settings.default_width, settings.default_height) == (512, 512)
    assert params.num_inference_steps == settings.default_steps
    assert params.guidance_scale == settings.default_guidance_scale
    assert params.negative_prompt is None
    assert (data["width"], data["height"]) == (512, 512)
    assert data["num_inference_steps"] == settings.default_steps
    assert data["guidance_scale"] == settings.default_guidance_scale
    # A seed was chosen, sent to the broker and returned so the image can be reproduced.
    assert isinstance(data["seed"], int) and 0 <= data["seed"] < 2**32
    assert data["seed"] == params.seed
    assert data["game_id"] is None and data["round_id"] is None and data["player_id"] is None

    image = await client.get(f"/images/{data['image_id']}.png")
    with Image.open(io.BytesIO(await image.read())) as picture:
        assert picture.size == (512, 512)


async def test_generate_nulls_mean_defaults(client: TestClient, broker: RecordingFakeBroker, settings):
    body = {"prompt": "x", "width": None, "height": None, "num_inference_steps": None,
            "guidance_scale": None, "seed": None, "negative_prompt": None, "game_id": None}
    status, data, _ = await post_generate(client, body)
    assert status == 200, data
    params = broker.params[0]
    assert (params.width, params.height, params.num_inference_steps, params.guidance_scale) == (
        settings.default_width, settings.default_height, settings.default_steps, settings.default_guidance_scale)


async def test_random_seeds_differ_between_requests(client: TestClient, broker: RecordingFakeBroker):
    seeds = set()
    for _ in range(4):
        status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
        assert status == 200
        seeds.add(data["seed"])
    assert len(seeds) > 1


async def test_generate_image_ids_are_unique(client: TestClient):
    ids = set()
    for _ in range(3):
        status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64, "seed": 1})
        assert status == 200
        ids.add(data["image_id"])
    assert len(ids) == 3


async def test_public_base_url_used_in_image_url(tmp_path: Path, broker: RecordingFakeBroker):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), public_base_url="https://img.example.com/play/")
    client = await start_client(settings, broker)
    try:
        status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
    finally:
        await client.close()
    assert status == 200, data
    assert data["image_url"] == f"https://img.example.com/play/images/{data['image_id']}.png"


async def test_float_with_integer_value_accepted(client: TestClient, broker: RecordingFakeBroker):
    status, data, _ = await post_generate(client, {"prompt": "p", "width": 512.0, "height": 64,
                                                   "num_inference_steps": 10.0, "seed": 3.0})
    assert status == 200, data
    params = broker.params[0]
    assert (params.width, params.num_inference_steps, params.seed) == (512, 10, 3)
    assert all(type(v) is int for v in (params.width, params.num_inference_steps, params.seed))


async def test_boundary_values_accepted(client: TestClient, broker: RecordingFakeBroker, settings):
    body = {"prompt": "p" * settings.max_prompt_chars, "negative_prompt": "", "width": settings.min_image_side,
            "height": settings.min_image_side, "num_inference_steps": settings.max_inference_steps,
            "guidance_scale": 0, "seed": MAX_SEED, "game_id": "g" * MAX_ID_CHARS}
    status, data, _ = await post_generate(client, body)
    assert status == 200, data
    assert data["seed"] == MAX_SEED
    assert broker.params[0].guidance_scale == 0.0


async def test_app_starts_and_closes_the_broker_link(settings, broker: RecordingFakeBroker):
    client = await start_client(settings, broker)
    assert broker.started and not broker.closed
    await client.close()
    assert broker.closed


# --------------------------------------------------------------------------- validation over HTTP

S = GatewaySettings()  # defaults, for building bodies at collection time
OK = {"prompt": "a cat"}

INVALID_BODIES = [
    ({}, "prompt"),
    ({"negative_prompt": "x"}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a", "cat"]}, "prompt"),
    ({"prompt": "p" * (S.max_prompt_chars + 1)}, "prompt"),
    ({**OK, "negative_prompt": 5}, "negative_prompt"),
    ({**OK, "negative_prompt": "n" * (S.max_prompt_chars + 1)}, "negative_prompt"),
    ({**OK, "width": 100}, "width"),
    ({**OK, "height": 516}, "height"),
    ({**OK, "width": "512"}, "width"),
    ({**OK, "height": "512"}, "height"),
    ({**OK, "width": True}, "width"),
    ({**OK, "height": False}, "height"),
    ({**OK, "width": 512.5}, "width"),
    ({**OK, "height": 64.25}, "height"),
    ({**OK, "width": [512]}, "width"),
    ({**OK, "width": S.min_image_side - 8}, "width"),
    ({**OK, "width": 0}, "width"),
    ({**OK, "width": -512}, "width"),
    ({**OK, "height": S.min_image_side - 8}, "height"),
    ({**OK, "width": S.max_image_side + 8}, "width"),
    ({**OK, "height": S.max_image_side + 8}, "height"),
    ({**OK, "num_inference_steps": 0}, "num_inference_steps"),
    ({**OK, "num_inference_steps": -1}, "num_inference_steps"),
    ({**OK, "num_inference_steps": S.max_inference_steps + 1}, "num_inference_steps"),
    ({**OK, "num_inference_steps": "25"}, "num_inference_steps"),
    ({**OK, "num_inference_steps": 2.5}, "num_inference_steps"),
    ({**OK, "num_inference_steps": True}, "num_inference_steps"),
    ({**OK, "guidance_scale": -0.1}, "guidance_scale"),
    ({**OK, "guidance_scale": S.max_guidance_scale + 0.5}, "guidance_scale"),
    ({**OK, "guidance_scale": "7.5"}, "guidance_scale"),
    ({**OK, "guidance_scale": True}, "guidance_scale"),
    ({**OK, "seed": -1}, "seed"),
    ({**OK, "seed": MAX_SEED + 1}, "seed"),
    ({**OK, "seed": "42"}, "seed"),
    ({**OK, "seed": 4.5}, "seed"),
    ({**OK, "seed": True}, "seed"),
    ({**OK, "game_id": {"id": 1}}, "game_id"),
    ({**OK, "round_id": [1]}, "round_id"),
    ({**OK, "player_id": True}, "player_id"),
    ({**OK, "player_id": 1.5}, "player_id"),
    ({**OK, "game_id": "g" * (MAX_ID_CHARS + 1)}, "game_id"),
    ({**OK, "num_steps": 30}, "num_steps"),
    ({**OK, "Prompt": "x"}, "Prompt"),
]


@pytest.mark.parametrize("body, field", INVALID_BODIES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(INVALID_BODIES)])
async def test_invalid_body_fields(client: TestClient, broker: RecordingFakeBroker, body, field):
    status, data, response = await post_generate(client, body)
    assert_error(status, data, 400, "invalid_request", field)
    assert response.content_type == "application/json"
    assert broker.calls == []


async def test_too_many_pixels(tmp_path: Path, broker: RecordingFakeBroker):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), max_image_pixels=512 * 512)
    client = await start_client(settings, broker)
    try:
        status, data, _ = await post_generate(client, {"prompt": "p", "width": 1024, "height": 512})
        assert_error(status, data, 400, "invalid_request", "width")
        assert "pixels" in data["error"]["message"]
        status, data, _ = await post_generate(client, {"prompt": "p", "width": 512, "height": 512})
        assert status == 200, data
    finally:
        await client.close()
    assert len(broker.calls) == 1


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"prompt": "a"} trailing'],
                         ids=["broken", "empty", "not-utf8", "trailing"])
async def test_body_not_json(client: TestClient, broker: RecordingFakeBroker, raw: bytes):
    response = await client.post("/generate", data=raw, headers={"Content-Type": "application/json"})
    assert_error(response.status, await response.json(), 400, "invalid_request", None)
    assert broker.calls == []


@pytest.mark.parametrize("document", [[{"prompt": "a cat"}], "a cat", 42, None, True],
                         ids=["array", "string", "number", "null", "bool"])
async def test_body_not_an_object(client: TestClient, broker: RecordingFakeBroker, document):
    status, data, _ = await post_generate(client, document)
    assert_error(status, data, 400, "invalid_request", None)
    assert broker.calls == []


async def test_body_too_large_content_length(client: TestClient, broker: RecordingFakeBroker, settings):
    body = json.dumps({"prompt": "p" * (settings.max_request_bytes + 10)}).encode()
    response = await client.post("/generate", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert response.content_type == "application/json"
    assert_error(response.status, await response.json(), 413, "invalid_request", None)
    assert broker.calls == []


async def test_body_too_large_declared_content_length_only(client: TestClient, broker: RecordingFakeBroker):
    # Refused from the Content-Length header alone, before the body is read.
    status, headers, payload = await raw_request(
        client, "POST /generate HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                "Content-Length: 100000000\nConnection: close\n", b'{"prompt": "a"}')
    assert headers["content-type"].startswith("application/json")
    assert_error(status, json.loads(payload), 413, "invalid_request", None)
    assert broker.calls == []


async def test_body_too_large_chunked(client: TestClient, broker: RecordingFakeBroker, settings):
    chunk = b" " * 8192

    async def body():
        yield b'{"prompt": "a cat"'
        for _ in range(settings.max_request_bytes // len(chunk) + 2):
            yield chunk
            await asyncio.sleep(0)
        yield b"}"

    response = await client.post("/generate", data=body(), headers={"Content-Type": "application/json"})
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert_error(response.status, await response.json(), 413, "invalid_request", None)
    assert broker.calls == []


async def test_chunked_body_within_limit_in_many_pieces(client: TestClient, broker: RecordingFakeBroker):
    # A body that arrives in several chunks (with pauses between them) must be read whole.
    document = json.dumps({"prompt": "a cat in a hat", "width": 64, "height": 64, "seed": 5}).encode()

    async def body():
        for i in range(0, len(document), 7):
            yield document[i:i + 7]
            await asyncio.sleep(0.01)

    response = await client.post("/generate", data=body(), headers={"Content-Type": "application/json"})
    data = await response.json()
    assert response.status == 200, data
    assert broker.params[0].prompt == "a cat in a hat"


async def test_body_at_exact_size_limit_accepted(tmp_path: Path, broker: RecordingFakeBroker):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), max_request_bytes=1000)
    document = json.dumps({"prompt": "p", "width": 64, "height": 64}).encode()
    exact = document + b" " * (1000 - len(document))
    client = await start_client(settings, broker)
    try:
        response = await client.post("/generate", data=exact, headers={"Content-Type": "application/json"})
        assert response.status == 200, await response.text()
        response = await client.post("/generate", data=exact + b" ", headers={"Content-Type": "application/json"})
        assert_error(response.status, await response.json(), 413, "invalid_request", None)
    finally:
        await client.close()
    assert len(broker.calls) == 1


# --------------------------------------------------------------------------- broker failures


@pytest.mark.parametrize("code, status", [
    ("overloaded", 503),
    ("worker_lost", 503),
    ("shutting_down", 503),
    ("invalid_request", 400),
    ("generation_failed", 500),
    ("deadline_exceeded", 504),
    ("something_new", 500),
])
async def test_broker_failures(client: TestClient, broker: RecordingFakeBroker, settings, code, status):
    broker.failure = BrokerFailure(code, f"the broker says {code}")
    http_status, data, response = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
    assert_error(http_status, data, status, code)
    assert data["error"]["message"] == f"the broker says {code}"
    if status == 503:
        assert response.headers["Retry-After"] == str(settings.retry_after_s)
    else:
        assert "Retry-After" not in response.headers
    assert len(broker.calls) == 1
    assert os.listdir(settings.image_dir) == []


async def test_overloaded_retry_after_follows_settings(tmp_path: Path, broker: RecordingFakeBroker):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), retry_after_s=17)
    broker.failure = BrokerFailure("overloaded", "queue full")
    client = await start_client(settings, broker)
    try:
        status, data, response = await post_generate(client, {"prompt": "p"})
    finally:
        await client.close()
    assert_error(status, data, 503, "overloaded")
    assert response.headers["Retry-After"] == "17"


@pytest.mark.parametrize("timeout_s, accepted", [("86400", True), ("86400.5", False), ("0", False)])
def test_request_timeout_is_refused_at_start_beyond_what_the_broker_accepts(tmp_path: Path, timeout_s, accepted):
    """A deadline above a day would be refused by the broker as malformed: every request would
    then wait out REQUEST_TIMEOUT_S for nothing. So the gateway refuses the setting at start."""
    environ = {"IMAGE_DIR": str(tmp_path / "images"), "REQUEST_TIMEOUT_S": timeout_s}
    if not accepted:
        with pytest.raises(settings_lib.SettingsError, match="REQUEST_TIMEOUT_S"):
            settings_lib.load(GatewaySettings, [], environ=environ)
        return
    settings = settings_lib.load(GatewaySettings, [], environ=environ)
    frames = protocol.encode(CLIENT_LINK, Generate("r", GenerationParams("p", 64, 64, 1, 1.0, 1),
                                                   settings.request_timeout_s))
    assert protocol.decode(frames, CLIENT_LINK)[0].deadline_s == 86_400.0  # what the broker accepts


async def test_broker_timeout(client: TestClient, broker: RecordingFakeBroker, settings):
    broker.failure = "timeout"
    status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
    assert_error(status, data, 504, "timeout")
    assert os.listdir(settings.image_dir) == []


@pytest.mark.parametrize("mode", ["wrong_size", "garbage"])
async def test_bad_worker_output(client: TestClient, broker: RecordingFakeBroker, settings, mode):
    setattr(broker, mode, True)
    status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
    assert_error(status, data, 502, "bad_worker_output")
    assert os.listdir(settings.image_dir) == []


# --------------------------------------------------------------------------- stats, health, readiness


async def test_stats_passthrough(client: TestClient, broker: RecordingFakeBroker):
    broker.stats_document = {"num_gpus": 3, "nested": {"a": [1, 2, 3]}, "batches": 17, "ratio": 0.5}
    response = await client.get("/stats")
    assert response.status == 200
    assert await response.json() == broker.stats_document


async def test_stats_timeout(client: TestClient, broker: RecordingFakeBroker, settings):
    broker.stats_timeout = True
    response = await client.get("/stats")
    assert_error(response.status, await response.json(), 503, "broker_unreachable")
    assert response.headers["Retry-After"] == str(settings.retry_after_s)


async def test_healthz(client: TestClient, broker: RecordingFakeBroker):
    broker.stats_timeout = True  # liveness does not depend on the broker
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize("num_gpus", [1, 4])
async def test_readyz_ready(client: TestClient, broker: RecordingFakeBroker, num_gpus):
    broker.stats_document = {"num_gpus": num_gpus}
    response = await client.get("/readyz")
    assert response.status == 200
    data = await response.json()
    assert data["status"] == "ready" and data["workers"] == num_gpus


@pytest.mark.parametrize("document", [{"num_gpus": 0}, {}], ids=["zero", "missing"])
async def test_readyz_no_workers(client: TestClient, broker: RecordingFakeBroker, document):
    broker.stats_document = document
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] == "not_ready"


async def test_readyz_broker_timeout(client: TestClient, broker: RecordingFakeBroker):
    broker.stats_timeout = True
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] == "not_ready"


# --------------------------------------------------------------------------- images and routing


async def test_unknown_image_404(client: TestClient):
    response = await client.get(f"/images/{new_image_id()}.png")
    assert_error(response.status, await response.json(), 404, "not_found")


TRAVERSALS = [
    "/images/..%2F..%2Fetc%2Fpasswd",
    "/images/..%2F..%2Fetc%2Fpasswd.png",
    "/images/../../etc/passwd",
    "/images/..%2Fsecret.png",
    "/images/%2E%2E%2Fsecret.png",
    "/images/..%5Csecret.png",
    "/images/{id}",
    "/images/{id}.PNG",
    "/images/{ID}.png",
    "/images/{id31}.png",
    "/images/{id}0.png",
    "/images/{id}%0A.png",
    "/images/{id}.png.png",
    "/images/%2Fetc%2Fpasswd",
    "/images/",
]


@pytest.mark.parametrize("template", TRAVERSALS)
async def test_image_paths_never_leak_files(client: TestClient, settings, tmp_path: Path, template: str):
    # A real image exists (so a lax match would find something), and a secret lies outside the folder.
    status, data, _ = await post_generate(client, {"prompt": "p", "width": 64, "height": 64})
    assert status == 200
    image_id = data["image_id"]
    secret = b"TOP-SECRET-CONTENTS"
    (tmp_path / "secret.png").write_bytes(secret)
    (tmp_path / "secret").write_bytes(secret)
    path = template.format(id=image_id, ID=image_id.upper(), id31=image_id[:31])

    status, headers, payload = await raw_request(client, f"GET {path} HTTP/1.1\nHost: test\nConnection: close\n")
    assert status == 404, (path, payload)
    assert headers["content-type"].startswith("application/json")
    assert secret not in payload and b"root:" not in payload and b"PNG" not in payload[:8]
    body = json.loads(payload)
    assert body["error"]["code"] == "not_found"


async def test_unknown_route_json_404(client: TestClient):
    response = await client.get("/no/such/route")
    assert response.content_type == "application/json"
    assert_error(response.status, await response.json(), 404, "not_found", None)


async def test_get_generate_405(client: TestClient, broker: RecordingFakeBroker):
    response = await client.get("/generate")
    assert response.content_type == "application/json"
    assert_error(response.status, await response.json(), 405, "method_not_allowed", None)
    assert "POST" in response.headers.get("Allow", "")
    assert broker.calls == []


# --------------------------------------------------------------------------- ImageStore unit tests


def test_image_store_save_is_atomic(tmp_path: Path, monkeypatch):
    store = ImageStore(tmp_path / "store", max_count=10, max_age_s=3600)
    image_id = new_image_id()
    png = make_png(16, 8)
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # At the moment of the rename the full image is in a temp file in the same folder,
        # and the final name does not exist yet.
        src, dst = str(src), str(dst)
        assert Path(src).parent == store.directory
        assert Path(src).read_bytes() == png
        assert not Path(dst).exists()
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    path = store.save(image_id, png)
    assert replaced == [(replaced[0][0], str(store.directory / f"{image_id}.png"))]
    assert path == store.directory / f"{image_id}.png"
    assert path.read_bytes() == png
    assert sorted(p.name for p in store.directory.iterdir()) == [f"{image_id}.png"]  # no temp left behind


def test_image_store_save_overwrites_atomically(tmp_path: Path):
    store = ImageStore(tmp_path, max_count=10, max_age_s=3600)
    image_id = new_image_id()
    store.save(image_id, b"first")
    store.save(image_id, b"second")
    assert store.path_for(image_id).read_bytes() == b"second"
    assert os.listdir(tmp_path) == [f"{image_id}.png"]


def test_image_store_creates_directory(tmp_path: Path):
    ImageStore(tmp_path / "a" / "b", max_count=1, max_age_s=1)
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("bad", [
    "", "../etc/passwd", "..", "a" * 31, "a" * 33, "A" * 32, "g" * 32, "0" * 31 + "/",
    "0" * 32 + ".png", "0" * 32 + "\n", "\n" + "0" * 32, "0" * 16 + "/" + "0" * 15, "0" * 32 + "\x00",
])
def test_image_store_rejects_bad_ids(tmp_path: Path, bad: str):
    store = ImageStore(tmp_path, max_count=10, max_age_s=3600)
    assert store.path_for(bad) is None
    with pytest.raises(ValueError):
        store.save(bad, b"x")
    assert os.listdir(tmp_path) == []


def test_image_store_path_for_valid_id(tmp_path: Path):
    store = ImageStore(tmp_path, max_count=10, max_age_s=3600)
    image_id = new_image_id()
    assert HEX32.match(image_id)
    assert store.path_for(image_id) == tmp_path / f"{image_id}.png"


def _aged_images(store: ImageStore, ages_s: list[float], now: float) -> list[Path]:
    paths = []
    for age in ages_s:
        path = store.save(new_image_id(), b"png")
        os.utime(path, (now - age, now - age))
        paths.append(path)
    return paths


def test_prune_removes_images_older_than_max_age(tmp_path: Path):
    now = time.time()
    store = ImageStore(tmp_path, max_count=100, max_age_s=3600)
    old1, fresh1, old2, fresh2 = _aged_images(store, [7200, 10, 3601, 3500], now)
    (tmp_path / "notes.txt").write_text("not an image")
    os.utime(tmp_path / "notes.txt", (now - 99999, now - 99999))
    assert store.prune(now=now) == 2
    assert not old1.exists() and not old2.exists()
    assert fresh1.exists() and fresh2.exists()
    assert (tmp_path / "notes.txt").exists()  # only .png files are pruned


def test_prune_removes_oldest_beyond_max_count(tmp_path: Path):
    now = time.time()
    store = ImageStore(tmp_path, max_count=2, max_age_s=3600)
    paths = _aged_images(store, [50, 10, 40, 20, 30], now)  # oldest first: 50, 40, 30, 20, 10
    assert store.prune(now=now) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths[1].name, paths[3].name])


def test_prune_age_and_count_together(tmp_path: Path):
    now = time.time()
    store = ImageStore(tmp_path, max_count=2, max_age_s=100)
    expired, a, b, c = _aged_images(store, [500, 30, 20, 10], now)
    assert store.prune(now=now) == 2  # one by age, then one more to get down to max_count
    assert not expired.exists() and not a.exists()
    assert b.exists() and c.exists()
    assert store.prune(now=now) == 0


def test_prune_nothing_to_do(tmp_path: Path):
    now = time.time()
    store = ImageStore(tmp_path, max_count=5, max_age_s=3600)
    assert store.prune(now=now) == 0
    paths = _aged_images(store, [1, 2, 3], now)
    assert store.prune() == 0
    assert all(p.exists() for p in paths)


@pytest.mark.parametrize("size", [(1, 1), (64, 128), (512, 512), (1000, 8)])
def test_png_size_of_real_png(size):
    assert png_size(make_png(*size)) == size


@pytest.mark.parametrize("data", [
    b"", b"garbage", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 16,
    b"GIF89a" + b"\x00" * 40,
])
def test_png_size_garbage(data):
    assert png_size(data) is None


def test_png_size_of_other_format():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
    assert png_size(buffer.getvalue()) is None


# --------------------------------------------------------------------------- parse_generate_request


def test_parse_defaults_with_deterministic_seed():
    settings = GatewaySettings()
    parsed = parse_generate_request({"prompt": "a cat"}, settings, rng=random.Random(0))
    assert parsed.params == GenerationParams(
        prompt="a cat", width=settings.default_width, height=settings.default_height,
        num_inference_steps=settings.default_steps, guidance_scale=settings.default_guidance_scale,
        seed=random.Random(0).randrange(0, 2**32), negative_prompt=None)
    assert (parsed.game_id, parsed.round_id, parsed.player_id) == (None, None, None)
    again = parse_generate_request({"prompt": "a cat"}, settings, rng=random.Random(0))
    assert again.params.seed == parsed.params.seed


def test_parse_given_values_and_conversions():
    settings = GatewaySettings()
    parsed = parse_generate_request(
        {"prompt": "p", "negative_prompt": "n", "width": 768.0, "height": 256, "num_inference_steps": 30,
         "guidance_scale": 3, "seed": 0, "game_id": 12, "round_id": "r", "player_id": "pl"},
        settings, rng=random.Random(0))
    params = parsed.params
    assert (params.width, params.height, params.num_inference_steps, params.seed) == (768, 256, 30, 0)
    assert params.guidance_scale == 3.0 and isinstance(params.guidance_scale, float)
    assert params.negative_prompt == "n"
    assert (parsed.game_id, parsed.round_id, parsed.player_id) == ("12", "r", "pl")


def test_parse_respects_custom_settings():
    settings = GatewaySettings(max_prompt_chars=10, min_image_side=128, max_image_side=256,
                               max_image_pixels=256 * 128, max_inference_steps=5, max_guidance_scale=2.0,
                               default_width=128, default_height=128, default_steps=4,
                               default_guidance_scale=1.0)
    settings.validate()
    parse_generate_request({"prompt": "p" * 10, "width": 256, "height": 128, "num_inference_steps": 5,
                            "guidance_scale": 2.0}, settings)
    for body, field in [({"prompt": "p" * 11}, "prompt"), ({"prompt": "p", "width": 120}, "width"),
                        ({"prompt": "p", "width": 264}, "width"), ({"prompt": "p", "width": 256, "height": 256}, "width"),
                        ({"prompt": "p", "num_inference_steps": 6}, "num_inference_steps"),
                        ({"prompt": "p", "guidance_scale": 2.01}, "guidance_scale")]:
        with pytest.raises(FieldError) as info:
            parse_generate_request(body, settings)
        assert info.value.field == field, body
        assert info.value.status == 400


@pytest.mark.parametrize("body, field", INVALID_BODIES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(INVALID_BODIES)])
def test_parse_invalid(body, field):
    with pytest.raises(FieldError) as info:
        parse_generate_request(body, S, rng=random.Random(0))
    assert info.value.field == field
    assert info.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["width", "num_inference_steps", "guidance_scale", "seed"])
def test_parse_rejects_non_finite_numbers(field, value):
    # Python's json module accepts NaN and Infinity, so these can arrive from a client.
    with pytest.raises(FieldError) as info:
        parse_generate_request({"prompt": "p", field: value}, S)
    assert info.value.field == field


@pytest.mark.parametrize("body", [[], "x", 1, None, [{"prompt": "p"}]])
def test_parse_non_object(body):
    with pytest.raises(FieldError) as info:
        parse_generate_request(body, S)
    assert info.value.field is None
