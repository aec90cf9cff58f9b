"""Two models in one cluster, with real processes: a broker, a gateway and two CPU workers, one
serving the built-in ``tiny`` model (SD-1.5 layout, random weights) and one ``tiny-sdxl`` (SDXL
layout). Each request goes to a worker of the model it names; a model nobody serves, or none named
while both are served, is refused 400 listing both; the OpenAI route's ``model`` selects too."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import Cluster, call, post

pytestmark = pytest.mark.timeout(300)

WORKER_OF = {"tiny": "worker0", "tiny-sdxl": "worker1"}


@pytest.fixture(scope="module")
def cluster(make_module_cluster) -> Cluster:
    """Broker, gateway, worker0 serving tiny and worker1 serving tiny-sdxl, on the CPU."""
    c = make_module_cluster(WORKER_WARMUP="false")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0, MODEL_ID="tiny")
    c.start_worker(1, MODEL_ID="tiny-sdxl")
    c.wait_for_workers(2, timeout_s=180)
    return c


def body(i: int, model: str | None = None) -> dict:
    request = {"prompt": f"model test {i}", "width": 64, "height": 64, "num_inference_steps": 2, "seed": i}
    return request if model is None else {**request, "model": model}


def post_openai(url: str, request: dict) -> tuple[int, dict]:
    status, answer, _ = call(url, "/v1/images/generations", request)
    return status, answer


def served_by(stats: dict) -> dict[str, int]:
    """worker name -> requests it completed."""
    return {entry["worker"]: entry["total_requests"] for entry in stats["per_gpu_stats"]}


def test_stats_list_both_models(cluster):
    models = cluster.stats()["models"]
    assert set(models) == {"tiny", "tiny-sdxl"}
    assert all(entry["workers"] == 1 for entry in models.values())


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_each_request_goes_to_a_worker_of_its_model(cluster, model):
    for i in range(3):
        status, answer, _ = post(cluster.url, body(i, model), timeout_s=120)
        assert status == 200, (answer, cluster.logs())
        assert (answer["worker"], answer["model"]) == (WORKER_OF[model], model)


def test_a_model_nobody_serves_is_refused_listing_both(cluster):
    status, answer, _ = post(cluster.url, body(1, "sd15"))
    assert status == 400, answer
    error = answer["error"]
    assert (error["code"], error["field"]) == ("unknown_model", "model")
    assert "tiny, tiny-sdxl" in error["message"]


def test_no_model_while_two_are_served_is_refused(cluster):
    status, answer, _ = post(cluster.url, body(1))
    assert status == 400, answer
    assert answer["error"]["code"] == "model_required" and "tiny, tiny-sdxl" in answer["error"]["message"]


def test_the_openai_routes_model_selects(cluster):
    before = served_by(cluster.stats())
    status, answer = post_openai(cluster.url, {"prompt": "a lighthouse", "n": 2, "size": "64x64",
                                               "model": "tiny-sdxl", "num_inference_steps": 2,
                                               "response_format": "b64_json"})
    assert status == 200 and len(answer["data"]) == 2, answer
    cluster.wait_for(lambda s: served_by(s)["worker1"] - before["worker1"] == 2, 10, "the sdxl worker's 2 images")
    assert served_by(cluster.stats())["worker0"] == before["worker0"]
    status, answer = post_openai(cluster.url, {"prompt": "a lighthouse", "model": "dall-e-3"})
    assert status == 400 and (answer["error"]["code"], answer["error"]["param"]) == ("unknown_model", "model")


def test_stats_and_metrics_show_each_workers_compile_state(cluster):
    """CPU workers without TORCH_COMPILE: compile state off (every size alike), no size warm, which
    /stats and /metrics show through the broker and the gateway."""
    entries = cluster.stats()["per_gpu_stats"]
    for entry in entries:
        assert (entry["warm_sizes"], entry["compile_state"]) == ([], "off"), entry
        assert all(re.fullmatch(r"\d+x\d+", size) for size in entry["sizes"]), entry
        assert entry["unlisted_size"] in ("eager", "refuse", "snap")
        assert all(isinstance(entry[key], int) for key in ("eager_batches", "eager_images", "unlisted_refused",
                                                           "unlisted_snapped"))
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    workers = WORKER_OF.values()
    states = {(s.labels["worker"], s.labels["state"]): s.value
              for s in families["imagegen_worker_compile_state"].samples}
    assert states == {(worker, state): float(state == "off")
                      for worker in workers for state in ("off", "warming", "warm")}
    assert {s.labels["worker"]: s.value for s in families["imagegen_worker_warm_sizes"].samples} == {
        worker: 0.0 for worker in workers}
    assert {s.labels["worker"]: s.value for s in families["imagegen_worker_sizes"].samples} == {
        entry["worker"]: float(len(entry["sizes"])) for entry in entries}
