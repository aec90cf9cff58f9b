"""The broker's memory limit and out-of-memory exit, in one process: the settings that keep the
gateway socket on loopback, the shipped supervisord configuration's limit, and a MemoryError ending
serve() (status 3). Flooding the real broker process: tests/e2e/test_broker_memory.py."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import zmq

from broker.config import MIN_MEMORY_LIMIT_BYTES, BrokerSettings
from broker.server import BrokerServer
from imagegen import settings as settings_lib
from launcher import supervisor_config
from tests.support.broker_ping import ping
from tests.support.paths import REPO
from tests.support.procs import free_port

MIB = 1024 * 1024


def test_a_gateway_socket_or_address_beyond_loopback_stops_the_process_at_start():
    from gateway.config import GatewaySettings

    for cls, env, value in ((BrokerSettings, "BROKER_CLIENT_BIND", "tcp://0.0.0.0:5555"),
                            (BrokerSettings, "BROKER_CLIENT_BIND", "tcp://10.1.2.3:5555"),
                            (GatewaySettings, "BROKER_CLIENT_ADDRESS", "tcp://broker-host:5555")):
        with pytest.raises(settings_lib.SettingsError, match=env):
            settings_lib.load(cls, [], {env: value})
        opted_out = settings_lib.load(cls, [], {env: value, "BROKER_ALLOW_UNAUTHENTICATED_CLIENTS": "true"})
        assert value in (getattr(opted_out, "client_bind", None), getattr(opted_out, "broker_address", None))
    for local in ("tcp://127.0.0.1:5555", "ipc:///run/imagegen/broker.sock"):
        assert settings_lib.load(BrokerSettings, [], {"BROKER_CLIENT_BIND": local}).client_bind == local
        assert settings_lib.load(GatewaySettings, [], {"BROKER_CLIENT_ADDRESS": local}).broker_address == local


def broker_environment(config_text: str) -> dict[str, str]:
    parser = supervisor_config._read(config_text)
    return supervisor_config._parse_environment(parser.get("program:broker", "environment", fallback=""))


def test_the_shipped_supervisord_configuration_limits_the_brokers_memory(tmp_path):
    """supervisord.conf and the run/supervisord.conf written from it both give the broker a limit that
    the broker accepts."""
    template = (REPO / "supervisord.conf").read_text()
    generated = tmp_path / "run" / "supervisord.conf"
    assert supervisor_config.main(["--assume-gpu-count", "0", "--output", str(generated)], {}) == 0
    for name, text in (("supervisord.conf", template), ("generated", generated.read_text())):
        env = broker_environment(text)
        assert "BROKER_MEMORY_LIMIT_BYTES" in env, f"{name}: no memory limit in the broker's environment= line"
        limit = settings_lib.load(BrokerSettings, [], env).memory_limit_bytes
        assert MIN_MEMORY_LIMIT_BYTES <= limit <= 16 * 1024 * MIB, f"{name}: {limit}"
        assert settings_lib.load(BrokerSettings, [], {}).memory_limit_bytes > 0, "python -m broker alone: limited"
        parser = supervisor_config._read(text)
        assert parser.get("program:broker", "autorestart") == "true", f"{name}: the broker must be restarted"


def test_a_broker_out_of_memory_exits_instead_of_running_deaf():
    """A MemoryError while handling a message ends serve() (and so the process, status 3), where before it
    was logged and dropped or silently ended the socket's reader."""
    port = free_port()
    settings = settings_lib.load(BrokerSettings, [], {"BROKER_CLIENT_BIND": f"tcp://127.0.0.1:{port}",
                                                      "BROKER_WORKER_BIND": f"tcp://127.0.0.1:{free_port()}"})
    server = BrokerServer(settings)

    def out_of_memory(client_id, frames):
        raise MemoryError()

    server._on_client_message = out_of_memory

    def send_ping() -> None:
        try:
            ping(f"tcp://127.0.0.1:{port}", timeout_ms=3000)
        except zmq.Again:
            pass  # no answer: the broker ran out of memory handling it

    pinger = threading.Thread(target=send_ping)
    pinger.start()

    async def serve() -> None:
        await asyncio.wait_for(server.serve(asyncio.Event()), timeout=30)

    try:
        with pytest.raises(MemoryError):
            asyncio.run(serve())
    finally:
        pinger.join()


def test_the_broker_process_exits_3_when_out_of_memory(monkeypatch):
    import broker.__main__ as broker_main

    async def serve(self, stop, drain_timeout_s=0.0):
        raise MemoryError()

    monkeypatch.setattr(broker_main.BrokerServer, "serve", serve)
    monkeypatch.setattr(broker_main.BrokerServer, "__init__", lambda self, settings: None)
    monkeypatch.setattr(broker_main, "apply_memory_limit", lambda limit: "not applied in this test")
    monkeypatch.setattr(os, "umask", lambda mask: 0o022)
    monkeypatch.setattr(broker_main, "setup_logging", lambda *args: None)  # leave this process's logging alone
    settings = settings_lib.load(BrokerSettings, [], {})
    with pytest.raises(SystemExit) as exited:
        asyncio.run(broker_main.main(settings))
    assert exited.value.code == broker_main.EXIT_OUT_OF_MEMORY == 3
