#!/usr/bin/env python3
"""Load test for the image-generation gateway: does dynamic batching actually batch?

This is the load test promised in the "Load Testing" section of the dynamic-batching
spec. It drives the gateway's HTTP API (``POST /generate``, ``GET /stats``) with many
concurrent requests and reports how well they were batched.

Usage::

    # 50 requests sent at the same moment
    python scripts/test_batching.py --burst 50

    # sustained load: 10 concurrent users, each sending 5 requests one after another
    python scripts/test_batching.py --users 10 --requests-per-user 5

    # against another host, small images, fewer steps, reproducible seeds
    python scripts/test_batching.py --url http://gpu-box:8080 --burst 16 \\
        --width 256 --height 256 --steps 10 --seed-base 1000

Exactly one of ``--burst`` / ``--users`` is required. Other flags: ``--url`` (default
http://localhost:8080), ``--width``/``--height`` (default 512, multiples of 8),
``--steps`` (25), ``--guidance-scale`` (7.5), ``--prompt``, ``--negative-prompt``,
``--timeout`` (seconds per request, default 900), ``--seed-base`` (seed = base + i),
``--requests-per-user`` (default 5, only with ``--users``), ``--no-stats``.

Readable output beyond the text report:

* a progress bar on stderr while the run goes (``[#####-----] 25/50 done, 0 failed, 12.3s``;
  ``--no-progress`` turns it off);
* ``--json PATH``: every request's outcome (times in seconds from the run's start, status, error,
  batch_id, batch_size, gpu_id, worker, queue_wait_ms, generation_ms, seed), the summary, the
  ``/stats`` samples and the final ``/stats`` document, as one JSON object;
* ``--plot PATH.png``: three charts (needs matplotlib): the latency CDF of the successful
  requests, the batch sizes over time (one point per distinct batch, at its first response), and
  the queue depth over time (cluster-wide, plus one line per GPU with several workers).

With ``--json`` or ``--plot`` the script samples ``GET /stats`` every ``--stats-interval``
seconds (default 0.5) during the run, unless ``--no-stats``.

Every request i (0-based across the whole run) gets prompt ``"<prompt> #i"``,
``player_id`` ``player-i``, ``game_id`` ``loadtest`` and one ``round_id`` shared by the
whole run (``round-<unix timestamp>``), so the requests are distinct but easy to find
in gateway logs. Requests also carry ``X-Loadtest-User`` / ``X-Loadtest-Request``
headers (the gateway ignores them; they help when reading server-side traces).
Failed requests are NOT retried, not even a 503 with Retry-After: the point is to
measure what the cluster does under this load.

Output (numbers vary)::

    Total Duration: 258.0s
    Successful: 50/50
    Avg batch size: 7.8
    Throughput: 0.19 images/second
    Latency p50: 130.2s  p95: 250.1s  max: 257.9s

followed, when any request failed, by ``Failed: N (<status> <error code>: count, ...)``
(e.g. ``Failed: 3 (503 overloaded: 3)``; transport problems are grouped as ``timeout``
or ``connection_error``), and by a best-effort line with the gateway's own cumulative
``/stats`` (skip it with ``--no-stats``).

Definitions:

* Total Duration: wall time from the first request sent to the last response received
  (failed responses included, since the client waited for them too).
* Throughput: successful images / Total Duration.
* Avg batch size: number of successful requests / number of distinct ``batch_id`` values
  among them, i.e. the per-batch average, the same definition as the gateway's
  ``/stats`` ``avg_batch_size``. If some successful response has no ``batch_id``, it
  falls back to the mean of the ``batch_size`` fields (a per-request average, which
  weights big batches more). ``n/a`` when neither is available.
  Note that a batch may also contain requests from other clients, in which case this
  client-side figure undercounts the true batch size.
* Latency p50 / p95 / max: client-observed time from sending a request to having read
  its whole response, over successful requests only, using the nearest-rank
  percentile (the smallest observed latency such that at least p% of the latencies are
  <= it; no interpolation, so every reported value is a real observed latency).

Exit code: 0 if every request succeeded, 1 if any failed, 2 on usage errors
(130 if interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import aiohttp

DEFAULT_URL = "http://localhost:8080"
DEFAULT_PROMPT = "A beautiful mountain landscape at sunset, highly detailed, digital art"
DEFAULT_REQUESTS_PER_USER = 5
GAME_ID = "loadtest"
# Headers only for correlating server-side traces with the client; the API ignores them.
USER_HEADER = "X-Loadtest-User"
REQUEST_HEADER = "X-Loadtest-Request"
# /stats is a cheap in-memory read; it must not hold up the report for long.
STATS_TIMEOUT_S = 10.0
DEFAULT_STATS_INTERVAL_S = 0.5
JSON_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RequestTemplate:
    """What every request of one run has in common; `build_payload` adds the per-request parts."""

    prompt: str = DEFAULT_PROMPT
    width: int = 512
    height: int = 512
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    round_id: str = "round-0"
    game_id: str = GAME_ID
    negative_prompt: str | None = None
    seed_base: int | None = None


@dataclass
class RequestResult:
    """Outcome of one /generate request, as the client saw it.

    ``sent_at``/``received_at`` are ``time.perf_counter()`` values, only meaningful
    relative to each other within one process.
    """

    index: int
    user: int | None
    ok: bool
    sent_at: float
    received_at: float
    status: int | None = None  # HTTP status; None when no response arrived at all
    error_code: str | None = None  # error.code from the body, or timeout/connection_error
    error_message: str | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    gpu_id: int | None = None
    body: dict[str, Any] | None = None

    @property
    def latency_s(self) -> float:
        return self.received_at - self.sent_at

    @property
    def failure_key(self) -> str:
        """How failures are grouped in the report: '503 overloaded', '500', 'timeout', ..."""
        if self.status is None:
            return self.error_code or "error"
        if self.error_code:
            return f"{self.status} {self.error_code}"
        return str(self.status)


@dataclass
class Summary:
    total: int
    successful: int
    duration_s: float
    throughput: float  # successful images per second of Total Duration
    avg_batch_size: float | None
    distinct_batches: int  # distinct batch_ids among successes (0 when absent)
    latency_p50_s: float | None  # None when nothing succeeded
    latency_p95_s: float | None
    latency_max_s: float | None
    failures: dict[str, int] = field(default_factory=dict)  # failure_key -> count, biggest first
    failure_examples: dict[str, str] = field(default_factory=dict)  # failure_key -> one message

    @property
    def failed(self) -> int:
        return self.total - self.successful

    @property
    def all_ok(self) -> bool:
        return self.total > 0 and self.failed == 0


# --------------------------------------------------------------------------- pure logic


def build_payload(template: RequestTemplate, index: int) -> dict[str, Any]:
    """JSON body of request `index`: distinct prompt suffix and player so none are deduplicated."""
    payload: dict[str, Any] = {
        "prompt": f"{template.prompt} #{index}",
        "game_id": template.game_id,
        "round_id": template.round_id,
        "player_id": f"player-{index}",
        "width": template.width,
        "height": template.height,
        "num_inference_steps": template.num_inference_steps,
        "guidance_scale": template.guidance_scale,
    }
    if template.negative_prompt:
        payload["negative_prompt"] = template.negative_prompt
    if template.seed_base is not None:
        payload["seed"] = template.seed_base + index
    return payload


def percentile_nearest_rank(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the ceil(pct/100 * n)-th smallest value (1-based)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {pct}")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def wall_duration(results: Sequence[RequestResult]) -> float:
    """First request sent -> last response received (0.0 for no results)."""
    if not results:
        return 0.0
    return max(r.received_at for r in results) - min(r.sent_at for r in results)


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    """Reduce per-request results to the figures the report prints (see module docstring)."""
    successes = [r for r in results if r.ok]
    n_ok = len(successes)

    avg_batch: float | None = None
    distinct = 0
    if successes and all(r.batch_id is not None for r in successes):
        distinct = len({r.batch_id for r in successes})
        avg_batch = n_ok / distinct
    else:
        # Older gateways may only report batch_size; a per-request mean is the best we can do.
        sizes = [r.batch_size for r in successes if r.batch_size is not None]
        if sizes:
            avg_batch = sum(sizes) / len(sizes)
        distinct = len({r.batch_id for r in successes if r.batch_id is not None})

    latencies = [r.latency_s for r in successes]
    p50 = percentile_nearest_rank(latencies, 50) if latencies else None
    p95 = percentile_nearest_rank(latencies, 95) if latencies else None
    lmax = max(latencies) if latencies else None

    counts = Counter(r.failure_key for r in results if not r.ok)
    # Biggest group first; ties by name so the output is deterministic.
    failures = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok and r.failure_key not in examples and r.error_message:
            examples[r.failure_key] = r.error_message

    return Summary(
        total=len(results),
        successful=n_ok,
        duration_s=duration_s,
        throughput=(n_ok / duration_s) if duration_s > 0 else 0.0,
        avg_batch_size=avg_batch,
        distinct_batches=distinct,
        latency_p50_s=p50,
        latency_p95_s=p95,
        latency_max_s=lmax,
        failures=failures,
        failure_examples=examples,
    )


def _fmt_throughput(x: float) -> str:
    # Two decimals as in the spec ("0.19"), but keep a third for slow runs
    # ("0.067" without batching) where two decimals would hide the difference.
    return f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.3f}"


def format_summary(summary: Summary) -> str:
    """The report, one line per figure, in the spec's format (no trailing newline)."""
    lines = [
        f"Total Duration: {summary.duration_s:.1f}s",
        f"Successful: {summary.successful}/{summary.total}",
        "Avg batch size: "
        + ("n/a" if summary.avg_batch_size is None else f"{summary.avg_batch_size:.1f}"),
        f"Throughput: {_fmt_throughput(summary.throughput)} images/second",
    ]
    if summary.latency_p50_s is None:
        lines.append("Latency p50: n/a  p95: n/a  max: n/a")
    else:
        lines.append(
            f"Latency p50: {summary.latency_p50_s:.1f}s  "
            f"p95: {summary.latency_p95_s:.1f}s  max: {summary.latency_max_s:.1f}s"
        )
    if summary.failed:
        groups = ", ".join(f"{key}: {n}" for key, n in summary.failures.items())
        lines.append(f"Failed: {summary.failed} ({groups})")
        # One sample message per group: usually enough to tell why without server logs.
        for key, message in summary.failure_examples.items():
            lines.append(f"  e.g. {key}: {message}")
    return "\n".join(lines)


