"""A real worker process under BATCH_POLICY=step with TORCH_COMPILE=true (tiny model, CPU): its engine is
warm at the first listed size before it registers, the second listed size warms in the background,
and then requests of both sizes run compiled (nothing falls back to eager), while a size it does not
list runs eager, logged. Compiling runs the C++ compiler: minutes on a busy 2-core machine."""

from __future__ import annotations

import pytest

from tests.support.cluster import post

pytestmark = pytest.mark.timeout(1800)


def test_a_step_worker_warms_every_listed_size_and_serves_them_compiled(make_cluster):
    cluster = make_cluster(MODEL_ID="tiny", TORCH_COMPILE="true", BATCH_POLICY="step", MAX_BATCH_SIZE="4",
                           SIZES="64x64,64x96")
    cluster.start("broker", "broker")
    cluster.start("gateway", "gateway")
    cluster.start_worker(0)
    cluster.wait_for_workers(1, timeout_s=900)
    log = (cluster.dir / "worker0.log").read_text()
    assert "the step engine is warm at 64x64" in log, cluster.logs()
    cluster.wait_for(lambda s: s.get("worker", {}).get("compile_state") == "warm", 900,
                     "64x96 warmed in the background")
    assert cluster.stats()["worker"]["warm_sizes"] == ["64x64", "64x96"]

    for number, (width, height) in enumerate(((64, 96), (64, 64), (64, 96))):
        status, body, _ = post(cluster.url, {"prompt": f"lamp {number}", "width": width, "height": height,
                                             "num_inference_steps": 3, "seed": number})
        assert status == 200, (body, cluster.logs())
    log = (cluster.dir / "worker0.log").read_text()
    assert "is not warm" not in log, cluster.logs()

    # A size SIZES does not list: its UNet call and its decode run eager, each said once.
    status, body, _ = post(cluster.url, {"prompt": "wide", "width": 128, "height": 64,
                                         "num_inference_steps": 2, "seed": 7})
    assert status == 200, body
    log = (cluster.dir / "worker0.log").read_text()
    assert "UNet input" in log and "(2, 4, 8, 16) is not warm" in log, cluster.logs()
    assert "ERROR" not in log, cluster.logs()
