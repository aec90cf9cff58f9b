"""The gateway's edge against strangers: where it listens, slow clients, connection counts.

Real ``python -m gateway`` processes on 127.0.0.1 and raw sockets. No broker runs: the routes used
here (/healthz, and bodies that never finish arriving) do not reach it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.paths import REPO
from tests.support.procs import free_port, kill_tree, wait_until_ready


def gateway_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "IMAGE_DIR"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", IMAGE_DIR=str(tmp_path / "images"),
               STATE_DIR=str(tmp_path / "state"),
               BROKER_CLIENT_ADDRESS=f"tcp://127.0.0.1:{free_port()}", GATEWAY_PORT=str(free_port()),
               GATEWAY_HOST="127.0.0.1")
    env.update(settings)
    return env


class Gateway:
    """One ``python -m gateway`` process; its output goes to a file the test can read."""

    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.env = gateway_env(tmp_path, **settings)
        self.port = int(self.env["GATEWAY_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gateway-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway"], env=self.env, cwd=REPO,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        wait_until_ready(f"{self.url}/healthz", 60, self.output)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        kill_tree(self.process.pid)
        self.process.wait()
        self.log.close()


@pytest.fixture
def gateways(tmp_path: Path):
    started: list[Gateway] = []

    def start(**settings: str) -> Gateway:
        gateway = Gateway(tmp_path, **settings)
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.stop()


# --------------------------------------------------------------------------- where it listens


def test_process_exits_2_on_all_interfaces_without_keys(tmp_path: Path):
    process = subprocess.run([sys.executable, "-m", "gateway"], env=gateway_env(tmp_path, GATEWAY_HOST="0.0.0.0"),
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert process.returncode == 2, process.stderr
    assert "GATEWAY_HOST" in process.stderr and "GATEWAY_ALLOW_UNAUTHENTICATED" in process.stderr


def test_unauthenticated_beyond_loopback_warns_at_start(gateways):
    gateway = gateways(GATEWAY_HOST="0.0.0.0", GATEWAY_ALLOW_UNAUTHENTICATED="true")
    gateway.wait_ready()
    warnings = [line for line in gateway.output().splitlines() if "WARNING" in line and "GATEWAY_HOST" in line]
    assert warnings, gateway.output()


# --------------------------------------------------------------------------- slow clients


STALLED_HEAD = ("POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")


async def _answer_and_eof(reader: asyncio.StreamReader, deadline_s: float) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if it never does)."""
    return await asyncio.wait_for(reader.read(), deadline_s)


async def _serve_meanwhile(url: str, stop: asyncio.Event) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=30)) as response:
                statuses.append(response.status)
            await asyncio.sleep(0.05)
    return statuses


async def _peak_fds(gateway: Gateway, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, gateway.open_fds())
        await asyncio.sleep(0.02)
    return peak


async def test_stalled_bodies_are_answered_408_and_closed_while_others_are_served(gateways, tmp_path: Path):
    timeout_s, count = 2.0, 300
    gateway = gateways(GATEWAY_BODY_TIMEOUT_S=str(timeout_s), GATEWAY_MAX_CONNECTIONS="1000")
    gateway.wait_ready()
    fds_before = gateway.open_fds()
    stop = asyncio.Event()
    served = asyncio.create_task(_serve_meanwhile(gateway.url, stop))
    connections = []
    started = time.monotonic()
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(STALLED_HEAD.encode())
            connections.append((reader, writer))
        await asyncio.gather(*(writer.drain() for _, writer in connections))
        peak = asyncio.create_task(_peak_fds(gateway, stop))
        # Closed within the timeout, with a 10x margin for a loaded machine.
        answers = await asyncio.gather(*(_answer_and_eof(reader, 10 * timeout_s) for reader, _ in connections))
        closed_after_s = time.monotonic() - started
    finally:
        stop.set()
        for _, writer in connections:
            writer.close()
    statuses = await served
    fds_during = await peak
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"x-request-id" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "body_timeout" and "GATEWAY_BODY_TIMEOUT_S" in error["message"]
    assert statuses and set(statuses) == {200}
    await asyncio.sleep(0.5)
    fds_after = gateway.open_fds()
    assert fds_during >= fds_before + count // 2  # the attack did hold connections open meanwhile
    assert fds_after <= fds_before + 5, (fds_before, fds_after)
    print(f"{count} stalled bodies closed {closed_after_s:.1f}s after the first was sent "
          f"(GATEWAY_BODY_TIMEOUT_S={timeout_s:g}); {len(statuses)} /healthz served meanwhile; "
          f"gateway fds {fds_before} -> {fds_during} -> {fds_after}")


async def _send(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def test_connections_beyond_the_cap_get_503_and_are_closed(gateways):
    limit = 20
    gateway = gateways(GATEWAY_MAX_CONNECTIONS=str(limit), RETRY_AFTER_S="7")
    gateway.wait_ready()
    idle = []
    try:
        # Headers that never finish: each holds a connection.
        for _ in range(limit):
            idle.append(await _send(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: test\r\n"))
        await asyncio.sleep(0.5)  # let the gateway accept them all
        reader, writer = await _send(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"\r\nRetry-After: 7" in head
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and "GATEWAY_MAX_CONNECTIONS" in error["message"]
    finally:
        for _, writer in idle:
            writer.close()
    # Once they are gone, the gateway serves again.
    deadline = time.monotonic() + 30
    while True:
        reader, writer = await _send(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        if answer.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    reader, writer = await _send(gateway.port, b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    metrics = (await asyncio.wait_for(reader.read(), 30)).decode()
    writer.close()
    refused = [line for line in metrics.splitlines() if line.startswith("imagegen_gateway_connections_refused_total ")]
    assert refused and float(refused[0].split()[1]) >= 1, metrics[:2000]


# --------------------------------------------------------------------------- every answer in JSON


async def _exchange(port: int, request: bytes) -> tuple[bytes, dict]:
    reader, writer = await _send(port, request)
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


async def test_requests_the_parser_refuses_answer_json(gateways):
    gateway = gateways()
    gateway.wait_ready()
    too_long_header = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    too_long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    too_many_headers = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"
    for request, words in [(too_long_header, "8190 bytes"), (too_long_line, "8190 bytes"),
                           (too_many_headers, "128 headers"), (b"NOT HTTP AT ALL\r\n\r\n", "could not be read")]:
        head, body = await _exchange(gateway.port, request)
        assert head.split(b" ")[1] == b"400", head
        assert b"content-type: application/json" in head.lower(), head
        assert body["error"]["code"] == "bad_request" and words in body["error"]["message"], body
