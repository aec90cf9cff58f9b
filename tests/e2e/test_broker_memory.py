"""One connection cannot exhaust the broker's memory.

A ZeroMQ peer can send message parts with the MORE flag forever: libzmq keeps every part until the
message ends, and MAXMSGSIZE bounds a part, not a message. The attack here speaks ZMTP 3.0 over a raw
TCP socket (NULL greeting, READY as a DEALER, then 15 MiB parts that never end the message), always
to 127.0.0.1, bounded in parts and seconds. The broker is the real process (under real supervisord in
the last test); its memory is read from /proc/<pid>/status.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from imagegen.keys import main as keys_main
from tests.support.broker_ping import ping
from tests.support.paths import REPO
from tests.support.procs import free_port, get_json, kill_tree
from tests.support.supervisord import Stack, fetch, post_generate

MIB = 1024 * 1024
PART_BYTES = 15 * MIB


def zmtp_null_greeting() -> bytes:
    """ZMTP 3.0 greeting: signature, version 3.0, mechanism NULL, as-client, filler (64 bytes)."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def zmtp_ready_as_dealer() -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    return bytes([0x04, len(body)]) + body


def flood(port: int, max_parts: int, max_s: float) -> tuple[int, str]:
    """Connect to 127.0.0.1:``port`` and send parts that never end a message, until ``max_parts``,
    ``max_s`` seconds or the broker closes the connection. Returns (parts sent, how it ended)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(zmtp_null_greeting())
            greeting = b""
            while len(greeting) < 64:
                chunk = sock.recv(64 - len(greeting))
                if not chunk:
                    return 0, "closed during the greeting"
                greeting += chunk
            sock.sendall(zmtp_ready_as_dealer())
            header, payload = b"\x03" + struct.pack(">Q", PART_BYTES), bytes(PART_BYTES)  # MORE | LONG
            started = time.monotonic()
            while sent < max_parts and time.monotonic() - started < max_s:
                sock.sendall(header)
                sock.sendall(payload)
                sent += 1
            return sent, "all sent"
        except OSError as exc:  # reset or timed out: the broker closed or stopped reading
            return sent, f"connection ended: {exc!r}"


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def listening_ports_beyond_loopback(pid: int) -> list[int]:
    """TCP ports ``pid`` listens on at an address other machines can reach (wildcard or not 127/::1)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            address, port = local.split(":")
            loopback = address in ("0100007F", "00000000000000000000000001000000")
            if state == "0A" and inode in inodes and not loopback:
                ports.append(int(port, 16))
    return ports


