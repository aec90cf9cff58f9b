"""The request's ``model`` field as the gateway reads it (pure): POST /generate's validator passes it
on, or refuses it naming the field; the OpenAI route marks its ``model`` as one to fall back from
(imagegen/protocol.py GenerationParams.model_fallback); a model refusal is answered 400 naming it."""

from __future__ import annotations

import pytest

from gateway.answers import broker_failure_answer
from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.openai_api import parse_images_request
from gateway.validation import FieldError, parse_generate_request

SETTINGS = GatewaySettings()


def test_generate_passes_the_model_on_and_leaves_it_out_when_absent():
    params = parse_generate_request({"prompt": "a cat", "model": "tiny-sdxl"}, SETTINGS).params
    assert (params.model, params.model_fallback) == ("tiny-sdxl", False)
    assert parse_generate_request({"prompt": "a cat", "model": None}, SETTINGS).params.model is None
    assert parse_generate_request({"prompt": "a cat"}, SETTINGS).params.model is None


@pytest.mark.parametrize("model", [3, "", ["tiny"], "x" * 1025, "\ud800"])
def test_a_bad_model_is_refused_naming_the_field(model):
    with pytest.raises(FieldError) as refused:
        parse_generate_request({"prompt": "a cat", "model": model}, SETTINGS)
    assert refused.value.field == "model"


def test_the_openai_route_falls_back_from_names_the_cluster_does_not_serve():
    images = parse_images_request({"prompt": "a cat", "n": 2, "model": "dall-e-3"}, SETTINGS).images
    assert {(i.model, i.model_fallback) for i in images} == {("dall-e-3", True)}
    assert parse_images_request({"prompt": "a cat", "model": ""}, SETTINGS).images[0].model is None


@pytest.mark.parametrize("code", ["unknown_model", "model_required"])
def test_a_model_refusal_is_400_naming_the_field(code):
    answer = broker_failure_answer(BrokerFailure(code, "models served: tiny, tiny-sdxl"), SETTINGS)
    assert (answer.status, answer.code, answer.field, answer.headers()) == (400, code, "model", None)
