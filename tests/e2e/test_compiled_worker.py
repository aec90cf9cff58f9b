"""A real worker process with TORCH_COMPILE=true (tiny model, CPU): it compiles and warms up its first
size before it registers and its second in the background, serves both compiled, and runs a size it
does not list eager instead of compiling inside the request. CUDA graphs need a GPU (bench/gpu.py measures them there)."""

from __future__ import annotations

import io
import urllib.request

import PIL.Image
import pytest

from tests.support.cluster import post, send_concurrently

pytestmark = pytest.mark.timeout(1800)  # a worker compiling on a busy 2-core machine


@pytest.fixture
def cluster(make_cluster):
    # Two sizes: 64x64 warmed before registering, 64x96 in the background.
    return make_cluster(MODEL_ID="tiny", TORCH_COMPILE="true", MAX_BATCH_SIZE="4", MAX_BATCH_WAIT_TIME="0.5",
                        SIZES="64x64,64x96")


def test_a_compiled_worker_warms_up_then_serves_without_compiling(cluster):
    cluster.start("broker", "broker")
    cluster.start("gateway", "gateway")
    cluster.start_worker(0)
    cluster.wait_for_workers(1, timeout_s=600)
    log = (cluster.dir / "worker0.log").read_text()
    assert "optimizations: torch.compile" in log, cluster.logs()
    assert "warm-up at 64x64" in log and "{4: " in log and all(f" {size}: " in log for size in (1, 2, 3)), cluster.logs()
    assert cluster.stats()["worker"]["warm_sizes"] == ["64x64"]
    cluster.wait_for(lambda s: s.get("worker", {}).get("compile_state") == "warm", 900,
                     "64x96 warmed in the background")
    assert cluster.stats()["worker"]["warm_sizes"] == ["64x64", "64x96"]

    pool, futures = send_concurrently(cluster.url, 6)
    replies = [future.result() for future in futures]
    pool.shutdown()
    assert [status for status, _, _ in replies] == [200] * 6, replies
    assert max(body["batch_size"] for _, body, _ in replies) > 1
    with urllib.request.urlopen(replies[0][1]["image_url"], timeout=10) as response:
        assert PIL.Image.open(io.BytesIO(response.read())).size == (64, 64)

    # The size warmed in the background runs compiled: nothing falls back to eager.
    status, body, _ = post(cluster.url, {"prompt": "tall", "width": 64, "height": 96, "num_inference_steps": 2,
                                         "seed": 7})
    assert status == 200, body
    log = (cluster.dir / "worker0.log").read_text()
    assert "is not warm" not in log, cluster.logs()

    # A size SIZES does not list: torch would have to compile again, which is forbidden outside a warm-up.
    status, body, _ = post(cluster.url, {"prompt": "wide", "width": 128, "height": 64,
                                         "num_inference_steps": 2, "seed": 7})
    assert status == 200, body
    log = (cluster.dir / "worker0.log").read_text()
    # Both compiled parts that see the new size fall back once: the UNet, and the decoder of one image
    # (the text encoders see the same 77 tokens whatever the size).
    assert log.count("is not warm; it runs eager") == 2, cluster.logs()
    assert "UNet input (2, 4, 8, 16) is not warm" in log and "VAE decoder input (1, 4, 8, 16) is not warm" in log
    assert "ERROR" not in log, cluster.logs()
    cluster.wait_for(lambda s: s.get("worker", {}).get("eager_batches") == 1, 30, "the eager batch counted")