def format_gateway_stats(stats: dict[str, Any]) -> str:
    """One line with the gateway's cumulative counters (they include other clients' traffic)."""
    parts = [f"{k}={stats[k]}" for k in ("total_requests", "total_batches", "avg_batch_size") if k in stats]
    return "Gateway /stats (cumulative): " + (" ".join(parts) if parts else "no counters")


# --------------------------------------------------------------------------- progress, JSON, plot


def format_progress(done: int, failed: int, total: int, elapsed_s: float, width: int = 30) -> str:
    """``[#######-----] 12/50 done, 1 failed, 3.4s`` (no newline)."""
    filled = width if total <= 0 else min(width, width * done // total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} done, {failed} failed, {elapsed_s:.1f}s"


class Progress:
    """A one-line progress bar on ``stream`` (stderr), redrawn in place with a carriage return.

    Redrawn at most every ``min_interval_s`` (0.1 s on a terminal, 1 s into a log file), and always
    for the last request; ``finish`` ends the line."""

    def __init__(self, total: int, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter,
                 min_interval_s: float | None = None) -> None:
        stream = stream if stream is not None else sys.stderr  # looked up now: tests replace sys.stderr
        self.total, self.stream, self.clock = total, stream, clock
        self.done = self.failed = 0
        self.started = clock()
        self.min_interval_s = min_interval_s if min_interval_s is not None else (
            0.1 if getattr(stream, "isatty", lambda: False)() else 1.0)
        self._drawn_at = float("-inf")
        self._drawn_done = -1

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if self.done >= self.total or self.clock() - self._drawn_at >= self.min_interval_s:
            self._draw()

    def _draw(self) -> None:
        self._drawn_at, self._drawn_done = self.clock(), self.done
        line = format_progress(self.done, self.failed, self.total, self._drawn_at - self.started)
        self.stream.write("\r" + line)
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn_done != self.done:  # the last request always draws; this covers an empty run
            self._draw()
        self.stream.write("\n")
        self.stream.flush()


def compact_stats(stats: dict[str, Any], t_s: float) -> dict[str, Any]:
    """One /stats sample as kept for --json and --plot: the queue and batch counters, per GPU too."""
    sample = {"t_s": round(t_s, 3), **{k: stats.get(k) for k in ("current_queue_depth", "total_requests",
                                                                   "total_batches", "num_gpus")}}
    per_gpu = stats.get("per_gpu_stats")
    if isinstance(per_gpu, list):
        sample["per_gpu"] = [{k: g.get(k) for k in ("gpu_id", "worker", "current_queue_depth", "total_batches")}
                             for g in per_gpu if isinstance(g, dict)]
    return sample


def result_record(result: RequestResult, t0: float) -> dict[str, Any]:
    """One request for --json: times in seconds from ``t0`` (the run's start)."""
    body = result.body or {}
    record = {
        "index": result.index, "user": result.user, "ok": result.ok, "status": result.status,
        "sent_s": round(result.sent_at - t0, 4), "received_s": round(result.received_at - t0, 4),
        "latency_s": round(result.latency_s, 4), "error_code": result.error_code,
        "error_message": result.error_message, "batch_id": result.batch_id, "batch_size": result.batch_size,
        "gpu_id": result.gpu_id,
    }
    if result.ok:
        record.update({k: body.get(k) for k in ("worker", "queue_wait_ms", "generation_ms", "seed", "image_url")})
    return record


def json_report(run: dict[str, Any], results: Sequence[RequestResult], summary: Summary, t0: float,
                samples: Sequence[dict[str, Any]], final_stats: dict[str, Any] | None) -> dict[str, Any]:
    """The whole run as one JSON-ready object (written by --json)."""
    return {
        "format_version": JSON_FORMAT_VERSION,
        "run": run,
        "summary": {**asdict(summary), "failed": summary.failed},
        "results": [result_record(r, t0) for r in sorted(results, key=lambda r: r.index)],
        "stats_samples": list(samples),
        "final_stats": final_stats,
    }


def batch_points(results: Sequence[RequestResult], t0: float) -> list[tuple[float, int, int | None]]:
    """(seconds from t0, batch_size, gpu_id) per distinct batch, at its first response; requests
    without a batch_id count as their own batch."""
    first: dict[str, tuple[float, int, int | None]] = {}
    for r in results:
        if not r.ok or r.batch_size is None:
            continue
        key = r.batch_id if r.batch_id is not None else f"request-{r.index}"
        point = (r.received_at - t0, r.batch_size, r.gpu_id)
        if key not in first or point[0] < first[key][0]:
            first[key] = point
    return sorted(first.values())


def write_plot(path: str, results: Sequence[RequestResult], samples: Sequence[dict[str, Any]], t0: float,
               title: str) -> None:
    """The PNG of --plot: latency CDF, batch size over time, queue depth over time."""
    from matplotlib.figure import Figure  # lazily: only --plot needs matplotlib
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 11), layout="constrained")
    cdf, batches, queue = fig.subplots(3, 1)
    fig.suptitle(title)
    latencies = sorted(r.latency_s for r in results if r.ok)
    if latencies:
        cdf.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], where="post")
        for pct, style in ((50, "--"), (95, ":")):
            cdf.axvline(percentile_nearest_rank(latencies, pct), color="grey", linestyle=style, label=f"p{pct}")
        cdf.legend(loc="lower right")
    _empty_note(cdf, not latencies, "no successful request")
    cdf.set(title="Latency CDF (successful requests)", xlabel="latency (s)", ylabel="fraction <= x", ylim=(0, 1.02))
    points = batch_points(results, t0)
    for gpu in sorted({p[2] for p in points}, key=lambda g: (g is None, g)):
        mine = [p for p in points if p[2] == gpu]
        batches.scatter([p[0] for p in mine], [p[1] for p in mine], label=f"GPU {gpu}", s=24)
    if len({p[2] for p in points}) > 1:
        batches.legend(loc="best")
    _empty_note(batches, not points, "no batch reported")
    batches.set(title="Batch size over time (at each batch's first response)", xlabel="time since start (s)",
                ylabel="batch size", ylim=(0, max((p[1] for p in points), default=1) + 1))
    for ax in (batches, queue):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _plot_queue(queue, samples)
    fig.savefig(path, dpi=100)


