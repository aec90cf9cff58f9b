"""The Redis job store against a real redis-server (tests/support/redis_server.py): the shared
behaviour (tests/support/job_store_contract.py), gateways sharing one server, and a server that is gone."""

from __future__ import annotations

import uuid

import pytest

from gateway.config import GatewaySettings
from gateway.jobs.store import JobStoreUnavailable, RedisJobStore, new_job, open_job_store
from imagegen import settings as settings_lib
from tests.support.job_store_contract import WEBHOOK, JobStoreContract
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def open_store(redis_server):
    """Stores on the module's server, under a prefix of this test's own."""
    prefix = f"test-{uuid.uuid4().hex}:"
    opened: list[RedisJobStore] = []

    def open_store(**kwargs) -> RedisJobStore:
        store = RedisJobStore(redis_server.url, prefix=prefix, **kwargs)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


class TestRedisJobStore(JobStoreContract):
    pass


def test_two_gateways_share_jobs_events_and_the_outbox(open_store):
    one, two = open_store(), open_store()
    made = one.create(new_job("alice", {"prompt": "p"}, 100.0, webhook_url=WEBHOOK))
    assert two.get(made.id, "alice") == made
    two.update(made.id, status="running", started_at=101.0)
    event = two.append_event(made.id, "started", {"worker": "w"}, at=101.0)
    two.enqueue(made.id, event, 101.0)
    assert one.load(made.id).status == "running"
    assert one.events_after(made.id) == [event]
    [claimed] = one.claim_due(102.0, 10, lease_s=30)
    assert two.claim_due(102.0, 10, lease_s=30) == []  # leased by the first gateway
    assert claimed.event_id == event.id


def test_open_job_store_picks_redis_from_the_settings(redis_server, tmp_path):
    settings = settings_lib.load(GatewaySettings, [], {"JOB_STORE": "redis", "JOB_STORE_URL": redis_server.url,
                                                       "IMAGE_DIR": str(tmp_path / "images")})
    store = open_job_store(settings)
    try:
        assert isinstance(store, RedisJobStore)
        made = store.create(new_job("", {"prompt": "p"}, 1.0))
        assert store.load(made.id) == made
    finally:
        store.close()


def test_a_server_that_is_gone_is_unavailable(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore(server.url.replace("redis://", "redis://:hunter2-password@"), socket_timeout_s=2.0)
    try:
        server.stop()
        for call in (lambda: store.load("x"), lambda: store.create(new_job("", {}, 1.0)),
                     lambda: store.claim_due(1.0, 10)):
            with pytest.raises(JobStoreUnavailable) as raised:
                call()
            assert "Redis at" in str(raised.value) and "hunter2" not in str(raised.value)
    finally:
        store.close()
        server.stop()
