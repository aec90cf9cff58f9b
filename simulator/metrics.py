"""What a run reports: throughput, latency percentiles, batch sizes, GPU busy fraction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from gpu_worker.decisions.batcher import BatchKey
from simulator.costs import provenance
from simulator.engine import Simulation


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default method)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (rank - lo) * (ordered[hi] - ordered[lo])


@dataclass(frozen=True)
class RunReport:
    """One (workload, policy) run. Latency: client sends -> client has the answer (seconds).
    Throughput: images answered / (last answer - first request sent)."""

    workload: str
    policy: str
    gpus: int
    cost_model: str
    requests: int
    completed: int
    throughput_img_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    max_s: float
    avg_batch_size: float
    batches: int
    gpu_busy_fraction: float
    makespan_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, digits: int = 4) -> dict[str, Any]:
        """A flat JSON-ready dict (extras merged in), floats rounded to ``digits`` significant places."""
        flat = {k: v for k, v in asdict(self).items() if k != "extra"}
        flat.update(self.extra)
        return {k: (_round(v, digits) if isinstance(v, float) else v) for k, v in flat.items()}


def _round(value: float, digits: int) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(0, digits - 1 - int(math.floor(math.log10(abs(value))))))


def size_label(key: BatchKey, keys: Sequence[BatchKey]) -> str:
    """``WIDTHxHEIGHT``, with steps and guidance added when another key of ``keys`` has that size."""
    if sum(1 for k in keys if (k.width, k.height) == (key.width, key.height)) <= 1:
        return f"{key.width}x{key.height}"
    return f"{key.width}x{key.height}/{key.num_inference_steps} steps/guidance {key.guidance_scale:g}"


def group_waits(sim: Simulation, keys: Sequence[BatchKey], digits: int = 4) -> dict[str, dict[str, Any]]:
    """Per size group (``keys``, in that order): requests, where its costs come from, and the wait
    (client sends -> its image's batch starts on a GPU) p50 / p95 / max and latency p95, in seconds."""
    done = [r for r in sim.requests.values() if r.done_at is not None and r.failed is None]
    groups = {}
    for key in keys:
        mine = [r for r in done if r.key == key]
        waits = [r.wait_s for r in mine]
        stats = {"wait_p50_s": percentile(waits, 50), "wait_p95_s": percentile(waits, 95),
                 "wait_max_s": max(waits, default=math.nan),
                 "latency_p95_s": percentile([r.latency_s for r in mine], 95)}
        groups[size_label(key, keys)] = {"requests": len(mine), "costs": provenance(sim.costs, key),
                                         **{k: _round(v, digits) for k, v in stats.items()}}
    return groups


def latencies_s(sim: Simulation) -> list[float]:
    return [r.latency_s for r in sim.requests.values() if r.done_at is not None and r.failed is None]


def summarize(sim: Simulation, workload: str, policy: str, **extra: Any) -> RunReport:
    done = [r for r in sim.requests.values() if r.done_at is not None and r.failed is None]
    lat = [r.latency_s for r in done]
    first_sent = min(r.sent_at for r in sim.requests.values())
    last_done = max((r.done_at for r in done), default=first_sent)
    makespan = last_done - first_sent
    completed = [b for b in sim.batches if not b.stopped]
    images = sum(b.size for b in completed)
    busy = sum(b.duration_s for b in sim.batches)  # a stopped batch's steps kept the GPU busy too
    return RunReport(
        workload=workload,
        policy=policy,
        gpus=len(sim.workers),
        cost_model=sim.costs.name,
        requests=len(sim.requests),
        completed=len(done),
        throughput_img_s=len(done) / makespan if makespan > 0 else math.nan,
        p50_s=percentile(lat, 50),
        p95_s=percentile(lat, 95),
        p99_s=percentile(lat, 99),
        mean_s=sum(lat) / len(lat) if lat else math.nan,
        max_s=max(lat, default=math.nan),
        avg_batch_size=images / len(completed) if completed else math.nan,
        batches=len(completed),
        gpu_busy_fraction=busy / (len(sim.workers) * makespan) if makespan > 0 else math.nan,
        makespan_s=makespan,
        extra=dict(extra),
    )


def class_latencies(sim: Simulation, digits: int = 4) -> dict[str, dict[str, Any]]:
    """Per priority class (Generate.priority), the answered requests' latency p50 / p95 / p99 (s)."""
    done = [r for r in sim.requests.values() if r.done_at is not None and r.failed is None]
    classes = {}
    for label in dict.fromkeys(sorted((r.priority for r in done), key=lambda p: ("high", "normal", "low").index(p)
                                      if p in ("high", "normal", "low") else 3)):
        lat = [r.latency_s for r in done if r.priority == label]
        classes[label] = {"requests": len(lat), **{f"p{q}_s": _round(percentile(lat, q), digits) for q in (50, 95, 99)}}
    return classes


def cancel_stats(sim: Simulation) -> dict[str, Any]:
    """Requests the clients cancelled, how many of them were running (rows on the GPU) when the
    CANCEL reached their worker, and the most denoising steps such a row still ran after it (the
    step in progress counted: 1 is "freed within one step")."""
    cancelled = [r for r in sim.requests.values() if r.cancelled]
    running = [r.steps_after_cancel for r in cancelled if r.steps_after_cancel is not None]
    return {"cancelled": len(cancelled), "cancelled_running": sum(1 for s in running if s > 0),
            "cancel_steps_after_max": max(running, default=0)}
