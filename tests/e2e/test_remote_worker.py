"""A worker on another host: its own Linux network namespace, joined to the broker's by a veth pair.

The "remote host" is a network namespace this test creates (``ip netns``) with a veth pair in a
private test range (10.201.0.0/16, a /30 per run); nothing leaves the machine. The broker (root
namespace) binds its worker endpoint on the veth's root-side address and requires CurveZMQ keys;
the worker runs with ``ip netns exec`` and reaches the broker only across the veth. A second worker
in the root namespace, under another host name, gives /stats its multi-GPU shape with two hosts.

Needs root and iproute2: skipped otherwise, except in CI (CI=true), where it must run (.ci/run
installs iproute2; CI runs as root). The namespace, the veth pair and every process are removed in
teardown, also when the test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.keys import main as keys_main
from tests.support.cluster import Cluster, post, request_body, send_concurrently
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(120)

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
TEST_RANGE = "10.201"  # 10.201.0.0/16: this test's own hosts only; one /30 per namespace


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces and veth pairs needs root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class NetnsHost:
    """A test host: network namespace ``name`` with ``address``, linked to ``root_address`` by veth."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"igtest-{tag}"
        self.root_veth, self.host_veth = f"igt{tag}r", f"igt{tag}h"  # interface names: 15 characters at most
        self.root_address, self.address = self._free_subnet()

    @staticmethod
    def _free_subnet() -> tuple[str, str]:
        in_use = _ip("-4", "-o", "addr", "show")
        for _ in range(20):
            third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
            root, host = f"{TEST_RANGE}.{third}.{fourth + 1}", f"{TEST_RANGE}.{third}.{fourth + 2}"
            if f" {root}/" not in in_use and f" {host}/" not in in_use:
                return root, host
        raise RuntimeError(f"no free /30 in {TEST_RANGE}.0.0/16")

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.root_veth, "type", "veth", "peer", "name", self.host_veth)
        _ip("link", "set", self.host_veth, "netns", self.name)
        _ip("addr", "add", f"{self.root_address}/30", "dev", self.root_veth)
        _ip("link", "set", self.root_veth, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.host_veth)
        _ip("-n", self.name, "link", "set", self.host_veth, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Remove the namespace (which takes its veth end, and so the pair); ignore what is gone."""
        for args in (("netns", "del", self.name), ("link", "del", self.root_veth)):
            subprocess.run(["ip", *args], capture_output=True, timeout=30)

    def namespace_of(self, pid: int) -> str:
        return _ip("netns", "identify", str(pid)).strip()

    def root_side_bytes(self) -> int:
        """Bytes received on the root side of the veth: what the remote host sent across it."""
        return int(Path(f"/sys/class/net/{self.root_veth}/statistics/rx_bytes").read_text())


@pytest.fixture
def remote_host():
    reason = _unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true, but {reason}: in CI this test must run (.ci/run installs iproute2; run as root)")
        pytest.skip(reason)
    host = NetnsHost()
    try:
        host.create()
        yield host
    finally:
        host.destroy()
    assert host.name not in _ip("netns", "list"), "the test namespace must be gone after teardown"


@pytest.fixture
def keys(tmp_path):
    """Broker keys, and one key pair per worker host, both authorized."""
    keys_dir, authorized = tmp_path / "keys", tmp_path / "authorized"
    assert keys_main(["broker", str(keys_dir)]) == 0
    authorized.mkdir()
    for name in ("remote-host", "local-host"):
        assert keys_main(["worker", name, str(keys_dir)]) == 0
        shutil.copy(keys_dir / f"{name}.key", authorized / f"{name}.key")
    return keys_dir, authorized


def worker_keys(keys_dir: Path, host: str) -> dict[str, str]:
    return {"WORKER_CURVE_SECRET_KEY": str(keys_dir / f"{host}.key_secret"),
            "BROKER_CURVE_PUBLIC_KEY": str(keys_dir / "broker.key")}


def start_in_namespace(cluster: Cluster, namespace: str, name: str, **settings: str) -> subprocess.Popen:
    """Cluster.start, but the worker runs inside ``namespace`` (ip netns exec execs it: same pid)."""
    log = open(cluster.dir / f"{name}.log", "ab")
    process = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "gpu_worker"],
                               env={**cluster.env, **settings}, cwd=cluster.dir, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    cluster.processes[name] = process
    return process


@pytest.fixture
def cluster(remote_host, keys, make_cluster):
    # make_cluster is set up after remote_host, so the cluster is stopped before the namespace goes.
    keys_dir, authorized = keys
    endpoint = f"tcp://{remote_host.root_address}:{free_port()}"
    c = make_cluster(BROKER_WORKER_BIND=endpoint, BROKER_WORKER_ADDRESS=endpoint, MODEL_ID="fake:delay=0.2",
                     BROKER_CURVE_SECRET_KEY=str(keys_dir / "broker.key_secret"),
                     BROKER_AUTHORIZED_KEYS_DIR=str(authorized))
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    return c


def test_worker_on_another_host_registers_serves_and_appears_in_stats_with_its_host(cluster, remote_host, keys):
    keys_dir, _ = keys
    remote = start_in_namespace(cluster, remote_host.name, "remote-worker", WORKER_HOST="remote-host", GPU_ID="0",
                                **worker_keys(keys_dir, "remote-host"))
    cluster.wait_for_workers(1)
    assert remote_host.namespace_of(remote.pid) == remote_host.name, "the worker must run on the test host"

    # It takes work: the only worker, so this request crossed the veth both ways.
    status, body, _ = post(cluster.url, request_body(1))
    assert status == 200, (body, cluster.logs())
    assert (body["host"], body["worker"], body["gpu_id"]) == ("remote-host", "remote-host-gpu0", 0)
    assert remote_host.root_side_bytes() > 0

    # A second GPU worker on the broker's own host: /stats takes the multi-GPU shape, two hosts.
    cluster.start_worker(1, WORKER_NAME="local-host-gpu0", WORKER_HOST="local-host", GPU_ID="0",
                         **worker_keys(keys_dir, "local-host"))
    cluster.wait_for_workers(2)
    pool, futures = send_concurrently(cluster.url, 8)
    replies = [future.result() for future in futures]
    pool.shutdown()
    assert [status for status, _, _ in replies] == [200] * 8, replies
    assert {body["host"] for _, body, _ in replies} == {"remote-host", "local-host"}, "both hosts share a burst"

    served = {host: sum(body["host"] == host for _, body, _ in replies) for host in ("remote-host", "local-host")}
    served["remote-host"] += 1  # the first request

    def per_host(stats: dict) -> dict[str, dict]:
        return {gpu["host"]: gpu for gpu in stats.get("per_gpu_stats", [])}

    # Workers report their counters after each batch; wait until both reports are in.
    cluster.wait_for(lambda s: {h: g["total_requests"] for h, g in per_host(s).items()} == served, 10,
                     f"per-GPU stats counting {served}")
    stats = cluster.stats()
    assert stats["num_gpus"] == 2 and stats["gpu_ids"] == [0, 0], stats  # GPU 0 of each host
    remote_stats = per_host(stats)["remote-host"]
    assert (remote_stats["worker"], remote_stats["gpu_id"], remote_stats["state"]) == ("remote-host-gpu0", 0, "ready")
    assert per_host(stats)["local-host"]["worker"] == "local-host-gpu0"
    assert stats["broker"]["connections_refused_unknown_key"] == 0
