"""The gateway app in this process, on aiohttp's test server, with any fake of its broker link
(tests/support/fake_brokers.py) behind it."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import GatewaySettings


async def start_client(settings: GatewaySettings, broker: Any) -> TestClient:
    """The gateway app on a test server, with ``broker`` (any fake of the broker client) behind it."""
    client = TestClient(TestServer(create_app(settings, broker_client=broker)))
    await client.start_server()
    return client


def generate_body(seed: int = 1) -> dict[str, Any]:
    return {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": seed}
