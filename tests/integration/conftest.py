"""Fixtures of the tests in one process: the gateway app on aiohttp's test server with a fake of its
broker link (tests/support/fake_brokers.py) behind it.

``client`` is the app with ``settings`` (images under the test's tmp_path) and ``broker`` (a
RecordingFakeBroker); a module overrides ``settings`` or ``broker`` to change them. ``start_gateway``
starts as many as a test needs, each with its own settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import GatewaySettings
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return GatewaySettings(image_dir=str(tmp_path / "images"))


@pytest.fixture
def broker() -> RecordingFakeBroker:
    return RecordingFakeBroker()


@pytest.fixture
async def client(settings: GatewaySettings, broker):
    client = await start_client(settings, broker)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def start_gateway(tmp_path: Path):
    """``await start_gateway(settings)`` or ``await start_gateway(**fields)`` (GatewaySettings fields,
    images under tmp_path): (client, its RecordingFakeBroker); every client is closed after the test."""
    started: list[TestClient] = []

    async def start(settings: GatewaySettings | None = None, **fields) -> tuple[TestClient, RecordingFakeBroker]:
        if settings is None:
            settings = GatewaySettings(image_dir=str(tmp_path / "images"), **fields)
        elif fields:
            raise TypeError("pass GatewaySettings or its fields, not both")
        broker = RecordingFakeBroker()
        client = await start_client(settings, broker)
        started.append(client)
        return client, broker

    yield start
    for client in started:
        await client.close()
