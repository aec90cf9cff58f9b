"""POST /v1/images/generations, the OpenAI-compatible route (gateway/openai_api.py), through the
official ``openai`` Python client against a real cluster of processes (tests/support/cluster.py:
broker, gateway, one worker on the FAKE image backend, since the serving layer is what is under
test). The parser and the route in one process: tests/integration/test_openai_api.py."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request

import pytest
from PIL import Image

from tests.support.cluster import Cluster

openai = pytest.importorskip("openai", reason="the official client is in the test extra: pip install -e '.[test]'")

API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    """Broker, gateway and one worker (FAKE backend), API keys on; a 0.5 s window so n images batch."""
    c = make_module_cluster(GATEWAY_API_KEYS=API_KEY, MAX_BATCH_WAIT_TIME="0.5", MAX_BATCH_SIZE="4",
                            MODEL_ID="fake:delay=0.1")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    deadline = time.monotonic() + 60
    while stats(c).get("num_gpus") != 1:  # /stats wants the key here, which Cluster.wait_for_workers has not
        assert time.monotonic() < deadline, f"no worker registered\n{c.logs()}"
        time.sleep(0.1)
    return c


def stats(c: Cluster) -> dict:
    request = urllib.request.Request(f"{c.url}/stats", headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return {}


def official_client(c: Cluster, api_key: str = API_KEY):
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key=api_key, max_retries=0, timeout=30)


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


def test_official_client_urls_load_without_a_key(cluster):
    result = official_client(cluster).images.generate(prompt="a lighthouse", n=2, size="64x128")
    assert [image.b64_json for image in result.data] == [None, None]
    for image in result.data:
        with urllib.request.urlopen(image.url, timeout=10) as response:  # image URLs need no key
            assert Image.open(io.BytesIO(response.read())).size == (64, 128)


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
