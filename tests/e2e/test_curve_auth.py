"""Who may join as a worker: CurveZMQ keys and the ZAP allow-list, over real sockets and processes.

The broker is the real one (in a subprocess); the authorized worker is the real gpu_worker process
(FAKE backend: the model is not what is tested); intruders are raw DEALER sockets.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from broker.config import BrokerSettings
from broker.server import BrokerServer
from imagegen import protocol
from imagegen.keys import main as keys_main
from imagegen.protocol import WORKER_LINK, BatchingConfig, Disconnect, Heartbeat, Register, Welcome, WorkerStatus
from tests.support.cluster import post, request_body
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def keys(tmp_path):
    keys_dir, authorized = tmp_path / "keys", tmp_path / "authorized"
    assert keys_main(["broker", str(keys_dir)]) == 0
    for name in ("gpu-host-1", "intruder"):
        assert keys_main(["worker", name, str(keys_dir)]) == 0
    authorized.mkdir()
    (authorized / "gpu-host-1.key").write_bytes((keys_dir / "gpu-host-1.key").read_bytes())
    return keys_dir, authorized


@pytest.fixture
def secured(keys, make_cluster):
    keys_dir, authorized = keys
    c = make_cluster(BROKER_CURVE_SECRET_KEY=str(keys_dir / "broker.key_secret"),
                     BROKER_AUTHORIZED_KEYS_DIR=str(authorized))
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    return c, keys_dir


def register(name: str) -> Register:
    batching = BatchingConfig(enable_batching=True, max_batch_size=4, max_wait_time=1.0, min_batch_size=1,
                              min_wait_time=0.5, adaptive_batching=True, adaptive_threshold=10)
    return Register(worker_name=name, host="h", gpu_id=0, pid=1, model_id="fake", device="cpu", capacity=4,
                    batching=batching)


def dealer(ctx: zmq.Context, address: str, keys_dir, key_name: str | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 2000
    if key_name is not None:
        public, secret = zmq.auth.load_certificate(keys_dir / f"{key_name}.key_secret")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey, _ = zmq.auth.load_certificate(keys_dir / "broker.key")
    sock.connect(address)
    return sock


def answer(sock: zmq.Socket) -> protocol.Message | None:
    try:
        return protocol.decode(sock.recv_multipart(), WORKER_LINK)[0]
    except zmq.Again:
        return None


def test_authorized_worker_serves_and_unknown_keys_are_refused(secured):
    c, keys_dir = secured
    c.start_worker(0, WORKER_NAME="gpu-host-1-gpu0", WORKER_CURVE_SECRET_KEY=str(keys_dir / "gpu-host-1.key_secret"),
                   BROKER_CURVE_PUBLIC_KEY=str(keys_dir / "broker.key"))
    c.wait_for_workers(1)
    status, body, _ = post(c.url, request_body(1))
    assert status == 200 and body["worker"] == "gpu-host-1-gpu0", body

    ctx = zmq.Context()
    try:
        address = c.env["BROKER_WORKER_ADDRESS"]
        for key_name in ("intruder", None):  # a key not on the allow-list, and no key at all
            sock = dealer(ctx, address, keys_dir, key_name)
            sock.send_multipart(protocol.encode(WORKER_LINK, register(f"sneaky-{key_name}")))
            assert answer(sock) is None, "an unknown worker must get nothing back, not even a refusal"
            sock.close()
        stats = c.stats()
        assert stats["num_gpus"] == 1 and stats["broker"]["connections_refused_unknown_key"] >= 1, stats
        # The intruders never saw a prompt: every request still goes to the one real worker.
        for i in range(3):
            assert post(c.url, request_body(10 + i))[1]["worker"] == "gpu-host-1-gpu0"
    finally:
        ctx.destroy(linger=0)


def test_a_registered_key_cannot_pose_as_another_hosts_worker(secured):
    c, keys_dir = secured
    ctx = zmq.Context()
    try:
        sock = dealer(ctx, c.env["BROKER_WORKER_ADDRESS"], keys_dir, "gpu-host-1")
        sock.send_multipart(protocol.encode(WORKER_LINK, register("gpu-host-2-gpu0")))
        refusal = answer(sock)
        assert isinstance(refusal, Disconnect) and "may not register as 'gpu-host-2-gpu0'" in refusal.reason
        sock.send_multipart(protocol.encode(WORKER_LINK, register("gpu-host-1-gpu3")))
        assert isinstance(answer(sock), Welcome)
        # wait_for: the gateway may still be starting (connection refused) on a loaded machine
        c.wait_for(lambda s: s["num_gpus"] == 1 and s["broker"]["registrations_refused"] == 1, 30,
                   "one worker registered and one registration refused")
    finally:
        ctx.destroy(linger=0)


def receive(sock: zmq.Socket, wanted: type, saying: str = "", timeout_s: float = 5.0) -> protocol.Message:
    """The first ``wanted`` message (a Disconnect: whose reason contains ``saying``), heartbeating
    meanwhile as a registered worker does; the broker's other messages in between are skipped
    (BrokerHeartbeats, and "register again" answers to heartbeats once it has let the worker go)."""
    beat = protocol.encode(WORKER_LINK, Heartbeat(WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            sock.send_multipart(beat, flags=zmq.DONTWAIT)
        except zmq.Again:  # no connection (a refused handshake): a blocking send would wait forever
            pass
        if sock.poll(100):
            message = protocol.decode(sock.recv_multipart(), WORKER_LINK)[0]
            if isinstance(message, wanted) and saying in getattr(message, "reason", ""):
                return message
    raise AssertionError(f"no {wanted.__name__} from the broker within {timeout_s}s")


def test_a_key_copied_in_or_removed_takes_effect_without_a_broker_restart(secured):
    c, keys_dir = secured
    authorized = Path(c.env["BROKER_AUTHORIZED_KEYS_DIR"])
    ctx = zmq.Context()
    try:
        address = c.env["BROKER_WORKER_ADDRESS"]
        c.wait_for(lambda s: s["num_gpus"] == 0, 10, "the broker to answer (it has read the keys)")
        shutil.copy(keys_dir / "intruder.key", authorized / "intruder.key")  # a new host's key, while running
        sock = dealer(ctx, address, keys_dir, "intruder")
        sock.send_multipart(protocol.encode(WORKER_LINK, register("intruder-gpu0")))
        assert isinstance(receive(sock, Welcome), Welcome)
        c.wait_for(lambda s: s["num_gpus"] == 1 and s["worker"]["worker"] == "intruder-gpu0", 10,
                   "the new host's worker in /stats")

        (authorized / "intruder.key").unlink()  # revoked: the registered worker is told to leave
        receive(sock, Disconnect, saying="no longer authorized")
        assert c.stats()["num_gpus"] == 0  # gone at once: the broker removed it before saying so
        sock.send_multipart(protocol.encode(WORKER_LINK, register("intruder-gpu0")))
        receive(sock, Disconnect, saying="may not register")  # and cannot come back
        assert c.stats()["broker"]["registrations_refused"] == 1
    finally:
        ctx.destroy(linger=0)


async def test_a_key_removal_read_first_by_a_handshake_still_disconnects_its_workers(keys, caplog):
    """In-process broker (on the test's event loop: its ZAP handler needs one): the folder's change
    may be read by a ZAP handshake's refresh, not by the heartbeat timer's; the timer must still
    find the worker whose key went."""
    keys_dir, authorized = keys
    settings = BrokerSettings(client_bind=f"tcp://127.0.0.1:{free_port()}", worker_bind=f"tcp://127.0.0.1:{free_port()}",
                              curve_secret_key=str(keys_dir / "broker.key_secret"),
                              authorized_keys_dir=str(authorized))
    server = BrokerServer(settings)
    try:
        routing_id, key = b"\x00worker", zmq.auth.load_certificate(authorized / "gpu-host-1.key")[0]
        server.state.register(routing_id, register("gpu-host-1-gpu0"), server.clock(), key, server.allow_list.keys)
        server._disconnect_revoked_workers()
        assert list(server.state.workers) == [routing_id]  # its key is there: it stays

        (authorized / "gpu-host-1.key").unlink()
        assert server.allow_list.refresh()  # a handshake read the change first
        server._disconnect_revoked_workers()
        assert server.state.workers == {}
        assert "gpu-host-1-gpu0 disconnected: its key is no longer authorized" in caplog.text
    finally:
        server.close()
