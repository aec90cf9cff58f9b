"""Optional API keys on the gateway (gateway/auth.py, GATEWAY_API_KEYS, GATEWAY_API_KEYS_FILE).

The gateway runs in-process on aiohttp's TestServer (``start_gateway``, tests/integration/conftest.py) with a
`RecordingFakeBroker` (tests/support/fake_brokers.py), a FAKE in place of the ZeroMQ broker link: it draws a PNG with
PIL and talks to no broker. What is under test is only the HTTP layer's authentication, so these tests need no
broker, worker, GPU or model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.auth import api_key_middleware, load_api_keys
from gateway.config import GatewaySettings
from imagegen import settings as settings_lib
from imagegen.settings import SettingsError
from tests.support.fake_brokers import RecordingFakeBroker

ENV_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-fedcba9876543210"
OTHER_KEY = "not-a-key-0000000000000000"


BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 2}


def load(tmp_path: Path, **environ: str) -> GatewaySettings:
    return settings_lib.load(GatewaySettings, [], environ={"IMAGE_DIR": str(tmp_path / "images"), **environ})


def key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "api-keys.txt"
    path.write_text(text)
    return str(path)


@pytest.fixture
async def secured(tmp_path, start_gateway) -> tuple[TestClient, RecordingFakeBroker]:
    path = key_file(tmp_path, f"# keys for the game servers\n\n  {FILE_KEY}  \n# retired: {OTHER_KEY}\n")
    return await start_gateway(load(tmp_path, GATEWAY_API_KEYS=f" {ENV_KEY} ,", GATEWAY_API_KEYS_FILE=path))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def assert_unauthorized(response) -> None:
    assert response.status == 401, await response.text()
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized", body
    assert body["error"]["field"] is None and body["error"]["message"], body


# --------------------------------------------------------------------------- no keys


async def test_without_keys_no_authentication_is_needed(tmp_path, start_gateway):
    settings = load(tmp_path, GATEWAY_API_KEYS=" , ")  # empty entries only: no keys
    assert load_api_keys(settings) == frozenset()
    client, broker = await start_gateway(settings)
    response = await client.post("/generate", json=BODY)
    assert response.status == 200, await response.text()
    assert (await client.get("/stats")).status == 200
    # A header nobody asked for changes nothing.
    assert (await client.post("/generate", json=BODY, headers=bearer(OTHER_KEY))).status == 200
    assert len(broker.calls) == 2


def test_the_middleware_refuses_an_empty_key_set():
    with pytest.raises(ValueError):
        api_key_middleware(frozenset())


# --------------------------------------------------------------------------- keys configured


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": f"Bearer {OTHER_KEY}"},
    {"Authorization": f"Bearer {ENV_KEY[:-1]}"},
    {"Authorization": f"Bearer {ENV_KEY}x"},
    {"Authorization": f"Basic {ENV_KEY}"},
    {"Authorization": "Basic ZW52LWtleTpzZWNyZXQ="},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer    "},
    {"Authorization": ENV_KEY},
    {"Authorization": ""},
    {"X-API-Key": ENV_KEY},
], ids=["none", "wrong-key", "prefix", "suffix", "basic-key", "basic", "bearer-empty", "bearer-blank",
        "no-scheme", "empty-header", "other-header"])
async def test_generate_and_stats_without_a_valid_key_answer_401_json(secured, headers):
    client, broker = secured
    await assert_unauthorized(await client.post("/generate", json=BODY, headers=headers))
    await assert_unauthorized(await client.get("/stats", headers=headers))
    assert len(broker.calls) == 0


@pytest.mark.parametrize("key", [ENV_KEY, FILE_KEY], ids=["from-env", "from-file"])
async def test_either_configured_key_is_accepted(secured, key):
    client, broker = secured
    response = await client.post("/generate", json=BODY, headers=bearer(key))
    assert response.status == 200, await response.text()
    assert (await client.get("/stats", headers=bearer(key))).status == 200
    # The scheme is case-insensitive (RFC 7235).
    assert (await client.get("/stats", headers={"Authorization": f"bearer {key}"})).status == 200
    assert len(broker.calls) == 1


async def test_a_commented_out_key_is_not_a_key(secured):
    client, _ = secured
    await assert_unauthorized(await client.get("/stats", headers=bearer(OTHER_KEY)))
    await assert_unauthorized(await client.get("/stats", headers=bearer(f"# retired: {OTHER_KEY}")))


async def test_exempt_routes_need_no_key(secured):
    client, _ = secured
    made = await client.post("/generate", json=BODY, headers=bearer(ENV_KEY))
    image_url = (await made.json())["image_url"]
    image_path = image_url[image_url.index("/images/"):]
    for path in ("/healthz", "/readyz", image_path):
        response = await client.get(path)
        assert response.status == 200, (path, await response.text())
        assert (await client.head(path)).status == 200, path
    # An image that does not exist is a 404, not a 401: /images/ is exempt whatever the name.
    assert (await client.get("/images/" + "0" * 32 + ".png")).status == 404


async def test_openapi_json_needs_no_key(tmp_path):
    app = create_app(load(tmp_path, GATEWAY_API_KEYS=ENV_KEY), broker_client=RecordingFakeBroker())
    if not any(resource.canonical == "/openapi.json" for resource in app.router.resources()):
        # gateway.app does not serve it (yet): a stand-in route, to test the exemption itself.
        async def openapi(request):
            return web.json_response({"openapi": "3.1.0"})
        app.router.add_get("/openapi.json", openapi)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        response = await client.get("/openapi.json")
        assert response.status == 200, await response.text()
    finally:
        await client.close()


async def test_exemption_is_by_route_and_method_not_by_path_prefix(secured):
    client, broker = secured
    await assert_unauthorized(await client.post("/healthz"))  # wrong method on an exempt path
    await assert_unauthorized(await client.post("/images/x.png"))
    # Sent byte for byte (a client library would normalise these paths before sending).
    for path in ("/images/../stats", "/images/%2e%2e/stats", "/images/..%2fstats", "/healthz/../stats",
                 "//stats", "/stats/", "/healthz/../generate"):
        status = await raw_status(client, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status in (b"401", b"404"), (path, status)
    assert len(broker.calls) == 0


async def test_unknown_routes_answer_401_without_a_key_and_json_404_405_with_one(secured):
    client, _ = secured
    await assert_unauthorized(await client.get("/no-such-route"))
    await assert_unauthorized(await client.get("/generate"))
    response = await client.get("/no-such-route", headers=bearer(ENV_KEY))
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    response = await client.get("/generate", headers=bearer(ENV_KEY))
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def raw_status(client: TestClient, request: bytes) -> bytes:
    """Send exactly these bytes; returns the status code of the answer."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return status_line.split()[1]


