"""WebhookSender delivering a SQLite store's outbox to real aiohttp receivers on 127.0.0.1, in this
process: signatures verified by the receiver, a 500 answered once then the retry with the same
webhook-id, giving up, the URL guard at delivery time, the filter, and docs/jobs.md's receiver."""

from __future__ import annotations

import asyncio
import inspect
import time
import re
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.jobs import webhooks
from gateway.jobs.store import SQLITE_FILE, JobStore, SqliteJobStore, new_job
from gateway.jobs.webhooks import Backoff, WebhookSender, generate_secret, record_event, verify
from tests.support.clock import Clock
from tests.support.paths import REPO
from tests.support.procs import free_port
from tests.support.fake_resolver import FakeResolver

SECRET = generate_secret()
T0 = 1_795_800_000.0
FIXED = Backoff(max_attempts=3, base_s=5.0, factor=4.0, jitter=lambda: 1.0)  # retries after 5 s, then 20 s


class Receiver:
    """A webhook receiver that verifies every delivery and answers from a script of statuses."""

    def __init__(self, statuses: list[int], clock: Clock | None = None, delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.clock = clock
        self.delay_s = delay_s
        self.received: list[tuple[dict, bytes]] = []
        self.verified: list[bool] = []
        self.server: TestServer | None = None
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        try:
            verify(SECRET, request.headers, body, now=self.clock() if self.clock else None)
            self.verified.append(True)
        except ValueError:
            self.verified.append(False)
        self.arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status in (301, 302, 307, 308):
            raise web.HTTPTemporaryRedirect("/elsewhere")
        return web.Response(status=status)

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.received.append(({"redirected": "yes"}, await request.read()))
        return web.Response(status=200)

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/elsewhere", self.elsewhere)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server.port}/hook"

    async def close(self) -> None:
        await self.server.close()


@pytest.fixture
def store(tmp_path: Path):
    store = SqliteJobStore(tmp_path / SQLITE_FILE)
    yield store
    store.close()


@pytest.fixture
async def receivers():
    started: list[Receiver] = []

    async def start(statuses: list[int], **options) -> Receiver:
        receiver = await Receiver(statuses, **options).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.close()


@pytest.fixture
async def senders():
    made: list[WebhookSender] = []

    async def make(store: JobStore, **options) -> WebhookSender:
        options.setdefault("allow_private", True)  # the receivers are on loopback
        sender = WebhookSender(store, SECRET, **options)
        await sender.open()
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.stop()


def submit(store: JobStore, url: str, events=("completed",)):
    return store.create(new_job("", {"prompt": "p"}, T0, webhook_url=url, webhook_events=list(events)))


async def test_a_500_is_retried_with_the_same_webhook_id_after_the_backoff(store, receivers, senders):
    clock = Clock(T0)
    receiver = await receivers([500, 200], clock=clock)
    sender = await senders(store, clock=clock, backoff=FIXED)
    job = submit(store, receiver.url())
    record_event(store, job, "succeeded", {"image_url": "http://x/i.png"}, now=T0)

    assert await sender.run_once() == 1
    assert len(receiver.received) == 1 and sender.stats["retried"] == 1
    [pending] = store.pending_deliveries(job.id)
    assert (pending.attempts, pending.next_attempt_at) == (1, T0 + 5.0)
    clock.now = T0 + 4.9
    assert await sender.run_once() == 0  # not due yet
    clock.now = T0 + 5.0
    assert await sender.run_once() == 1
    assert sender.stats == {"delivered": 1, "retried": 1, "given_up": 0, "refused": 0}
    assert store.pending_deliveries(job.id) == []

    (first, body1), (second, body2) = receiver.received
    assert receiver.verified == [True, True]
    assert first["webhook-id"] == second["webhook-id"] == f"msg_{job.id}.1"  # the receiver deduplicates by it
    assert (first["webhook-timestamp"], second["webhook-timestamp"]) == (str(int(T0)), str(int(T0 + 5)))
    assert body1 == body2 and first["Content-Type"] == "application/json"
    assert b'"type":"job.succeeded"' in body1 and f'"job_id":"{job.id}"'.encode() in body1


async def test_the_background_loop_retries_and_stops_cleanly(store, receivers, senders):
    receiver = await receivers([500, 200])
    sender = await senders(store, backoff=Backoff(base_s=0.01, factor=1.0, max_delay_s=0.01), poll_interval_s=0.02)
    await sender.start()
    job = submit(store, receiver.url(), events=("start", "completed"))
    for event_type in ("started", "progress", "succeeded"):
        await asyncio.to_thread(record_event, store, job, event_type, {})
    sender.wake()
    async with asyncio.timeout(30):
        while sender.stats["delivered"] < 2:
            await asyncio.sleep(0.01)
    await sender.stop()
    assert sender._task is None and sender._session is None
    ids = [headers["webhook-id"] for headers, _ in receiver.received]
    assert sorted(set(ids)) == [f"msg_{job.id}.1", f"msg_{job.id}.3"]  # progress was not selected
    assert len(ids) == 3 and all(receiver.verified)
    assert store.pending_deliveries(job.id) == []


async def test_after_the_last_attempt_a_delivery_is_given_up(store, receivers, senders):
    clock = Clock(T0)
    receiver = await receivers([503], clock=clock)
    sender = await senders(store, clock=clock, backoff=FIXED)
    job = submit(store, receiver.url())
    record_event(store, job, "failed", {"error": {"code": "x", "message": "y"}}, now=T0)
    for now in (T0, T0 + 5, T0 + 25):
        clock.now = now
        assert await sender.run_once() == 1
    assert len(receiver.received) == 3
    assert sender.stats == {"delivered": 0, "retried": 2, "given_up": 1, "refused": 0}
    assert store.pending_deliveries(job.id) == [] and await sender.run_once() == 0


async def test_redirects_are_not_followed_and_count_as_failures(store, receivers, senders):
    receiver = await receivers([307])
    sender = await senders(store, backoff=FIXED)
    job = submit(store, receiver.url())
    record_event(store, job, "succeeded", {})
    await sender.run_once()
    assert [headers.get("redirected") for headers, _ in receiver.received] == [None]
    assert sender.stats["retried"] == 1


async def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(store, receivers, senders):
    receiver = await receivers([200], delay_s=5.0)
    sender = await senders(store, backoff=FIXED, timeout_s=0.2)
    job = submit(store, receiver.url())
    record_event(store, job, "succeeded", {})
    await sender.run_once()
    assert sender.stats["retried"] == 1 and sender.stats["delivered"] == 0
    assert store.pending_deliveries(job.id)[0].attempts == 1


async def test_a_receiver_that_is_not_listening_is_a_failed_attempt(store, senders):
    sender = await senders(store, backoff=FIXED)
    job = submit(store, f"http://127.0.0.1:{free_port()}/hook")
    record_event(store, job, "succeeded", {})
    await sender.run_once()
    assert sender.stats["retried"] == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "rebind.example.com"])
