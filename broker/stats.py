"""The /stats document, built from the broker's state (pure; the seed's JSON shapes).

With one worker (or none) the document has the seed's single-GPU shape; with two or more, the
multi-GPU shape (num_gpus, gpu_ids, load_balance_strategy, per_gpu_stats[]). Every field the seed
shows is present with a real value, plus a few more (marked below) that operators need.

Definitions (all counts since the broker started, including workers that have since left):
* total_requests: requests completed inside a batch; total_batches: batches run.
* avg_batch_size = total_requests / total_batches.
* avg_wait_time_ms: mean time a request waited in its worker for batch-mates (arrival at the
  worker -> its batch starts), the wait the seed's MAX_BATCH_WAIT_TIME governs.
* avg_generation_time_ms: mean time of one batch's inference.
* current_queue_depth: requests accepted and not yet in a running batch (broker queue + workers').
* max_queue_depth: the largest current_queue_depth seen.

Beyond the seed, the single-GPU shape carries ``worker``: its one worker's entry, with the fields of
a per_gpu_stats entry (absent with no worker), so per-worker metrics need no second shape.

Both shapes carry ``models``: for each model a registered worker serves (or a request waits for),
its workers and queue depths (:func:`models_section`); ``priorities``: per priority, requests
waiting, accepted and dispatched and their wait in the queue (:func:`priorities_section`); and
``fair_share``: per owner (API key), its GPU-seconds and weight (:func:`owners_section`).
"""

from __future__ import annotations

from typing import Any

from broker.state import BrokerState, WorkerRecord
from broker.priorities import known_priority
from imagegen.protocol import PRIORITIES, WorkerStatus


def _averages(status: WorkerStatus) -> dict[str, float]:
    return {
        "avg_batch_size": round(status.total_requests / status.total_batches, 2) if status.total_batches else 0.0,
        "avg_wait_time_ms": round(status.sum_wait_ms / status.total_requests) if status.total_requests else 0,
        "avg_generation_time_ms": (
            round(status.sum_generation_ms / status.total_batches) if status.total_batches else 0
        ),
    }


def _sum_status(statuses: list[WorkerStatus]) -> WorkerStatus:
    return WorkerStatus(
        state="cluster",
        queue_depth=sum(s.queue_depth for s in statuses),
        running=sum(s.running for s in statuses),
        max_queue_depth=max((s.max_queue_depth for s in statuses), default=0),
        total_requests=sum(s.total_requests for s in statuses),
        total_batches=sum(s.total_batches for s in statuses),
        total_failed=sum(s.total_failed for s in statuses),
        sum_wait_ms=sum(s.sum_wait_ms for s in statuses),
        sum_generation_ms=sum(s.sum_generation_ms for s in statuses),
    )


def _config(worker: WorkerRecord | None) -> dict[str, Any]:
    if worker is None:
        return {"max_batch_size": None, "max_wait_time": None, "adaptive_batching": None}
    b = worker.info.batching
    return {
        "max_batch_size": worker.status.max_batch_size or b.max_batch_size,  # lowered after out-of-memory
        "max_wait_time": b.max_wait_time,
        "adaptive_batching": b.adaptive_batching,
        # beyond the seed:
        "enable_batching": b.enable_batching,
        "max_batch_size_auto": b.max_batch_size_auto,
        "min_batch_size": b.min_batch_size,
        "min_wait_time": b.min_wait_time,
        "adaptive_batch_threshold": b.adaptive_threshold,
    }


def _per_gpu(worker: WorkerRecord, now: float) -> dict[str, Any]:
    return {
        "gpu_id": worker.info.gpu_id,
        "current_queue_depth": worker.queue_depth,
        "total_requests": worker.status.total_requests,
        "total_batches": worker.status.total_batches,
        **_averages(worker.status),
        # beyond the seed:
        "worker": worker.info.worker_name,
        "host": worker.info.host,
        "state": worker.status.state,
        "device": worker.info.device,
        "model_id": worker.info.model_id,
        "max_batch_size": worker.status.max_batch_size or worker.info.batching.max_batch_size,
        "in_flight": len(worker.in_flight),
        "running": worker.status.running,
        "max_queue_depth": worker.status.max_queue_depth,
        "failed_requests": worker.status.total_failed,
        "stopped_batches": worker.status.stopped_batches,
        "stopped_batch_seconds": round(worker.status.sum_stopped_ms / 1000.0, 3),
        "last_seen_s_ago": round(now - worker.last_seen, 3),
        # torch.compile: the sizes it serves compiled, those warm now, what it does with others, and
        # the batches (images) that ran eager and the unlisted-size requests refused or snapped.
        "sizes": [str(size) for size in worker.info.sizes],
        "warm_sizes": [str(size) for size in worker.warm_sizes],
        "compile_state": worker.compile_state,
        "unlisted_size": worker.info.unlisted_size,
        "eager_batches": worker.status.eager_batches,
        "eager_images": worker.status.eager_images,
        "unlisted_refused": worker.status.unlisted_refused,
        "unlisted_snapped": worker.status.unlisted_snapped,
    }


def models_section(state: BrokerState) -> dict[str, dict[str, int]]:
    """model -> its registered and accepting workers, the requests waiting for it in the broker
    (``broker_queue_depth``), and those plus its workers' queues (``current_queue_depth``). Requests
    accepted before any worker registered that name no model wait under none of them."""
    models = sorted(set(state.served_models()) | {m for m in state.queue.models() if m is not None})
    section = {}
    for model in models:
        workers = [w for w in state.workers.values() if w.info.model_id == model]
        waiting = state.queue.depth(model)
        section[model] = {
            "workers": len(workers),
            "accepting_workers": sum(1 for w in workers if w.accepting),
            "broker_queue_depth": waiting,
            "current_queue_depth": waiting + sum(w.queue_depth for w in workers),
        }
    return section


