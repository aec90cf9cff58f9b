"""The broker's worker port against strangers: real broker, gateway and worker processes, and an
intruder that is a plain pyzmq DEALER speaking the worker protocol (no key, no worker code).

* By default the port is bound to loopback only, and a non-loopback bind without CurveZMQ keys
  stops the broker at start (exit 2) unless explicitly allowed.
* A registration under a live worker's name neither evicts it nor receives its requests.
* A connection announcing a live worker's routing id (ROUTER_HANDOVER) receives nothing meant for it.
* An intruder that takes work and never answers is declared stuck; the real worker serves everything.
* A worker SIGKILLed and restarted at once is refused while its old record lives, and comes back
  by itself once that record expires.

Workers run the FAKE backend (MODEL_ID=fake:delay=...): the serving layer is under test.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

from broker.config import BrokerSettings
from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    WORKER_LINK,
    BatchingConfig,
    Disconnect,
    Generate,
    GenerationParams,
    Heartbeat,
    Register,
    Welcome,
    WorkerStatus,
)
from imagegen.settings import SettingsError, load
from tests.support.cluster import post, request_body, send_concurrently
from tests.support.paths import REPO
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(120)


def register_message(name: str, capacity: int = 8, model_id: str = "fake") -> Register:
    batching = BatchingConfig(enable_batching=True, max_batch_size=capacity, max_wait_time=0.05, min_batch_size=1,
                              min_wait_time=0.0, adaptive_batching=False, adaptive_threshold=10)
    return Register(worker_name=name, host="intruder-host", gpu_id=0, pid=4242, model_id=model_id, device="cpu",
                    capacity=capacity, batching=batching)


class Intruder:
    """A raw DEALER in a thread: registers (once, or again every ``reregister_s``), heartbeats every
    ``heartbeat_s``, records what the broker sends it and never answers a request."""

    def __init__(self, address: str, name: str, routing_id: bytes | None = None, reregister_s: float | None = None,
                 heartbeat_s: float = 0.1, model_id: str = "fake") -> None:
        # model_id: the cluster's own model, so that the broker would route its requests to the intruder
        self.address, self.name, self.routing_id, self.model_id = address, name, routing_id, model_id
        self.reregister_s, self.heartbeat_s = reregister_s, heartbeat_s
        self.received: list[protocol.Message] = []
        self.registrations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Intruder":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def of_type(self, kind: type) -> list:
        return [m for m in list(self.received) if isinstance(m, kind)]

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if self.routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.connect(self.address)
        beat = protocol.encode(WORKER_LINK, Heartbeat(WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0)))
        register = protocol.encode(WORKER_LINK, register_message(self.name, model_id=self.model_id))
        last_register = last_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.registrations == 0 or (self.reregister_s is not None and now - last_register >= self.reregister_s):
                    sock.send_multipart(register)
                    self.registrations += 1
                    last_register = now
                if now - last_beat >= self.heartbeat_s:
                    sock.send_multipart(beat)
                    last_beat = now
                if sock.poll(20):
                    message, _ = protocol.decode(sock.recv_multipart(), WORKER_LINK)
                    self.received.append(message)
        finally:
            sock.close(linger=0)
            ctx.term()


def wait_for_message(intruder: Intruder, kind: type, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if intruder.of_type(kind):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def intruders():
    started: list[Intruder] = []

    def make(*args, **kwargs) -> Intruder:
        started.append(Intruder(*args, **kwargs).start())
        return started[-1]

    yield make
    for intruder in started:
        intruder.stop()


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the route a packet would leave by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


# ------------------------------------------------------------------ the default bind


def test_the_default_worker_bind_cannot_be_reached_from_another_address(make_cluster, intruders):
    """The default bind's interface, on a free port: a DEALER on loopback is welcomed (the broker is
    up), one arriving on the machine's network address never connects, so it reads no prompt."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    default = load(BrokerSettings, [], environ={}).worker_bind
    port = free_port()
    c = make_cluster(BROKER_WORKER_BIND=f"{default.rpartition(':')[0]}:{port}")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    local = intruders(f"tcp://127.0.0.1:{port}", "local-worker", reregister_s=1.0)
    assert wait_for_message(local, Welcome, 30), c.logs()
    local.stop()
    remote = intruders(f"tcp://{address}:{port}", "intruder", reregister_s=0.5)
    # The gateway's requests would go to any registered worker: none gets to the intruder.
    pool, futures = send_concurrently(c.url, 3, timeout_s=60)
    time.sleep(3)
    assert remote.received == [], f"{default}: the intruder on {address} got {remote.received}"
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://[::]:5556", "tcp://192.0.2.2:5556",
                                  "tcp://broker-host:5556", "tcp://eth0:5556"])
