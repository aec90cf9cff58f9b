"""A cluster of real processes for fault tests: broker, gateway and workers started one by one.

Each process runs in its own process group so a test can SIGKILL, SIGSTOP or SIGTERM exactly one
of them; :meth:`Cluster.stop` kills whatever is left (tests call it in a fixture's teardown, so
nothing survives a failing test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagegen.local_cluster import loopback_settings
from tests.support.procs import get_json, kill_tree


class Cluster:
    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.dir = tmp_path
        loopback, self.url = loopback_settings(tmp_path / "images")
        self.env = {
            **os.environ,
            **loopback,
            "HEARTBEAT_INTERVAL_S": "0.2",
            "HEARTBEAT_LIVENESS": "5",
            "MAX_BATCH_WAIT_TIME": "0.05",
            "MODEL_ID": "fake:delay=0.3",  # the FAKE backend: the serving layer is under test here
            **settings,
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, **settings: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", module], env={**self.env, **settings}, cwd=self.dir,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def start_all(self, workers: int = 1, timeout_s: float = 60) -> Cluster:
        """The broker, the gateway and ``workers`` workers (GPU ids 0, 1, ...); returns once every
        worker has registered."""
        self.start("broker", "broker")
        self.start("gateway", "gateway")
        for index in range(workers):
            self.start_worker(index)
        self.wait_for_workers(workers, timeout_s)
        return self

    def start_worker(self, index: int, **settings: str) -> subprocess.Popen:
        return self.start(f"worker{index}", "gpu_worker", **{"GPU_ID": str(index), "WORKER_NAME": f"worker{index}",
                                                             **settings})

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.processes[name].pid, sig)

    def stop(self) -> None:
        for process in self.processes.values():
            try:
                os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot die of SIGTERM
            except ProcessLookupError:
                pass
            kill_tree(process.pid, grace_s=5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.dir.glob("*.log")))

    def stats(self) -> dict:
        status, body = get_json(f"{self.url}/stats")
        assert status == 200, body
        return body

    def wait_for(self, predicate, timeout_s: float, what: str) -> float:
        """Poll ``predicate(stats)`` until true; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if predicate(self.stats()):
                    return time.monotonic() - started
            except (OSError, AssertionError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{self.logs()}")

    def wait_for_workers(self, count: int, timeout_s: float = 60) -> None:
        self.wait_for(lambda s: s.get("num_gpus") == count, timeout_s, f"{count} workers registered")


def post(url: str, body: dict, timeout_s: float = 60) -> tuple[int, dict, float]:
    """POST /generate; returns (status, JSON body, seconds taken)."""
    started = time.monotonic()
    status, answer, _ = call(url, "/generate", body, timeout_s=timeout_s)
    return status, answer, time.monotonic() - started


def call(url: str, path: str, body: dict, label: str | None = None, timeout_s: float = 120) -> tuple[int, dict, dict]:
    """POST ``body`` as JSON to ``path``, with ``label`` as its X-Request-ID; returns (status, JSON
    answer, headers). Raises OSError when the client gives up."""
    headers = {"Content-Type": "application/json"}
    if label is not None:
        headers["X-Request-ID"] = label
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def request_body(i: int, size: int = 64) -> dict:
    return {"prompt": f"request {i}", "width": size, "height": size, "num_inference_steps": 2, "seed": i}


def send_concurrently(url: str, count: int, timeout_s: float = 60) -> tuple[ThreadPoolExecutor, list]:
    """Start ``count`` requests at once; returns (pool, futures) so the caller can act meanwhile."""
    pool = ThreadPoolExecutor(max_workers=count)
    futures = [pool.submit(post, url, request_body(i), timeout_s) for i in range(count)]
    return pool, futures
