"""Overload test: a real broker, gateway and worker, offered ten times the load they can serve.

What it checks is backpressure: past the bounded queues (the broker's MAX_QUEUE_SIZE, the gateway's
GATEWAY_MAX_PENDING) requests must be refused at once with 503 and Retry-After, and no process's
memory may grow with the offered backlog.

The worker runs the FAKE backend (MODEL_ID=fake:delay=D: no model, no GPU; each batch takes D
seconds whatever its size), so capacity is known: MAX_BATCH_SIZE / D images per second (4 / 0.5 s =
8 images/s by default). Load is open-loop: request i is sent at start + i / rate whatever happened to
the earlier ones, each with its own client timeout. Meanwhile the script samples every process's
VmRSS (/proc/PID/status) and the broker's queue depth (GET /stats) every 0.5 s.

    .venv/bin/python -m bench.overload                       # 80 requests/s for 20 s (10x of 8/s)
    .venv/bin/python -m bench.overload --rate 80 --duration 5 --max-queue-size 20 --json out.json

Everything listens on 127.0.0.1 on free ports; every process started runs in its own process group,
which is killed on exit, Ctrl-C and errors included. It imports nothing from tests/.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import save_json
from bench.local_service import LocalService, interrupt_on_termination

SAMPLE_INTERVAL_S = 0.5
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0
# Settings of the caller's environment that would change what is measured (or lock us out).
DROPPED_ENV = ("GATEWAY_API_KEYS", "GATEWAY_API_KEYS_FILE", "BROKER_CURVE_SECRET_KEY", "BROKER_AUTHORIZED_KEYS_DIR",
               "WORKER_CURVE_SECRET_KEY", "BROKER_CURVE_PUBLIC_KEY", "PUBLIC_BASE_URL")


# --------------------------------------------------------------------------- processes


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Stack(LocalService):
    """Broker, gateway and one worker as subprocesses, each in its own process group (session)."""

    def __init__(self, workdir: Path, max_queue_size: int, batch_size: int, delay_s: float,
                 max_pending: int | None) -> None:
        settings = {
            "MAX_QUEUE_SIZE": str(max_queue_size),
            "MODEL_ID": f"fake:delay={delay_s:g}",  # the FAKE backend: the serving layer is under test
            "MAX_BATCH_SIZE": str(batch_size),
            "MAX_BATCH_WAIT_TIME": "0.05",
            "GATEWAY_SHUTDOWN_TIMEOUT_S": "2",
            "BROKER_DRAIN_TIMEOUT_S": "2",
            "LOG_LEVEL": "WARNING",  # an access line per request would be most of the gateway's work
            "GPU_ID": "0",
            "WORKER_NAME": "overload-worker0",
        }
        if max_pending is not None:
            settings["GATEWAY_MAX_PENDING"] = str(max_pending)
        # without: the default (the caller's own GATEWAY_MAX_PENDING is dropped)
        super().__init__(workdir, settings, (*DROPPED_ENV, "GATEWAY_MAX_PENDING"), STOP_GRACE_S, READY_TIMEOUT_S)


# --------------------------------------------------------------------------- load and sampling


@dataclass
class Outcome:
    sent_at: float
    status: int | None = None  # None: timeout or connection error
    seconds: float = 0.0
    retry_after: str | None = None
    code: str | None = None
    error: str | None = None


@dataclass
class Samples:
    rss_kib: dict[str, list[tuple[float, int | None]]] = field(default_factory=dict)
    broker_queue: list[tuple[float, int]] = field(default_factory=list)
    stats_errors: int = 0
    last_stats: dict[str, Any] | None = None


def request_body(i: int) -> dict[str, Any]:
    return {"prompt": f"overload {i}", "width": 64, "height": 64, "num_inference_steps": 2, "seed": i}


async def one_request(session: aiohttp.ClientSession, url: str, i: int, timeout_s: float, t0: float) -> Outcome:
    outcome = Outcome(sent_at=time.monotonic() - t0)
    started = time.monotonic()
    try:
        async with session.post(f"{url}/generate", json=request_body(i),
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            outcome.status = response.status
            outcome.retry_after = response.headers.get("Retry-After")
            try:
                body = await response.json(content_type=None)
                if isinstance(body, dict) and isinstance(body.get("error"), dict):
                    outcome.code = body["error"].get("code")
            except (ValueError, aiohttp.ContentTypeError):
                outcome.code = "<not json>"
    except asyncio.TimeoutError:
        outcome.error = "timeout"
    except aiohttp.ClientError as exc:
        outcome.error = type(exc).__name__
    outcome.seconds = time.monotonic() - started
    return outcome


async def offer_load(url: str, rate: float, duration_s: float, timeout_s: float, t0: float) -> list[Outcome]:
    """Open loop: request i leaves at t0 + i / rate, whatever the earlier ones did. Bounded in count
    (rate x duration) and time (sending stops at duration + 1 s even if the event loop fell behind)."""
    total = int(rate * duration_s)
    connector = aiohttp.TCPConnector(limit=min(20000, max(100, int(rate * (timeout_s + 5)))))
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - t0 > duration_s + 1.0:
                break
            tasks.append(asyncio.create_task(one_request(session, url, i, timeout_s, t0)))
        return list(await asyncio.gather(*tasks))


async def sample(url: str, pids: dict[str, int], samples: Samples, stop: asyncio.Event, t0: float) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            now = round(time.monotonic() - t0, 2)
            for name, pid in pids.items():
                samples.rss_kib.setdefault(name, []).append((now, rss_kib(pid)))
            try:
                async with session.get(f"{url}/stats", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    document = await response.json()
                samples.last_stats = document
                samples.broker_queue.append((now, document["broker"]["queue_depth"]))
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
                samples.stats_errors += 1
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
            except asyncio.TimeoutError:
                pass


async def measure(stack: Stack, rate: float, duration_s: float, timeout_s: float,
                  settle_s: float) -> tuple[list[Outcome], Samples, float]:
    samples = Samples()
    stop = asyncio.Event()
    pids = {**stack.pids(), "loadgen": os.getpid()}
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample(stack.url, pids, samples, stop, t0))
    await asyncio.sleep(1.0)  # a couple of idle samples: the "start" figures
    load_t0 = time.monotonic()
    outcomes = await offer_load(stack.url, rate, duration_s, timeout_s, load_t0)
    elapsed = time.monotonic() - load_t0
    await asyncio.sleep(settle_s)  # everything answered: let the processes settle for the "end" figures
    stop.set()
    await sampler
    return outcomes, samples, elapsed


# --------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # nearest rank


def summarise(outcomes: list[Outcome], samples: Samples, args: argparse.Namespace, elapsed_s: float) -> dict:
    statuses: dict[str, int] = {}
    codes_503: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else (o.error or "error")
        statuses[key] = statuses.get(key, 0) + 1
        if o.status == 503:
            codes_503[o.code or "?"] = codes_503.get(o.code or "?", 0) + 1
    ok = [o.seconds for o in outcomes if o.status == 200]
    s503 = [o for o in outcomes if o.status == 503]
    other = {k: v for k, v in statuses.items() if k not in ("200", "503")}
    rss = {}
    for name, series in samples.rss_kib.items():
        values = [v for _, v in series if v is not None]
        if values:
            rss[name] = {"start_mib": round(values[0] / 1024, 1), "peak_mib": round(max(values) / 1024, 1),
                         "end_mib": round(values[-1] / 1024, 1)}
    capacity = args.batch_size / args.delay
    stats = samples.last_stats or {}
    broker = stats.get("broker", {})
    return {
        "config": {
            "offered_rate_per_s": args.rate, "duration_s": args.duration, "client_timeout_s": args.timeout,
            "model_id": f"fake:delay={args.delay:g}", "max_batch_size": args.batch_size,
            "capacity_images_per_s": capacity, "overload_factor": round(args.rate / capacity, 2),
            "max_queue_size": args.max_queue_size,
            "gateway_max_pending": args.max_pending if args.max_pending is not None else "default (5000)",
            "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
        },
        "requests": {
            "sent": len(outcomes),
            "ok_200": len(ok),
            "overloaded_503": len(s503),
            "503_with_retry_after": sum(1 for o in s503 if o.retry_after),
            "503_without_retry_after": sum(1 for o in s503 if not o.retry_after),
            "503_codes": codes_503,
            "other": other,
            "statuses": statuses,
            "first_send_to_last_answer_s": round(elapsed_s, 2),
            "served_images_per_s": round(len(ok) / elapsed_s, 2) if elapsed_s else None,
        },
        "latency_s": {
            "ok_p50": _round(percentile(ok, 0.50)), "ok_p95": _round(percentile(ok, 0.95)),
            "ok_max": _round(max(ok) if ok else None),
            "503_p50": _round(percentile([o.seconds for o in s503], 0.50)),
            "503_p95": _round(percentile([o.seconds for o in s503], 0.95)),
        },
        "rss": rss,
        "broker_queue": {
            "sampled_peak": max((d for _, d in samples.broker_queue), default=None),
            "max_queue_size": args.max_queue_size,
            "high_water_current_queue_depth": stats.get("max_queue_depth"),  # broker queue + the worker's
            "rejected_overloaded": broker.get("rejected_overloaded"),
            "requests_received": broker.get("requests_received"),
            "requests_completed": broker.get("requests_completed"),
            "cancelled": broker.get("cancelled"),
            "stats_query_failures": samples.stats_errors,
        },
        "samples": {
            "interval_s": SAMPLE_INTERVAL_S,
            "rss_kib": {name: series for name, series in samples.rss_kib.items()},
            "broker_queue_depth": samples.broker_queue,
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def print_report(result: dict) -> None:
    c, r, lat, q = result["config"], result["requests"], result["latency_s"], result["broker_queue"]
    print(f"offered {c['offered_rate_per_s']:g} requests/s for {c['duration_s']:g} s "
          f"({c['overload_factor']:g}x the capacity of {c['capacity_images_per_s']:g} images/s; "
          f"MAX_QUEUE_SIZE={c['max_queue_size']}, GATEWAY_MAX_PENDING={c['gateway_max_pending']})")
    print(f"sent {r['sent']}: 200 {r['ok_200']}, 503 {r['overloaded_503']} "
          f"(with Retry-After {r['503_with_retry_after']}, codes {r['503_codes']}), other {r['other'] or 'none'}")
    print(f"served {r['served_images_per_s']} images/s; latency of 200s p50 {lat['ok_p50']} s, p95 {lat['ok_p95']} s, "
          f"max {lat['ok_max']} s; of 503s p50 {lat['503_p50']} s, p95 {lat['503_p95']} s")
    print(f"broker queue: sampled peak {q['sampled_peak']} (limit {q['max_queue_size']}), high-water of broker + "
          f"worker queues {q['high_water_current_queue_depth']}, rejected_overloaded {q['rejected_overloaded']}")
    for name, figures in result["rss"].items():
        print(f"RSS {name:8s} start {figures['start_mib']:7.1f} MiB  peak {figures['peak_mib']:7.1f} MiB  "
              f"end {figures['end_mib']:7.1f} MiB")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=80.0, help="requests offered per second (default 80: 10x)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, s (default 30)")
    parser.add_argument("--delay", type=float, default=0.5, help="fake backend seconds per batch (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=4, help="MAX_BATCH_SIZE (default 4)")
    parser.add_argument("--max-queue-size", type=int, default=100, help="the broker's MAX_QUEUE_SIZE (default 100)")
    parser.add_argument("--max-pending", type=int, default=None, help="GATEWAY_MAX_PENDING (default: its default)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after the last answer before the end sample")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs and images go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 1000 and 0 < args.duration <= 120 and 0 < args.timeout <= 120):
        parser.error("need 0 < --rate <= 1000, 0 < --duration <= 120 and 0 < --timeout <= 120")
    return args


def run(args: argparse.Namespace) -> dict:
    """Start the stack, offer the load, stop the stack (always), return the summary."""
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with Stack(workdir, args.max_queue_size, args.batch_size, args.delay, args.max_pending) as stack:
            outcomes, samples, elapsed = asyncio.run(measure(stack, args.rate, args.duration, args.timeout, args.settle))
            stack.check_alive()
            result = summarise(outcomes, samples, args, elapsed)
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_termination()
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