def test_a_non_loopback_bind_without_keys_is_a_settings_error(bind):
    with pytest.raises(SettingsError, match="BROKER_WORKER_BIND"):
        load(BrokerSettings, [], environ={"BROKER_WORKER_BIND": bind})
    allowed = load(BrokerSettings, [], environ={"BROKER_WORKER_BIND": bind,
                                                "BROKER_ALLOW_UNAUTHENTICATED_WORKERS": "true"})
    assert allowed.worker_bind == bind


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:5556", "tcp://127.0.0.2:5556", "tcp://[::1]:5556",
                                  "ipc:///tmp/imagegen-workers"])
def test_a_local_bind_needs_no_keys(bind):
    assert load(BrokerSettings, [], environ={"BROKER_WORKER_BIND": bind}).worker_bind == bind


def test_the_broker_refuses_to_start_on_all_interfaces_without_keys_unless_told(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "BROKER_CLIENT_BIND": f"tcp://127.0.0.1:{free_port()}",
           "BROKER_WORKER_BIND": f"tcp://0.0.0.0:{free_port()}"}
    try:
        refused = subprocess.run([sys.executable, "-m", "broker"], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=30)
    except subprocess.TimeoutExpired:  # run() killed it
        pytest.fail("the broker started on 0.0.0.0 without keys")
    assert refused.returncode == 2, refused.stderr
    assert "BROKER_WORKER_BIND" in refused.stderr and "python -m imagegen.keys" in refused.stderr, refused.stderr
    assert "BROKER_ALLOW_UNAUTHENTICATED_WORKERS=true" in refused.stderr

    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "broker"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**env, "BROKER_ALLOW_UNAUTHENTICATED_WORKERS": "true"},
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "NOT authenticated" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "WARNING" in log.read_text() and "NOT authenticated" in log.read_text(), log.read_text()
    finally:
        process.kill()
        process.wait(10)


# ------------------------------------------------------------------ who may register, and as whom


def test_an_intruder_under_a_live_workers_name_neither_evicts_it_nor_receives_a_request(make_cluster, intruders):
    c = make_cluster(MODEL_ID="fake:delay=0.1")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    c.wait_for_workers(1)
    # The worker's name is in every response; the intruder claims it again and again.
    intruder = intruders(c.env["BROKER_WORKER_ADDRESS"], "worker0", reregister_s=0.05, model_id=c.env["MODEL_ID"])
    assert wait_for_message(intruder, Disconnect, 10), c.logs()
    replies = []
    for i in range(8):
        replies.append(post(c.url, request_body(i)))
    assert [status for status, _, _ in replies] == [200] * 8, (replies, c.logs())
    assert {body["worker"] for _, body, _ in replies} == {"worker0"}
    assert intruder.of_type(Generate) == [] and intruder.of_type(Welcome) == []
    stats = c.stats()
    broker = stats["broker"]
    assert broker["workers_registered"] == 1, stats  # the real worker's one registration: never evicted
    assert broker["registrations_refused"] >= 1 and broker["requeued"] == 0, stats
    refusal = intruder.of_type(Disconnect)[0].reason
    assert "live worker" in refusal and "WORKER_NAME" in refusal
    print(f"intruder registered {intruder.registrations} times as worker0: got 0 of 8 prompts, "
          f"{broker['registrations_refused']} registrations refused, worker0 served 8 of 8")