def _plot_queue(ax: Any, samples: Sequence[dict[str, Any]]) -> None:
    times = [s["t_s"] for s in samples if s.get("current_queue_depth") is not None]
    if times:
        ax.step(times, [s["current_queue_depth"] for s in samples if s.get("current_queue_depth") is not None],
                where="post", label="all GPUs", linewidth=2)
        per_gpu: dict[Any, list[tuple[float, int]]] = {}
        for s in samples:
            for g in s.get("per_gpu", []):
                per_gpu.setdefault(g["gpu_id"], []).append((s["t_s"], g["current_queue_depth"]))
        for gpu, series in sorted(per_gpu.items(), key=lambda kv: str(kv[0])):
            ax.step([t for t, _ in series], [d for _, d in series], where="post", label=f"GPU {gpu}", alpha=0.7)
        ax.legend(loc="best")
    _empty_note(ax, not times, "no /stats samples (--no-stats, or the gateway did not answer)")
    ax.set(title="Queue depth over time (GET /stats samples)", xlabel="time since start (s)",
           ylabel="requests waiting")


def _empty_note(ax: Any, empty: bool, text: str) -> None:
    if empty:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


# --------------------------------------------------------------------------- network


def _make_session(timeout_s: float) -> aiohttp.ClientSession:
    # limit=0 lifts aiohttp's default cap of 100 connections (and the per-host one):
    # with a cap, a burst of N would silently turn into waves and measure the client,
    # not the server's batching.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


