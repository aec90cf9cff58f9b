"""Priorities and API keys' allowances at the gateway (gateway/validation.py, gateway/key_policies.py,
gateway/auth.py ranking_of): the ``priority`` field on POST /generate, POST /v1/jobs and
/v1/images/generations, the keys' max_priority= and share= options checked at start, 403 above a
key's allowance, and what goes to the broker (priority, owner from the key, share). The gateway runs
on aiohttp's test server with a fake broker link (tests/support/fake_brokers.py,
tests/support/fake_job_broker.py); the broker's side is tests/unit/test_priorities.py and
tests/integration/test_priorities_sockets.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import ApiKeys, GatewaySettings, configured_key_policies
from gateway.key_policies import KeyPolicy, key_name
from gateway.metrics import ClusterCollector
from gateway.openapi import openapi_document
from imagegen import settings as settings_lib
from imagegen.settings import SettingsError
from tests.support.fake_job_broker import JobFakeBroker

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 2}
PLAIN = "plain-key-0123456789abcdef"
URGENT = "urgent-key-0123456789abcdef"
LOWLY = "lowly-key-0123456789abcdef"


def keyed(tmp_path: Path, **fields) -> GatewaySettings:
    keys = ApiKeys([PLAIN, f"{URGENT} max_priority=high share=3", f"{LOWLY}   max_priority=low"])
    return GatewaySettings(image_dir=str(tmp_path / "images"), state_dir=str(tmp_path / "state"),
                           api_keys=keys, progress_event_interval_s=0.0, **fields)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def jobs_gateway():
    started: list[TestClient] = []

    async def start(settings: GatewaySettings) -> tuple[TestClient, JobFakeBroker]:
        broker = JobFakeBroker()
        client = TestClient(TestServer(create_app(settings, broker_client=broker)))
        await client.start_server()
        started.append(client)
        return client, broker

    yield start
    for client in started:
        await client.close()


# --------------------------------------------------------------------------- the key configuration


def load(tmp_path: Path, **environ: str) -> GatewaySettings:
    return settings_lib.load(GatewaySettings, [], environ={"IMAGE_DIR": str(tmp_path / "images"), **environ})


def test_a_plain_key_may_use_normal_at_most_with_share_one(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the web front end\n{URGENT} max_priority=high share=2.5\n\n{LOWLY} share=0.5\n")
    policies = configured_key_policies(load(tmp_path, GATEWAY_API_KEYS=f"{PLAIN}, {URGENT} share=2.5 "
                                            "max_priority=high", GATEWAY_API_KEYS_FILE=str(keys_file)))
    assert policies == {PLAIN: KeyPolicy("normal", 1.0), URGENT: KeyPolicy("high", 2.5), LOWLY: KeyPolicy("normal", 0.5)}
    assert not policies[PLAIN].allows("high") and policies[PLAIN].allows("low")


@pytest.mark.parametrize("entry, words", [
    (f"{PLAIN} max_priority=urgent", ["max_priority='urgent'", "one of high, normal, low"]),
    (f"{PLAIN} share=0", ["share='0'", "from 0.01 to 1000"]),
    (f"{PLAIN} share=lots", ["share='lots'"]),
    (f"{PLAIN} share=nan", ["share='nan'"]),
    (f"{PLAIN} priority=high", ["'priority=high'", "options: max_priority, share"]),
    (f"{PLAIN} share=1 share=2", ["gives share twice"]),
    (f"{PLAIN} max_priority=high,{PLAIN}", ["listed twice", key_name(PLAIN)]),
])
def test_a_wrong_key_option_stops_the_gateway_at_start_naming_it(tmp_path, entry, words):
    with pytest.raises(SettingsError) as raised:
        load(tmp_path, GATEWAY_API_KEYS=entry).validate()
    message = str(raised.value)
    assert "GATEWAY_API_KEYS" in message and all(word in message for word in words), message
    assert PLAIN not in message  # the key itself is never shown


def test_a_wrong_option_in_the_keys_file_names_its_line(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{PLAIN}\n{URGENT} max_priority=top\n")
    with pytest.raises(SettingsError) as raised:
        load(tmp_path, GATEWAY_API_KEYS_FILE=str(keys_file)).validate()
    assert "GATEWAY_API_KEYS_FILE" in str(raised.value) and "line 2" in str(raised.value)


# --------------------------------------------------------------------------- the priority field


@pytest.mark.parametrize("value", ["urgent", "HIGH", 1, True, ["high"]])
async def test_an_unknown_priority_is_refused_naming_the_allowed_values(start_gateway, value):
    client, broker = await start_gateway()
    for path in ("/generate", "/v1/jobs"):
        response = await client.post(path, json={**BODY, "priority": value})
        body = await response.json()
        assert response.status == 400, (path, body)
        assert body["error"]["code"] == "invalid_request" and body["error"]["field"] == "priority", body
        assert "high, normal, low" in body["error"]["message"]
    response = await client.post("/v1/images/generations", json={"prompt": "a fox", "priority": value})
    body = await response.json()
    assert response.status == 400 and body["error"]["param"] == "priority", body
    assert "high, normal, low" in body["error"]["message"]
    assert not broker.calls


async def test_without_keys_every_priority_goes_to_the_broker_without_an_owner(start_gateway):
    client, broker = await start_gateway()
    for priority in ("high", "low", None):
        response = await client.post("/generate", json={**BODY, "priority": priority})
        assert response.status == 200, await response.text()
    assert (await client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2,
                                                              "priority": "high"})).status == 200
    assert broker.rankings == [{"priority": "high", "owner": "", "share": 1.0},
                               {"priority": "low", "owner": "", "share": 1.0},
                               {"priority": "normal", "owner": "", "share": 1.0},
                               {"priority": "high", "owner": "", "share": 1.0},
                               {"priority": "high", "owner": "", "share": 1.0}]


async def test_a_key_above_its_allowance_gets_403_naming_the_highest_allowed(tmp_path, start_gateway):
    client, broker = await start_gateway(keyed(tmp_path))
    for key, priority, allowed in ((PLAIN, "high", "normal"), (LOWLY, "normal", "low")):
        response = await client.post("/generate", json={**BODY, "priority": priority}, headers=bearer(key))
        body = await response.json()
        assert response.status == 403, body
        assert body["error"]["code"] == "priority_not_allowed" and body["error"]["field"] == "priority"
        assert f"priority {allowed!r} at most" in body["error"]["message"], body
    response = await client.post("/v1/images/generations", json={"prompt": "a fox", "priority": "high"},
                                 headers=bearer(PLAIN))
    body = await response.json()
    assert response.status == 403 and body["error"]["code"] == "priority_not_allowed", body
    assert body["error"]["param"] == "priority" and body["error"]["type"] == "invalid_request_error"
    assert not broker.calls


async def test_the_owner_and_share_come_from_the_key_never_from_the_body(tmp_path, start_gateway):
    client, broker = await start_gateway(keyed(tmp_path))
    assert (await client.post("/generate", json={**BODY, "priority": "high"}, headers=bearer(URGENT))).status == 200
    assert (await client.post("/generate", json=BODY, headers=bearer(PLAIN))).status == 200
    assert (await client.post("/generate", json={**BODY, "priority": "low"}, headers=bearer(LOWLY))).status == 200
    assert broker.rankings == [{"priority": "high", "owner": key_name(URGENT), "share": 3.0},
                               {"priority": "normal", "owner": key_name(PLAIN), "share": 1.0},
                               {"priority": "low", "owner": key_name(LOWLY), "share": 1.0}]
    # A body naming an owner is refused like any unknown field.
    response = await client.post("/generate", json={**BODY, "owner": "key-someone-else"}, headers=bearer(URGENT))
    assert response.status == 400 and (await response.json())["error"]["field"] == "owner"


async def test_jobs_carry_their_priority_to_the_broker_and_show_it_in_their_status(tmp_path, jobs_gateway):
    client, broker = await jobs_gateway(keyed(tmp_path))
    refused = await client.post("/v1/jobs", json={**BODY, "priority": "high"}, headers=bearer(PLAIN))
    assert refused.status == 403 and (await refused.json())["error"]["code"] == "priority_not_allowed"
    accepted = await client.post("/v1/jobs", json={**BODY, "priority": "high"}, headers=bearer(URGENT))
    assert accepted.status == 202, await accepted.text()
    job = await accepted.json()
    plain = await (await client.post("/v1/jobs", json=BODY, headers=bearer(PLAIN))).json()
    await broker.wait_for_requests(2)
    assert [broker.rankings[rid] for rid in broker.order] == [
        {"priority": "high", "owner": key_name(URGENT), "share": 3.0},
        {"priority": "normal", "owner": key_name(PLAIN), "share": 1.0}]
    status = await (await client.get(f"/v1/jobs/{job['id']}", headers=bearer(URGENT))).json()
    assert status["priority"] == "high"
    status = await (await client.get(f"/v1/jobs/{plain['id']}", headers=bearer(PLAIN))).json()
    assert status["priority"] == "normal"


def test_the_openapi_document_describes_priority(tmp_path):
    document = openapi_document(GatewaySettings(image_dir=str(tmp_path)))
    schemas, paths = document["components"]["schemas"], document["paths"]
    assert schemas["GenerateRequest"]["properties"]["priority"]["enum"] == ["high", "normal", "low", None]
    assert schemas["ImagesRequest"]["properties"]["priority"]["enum"] == ["high", "normal", "low", None]
    assert "priority" in schemas["Job"]["required"]
    for path in ("/generate", "/v1/jobs", "/v1/images/generations"):
        assert "403" in paths[path]["post"]["responses"], path


def test_metrics_name_every_configured_key_and_no_other_owner():
    stats = {"priorities": {"high": {"requests": 3, "dispatched": 2, "queue_wait_seconds": 1.5, "queued": 1}},
             "fair_share": {"owners": {"key-a": {"gpu_seconds": 12.5, "recent_gpu_seconds": 4.0, "queued": 2},
                                       "key-stranger": {"gpu_seconds": 99.0}}}}
    families = {f.name: f for f in ClusterCollector(stats, frozenset({"key-a", "key-b"})).collect()}
    seconds = {s.labels["owner"]: s.value for s in families["imagegen_owner_gpu_seconds"].samples
               if s.name.endswith("_total")}
    assert seconds == {"key-a": 12.5, "key-b": 0.0}
    requests = {s.labels["priority"]: s.value for s in families["imagegen_priority_requests"].samples
                if s.name.endswith("_total")}
    assert requests == {"high": 3.0, "normal": 0.0, "low": 0.0}
    waits = {s.labels["priority"]: s.value for s in families["imagegen_priority_queue_wait_seconds"].samples
             if s.name.endswith("_total")}
    assert waits["high"] == 1.5
    # Without API keys: no owner series at all.
    assert "imagegen_owner_gpu_seconds" not in {f.name for f in ClusterCollector(stats).collect()}