def priorities_section(state: BrokerState) -> dict[str, dict[str, Any]]:
    """priority -> requests of it waiting in the broker's queue now (``queued``), accepted since start
    (``requests``), handed to a worker for the first time (``dispatched``), and the seconds those
    waited in the queue, summed (``queue_wait_seconds``) and on average (``avg_queue_wait_ms``)."""
    queued = {priority: 0 for priority in PRIORITIES}
    for request_id in state.queue:
        queued[known_priority(state.requests[request_id].message.priority)] += 1
    section = {}
    for priority, counters in state.priority_counters.items():
        section[priority] = {
            "queued": queued[priority],
            "requests": counters.received,
            "dispatched": counters.dispatched,
            "queue_wait_seconds": round(counters.queue_wait_s, 3),
            "avg_queue_wait_ms": round(counters.queue_wait_s * 1000.0 / counters.dispatched) if counters.dispatched else 0,
        }
    return section


def owners_section(state: BrokerState, now: float) -> dict[str, Any]:
    """The fair share between owners (API keys): the half-life of its GPU-seconds, and per owner that
    sent a request (none without API keys) its GPU-seconds since start (``gpu_seconds``), decayed as
    the fair share counts them (``recent_gpu_seconds``), its weight, and its requests waiting now."""
    fair = state.fair_shares
    queued: dict[str, int] = {}
    for request_id in state.queue:
        owner = state.requests[request_id].message.owner
        if owner:
            queued[owner] = queued.get(owner, 0) + 1
    owners = sorted((set(fair.owners()) | set(queued)) - {""})
    return {
        "half_life_s": fair.half_life_s,
        "priority_aging_s": state.policy.priority_aging_s,
        "owners": {owner: {"gpu_seconds": round(fair.total(owner), 3),
                           "recent_gpu_seconds": round(fair.recent(owner, now), 3),
                           "share": fair.share(owner),
                           "queued": queued.get(owner, 0)} for owner in owners},
    }


def _broker_section(state: BrokerState) -> dict[str, Any]:
    c = state.counters
    return {
        "epoch": state.epoch,
        "queue_depth": len(state.queue),
        "max_queue_size": state.policy.max_queue_size,
        "in_progress": state.in_progress(),
        "requests_received": c.requests_received,
        "requests_completed": c.requests_completed,
        "requests_failed": c.requests_failed,
        "rejected_overloaded": c.rejected_overloaded,
        "rejected_too_costly": c.rejected_too_costly,
        "rejected_behind_queue": c.rejected_behind_queue,
        "deadline_expired": c.deadline_expired,
        "requeued": c.requeued,
        "duplicate_results": c.duplicate_results,
        "workers_registered": c.workers_registered,
        "workers_expired": c.workers_expired,
        "cancelled": c.cancelled,
        "rejected_draining": c.rejected_draining,
        "registrations_refused": c.registrations_refused,
        "unregistered_worker_messages": c.unregistered_messages,
        "wrong_key_worker_messages": c.wrong_key_messages,
        "unassigned_answers": c.unassigned_answers,
        "workers_stuck": c.workers_stuck,
        "rejected_model": c.rejected_model,
        # Answers kept because their gateway was away (broker/unclaimed.py): held now, and since start.
        "unclaimed_results": len(state.unclaimed),
        "unclaimed_result_bytes": state.unclaimed.bytes,
        "unclaimed_kept": state.unclaimed.counters.kept,
        "unclaimed_claimed": state.unclaimed.counters.claimed,
        "unclaimed_expired": state.unclaimed.counters.expired,
        "unclaimed_dropped": state.unclaimed.counters.dropped,
        "unclaimed_cancelled": state.unclaimed.counters.cancelled,
        "collects": c.collects,
        "collects_unknown": c.collects_unknown,
        "progress_forwarded": c.progress_forwarded,
        "previews_forwarded": c.previews_forwarded,
        "queued_reports": c.queued_reports,
        "draining": state.draining,
    }


def build_stats(state: BrokerState, now: float, extra_broker_counters: dict[str, int] | None = None) -> dict:
    workers = sorted(state.workers.values(), key=lambda w: (w.info.host, w.info.gpu_id, w.info.worker_name))
    totals = _sum_status([w.status for w in workers] + list(state.retired.values()))
    common = {
        "total_requests": totals.total_requests,
        "total_batches": totals.total_batches,
        "current_queue_depth": state.current_queue_depth(),
        "max_queue_depth": state.max_queue_depth,
        **_averages(totals),
    }
    broker = _broker_section(state) | (extra_broker_counters or {})
    if len(workers) <= 1:
        only = workers[0] if workers else None
        single = {**common, "num_gpus": len(workers), "config": _config(only), "models": models_section(state),
                  "priorities": priorities_section(state), "fair_share": owners_section(state, now), "broker": broker}
        return single | ({"worker": _per_gpu(only, now)} if only is not None else {})
    return {
        "num_gpus": len(workers),
        "gpu_ids": [w.info.gpu_id for w in workers],
        "load_balance_strategy": state.policy.strategy,
        **common,
        "per_gpu_stats": [_per_gpu(w, now) for w in workers],
        "config": _config(workers[0]),
        "models": models_section(state),
        "priorities": priorities_section(state),
        "fair_share": owners_section(state, now),
        "broker": broker,
    }
