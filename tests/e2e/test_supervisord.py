"""End to end: the real supervisord.conf starts broker, gateway and a real tiny-diffusers worker.

Nothing here is faked: real processes under real supervisord, real sockets, the real pipeline
(MODEL_ID=tiny, random weights, on the CPU). Each test's processes are stopped by the test itself,
even when it fails.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.support.procs import get_json, wait_until_ready
from tests.support.supervisord import Stack, fetch, post_generate

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def stack(tmp_path):
    stacks: list[Stack] = []

    def make(**settings: str) -> Stack:
        stacks.append(Stack(tmp_path, **settings))
        stacks[-1].start()
        return stacks[-1]

    yield make
    for s in stacks:
        s.stop()


def test_eight_concurrent_requests_are_batched_into_distinct_pngs(stack):
    s = stack(MAX_BATCH_SIZE="4", MAX_BATCH_WAIT_TIME="2.0")
    bodies = [
        {"prompt": f"a castle on a hill, variant {i}", "game_id": "g1", "round_id": "r1", "player_id": f"p{i}",
         "width": 64, "height": 64, "num_inference_steps": 4, "guidance_scale": 7.5, "seed": 1000 + i}
        for i in range(8)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda b: post_generate(s.url, b), bodies))

    assert [status for status, _ in replies] == [200] * 8, replies
    assert sorted(r["player_id"] for _, r in replies) == [f"p{i}" for i in range(8)]
    images = [fetch(r["image_url"]) for _, r in replies]
    assert len({r["image_id"] for _, r in replies}) == 8
    assert len(set(images)) == 8, "every prompt and seed must give its own image"
    for png in images:
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
        with Image.open(io.BytesIO(png)) as img:
            assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
    assert max(r["batch_size"] for _, r in replies) > 1

    status, stats = get_json(f"{s.url}/stats")
    assert status == 200
    assert stats["total_requests"] == 8
    assert stats["total_batches"] < 8 and stats["avg_batch_size"] > 1.0, stats
    assert stats["config"]["max_batch_size"] == 4

    assert s.wait_for_states({"broker": "RUNNING", "gateway": "RUNNING", "gpu_worker:gpu_worker_0": "RUNNING"})


def test_worker_stops_cleanly_and_a_restarted_worker_serves_again(stack):
    s = stack(MAX_BATCH_SIZE="2", MAX_BATCH_WAIT_TIME="0.2")
    s.wait_for_states({"gpu_worker:gpu_worker_0": "RUNNING"})
    out = s.ctl("stop", "gpu_worker:*")
    assert "stopped" in out, out + s.logs()
    # STOPPED, not EXITED or a SIGKILL: it left through its SIGTERM handler within stopwaitsecs.
    assert s.states()["gpu_worker:gpu_worker_0"] == "STOPPED"
    deadline = time.monotonic() + 10
    while get_json(f"{s.url}/readyz")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get_json(f"{s.url}/readyz")[0] == 503, "the broker must notice the worker left"

    s.ctl("start", "gpu_worker:*")
    wait_until_ready(f"{s.url}/readyz", 120, s.logs)
    status, reply = post_generate(s.url, {"prompt": "after restart", "width": 64, "height": 64,
                                          "num_inference_steps": 2})
    assert status == 200, reply
    assert "worker shutting down" in s.logs()