def start_broker(tmp_path: Path, name: str, **settings: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **settings}
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "broker"], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_pong(address: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the broker exited with {process.returncode}\n{log.read_text()}"
        try:
            ping(address, timeout_ms=1000)
            return
        except zmq.Again:
            pass
    raise AssertionError(f"the broker did not answer within {timeout_s}s\n{log.read_text()}")


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        kill_tree(process.pid, grace_s=5)


@pytest.mark.timeout(240)
def test_no_socket_reachable_from_other_hosts_lets_a_stranger_flood_the_broker(tmp_path, processes):
    """The broker told to listen on every interface on both links, the worker link with CurveZMQ keys.
    Either it refuses the unauthenticated wildcard gateway socket at start (then runs with the gateway
    socket on loopback), or whatever it listens on beyond loopback is flooded: the flood must be refused
    at the handshake, the broker's memory must not grow, and it must keep answering."""
    keys_dir, authorized = tmp_path / "keys", tmp_path / "authorized"
    assert keys_main(["broker", str(keys_dir)]) == 0
    authorized.mkdir()
    keyed = {"BROKER_CURVE_SECRET_KEY": str(keys_dir / "broker.key_secret"),
             "BROKER_AUTHORIZED_KEYS_DIR": str(authorized),
             "BROKER_WORKER_BIND": f"tcp://0.0.0.0:{free_port()}"}
    client_port = free_port()
    wildcard = start_broker(tmp_path, "wildcard", BROKER_CLIENT_BIND=f"tcp://0.0.0.0:{client_port}", **keyed)
    processes.append(wildcard)
    try:
        status = wildcard.wait(timeout=30)
    except subprocess.TimeoutExpired:
        status = None  # it started: the flood below decides
    if status is not None:
        output = (tmp_path / "wildcard.log").read_text()
        assert status == 2 and "BROKER_CLIENT_BIND" in output, output
        client_port = free_port()
        broker = start_broker(tmp_path, "broker", BROKER_CLIENT_BIND=f"tcp://127.0.0.1:{client_port}", **keyed)
        processes.append(broker)
    else:
        broker = wildcard
    log = tmp_path / ("broker.log" if broker is not wildcard else "wildcard.log")
    address = f"tcp://127.0.0.1:{client_port}"
    wait_for_pong(address, broker, log)

    exposed = listening_ports_beyond_loopback(broker.pid)
    assert exposed, "the worker socket must listen beyond loopback in this test"
    before_kib = memory_kib(broker.pid)
    for port in exposed:
        sent, how = flood(port, max_parts=40, max_s=20)
        grown_mib = (memory_kib(broker.pid) - before_kib) / 1024
        print(f"port {port}: {sent} parts sent ({how}); RSS {before_kib / 1024:.0f} MiB, +{grown_mib:.0f} MiB")
        assert sent == 0, f"port {port} took {sent} parts of 15 MiB from a stranger ({how})"
        assert grown_mib < 64, f"port {port}: the broker grew {grown_mib:.0f} MiB"
    assert broker.poll() is None, log.read_text()
    assert ping(address).broker_epoch


@pytest.mark.timeout(120)
def test_the_ipc_gateway_socket_is_for_the_brokers_user_only(tmp_path, processes):
    """Started with a umask that would leave the socket file open to everyone."""
    path = tmp_path / "broker.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BROKER_CLIENT_BIND": f"ipc://{path}",
           "BROKER_WORKER_BIND": f"tcp://127.0.0.1:{free_port()}"}
    log = open(tmp_path / "broker.log", "ab")
    broker = subprocess.Popen(["sh", "-c", f"umask 000; exec {sys.executable} -m broker"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(broker)
    wait_for_pong(f"ipc://{path}", broker, tmp_path / "broker.log")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


SMALL_LIMIT_BYTES = 256 * MIB


@pytest.mark.timeout(300)
def test_under_supervisord_a_flood_stops_at_the_limit_and_an_accepted_request_is_still_answered(tmp_path):
    """The shipped supervisord.conf with its memory limit made small; a request is accepted (a worker
    is running it), then the keyless loopback gateway socket is flooded, connection after connection.
    The broker never grows far past its limit, whether it sheds the connection or dies and is restarted
    by supervisord, and the request still gets its image."""
    stack = Stack(tmp_path, MODEL_ID="fake:delay=4", MAX_BATCH_WAIT_TIME="0.05", REQUEST_TIMEOUT_S="120",
                  PYTHONPATH=str(REPO))  # this checkout's code, whichever is installed
    conf = stack.conf.read_text()
    assert re.search(r'BROKER_MEMORY_LIMIT_BYTES="\d+"', conf), "supervisord.conf sets no memory limit"
    stack.conf.write_text(re.sub(r'BROKER_MEMORY_LIMIT_BYTES="\d+"',
                                 f'BROKER_MEMORY_LIMIT_BYTES="{SMALL_LIMIT_BYTES}"', conf))
    client_port = int(stack.env["BROKER_CLIENT_BIND"].rsplit(":", 1)[1])
    peak_kib, pids, sampling = [0], set(), threading.Event()

    def sample() -> None:  # the broker's RSS every 20 ms, whichever broker process is running
        while not sampling.is_set():
            try:
                pid = int(stack.ctl("pid", "broker").strip())
                pids.add(pid)
                while not sampling.is_set():
                    peak_kib[0] = max(peak_kib[0], memory_kib(pid))
                    time.sleep(0.02)
            except (ValueError, OSError, AssertionError):
                time.sleep(0.1)  # between a broker's death and its successor

    try:
        stack.start()
        first_pid = int(stack.ctl("pid", "broker").strip())
        idle_kib = memory_kib(first_pid)
        body = {"prompt": "accepted before the flood", "width": 64, "height": 64, "num_inference_steps": 2}
        reply: dict = {}
        requester = threading.Thread(target=lambda: reply.update(answer=post_generate(stack.url, body, 180)))
        requester.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, stats = get_json(f"{stack.url}/stats")
            if status == 200 and stats["broker"]["in_progress"] == 1:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the request was not accepted\n{stack.logs()}")
        watcher = threading.Thread(target=sample)
        watcher.start()
        floods = []
        for _ in range(4):
            try:
                floods.append(flood(client_port, max_parts=40, max_s=20))
            except OSError as exc:  # refused: the broker is between a death and its restart
                floods.append((0, repr(exc)))
                time.sleep(0.5)
        requester.join(timeout=150)
        sampling.set()
        watcher.join()
        print(f"idle RSS {idle_kib / 1024:.0f} MiB, peak {peak_kib[0] / 1024:.0f} MiB under a "
              f"{SMALL_LIMIT_BYTES >> 20} MiB limit; floods {floods}; broker pids {sorted(pids)}")
        assert "answer" in reply, f"no answer\n{stack.logs()}"
        status, answer = reply["answer"]
        assert status == 200, (answer, stack.logs())
        assert fetch(answer["image_url"]).startswith(b"\x89PNG")
        assert all(sent < SMALL_LIMIT_BYTES // PART_BYTES + 1 for sent, _ in floods), floods
        assert peak_kib[0] * 1024 < SMALL_LIMIT_BYTES + 96 * MIB, f"peak RSS {peak_kib[0] / 1024:.0f} MiB"
        assert stack.wait_for_states({"broker": "RUNNING", "gateway": "RUNNING"}, timeout_s=60)
        status, _ = post_generate(stack.url, {**body, "prompt": "after the flood"}, 120)
        assert status == 200, stack.logs()
    finally:
        sampling.set()
        stack.stop()