async def test_private_addresses_are_refused_at_delivery_too(store, receivers, senders, host):
    """A job stored with a URL that passed (or, here, skipped) the submission check: the sender checks
    again, on the addresses it would connect to, and gives the delivery up without sending it."""
    receiver = await receivers([200])
    resolver = FakeResolver({"rebind.example.com": ["127.0.0.1"], "localhost": ["127.0.0.1"]})
    sender = await senders(store, allow_private=False, resolver=resolver)
    job = submit(store, receiver.url(host))
    record_event(store, job, "succeeded", {})
    assert await sender.run_once() == 1
    assert receiver.received == []
    assert sender.stats == {"delivered": 0, "retried": 0, "given_up": 0, "refused": 1}
    assert store.pending_deliveries(job.id) == []


async def test_the_sender_connects_to_the_address_its_resolver_checked(store, receivers, senders):
    receiver = await receivers([200])
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    sender = await senders(store, allow_private=True, resolver=resolver)
    job = submit(store, receiver.url("hooks.example.com"))
    record_event(store, job, "succeeded", {})
    await sender.run_once()
    assert resolver.asked == ["hooks.example.com"] and sender.stats["delivered"] == 1
    assert receiver.received[0][0]["Host"] == f"hooks.example.com:{receiver.server.port}"


async def test_lagging_progress_is_coalesced_to_the_latest(store, receivers, senders):
    clock = Clock(T0)
    receiver = await receivers([500, 200], clock=clock)
    sender = await senders(store, clock=clock, backoff=FIXED)
    job = submit(store, receiver.url(), events=("progress", "completed"))
    record_event(store, job, "progress", {"step": 1, "steps": 4}, now=T0)
    await sender.run_once()  # 500: the receiver lags
    for step in (2, 3, 4):
        record_event(store, job, "progress", {"step": step, "steps": 4}, now=T0 + step / 10)
    record_event(store, job, "succeeded", {}, now=T0 + 1)
    clock.now = T0 + 5
    assert await sender.run_once() == 2
    delivered = [body for _, body in receiver.received[1:]]
    assert sorted(b'"step":4' in body or b"job.succeeded" in body for body in delivered) == [True, True]
    assert sender.stats["delivered"] == 2 and store.pending_deliveries(job.id) == []


def test_record_event_queues_only_what_the_filter_selects(store):
    default = store.create(new_job("", {}, T0, webhook_url="http://example.com/h"))
    for event_type in ("queued", "started", "progress", "preview", "restarted", "cancelled"):
        record_event(store, default, event_type, {}, now=T0)
    assert [d.type for d in store.pending_deliveries(default.id)] == ["started", "restarted", "cancelled"]
    silent = store.create(new_job("", {}, T0))
    assert record_event(store, silent, "started", {}, now=T0).id == 1
    assert store.pending_deliveries(silent.id) == []


# --- docs/jobs.md's receiver ---------------------------------------------------------------------

def receiver_snippet() -> str:
    text = (REPO / "docs" / "jobs.md").read_text()
    section = text.split("### A receiver in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_show_the_verify_function_as_it_is():
    assert inspect.getsource(webhooks.verify) in receiver_snippet()


async def test_the_receiver_in_the_docs_verifies_and_deduplicates(store, senders, monkeypatch):
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    namespace: dict = {"__name__": "receiver"}
    exec(compile(receiver_snippet(), "docs/jobs.md", "exec"), namespace)
    server = TestServer(namespace["app"], host="127.0.0.1")
    await server.start_server()
    try:
        sender = await senders(store)
        job = submit(store, f"http://127.0.0.1:{server.port}/webhook")
        event = record_event(store, job, "succeeded", {"image_url": "u"})
        assert await sender.run_once() == 1 and sender.stats["delivered"] == 1
        assert namespace["handled"] == {f"msg_{job.id}.{event.id}"}
        # A tampered or unsigned delivery is refused with 400 and not handled.
        session = sender._session
        body = b'{"type":"job.succeeded","data":{"job_id":"x"}}'
        headers = webhooks.signed_headers(SECRET, "msg_forged.1", int(time.time()), body)
        headers["webhook-timestamp"] = str(int(time.time()) + 1)  # signed for another moment
        async with session.post(f"http://127.0.0.1:{server.port}/webhook", data=body, headers=headers) as answer:
            assert answer.status == 400 and "no signature matches" in (await answer.json())["error"]
        assert namespace["handled"] == {f"msg_{job.id}.{event.id}"}
    finally:
        await server.close()
