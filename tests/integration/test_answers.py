"""POST /generate and POST /v1/images/generations answer alike (gateway/answers.py): the same status,
code, message and Retry-After for every way of failing, each in its own JSON shape, and the same
image URL for an image kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.answers import FAILURE_FIELD, FAILURE_STATUS, UNKNOWN_FAILURE_STATUS, ErrorAnswer, broker_failure_answer
from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.images import StorageFailure, StorageUnavailable
from gateway.openai_api import openai_param
from imagegen.protocol import FailureCode
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client

BODY = {"prompt": "a lighthouse", "width": 64, "height": 64}
OPENAI_BODY = {"prompt": "a lighthouse", "size": "64x64"}


def test_every_failure_code_has_a_status():
    assert set(FAILURE_STATUS) == {code.value for code in FailureCode}


@pytest.mark.parametrize("code", [*FAILURE_STATUS, "something_new"])
def test_a_broker_failure_keeps_its_code_and_message_and_only_a_503_says_when_to_retry(code):
    answer = broker_failure_answer(BrokerFailure(code, "why", retry_after_s=2.5), GatewaySettings())
    assert (answer.status, answer.code, answer.message) == (FAILURE_STATUS.get(code, UNKNOWN_FAILURE_STATUS),
                                                            code, "why")
    assert answer.headers() == ({"Retry-After": "3"} if answer.status == 503 else None)


def test_without_the_brokers_estimate_retry_after_is_the_setting():
    answer = broker_failure_answer(BrokerFailure("overloaded", "full"), GatewaySettings(retry_after_s=11))
    assert answer == ErrorAnswer(503, "overloaded", "full", 11)


async def both_answers(tmp_path: Path, broker: RecordingFakeBroker, **settings) -> tuple:
    """(status, body, Retry-After) of /generate, then of /v1/images/generations."""
    client = await start_client(GatewaySettings(image_dir=str(tmp_path / "images"), **settings), broker)
    try:
        answers = []
        for path, body in (("/generate", BODY), ("/v1/images/generations", OPENAI_BODY)):
            response = await client.post(path, json=body)
            answers.append((response.status, await response.json(), response.headers.get("Retry-After")))
        return tuple(answers)
    finally:
        await client.close()


@pytest.mark.parametrize("failure", [*(BrokerFailure(code, f"the broker says {code}") for code in FAILURE_STATUS),
                                     BrokerFailure("something_new", "new"),
                                     BrokerFailure("overloaded", "later", retry_after_s=41.2), "timeout"])
async def test_both_routes_turn_a_failure_into_the_same_answer(tmp_path: Path, failure):
    broker = RecordingFakeBroker()
    broker.failure = failure
    (status, body, retry), (openai_status, openai_body, openai_retry) = await both_answers(tmp_path, broker,
                                                                                           retry_after_s=9)
    assert (status, retry) == (openai_status, openai_retry)
    assert body["error"]["code"] == openai_body["error"]["code"]
    assert body["error"]["message"] == openai_body["error"]["message"]
    field = FAILURE_FIELD.get(getattr(failure, "code", None))  # "model" for a model refusal, else None
    assert body["error"]["field"] == field
    assert openai_body["error"]["param"] == openai_param(field)  # OpenAI names width and height "size"
    assert openai_body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")


async def test_a_size_not_served_is_a_400_naming_the_size_on_both_routes(tmp_path: Path):
    broker = RecordingFakeBroker()
    broker.failure = BrokerFailure("size_not_served", "64x64 is not served; sizes served: 512x512, 768x768")
    (status, body, retry), (openai_status, openai_body, openai_retry) = await both_answers(tmp_path, broker)
    assert status == openai_status == 400 and retry is openai_retry is None
    assert body["error"] == {"code": "size_not_served", "field": "width",
                             "message": "64x64 is not served; sizes served: 512x512, 768x768"}
    assert openai_body["error"] == {"code": "size_not_served", "param": "size", "type": "invalid_request_error",
                                    "message": "64x64 is not served; sizes served: 512x512, 768x768"}


async def test_both_routes_refuse_an_image_of_the_wrong_size(tmp_path: Path):
    broker = RecordingFakeBroker()
    broker.wrong_size = True
    (status, body, _), (openai_status, openai_body, _) = await both_answers(tmp_path, broker)
    assert status == openai_status == 502
    assert body["error"]["code"] == openai_body["error"]["code"] == "bad_worker_output"
    assert list((tmp_path / "images").glob("*.png")) == []


async def test_both_routes_answer_a_full_disk_alike(tmp_path: Path, monkeypatch):
    def full(self, image_id: str, png: bytes) -> None:
        raise StorageUnavailable(StorageFailure("disk_full", "IMAGE_DIR is full"))

    monkeypatch.setattr("gateway.images.ImageStore.save", full)
    (status, body, retry), (openai_status, openai_body, openai_retry) = await both_answers(
        tmp_path, RecordingFakeBroker(), retry_after_s=13)
    assert (status, retry) == (openai_status, openai_retry) == (503, "13")
    assert body["error"]["code"] == openai_body["error"]["code"] == "storage_unavailable"
    assert body["error"]["message"] == openai_body["error"]["message"] == "IMAGE_DIR is full"


async def test_both_routes_give_the_same_kind_of_image_url(tmp_path: Path):
    (status, body, _), (openai_status, openai_body, _) = await both_answers(
        tmp_path, RecordingFakeBroker(), public_base_url="https://images.example/base/")
    assert status == openai_status == 200
    urls = [body["image_url"], openai_body["data"][0]["url"]]
    for url in urls:
        assert url.startswith("https://images.example/base/images/") and url.endswith(".png")
    kept = sorted(path.name for path in (tmp_path / "images").glob("*.png"))
    assert kept == sorted(url.rsplit("/", 1)[1] for url in urls)
