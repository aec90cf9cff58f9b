"""The gateway's edge in one process: where it may listen (the settings' checks), and the answers to
unknown paths, wrong methods, odd OpenAI sizes and links in the image folder, on aiohttp's test
server. Real gateway processes against slow clients and connection floods: tests/e2e/test_gateway_edge.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from imagegen import settings as settings_lib
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client

KEY = "k" * 24


# --------------------------------------------------------------------------- where it listens


def test_default_host_is_loopback():
    assert GatewaySettings().host == "127.0.0.1"
    assert settings_lib.load(GatewaySettings, [], environ={}).host == "127.0.0.1"


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                           ("", False), ("::", False), ("10.0.0.5", False),
                                           ("gateway.example", False)])
def test_is_loopback(host, loopback):
    from gateway.config import is_loopback

    assert is_loopback(host) is loopback


def test_all_interfaces_without_keys_is_refused_naming_the_fix():
    with pytest.raises(settings_lib.SettingsError) as caught:
        settings_lib.load(GatewaySettings, [], environ={"GATEWAY_HOST": "0.0.0.0"})
    message = str(caught.value)
    assert message.startswith("GATEWAY_HOST")
    assert "GATEWAY_API_KEYS" in message and "GATEWAY_ALLOW_UNAUTHENTICATED=true" in message
    # Either fix lets it start.
    settings_lib.load(GatewaySettings, [], environ={"GATEWAY_HOST": "0.0.0.0", "GATEWAY_API_KEYS": KEY})
    settings_lib.load(GatewaySettings, [], environ={"GATEWAY_HOST": "0.0.0.0",
                                                    "GATEWAY_ALLOW_UNAUTHENTICATED": "true"})


# --------------------------------------------------------------------------- every answer in JSON


async def test_unknown_path_lists_the_endpoints(client):
    response = await client.get("/no/such/route")
    body = await response.json()
    assert response.status == 404 and body["error"]["code"] == "not_found"
    message = body["error"]["message"]
    assert "/no/such/route" in message
    for endpoint in ("POST /generate", "GET /stats", "GET /readyz", "POST /v1/images/generations"):
        assert endpoint in message, message


async def test_wrong_method_names_the_allowed_ones(client):
    response = await client.delete("/generate")
    body = await response.json()
    assert response.status == 405 and response.headers["Allow"] == "POST"
    assert body["error"]["code"] == "method_not_allowed"
    assert "DELETE" in body["error"]["message"] and "allowed: POST" in body["error"]["message"], body
    response = await client.put("/stats")
    assert "GET" in response.headers["Allow"] and "GET" in (await response.json())["error"]["message"]


async def test_openai_paths_answer_in_openai_shape(client):
    response = await client.get("/v1/images/edits")
    body = await response.json()
    assert response.status == 404 and set(body["error"]) == {"message", "type", "param", "code"}, body
    response = await client.get("/v1/images/generations")
    body = await response.json()
    assert response.status == 405 and body["error"]["type"] == "invalid_request_error"
    assert "allowed: POST" in body["error"]["message"]


# --------------------------------------------------------------------------- images and sizes


async def test_a_symbolic_link_in_the_image_folder_is_never_followed(client, tmp_path: Path):
    response = await client.post("/generate", json={"prompt": "p", "width": 64, "height": 64})
    real_id = (await response.json())["image_id"]
    folder = tmp_path / "images"
    assert (await client.get(f"/images/{real_id}.png")).status == 200
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET")
    outside, inside = "a" * 32, "b" * 32
    (folder / f"{outside}.png").symlink_to(secret)
    (folder / f"{inside}.png").symlink_to(folder / f"{real_id}.png")  # even to a real image
    (folder / f"{'c' * 32}.png").mkdir()  # not a regular file
    for image_id in (outside, inside, "c" * 32):
        response = await client.get(f"/images/{image_id}.png")
        payload = await response.read()
        assert response.status == 404, payload
        assert b"TOP-SECRET" not in payload and json.loads(payload)["error"]["code"] == "not_found"


@pytest.mark.parametrize("size", ["64x64\n", "64x64\r\n", "\n64x64", " 64x64", "64x64 ", "64X64", "x64", "64x"])
async def test_openai_size_must_be_exactly_widthxheight(client, size):
    response = await client.post("/v1/images/generations", json={"prompt": "p", "size": size})
    body = await response.json()
    assert response.status == 400 and body["error"]["param"] == "size", body
    assert "WIDTHxHEIGHT" in body["error"]["message"]


@pytest.mark.parametrize("size,bound", [("1000000x5", "MIN_IMAGE_SIDE..MAX_IMAGE_SIDE"),
                                        ("64x9999999", "MIN_IMAGE_SIDE..MAX_IMAGE_SIDE"),
                                        ("100x64", "multiple of 8"),
                                        ("2048x2048", None)])
async def test_openai_size_out_of_bounds_names_the_bound(client, size, bound):
    response = await client.post("/v1/images/generations", json={"prompt": "p", "size": size})
    body = await response.json()
    if bound is None:
        assert response.status == 200, body
        return
    assert response.status == 400 and body["error"]["param"] == "size", body
    message = body["error"]["message"]
    assert bound in message and size in message and "WIDTHxHEIGHT" not in message, message


async def test_too_many_pixels_names_max_image_pixels(tmp_path: Path):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), max_image_pixels=128 * 128)
    client = await start_client(settings, RecordingFakeBroker())
    try:
        response = await client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"})
        body = await response.json()
        assert response.status == 400 and "MAX_IMAGE_PIXELS" in body["error"]["message"], body
    finally:
        await client.close()
