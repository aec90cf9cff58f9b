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
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

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


async def run_burst(
    url: str, count: int, template: RequestTemplate, timeout_s: float = 900.0
) -> list[RequestResult]:
    """Send `count` requests at once and wait for all of them."""
    url = url.rstrip("/")
    async with _make_session(timeout_s) as session:
        # gather starts every coroutine in the same loop iteration, so all requests
        # are on the wire together, which is what lets the gateway batch them.
        return list(
            await asyncio.gather(*(send_one(session, url, template, i) for i in range(count)))
        )


async def run_users(
    url: str,
    users: int,
    requests_per_user: int,
    template: RequestTemplate,
    timeout_s: float = 900.0,
) -> list[RequestResult]:
    """`users` concurrent users; each sends its requests back to back (no think time)."""
    url = url.rstrip("/")

    async def one_user(session: aiohttp.ClientSession, user: int) -> list[RequestResult]:
        out = []
        for k in range(requests_per_user):
            # Request index unique across the run, so prompts/player ids stay distinct.
            index = user * requests_per_user + k
            out.append(await send_one(session, url, template, index, user=user))
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
    p.add_argument("--no-stats", action="store_true", help="do not query GET /stats afterwards")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; returns the exit code (0 all ok, 1 some failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.requests_per_user is not None and args.burst is not None:
            parser.error("--requests-per-user only applies with --users")
    except SystemExit as exc:  # argparse exits 2 on errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2

    template = RequestTemplate(
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
    url = args.url.rstrip("/")
    if args.burst is not None:
        what = f"burst of {args.burst} requests"
        coro = run_burst(url, args.burst, template, args.timeout)
    else:
        rpu = args.requests_per_user or DEFAULT_REQUESTS_PER_USER
        what = f"{args.users} users x {rpu} requests"
        coro = run_users(url, args.users, rpu, template, args.timeout)
    # Progress goes to stderr so stdout is just the report.
    print(f"Load test: {what} -> {url}/generate "
          f"({args.width}x{args.height}, {args.steps} steps)", file=sys.stderr, flush=True)

    try:
        results = asyncio.run(coro)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    summary = summarize(results, wall_duration(results))
    print(format_summary(summary), flush=True)
    if not args.no_stats:
        stats = asyncio.run(fetch_stats(url))
        if stats is not None:
            print(format_gateway_stats(stats), flush=True)
    return 0 if summary.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