def _error_from_body(body: Any) -> tuple[str | None, str | None]:
    """(code, message) from the gateway's {"error": {"code", "message", "field"}} shape."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = err.get("code")
        message = err.get("message")
        if err.get("field"):
            message = f"{message} (field {err['field']})"
        return (str(code) if code else None), (str(message) if message else None)
    return None, None


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    template: RequestTemplate,
    index: int,
    user: int | None = None,
) -> RequestResult:
    """POST one /generate request and classify the outcome; never raises for network errors."""
    payload = build_payload(template, index)
    headers = {REQUEST_HEADER: str(index)}
    if user is not None:
        headers[USER_HEADER] = str(user)
    sent_at = time.perf_counter()
    try:
        async with session.post(f"{url}/generate", json=payload, headers=headers) as resp:
            raw = await resp.read()  # the whole body, so latency includes the transfer
            received_at = time.perf_counter()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            if resp.status == 200 and isinstance(body, dict):
                batch_size = body.get("batch_size")
                gpu_id = body.get("gpu_id")
                batch_id = body.get("batch_id")
                return RequestResult(
                    index=index,
                    user=user,
                    ok=True,
                    sent_at=sent_at,
                    received_at=received_at,
                    status=resp.status,
                    batch_id=None if batch_id is None else str(batch_id),
                    batch_size=batch_size if isinstance(batch_size, int) else None,
                    gpu_id=gpu_id if isinstance(gpu_id, int) else None,
                    body=body,
                )
            code, message = _error_from_body(body)
            if resp.status == 200:
                code, message = "bad_response", "200 without a JSON object body"
            elif message is None:
                message = raw[:200].decode("utf-8", "replace") or resp.reason
            retry_after = resp.headers.get("Retry-After")
            if retry_after:
                message = f"{message} (Retry-After: {retry_after})"
            return RequestResult(
                index=index,
                user=user,
                ok=False,
                sent_at=sent_at,
                received_at=received_at,
                status=resp.status,
                error_code=code,
                error_message=message,
                body=body if isinstance(body, dict) else None,
            )
    except asyncio.TimeoutError:
        code, message = "timeout", "no complete response within --timeout"
    except aiohttp.ClientConnectionError as exc:
        code, message = "connection_error", f"{type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        code, message = "client_error", f"{type(exc).__name__}: {exc}"
    return RequestResult(
        index=index,
        user=user,
        ok=False,
        sent_at=sent_at,
        received_at=time.perf_counter(),
        error_code=code,
        error_message=message,
    )


OnResult = Callable[[RequestResult], None]


async def _reported(on_result: OnResult | None, pending: Any) -> RequestResult:
    """Await one request; tell ``on_result`` (the progress bar) as soon as it ends."""
    result = await pending
    if on_result is not None:
        on_result(result)
    return result


async def run_burst(
    url: str, count: int, template: RequestTemplate, timeout_s: float = 900.0,
    on_result: OnResult | None = None,
) -> list[RequestResult]:
    """Send `count` requests at once and wait for all of them."""
    url = url.rstrip("/")
    async with _make_session(timeout_s) as session:
        # gather starts every coroutine in the same loop iteration, so all requests
        # are on the wire together, which is what lets the gateway batch them.
        return list(await asyncio.gather(
            *(_reported(on_result, send_one(session, url, template, i)) for i in range(count))))


async def run_users(
    url: str,
    users: int,
    requests_per_user: int,
    template: RequestTemplate,
    timeout_s: float = 900.0,
    on_result: OnResult | None = None,
) -> list[RequestResult]:
    """`users` concurrent users; each sends its requests back to back (no think time)."""
    url = url.rstrip("/")

    async def one_user(session: aiohttp.ClientSession, user: int) -> list[RequestResult]:
        out = []
        for k in range(requests_per_user):
            # Request index unique across the run, so prompts/player ids stay distinct.
            index = user * requests_per_user + k
            out.append(await _reported(on_result, send_one(session, url, template, index, user=user)))
        return out

    async with _make_session(timeout_s) as session:
        per_user = await asyncio.gather(*(one_user(session, u) for u in range(users)))
    return [r for rs in per_user for r in rs]


async def fetch_stats(url: str, timeout_s: float = STATS_TIMEOUT_S) -> dict[str, Any] | None:
    """GET /stats, or None if the gateway does not answer it usefully (it is only extra info)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            async with s.get(f"{url.rstrip('/')}/stats") as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
                return body if isinstance(body, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def sample_stats(url: str, interval_s: float, samples: list[dict[str, Any]], t0: float) -> None:
    """Append a compact GET /stats sample every ``interval_s`` until cancelled (times from ``t0``)."""
    while True:
        asked_at = time.perf_counter()
        stats = await fetch_stats(url, timeout_s=max(2.0, 4 * interval_s))
        if stats is not None:
            samples.append(compact_stats(stats, asked_at - t0))
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - asked_at)))


