"""SIZES and UNLISTED_SIZE through real processes: a worker registers once its first size is warm,
warms the others in the background (telling the broker, which shows them in /stats), runs a size not
warm yet eager (counted), and refuses or snaps sizes it does not list.

The worker is the FAKE backend with ``warm_delay``: each warm-up call sleeps instead of compiling (the
real compiler is exercised by tests/e2e/test_compiled_worker.py and tests/e2e/test_compile_cache.py);
what is under test is the worker's warming order, its reports and the service's answers."""

from __future__ import annotations

import io
import urllib.request

import PIL.Image
import pytest

from tests.support.cluster import post

pytestmark = pytest.mark.timeout(300)

WARM_DELAY_S = 1.5  # per warm-up call: the background warm-up of the three other sizes takes 6 calls (9 s)


def worker_stats(cluster) -> dict:
    return cluster.stats()["worker"]


def body(width: int, height: int, seed: int = 1) -> dict:
    return {"prompt": "a harbour", "width": width, "height": height, "num_inference_steps": 2, "seed": seed}


def test_a_worker_registers_with_one_size_warm_and_warms_the_others_in_the_background(make_cluster):
    cluster = make_cluster(MODEL_ID=f"fake:delay=0.1,warm_delay={WARM_DELAY_S}", TORCH_COMPILE="true",
                           SIZES="64x64,64x96,96x64,128x64", MAX_BATCH_SIZE="2", WARM_UP_MAX_DEFER_S="600")
    cluster.start_all()
    stats = worker_stats(cluster)
    assert stats["sizes"] == ["64x64", "64x96", "96x64", "128x64"], stats
    assert stats["compile_state"] == "warming" and stats["warm_sizes"] == ["64x64"], stats

    # 128x64 is not warm yet: it runs at once, eager, rather than wait for its warm-up, and it is
    # warmed next, before 96x64 (demand first; the size being warmed, 64x96, is finished first).
    status, answer, _ = post(cluster.url, body(128, 64))
    assert status == 200, answer
    cluster.wait_for(lambda s: s["worker"]["compile_state"] == "warm", 120, "every size warm")
    stats = worker_stats(cluster)
    assert sorted(stats["warm_sizes"]) == ["128x64", "64x64", "64x96", "96x64"], stats
    assert (stats["eager_batches"], stats["eager_images"]) == (1, 1), stats

    log = (cluster.dir / "worker0.log").read_text()
    assert "size 64x64 warm" in log and "(1 of 4 sizes warm); the others warm in the background" in log
    assert log.index("size 128x64 warm") < log.index("size 96x64 warm"), cluster.logs()
    assert "every listed size is warm" in log, cluster.logs()

    # Warm now: the same size counts no eager batch.
    status, answer, _ = post(cluster.url, body(128, 64, seed=2))
    assert status == 200, answer
    cluster.wait_for(lambda s: s["worker"]["total_batches"] == 2, 30, "the second batch reported")
    assert worker_stats(cluster)["eager_batches"] == 1


def test_unlisted_sizes_are_refused_with_the_sizes_served(make_cluster):
    cluster = make_cluster(SIZES="64x64,64x96", UNLISTED_SIZE="refuse").start_all()
    status, answer, _ = post(cluster.url, body(96, 96))
    assert status == 400, answer
    assert answer["error"]["code"] == "size_not_served", answer
    assert "ask for one of 64x64, 64x96" in answer["error"]["message"], answer
    status, answer, _ = post(cluster.url, body(64, 96))
    assert status == 200, answer
    cluster.wait_for(lambda s: s["worker"]["unlisted_refused"] == 1, 30, "the refusal counted")
    assert worker_stats(cluster)["unlisted_size"] == "refuse"


def test_unlisted_sizes_snap_to_the_nearest_listed_size(make_cluster):
    cluster = make_cluster(SIZES="64x64,64x96,96x64", UNLISTED_SIZE="snap").start_all()
    status, answer, _ = post(cluster.url, body(120, 72))  # 5:3, nearest in aspect to 96x64
    assert status == 200, answer
    assert (answer["width"], answer["height"]) == (96, 64), answer
    with urllib.request.urlopen(answer["image_url"], timeout=10) as response:
        assert PIL.Image.open(io.BytesIO(response.read())).size == (96, 64)
    cluster.wait_for(lambda s: s["worker"]["unlisted_snapped"] == 1, 30, "the snap counted")
