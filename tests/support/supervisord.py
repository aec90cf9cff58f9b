"""The service under the real supervisord, from a copy of the repository's supervisord.conf in a
temporary folder, and plain HTTP calls to its gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.paths import REPO
from tests.support.procs import free_port, kill_tree, wait_until_ready

BIN = Path(sys.executable).parent


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
