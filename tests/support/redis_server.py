"""A real redis-server (Debian's package) for the tests of the Redis job store: on a free port of
127.0.0.1, its files in a folder of the test's, nothing saved to disk, stopped by whoever started it.

Without redis-server the tests are skipped, except under CI (CI=true), where .ci/run installs it and
they must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.procs import free_port

START_TIMEOUT_S = 15.0


def redis_server_path() -> str:
    """redis-server's path, or skip (fail under CI) saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is missing: apt-get install redis-server (.ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI the Redis job store tests must run")
        pytest.skip(message)
    return path


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_file = self.folder / "redis.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import redis

        self.process = subprocess.Popen(
            [redis_server_path(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log_file.read_text() if self.log_file.exists() else ""
                    raise AssertionError(f"redis-server did not answer on port {self.port}\n{log}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