def test_a_connection_reusing_a_live_workers_routing_id_receives_nothing_meant_for_it(make_cluster, intruders):
    """Two raw DEALERs with the same ROUTING_ID: the first registered; the second must not take
    over the id (ROUTER_HANDOVER) and receive the first one's requests."""
    c = make_cluster()
    c.start("broker", "broker")
    routing_id = b"\x00worker-connection-1"
    victim = intruders(c.env["BROKER_WORKER_ADDRESS"], "victim-gpu0", routing_id=routing_id, reregister_s=1.0)
    assert wait_for_message(victim, Welcome, 30), c.logs()
    victim.reregister_s = None  # registered: from now on it only heartbeats
    intruder = intruders(c.env["BROKER_WORKER_ADDRESS"], "intruder-gpu0", routing_id=routing_id)
    time.sleep(1.0)  # the intruder connected and registered (or tried to)

    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    client.connect(c.env["BROKER_CLIENT_ADDRESS"])
    try:
        for i in range(4):
            client.send_multipart(protocol.encode(
                CLIENT_LINK, Generate(f"r-{i}", GenerationParams(f"secret prompt {i}", 64, 64, 2, 7.5, seed=i), 60.0)))
        deadline = time.monotonic() + 20
        while len(victim.of_type(Generate)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close(linger=0)
        ctx.term()
    assert intruder.of_type(Generate) == [], "a second connection with the worker's routing id got its prompts"
    assert sorted(m.request_id for m in victim.of_type(Generate)) == [f"r-{i}" for i in range(4)], c.logs()


# ------------------------------------------------------------------ the progress deadline


def test_an_intruder_that_takes_work_and_never_answers_is_declared_stuck(make_cluster, intruders):
    c = make_cluster(MODEL_ID="fake:delay=0.1", WORKER_PROGRESS_TIMEOUT_S="1", REQUEST_TIMEOUT_S="20")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    c.wait_for_workers(1)
    intruder = intruders(c.env["BROKER_WORKER_ADDRESS"], "intruder-gpu0",  # registers once, heartbeats
                         model_id=c.env["MODEL_ID"])
    c.wait_for_workers(2, timeout_s=10)
    pool, futures = send_concurrently(c.url, 6, timeout_s=40)
    replies = [future.result() for future in futures]
    pool.shutdown()
    taken = len(intruder.of_type(Generate))
    assert taken >= 1, "the intruder must have been handed work for this test to mean anything"
    assert [status for status, _, _ in replies] == [200] * 6, (replies, c.logs())
    assert {body["worker"] for _, body, _ in replies} == {"worker0"}
    stats = c.stats()
    assert stats["broker"]["workers_stuck"] == 1 and stats["num_gpus"] == 1, stats
    assert any("stuck" in m.reason for m in intruder.of_type(Disconnect))
    print(f"never-answering intruder took {taken} of 6 requests; worker0 served 6 of 6; "
          f"slowest reply {max(seconds for _, _, seconds in replies):.2f}s (progress timeout 1 s)")


def test_a_worker_restarted_at_once_after_sigkill_comes_back_by_itself(make_cluster):
    """Its old record still lives (a 4 s liveness window): the new process is refused, retries, and
    is admitted once the old record expires."""
    c = make_cluster(MODEL_ID="fake:delay=0.1", HEARTBEAT_LIVENESS="20")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    c.wait_for_workers(1)
    c.signal("worker0", signal.SIGKILL)
    c.processes["worker0"].wait(10)
    c.start_worker(0)
    c.wait_for(lambda s: s["broker"]["workers_expired"] == 1 and s["num_gpus"] == 1
               and s["broker"]["workers_registered"] == 2, 60, "the restarted worker to be admitted")
    status, body, _ = post(c.url, request_body(1))
    assert status == 200 and body["worker"] == "worker0", body
    refused = c.stats()["broker"]["registrations_refused"]
    print(f"restarted worker refused {refused} times, then admitted")


def test_a_real_worker_running_a_batch_longer_than_the_progress_timeout_is_not_stuck(make_cluster):
    """A 24-step batch of 0.5 s steps (12 s) against a 5 s progress timeout: the worker's PROGRESS
    (every step here; at most one each 0.5 s per request) keeps it from being declared stuck."""
    c = make_cluster(MODEL_ID="fake:step_delay=0.5", WORKER_PROGRESS_TIMEOUT_S="5")
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.start_worker(0)
    c.wait_for_workers(1)
    status, body, seconds = post(c.url, {**request_body(1), "num_inference_steps": 24}, timeout_s=120)
    assert status == 200 and body["worker"] == "worker0", (body, c.logs())
    assert seconds > 5, "the batch must outlast the progress timeout for this test to mean anything"
    stats = c.stats()
    assert stats["broker"]["workers_stuck"] == 0 and stats["broker"]["requeued"] == 0, stats