async def run_sampled(load: Any, url: str, interval_s: float | None) -> tuple[list[RequestResult], list, float]:
    """Run the ``load`` coroutine while sampling /stats (unless ``interval_s`` is None).

    Returns (results, samples, t0), t0 being the perf_counter value the sample times count from."""
    t0 = time.perf_counter()
    samples: list[dict[str, Any]] = []
    sampler = asyncio.ensure_future(sample_stats(url, interval_s, samples, t0)) if interval_s else None
    try:
        results = await load
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    return results, samples, t0


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_batching.py",
        description="Load-test the gateway's dynamic batching (burst or sustained users).",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--burst", type=_positive_int, metavar="N", help="send N requests at once")
    mode.add_argument(
        "--users", type=_positive_int, metavar="N", help="N concurrent users sending sequentially"
    )
    p.add_argument(
        "--requests-per-user",
        type=_positive_int,
        metavar="M",
        default=None,
        help=f"requests each user sends one after another (default {DEFAULT_REQUESTS_PER_USER}; --users only)",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"gateway base URL (default {DEFAULT_URL})")
    p.add_argument("--width", type=_size, default=512, help="image width, multiple of 8 (default 512)")
    p.add_argument("--height", type=_size, default=512, help="image height, multiple of 8 (default 512)")
    p.add_argument("--steps", type=_positive_int, default=25, help="num_inference_steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="guidance_scale (default 7.5)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="base prompt; each request appends ' #i'")
    p.add_argument("--negative-prompt", default=None, help="optional negative_prompt for every request")
    p.add_argument(
        "--seed-base", type=int, default=None, help="if given, request i uses seed BASE + i"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=900.0,
        help="per-request timeout in seconds (default 900: a deep queue is slow, not broken)",
    )
    p.add_argument("--no-stats", action="store_true",
                   help="do not query GET /stats (neither afterwards nor samples during the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write every request's result, the summary and the /stats samples to PATH as JSON")
    p.add_argument("--plot", metavar="PATH.png", default=None,
                   help="draw latency CDF, batch size and queue depth over time into a PNG (needs matplotlib)")
    p.add_argument("--stats-interval", type=_positive_float, default=DEFAULT_STATS_INTERVAL_S, metavar="S",
                   help=f"seconds between GET /stats samples with --json/--plot (default {DEFAULT_STATS_INTERVAL_S})")
    return p


