"""The request's ``model`` through the gateway's HTTP routes, in one process (the fake broker link
of tests/support/fake_brokers.py): passed on to the broker, the broker's unknown_model and
model_required answered 400 naming the field on both routes, the answer naming the model that drew."""

from __future__ import annotations

import pytest

from gateway.broker_client import BrokerFailure
from tests.support.fake_brokers import RecordingFakeBroker


@pytest.mark.parametrize("code", ["unknown_model", "model_required"])
async def test_both_routes_answer_a_model_refusal_400_naming_the_field(client, broker: RecordingFakeBroker,
                                                                        code: str):
    broker.failure = BrokerFailure(code, "models served: tiny, tiny-sdxl")
    response = await client.post("/generate", json={"prompt": "a cat", "model": "sd15"})
    assert response.status == 400
    assert (await response.json())["error"] == {"code": code, "message": "models served: tiny, tiny-sdxl",
                                                "field": "model"}
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "model": "sd15"})
    error = (await response.json())["error"]
    assert response.status == 400 and (error["code"], error["param"], error["type"]) == (
        code, "model", "invalid_request_error")


async def test_the_model_goes_to_the_broker_and_the_answer_names_the_model_that_drew(
        client, broker: RecordingFakeBroker):
    broker.RESULT = {**RecordingFakeBroker.RESULT, "model": "tiny-sdxl"}
    response = await client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64,
                                                    "model": "tiny-sdxl"})
    assert response.status == 200 and (await response.json())["model"] == "tiny-sdxl"
    assert broker.params[0].model == "tiny-sdxl"
    response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64",
                                                                 "model": "dall-e-3"})
    assert response.status == 200
    assert (broker.params[1].model, broker.params[1].model_fallback) == ("dall-e-3", True)


async def test_an_answer_from_a_broker_that_names_no_model_says_null(client, broker: RecordingFakeBroker):
    response = await client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64})
    assert response.status == 200 and (await response.json())["model"] is None
