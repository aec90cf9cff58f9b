"""The behaviour every job store must have, written once (gateway/jobs/store.py's docstring).

``JobStoreContract`` holds the tests; it is collected only through its subclasses, one per store:
tests/integration/test_job_store_sqlite.py (SQLite, in this process) and
tests/e2e/test_job_store_redis.py (a real redis-server). A subclass provides the fixture
``open_store``: ``open_store(**kwargs)`` opens a store (``max_events=``) on the same backing as every
other it opened in that test (the same file, the same Redis keys), so a second one stands for a
gateway that restarted or another gateway; the subclass closes them all after the test.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest

from gateway.jobs.store import (
    EVENT_TYPES, IdempotencyConflict, Job, JobStore, delivery_id, new_job,
)

T0 = 1_795_800_000.123456  # a timestamp with microseconds: floats must come back exactly
REQUEST = {"prompt": "a lighthouse at dusk, été", "width": 64, "height": 64, "num_inference_steps": 4,
           "seed": 2**63 - 1, "negative_prompt": None, "tags": [], "nested": {"a": [1, 2.5, {}]}}
WEBHOOK = "http://127.0.0.1:9/hook"


def job(owner: str = "", request: dict | None = None, **options) -> Job:
    return new_job(owner, dict(REQUEST if request is None else request), T0, **options)


class JobStoreContract:
    """Subclasses provide ``open_store``."""

    @pytest.fixture
    def store(self, open_store: Callable[..., JobStore]) -> JobStore:
        return open_store()

    # --- jobs --------------------------------------------------------------------------------

    def test_a_created_job_comes_back_whole(self, store):
        made = job("alice", webhook_url=WEBHOOK, webhook_events=["start", "completed"], preview=True,
                   idempotency_key="key-1")
        assert store.create(made) == made
        assert store.get(made.id, "alice") == made
        assert store.load(made.id) == made
        assert made.request["seed"] == 2**63 - 1 and made.created_at == T0
        assert made.status == "queued" and made.attempt == 1 and not made.finished

    def test_ids_are_fresh_url_safe_and_unguessable(self):
        ids = {job().id for _ in range(200)}
        assert len(ids) == 200
        assert all(len(job_id) >= 22 and job_id.replace("-", "").replace("_", "").isalnum() for job_id in ids)

    def test_another_owners_job_is_not_found(self, store):
        made = store.create(job("alice"))
        assert store.get(made.id, "bob") is None
        assert store.get(made.id, "") is None
        assert store.get("no-such-job", "alice") is None
        assert store.load("no-such-job") is None

    def test_a_finished_job_cannot_be_created(self, store):
        with pytest.raises(ValueError):
            store.create(Job(id="j", owner="", request={}, created_at=T0, status="succeeded", finished_at=T0))

    def test_an_update_is_partial(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        running = store.update(made.id, status="running", started_at=T0 + 1, worker="host-gpu0", batch_size=4,
                               progress={"step": 1, "steps": 4}, queue_position=None)
        assert running is not None
        assert (running.status, running.started_at, running.worker, running.batch_size) == \
               ("running", T0 + 1, "host-gpu0", 4)
        assert running.request == REQUEST and running.webhook_url == WEBHOOK and running.created_at == T0
        stepped = store.update(made.id, progress={"step": 2, "steps": 4})
        assert stepped.progress == {"step": 2, "steps": 4} and stepped.worker == "host-gpu0"
        assert store.load(made.id) == stepped

    @pytest.mark.parametrize("changes", [{"owner": "mallory"}, {"request": {}}, {"id": "x"}, {"webhook_url": "x"},
                                         {"status": "done"}, {"status": "succeeded"}, {"colour": "red"}])
    def test_an_update_of_a_fixed_or_unknown_field_or_a_bad_status_is_refused(self, store, changes):
        made = store.create(job())
        with pytest.raises(ValueError):
            store.update(made.id, **changes)
        assert store.load(made.id) == made

    @pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
    def test_terminal_states_are_final_and_a_later_update_is_ignored(self, store, final):
        made = store.create(job())
        store.update(made.id, status="running", started_at=T0 + 1)
        finished = store.update(made.id, status=final, finished_at=T0 + 2,
                                result={"image_url": "u"} if final == "succeeded" else None)
        assert finished.status == final and finished.finished and finished.finished_at == T0 + 2
        # A result arriving after a cancel, a progress message after the end: ignored, None.
        assert store.update(made.id, status="succeeded", finished_at=T0 + 3, result={"image_url": "late"}) is None
        assert store.update(made.id, progress={"step": 3, "steps": 4}) is None
        assert store.update(made.id, status="running") is None
        assert store.load(made.id) == finished

    def test_an_update_of_an_unknown_job_is_none(self, store):
        assert store.update("no-such-job", status="running") is None

    def test_unfinished_lists_queued_running_and_paused_jobs(self, store):
        queued, running, paused, done = (store.create(job()) for _ in range(4))
        store.update(running.id, status="running")
        store.update(paused.id, status="paused", progress={"step": 3, "steps": 10})
        store.update(done.id, status="failed", finished_at=T0, error={"code": "x", "message": "y"})
        assert sorted(j.id for j in store.unfinished()) == sorted([queued.id, running.id, paused.id])
        assert store.load(paused.id).status == "paused"

    # --- idempotency -------------------------------------------------------------------------

    def test_the_same_key_and_body_return_the_first_job(self, store):
        first = store.create(job("alice", idempotency_key="k"))
        again = job("alice", idempotency_key="k")
        assert again.id != first.id and again.body_hash == first.body_hash
        assert store.create(again) == first
        assert store.load(again.id) is None  # nothing new stored

    def test_the_same_key_with_another_body_is_a_conflict(self, store):
        first = store.create(job("alice", idempotency_key="k"))
        for other in (job("alice", {"prompt": "another"}, idempotency_key="k"),
                      job("alice", idempotency_key="k", webhook_url=WEBHOOK),
                      job("alice", idempotency_key="k", preview=True)):
            with pytest.raises(IdempotencyConflict) as raised:
                store.create(other)
            assert raised.value.existing_id == first.id and raised.value.key == "k"
            assert "different request body" in str(raised.value)
            assert store.load(other.id) is None

    def test_keys_belong_to_their_owner(self, store):
        alice = store.create(job("alice", idempotency_key="k"))
        bob = store.create(job("bob", {"prompt": "bob's"}, idempotency_key="k"))
        assert bob.id != alice.id and store.get(bob.id, "bob") == bob
        # Keys that a naive "owner:key" join would confuse stay apart.
        one = store.create(job("a:b", idempotency_key="c"))
        two = store.create(job("a", {"prompt": "2"}, idempotency_key="b:c"))
        assert one.id != two.id

    def test_jobs_without_a_key_are_never_merged(self, store):
        assert store.create(job()).id != store.create(job()).id

    async def test_concurrent_creates_with_one_key_make_one_job(self, store):
        candidates = [job("alice", idempotency_key="race") for _ in range(16)]
        stored = await asyncio.gather(*(asyncio.to_thread(store.create, c) for c in candidates))
        assert len({j.id for j in stored}) == 1
        assert stored[0].id in {c.id for c in candidates}

    # --- events ------------------------------------------------------------------------------

    def test_event_ids_increase_per_job_and_resume_after_an_id(self, store):
        a, b = store.create(job()), store.create(job())
        made = [store.append_event(a.id, "queued", {"queue_position": 3}, at=T0),
                store.append_event(b.id, "queued", {}, at=T0),
                store.append_event(a.id, "started", {"worker": "w"}, at=T0 + 1),
                store.append_event(a.id, "progress", {"step": 1, "steps": 4}, at=T0 + 2)]
        assert [(e.job_id, e.id) for e in made] == [(a.id, 1), (b.id, 1), (a.id, 2), (a.id, 3)]
        assert store.events_after(a.id) == [made[0], made[2], made[3]]
        assert store.events_after(a.id, 1) == [made[2], made[3]]
        assert store.events_after(a.id, 3) == []
        assert store.events_after(a.id, 0, limit=2) == [made[0], made[2]]
        assert made[3].data == {"step": 1, "steps": 4} and made[3].at == T0 + 2

    def test_the_log_closes_at_the_terminal_event(self, store):
        made = store.create(job())
        store.append_event(made.id, "started", at=T0)
        end = store.append_event(made.id, "cancelled", {"reason": "client"}, at=T0 + 1)
        assert end.id == 2
        assert store.append_event(made.id, "progress", {"step": 2, "steps": 4}) is None
        assert store.append_event(made.id, "succeeded") is None
        assert [e.type for e in store.events_after(made.id)] == ["started", "cancelled"]

    def test_events_of_an_unknown_job_or_type(self, store):
        assert store.append_event("no-such-job", "queued") is None
        assert store.events_after("no-such-job") == []
        made = store.create(job())
        with pytest.raises(ValueError):
            store.append_event(made.id, "exploded")
        assert set(EVENT_TYPES) == {"queued", "started", "progress", "preview", "restarted", "paused", "resumed",
                                    "succeeded", "failed", "cancelled"}

    def test_frequent_events_are_trimmed_oldest_first_and_the_rest_kept(self, open_store):
        store = open_store(max_events=5)
        made = store.create(job())
        store.append_event(made.id, "queued", {"queue_position": 9})
        store.append_event(made.id, "started")
        for step in range(1, 11):
            store.append_event(made.id, "progress", {"step": step, "steps": 20})
        store.append_event(made.id, "restarted", {"attempt": 2})
        for step in range(1, 4):
            store.append_event(made.id, "progress", {"step": step, "steps": 20})
        store.append_event(made.id, "preview", {"image": "..."})
        store.append_event(made.id, "succeeded", {"image_url": "u"})
        kept = store.events_after(made.id)
        # The newest five frequent events are kept (step 10 of the first run, steps 1-3 of the second,
        # the preview); the queued event and steps 1-9 are dropped; started, restarted and the end stay.
        assert [(e.id, e.type, e.data.get("step")) for e in kept] == [
            (2, "started", None), (12, "progress", 10), (13, "restarted", None), (14, "progress", 1),
            (15, "progress", 2), (16, "progress", 3), (17, "preview", None), (18, "succeeded", None)]
        assert [e.id for e in store.events_after(made.id, 12)] == [13, 14, 15, 16, 17, 18]

    # --- the webhook outbox ------------------------------------------------------------------

    def _event(self, store, job_id, type, step=None, at=T0):
        return store.append_event(job_id, type, {} if step is None else {"step": step, "steps": 4}, at=at)

    def test_a_job_without_a_webhook_enqueues_nothing(self, store):
        made = store.create(job())
        assert store.enqueue(made.id, self._event(store, made.id, "started"), T0) is None
        assert store.claim_due(T0 + 10, 10) == []
        assert store.enqueue("no-such-job", self._event(store, made.id, "progress", 1), T0) is None

    def test_a_delivery_is_due_claimed_leased_and_delivered(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        event = self._event(store, made.id, "started")
        queued = store.enqueue(made.id, event, T0)
        assert queued.id == delivery_id(made.id, event.id) == f"msg_{made.id}.1"
        assert (queued.url, queued.attempts, queued.next_attempt_at, queued.type) == (WEBHOOK, 0, T0, "started")
        assert store.claim_due(T0 - 1, 10) == []  # not due yet
        [claimed] = store.claim_due(T0, 10, lease_s=30)
        assert (claimed.id, claimed.job_id, claimed.event_id, claimed.data, claimed.at) == \
               (queued.id, made.id, 1, {}, T0)
        assert store.claim_due(T0 + 29, 10, lease_s=30) == []  # leased: another sender does not take it
        [again] = store.claim_due(T0 + 30, 10, lease_s=30)  # the lease ended: sent again (at least once)
        assert again.id == queued.id
        store.mark_delivered(queued.id)
        assert store.claim_due(T0 + 1000, 10) == [] and store.pending_deliveries(made.id) == []

    def test_a_retry_is_due_at_its_time_with_its_attempt_count(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        queued = store.enqueue(made.id, self._event(store, made.id, "succeeded"), T0)
        store.claim_due(T0, 10)
        store.mark_retry(queued.id, T0 + 5, 1)
        assert store.claim_due(T0 + 4.9, 10) == []
        [retry] = store.claim_due(T0 + 5, 10)
        assert (retry.id, retry.attempts) == (queued.id, 1)
        store.mark_given_up(queued.id)
        assert store.claim_due(T0 + 1000, 10) == []
        store.mark_retry(queued.id, T0 + 6, 2)  # after it left the outbox: nothing comes back
        assert store.claim_due(T0 + 1000, 10) == []

    def test_claims_take_the_oldest_due_first_up_to_the_limit(self, store):
        made = [store.create(job(webhook_url=WEBHOOK)) for _ in range(4)]
        for offset, each in zip((3, 1, 2, 0), made):
            store.enqueue(each.id, self._event(store, each.id, "started"), T0 + offset)
        first = store.claim_due(T0 + 10, 2)
        assert [d.job_id for d in first] == [made[3].id, made[1].id]
        assert [d.job_id for d in store.claim_due(T0 + 10, 10)] == [made[2].id, made[0].id]

    def test_pending_progress_is_coalesced_and_terminal_events_never_dropped(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        for step in (1, 2, 3):
            store.enqueue(made.id, self._event(store, made.id, "progress", step), T0)
        store.enqueue(made.id, self._event(store, made.id, "started"), T0)
        for step in (1, 2):
            store.enqueue(made.id, self._event(store, made.id, "preview", step), T0)
        store.enqueue(made.id, self._event(store, made.id, "succeeded"), T0)
        pending = store.pending_deliveries(made.id)
        assert [(d.type, d.data.get("step")) for d in pending] == [
            ("progress", 3), ("started", None), ("preview", 2), ("succeeded", None)]

    def test_a_coalesced_delivery_keeps_the_backoff_of_the_one_it_replaces(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        first = store.enqueue(made.id, self._event(store, made.id, "progress", 1), T0)
        store.claim_due(T0, 10)
        store.mark_retry(first.id, T0 + 80, 3)  # the receiver lags
        later = store.enqueue(made.id, self._event(store, made.id, "progress", 2), T0 + 10)
        assert (later.attempts, later.next_attempt_at) == (3, T0 + 80)
        [pending] = store.pending_deliveries(made.id)
        assert (pending.id, pending.attempts, pending.next_attempt_at) == (later.id, 3, T0 + 80)
        assert store.claim_due(T0 + 79, 10) == []
        assert [d.id for d in store.claim_due(T0 + 80, 10)] == [later.id]

    def test_a_delivery_in_flight_is_not_replaced(self, store):
        made = store.create(job(webhook_url=WEBHOOK))
        in_flight = store.enqueue(made.id, self._event(store, made.id, "progress", 1), T0)
        store.claim_due(T0, 10, lease_s=30)
        newer = store.enqueue(made.id, self._event(store, made.id, "progress", 2), T0 + 1)
        newest = store.enqueue(made.id, self._event(store, made.id, "progress", 3), T0 + 2)
        assert newer.attempts == 0 and newest.next_attempt_at == T0 + 2
        assert [d.id for d in store.pending_deliveries(made.id)] == [in_flight.id, newest.id]
        store.mark_delivered(in_flight.id)
        assert [d.id for d in store.claim_due(T0 + 2, 10)] == [newest.id]

    # --- retention ---------------------------------------------------------------------------

    def test_purge_deletes_old_finished_jobs_with_their_events_deliveries_and_keys(self, store):
        old = store.create(job("alice", webhook_url=WEBHOOK, idempotency_key="k"))
        self._event(store, old.id, "started")
        store.enqueue(old.id, self._event(store, old.id, "succeeded"), T0)
        store.update(old.id, status="succeeded", finished_at=T0 + 10, result={"image_url": "u"})
        recent = store.create(job())
        store.update(recent.id, status="failed", finished_at=T0 + 100, error={"code": "c", "message": "m"})
        running = store.create(job())  # old but not finished: kept
        store.update(running.id, status="running", started_at=T0)

        assert store.purge(T0 + 70, max_age_s=50) == 1
        assert store.load(old.id) is None and store.events_after(old.id) == []
        assert store.pending_deliveries(old.id) == [] and store.claim_due(T0 + 1000, 10) == []
        assert store.load(recent.id) is not None and store.load(running.id) is not None
        # The key is free again, even for another body.
        reused = store.create(job("alice", {"prompt": "new"}, idempotency_key="k"))
        assert reused.id != old.id
        assert store.purge(T0 + 70, max_age_s=50) == 0
        assert store.purge(T0 + 1000, max_age_s=50) == 1 and store.load(recent.id) is None
        assert store.load(running.id) is not None

    def test_purge_of_many_jobs_takes_them_all(self, store):
        made = [store.create(job()) for _ in range(1203)]
        for each in made:
            store.update(each.id, status="cancelled", finished_at=T0)
        assert store.purge(T0 + 10, 5) == 1203
        assert store.unfinished() == []

    # --- restarts and threads ----------------------------------------------------------------

    def test_everything_survives_closing_and_opening_again(self, open_store):
        first = open_store()
        made = first.create(job("alice", webhook_url=WEBHOOK, idempotency_key="k"))
        first.update(made.id, status="running", started_at=T0 + 1, progress={"step": 1, "steps": 4})
        event = first.append_event(made.id, "progress", {"step": 1, "steps": 4}, at=T0 + 1)
        first.enqueue(made.id, event, T0 + 1)
        first.close()

        second = open_store()
        again = second.get(made.id, "alice")
        assert again.status == "running" and again.progress == {"step": 1, "steps": 4}
        assert second.create(job("alice", webhook_url=WEBHOOK, idempotency_key="k")) == again
        assert second.events_after(made.id) == [event]
        assert second.append_event(made.id, "progress", {"step": 2, "steps": 4}).id == 2
        assert [d.event_id for d in second.claim_due(T0 + 2, 10)] == [1]
        assert [j.id for j in second.unfinished()] == [made.id]

    async def test_event_ids_stay_unique_under_threads(self, open_store):
        store = open_store(max_events=10_000)
        made = store.create(job(webhook_url=WEBHOOK))

        def append_many(worker: int) -> list[int]:
            return [store.append_event(made.id, "progress", {"worker": worker, "n": n}).id for n in range(40)]

        ids = [i for chunk in await asyncio.gather(*(asyncio.to_thread(append_many, w) for w in range(8)))
               for i in chunk]
        assert sorted(ids) == list(range(1, 321))
        assert [e.id for e in store.events_after(made.id)] == list(range(1, 321))