async def test_a_non_ascii_token_is_refused_not_a_server_error(secured):
    client, _ = secured
    status = await raw_status(client, b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      b"Authorization: Bearer \xc3\xa9t\xc3\xa9-\xff\xfe-0123456789abcdef\r\n\r\n")
    assert status in (b"400", b"401"), status


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("environ, variable", [
    ({"GATEWAY_API_KEYS": "short-key"}, "GATEWAY_API_KEYS"),
    ({"GATEWAY_API_KEYS": f"{ENV_KEY},fifteen-chars-x"}, "GATEWAY_API_KEYS"),
    ({"GATEWAY_API_KEYS": "sixteen chars ok"}, "GATEWAY_API_KEYS"),  # a space cannot travel in the header
], ids=["short", "one-of-two-short", "space"])
def test_bad_keys_are_refused_at_settings_load_naming_the_variable(tmp_path, environ, variable):
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, **environ)
    assert variable in str(caught.value)
    assert "fifteen-chars-x" not in str(caught.value) and "short-key" not in str(caught.value)


def test_a_short_key_in_the_file_is_refused_naming_the_file_variable_and_line(tmp_path):
    path = key_file(tmp_path, f"{FILE_KEY}\n# comment\ntoo-short\n")
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, GATEWAY_API_KEYS_FILE=path)
    assert "GATEWAY_API_KEYS_FILE" in str(caught.value) and "line 3" in str(caught.value)
    assert "too-short" not in str(caught.value)


@pytest.mark.parametrize("text", [None, "", "# only a comment\n\n"], ids=["missing", "empty", "comments-only"])
def test_a_key_file_that_is_missing_or_holds_no_key_is_refused(tmp_path, text):
    path = str(tmp_path / "absent.txt") if text is None else key_file(tmp_path, text)
    with pytest.raises(SettingsError, match="GATEWAY_API_KEYS_FILE"):
        load(tmp_path, GATEWAY_API_KEYS_FILE=path)


def test_keys_are_combined_and_never_shown_in_the_start_up_log(tmp_path):
    path = key_file(tmp_path, f"{FILE_KEY}\n")
    settings = load(tmp_path, GATEWAY_API_KEYS=f"{ENV_KEY},{ENV_KEY}2", GATEWAY_API_KEYS_FILE=path)
    assert load_api_keys(settings) == {ENV_KEY, f"{ENV_KEY}2", FILE_KEY}
    shown = settings_lib.describe(settings) + repr(settings)
    assert ENV_KEY not in shown and FILE_KEY not in shown
    assert "<2 API keys, redacted>" in shown


def test_keys_can_be_given_as_a_flag(tmp_path):
    settings = settings_lib.load(GatewaySettings, ["--gateway-api-keys", ENV_KEY], environ={})
    assert load_api_keys(settings) == {ENV_KEY}
