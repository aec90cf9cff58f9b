"""End to end: the real supervisord.conf starts broker, gateway and a real tiny-diffusers worker.

Nothing here is faked: real processes under real supervisord, real sockets, the real pipeline
(MODEL_ID=tiny, random weights, on the CPU). Each test's processes are stopped by the test itself,
even when it fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.support.paths import REPO
from tests.support.procs import free_port, get_json, kill_tree, wait_until_ready

BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Stack:
    """supervisord running a copy of the repo's supervisord.conf in a temporary folder."""

    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.dir = tmp_path
        self.conf = tmp_path / "supervisord.conf"
        shutil.copy(REPO / "supervisord.conf", self.conf)
        (tmp_path / "run" / "logs").mkdir(parents=True)
        self.gateway_port = free_port()
        client_port, worker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "BROKER_CLIENT_BIND": f"tcp://127.0.0.1:{client_port}",
            "BROKER_CLIENT_ADDRESS": f"tcp://127.0.0.1:{client_port}",
            "BROKER_WORKER_BIND": f"tcp://127.0.0.1:{worker_port}",
            "BROKER_WORKER_ADDRESS": f"tcp://127.0.0.1:{worker_port}",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.gateway_port),
            "IMAGE_DIR": str(tmp_path / "images"),
            "MODEL_ID": "tiny",
            **settings,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "supervisord"), "-c", str(self.conf)], env=self.env, cwd=self.dir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until_ready(f"{self.url}/readyz", 120, self.logs)

    def stop(self) -> None:
        if self.process is not None:
            kill_tree(self.process.pid)

    def ctl(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def states(self) -> dict[str, str]:
        """supervisorctl status as {program: state}."""
        lines = [line.split() for line in self.ctl("status").splitlines()]
        return {parts[0]: parts[1] for parts in lines if len(parts) >= 2}

    def wait_for_states(self, expected: dict[str, str], timeout_s: float = 20.0) -> bool:
        """True once every program is in its expected state (supervisord's startsecs delays RUNNING)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.states()
            if all(states.get(name) == state for name, state in expected.items()):
                return True
            time.sleep(0.25)
        raise AssertionError(f"expected {expected}, supervisorctl says {self.states()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.dir / "run" / "logs").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


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


def post_generate(url: str, body: dict, timeout_s: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        return response.read()


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
