"""A request id addresses its own request only: ids that route work are made by the service.

A client's X-Request-ID is a label for the logs, never the key of its request on the broker link.
Before, an OpenAI request sent with ``X-Request-ID: coll`` travelled as ``coll.0``, ``coll.1``...; a
second client's ``POST /generate`` with ``X-Request-ID: coll.0`` passed the gateway's duplicate check,
the broker took it for a resend, and the gateway handed the first client's image to the second client.

These tests send that exact sequence to a real cluster (the tiny random-weight pipeline, so the image
really depends on the prompt and seed), and a generated family of colliding labels to a cluster on the
fake backend; every client must get its own image, equal to a render of its own settings alone.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gpu_worker.model.fake_backend import fake_pixels
from gpu_worker.model.pipelines import GenerationJob
from imagegen.batch_key import BatchKey
from tests.support.cluster import Cluster, call


def pixels_at(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def pixels_of_png(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def wait_until(predicate, timeout_s: float, what: str) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


SECRET_A = {"prompt": "SECRET-A", "size": "64x64", "num_inference_steps": 40, "seed": 111}
B = {"prompt": "B", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 222}


@pytest.mark.timeout(300)
def test_a_label_that_another_requests_old_id_was_made_from_gets_its_own_image(tmp_path):
    """The reported sequence: OpenAI request with X-Request-ID 'coll', then /generate with 'coll.0'
    while the first is still queued (the window rule holds it at the worker for a few seconds,
    so the two certainly overlap). Each client gets the image of its own settings."""
    cluster = Cluster(tmp_path, MODEL_ID="tiny", WORKER_WARMUP="false", BATCH_POLICY="window",
                      MAX_BATCH_WAIT_TIME="3", REQUEST_TIMEOUT_S="120")
    try:
        cluster.start("broker", "broker")
        cluster.start("gateway", "gateway")
        cluster.start_worker(0)
        cluster.wait_for_workers(1, timeout_s=120)
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(call, cluster.url, "/v1/images/generations", SECRET_A, "coll")
            cluster.wait_for(lambda s: s.get("current_queue_depth", 0) >= 1, 60, "the first request to be queued")
            status_b, answer_b, headers_b = call(cluster.url, "/generate", B, "coll.0")
            status_a, answer_a, headers_a = first.result(timeout=180)
        assert status_a == 200, answer_a
        assert status_b == 200, answer_b
        assert headers_a["X-Request-ID"] == "coll" and headers_b["X-Request-ID"] == "coll.0"  # labels echoed
        assert answer_b["seed"] == 222 and answer_b["num_inference_steps"] == 4
        got_a, got_b = pixels_at(answer_a["data"][0]["url"]), pixels_at(answer_b["image_url"])

        # Solo renders of each client's own settings, one at a time, no labels.
        status, solo_a, _ = call(cluster.url, "/v1/images/generations", SECRET_A)
        assert status == 200, solo_a
        status, solo_b, _ = call(cluster.url, "/generate", B)
        assert status == 200, solo_b
        assert np.array_equal(got_a, pixels_at(solo_a["data"][0]["url"])), "client A did not get its own image"
        assert np.array_equal(got_b, pixels_at(solo_b["image_url"])), "client B did not get its own image"
        assert not np.array_equal(got_a, got_b)
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- colliding labels, generated


@pytest.fixture(scope="module")
def fake_cluster(make_module_cluster):
    """Requests stay in flight long enough to overlap: each batch takes 0.3 s, at most 2 per batch."""
    return make_module_cluster(MODEL_ID="fake:delay=0.3", MAX_BATCH_SIZE="2", MAX_BATCH_WAIT_TIME="0.05",
                               REQUEST_TIMEOUT_S="120", GATEWAY_MAX_PENDING="1000").start_all(1)


def solo_render(prompt: str, seed: int, size: int, steps: int) -> np.ndarray:
    """What the fake backend draws for these settings alone (it depends on nothing else)."""
    return fake_pixels(GenerationJob(prompt, None, seed), BatchKey(size, size, steps, 7.5))


_BASE = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12)


@st.composite
def colliding_labels(draw) -> list[str]:
    """Labels that collide with each other and with the ids the old gateway derived from them:
    the same label twice, label.N (an OpenAI image's old id), label-<hex8> (the old suffix), and a
    32-hex string shaped like a service-made id."""
    base = draw(_BASE)
    family = [base, base, f"{base}.0", f"{base}.1", f"{base}-{draw(st.text('0123456789abcdef', min_size=8, max_size=8))}",
              draw(st.text("0123456789abcdef", min_size=32, max_size=32))]
    return draw(st.lists(st.sampled_from(family), min_size=3, max_size=6))


@pytest.mark.timeout(600)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=colliding_labels(), data=st.data())
def test_generated_families_of_colliding_labels_each_get_their_own_images(fake_cluster, labels, data):
    """Every client, on either route, with any of the colliding labels, gets exactly its own images."""
    routes = data.draw(st.lists(st.sampled_from(["generate", "openai"]), min_size=len(labels), max_size=len(labels)))
    seed_base = data.draw(st.integers(0, 2**40))
    jobs = []
    for i, (label, route) in enumerate(zip(labels, routes)):
        prompt, seed = f"client {i} of {labels!r}", seed_base + 100 * i
        if route == "generate":
            body = {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2, "seed": seed}
            jobs.append((route, label, body, [seed]))
        else:
            body = {"prompt": prompt, "size": "64x64", "n": 2, "seed": seed, "num_inference_steps": 2,
                    "response_format": "b64_json"}
            jobs.append((route, label, body, [seed, seed + 1]))
    barrier = threading.Barrier(len(jobs))

    def send(job):
        route, label, body, _ = job
        barrier.wait(timeout=30)  # all at once, so they overlap in the broker and the worker
        return call(fake_cluster.url, "/generate" if route == "generate" else "/v1/images/generations", body, label)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (route, label, body, seeds), (status, answer, headers) in zip(jobs, answers):
        assert status == 200, (label, answer)
        assert headers["X-Request-ID"] == label
        if route == "generate":
            assert answer["seed"] == seeds[0]
            images = [pixels_at(answer["image_url"])]
        else:
            images = [pixels_of_png(base64.b64decode(item["b64_json"])) for item in answer["data"]]
        expected = [solo_render(body["prompt"], seed, 64, 2) for seed in seeds]
        assert len(images) == len(expected)
        for got, want in zip(images, expected):
            assert np.array_equal(got, want), f"a client with label {label!r} got another request's image"