def _check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse --json/--plot paths that cannot be written before the run, not after it."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            parser.error(f"{flag}: the folder of {path!r} does not exist")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")


def _write_outputs(args: argparse.Namespace, run: dict[str, Any], results: list[RequestResult], summary: Summary,
                   t0: float, samples: list[dict[str, Any]], final_stats: dict[str, Any] | None) -> None:
    if args.json is not None:
        report = json_report(run, results, summary, t0, samples, final_stats)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"Wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        title = f"{run['what']} -> {run['url']} ({run['width']}x{run['height']}, {run['steps']} steps)"
        write_plot(args.plot, results, samples, t0, title)
        print(f"Wrote {args.plot}", file=sys.stderr)


def _template(args: argparse.Namespace) -> RequestTemplate:
    return RequestTemplate(
        prompt=args.prompt,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        # One round per run: groups this run's images server-side, distinct from earlier runs.
        round_id=f"round-{int(time.time())}",
        negative_prompt=args.negative_prompt,
        seed_base=args.seed_base,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; returns the exit code (0 all ok, 1 some failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.requests_per_user is not None and args.burst is not None:
            parser.error("--requests-per-user only applies with --users")
        _check_outputs(parser, args)
    except SystemExit as exc:  # argparse exits 2 on errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2

    template = _template(args)
    url = args.url.rstrip("/")
    rpu = args.requests_per_user or DEFAULT_REQUESTS_PER_USER
    total = args.burst if args.burst is not None else args.users * rpu
    progress = None if args.no_progress else Progress(total)
    on_result = progress.update if progress is not None else None
    if args.burst is not None:
        what = f"burst of {args.burst} requests"
        load = run_burst(url, args.burst, template, args.timeout, on_result)
    else:
        what = f"{args.users} users x {rpu} requests"
        load = run_users(url, args.users, rpu, template, args.timeout, on_result)
    # Progress goes to stderr so stdout is just the report.
    print(f"Load test: {what} -> {url}/generate "
          f"({args.width}x{args.height}, {args.steps} steps)", file=sys.stderr, flush=True)
    sampling = (args.json is not None or args.plot is not None) and not args.no_stats

    try:
        results, samples, t0 = asyncio.run(run_sampled(load, url, args.stats_interval if sampling else None))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if progress is not None:
        progress.finish()

    summary = summarize(results, wall_duration(results))
    print(format_summary(summary), flush=True)
    stats = None
    if not args.no_stats:
        stats = asyncio.run(fetch_stats(url))
        if stats is not None:
            print(format_gateway_stats(stats), flush=True)
    run = {"what": what, "url": url, "mode": "burst" if args.burst is not None else "users", "total": total,
           "users": args.users, "requests_per_user": rpu if args.users is not None else None,
           "width": args.width, "height": args.height, "steps": args.steps, "guidance_scale": args.guidance_scale,
           "prompt": args.prompt, "round_id": template.round_id, "timeout_s": args.timeout,
           "stats_interval_s": args.stats_interval if sampling else None}
    _write_outputs(args, run, results, summary, t0, samples, stats)
    return 0 if summary.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
