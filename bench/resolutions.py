"""Every listed size at compiled speed, and how soon a compiled worker is ready: the measurement file
``docs/benchmarks/resolutions-<card>-<model>.json`` (one per card and model).

One invocation, the service as bench/service.py starts it (broker, gateway, one ``python -m
gpu_worker`` with TORCH_COMPILE=true, in their own process groups, stopped on every exit path):

1. ``cold``: the worker starts with an empty STATE_DIR (``WORK/host-a/state``). From its log: the
   first size warm (``ready_s.cold``) and every listed size warm (``ready_s.all_sizes_warm``),
   both counted from the moment the model's weights are loaded.
2. ``traffic``: once every size is warm, a burst of ``--burst`` (default 4 x the max batch size)
   square requests gives the burst throughput; then open-loop Poisson arrivals at ``--rate-fraction``
   (0.5) of it for ``--arrival-s`` seconds, square-only and then mixed (``--mix``: the same arrival
   times, sizes drawn by weight): p50, p95 and throughput of each; then ``--repeats`` lone requests
   per listed size, one after the other (median: ``lone_by_size[WxH].service_s``).
3. ``restart``: the worker stopped and started again with the same STATE_DIR
   (``ready_s.restart_with_cache``, and its every-size-warm time).
4. ``new-host``: the cache exported (``python -m gpu_worker.model.compile_cache export``), imported
   into a fresh STATE_DIR (``WORK/host-b/state``), a worker started on it
   (``ready_s.new_host_with_cache``).
5. ``raw``: in a separate process (``--raw-child``), with nothing else on the card: the pipeline
   loaded as the worker loads it (its settings, its AccelerationConfig, the cold host's compile
   cache), each size warmed with ``warm_up([1], W, H)`` and a batch of one timed ``--repeats`` times
   with the same steps (median: ``lone_by_size[WxH].raw_batch1_s``).

The file also says which targets are met (``targets``): mixed traffic's p95 within 1.5x of
square-only traffic's at the same rate, every size's lone request within 10% of its raw batch of
one, a worker restarted with its cache (or a new host with an imported one) serving its first size
within 30 s and every size within 120 s, and, given ``--cold-baseline-s``, a cold start no slower
than before.

    python -m bench.resolutions --model sd15 --max-batch-size 16 --work /tmp/res-sd15 \\
        --out docs/benchmarks/resolutions-h200-sd15.json
    # in parts (each call's limit): the results merge into --out; WORK keeps the caches between calls
    python -m bench.resolutions --model sdxl --phases cold --work /tmp/res-sdxl --out res.json
    python -m bench.resolutions --model sdxl --phases traffic,restart,new-host,raw --work /tmp/res-sdxl --out res.json

``--model tiny`` (CPU, TORCH_COMPILE compiling on the CPU: minutes) and ``--model
fake:delay=0.05,warm_delay=0.2`` (the FAKE backend: warm-up sleeps instead of compiling, no cache to
carry) run the same code without a GPU; their numbers measure nothing about a card.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bench.common import card_name, exit_on_sigterm, ordered_choices, save_json
from bench.service import Service

REPO = Path(__file__).resolve().parent.parent
PHASES = ("cold", "traffic", "restart", "new-host", "raw")
GUIDANCE = 7.5  # the worker warms its sizes with this guidance (two UNet rows per image)
PROMPT = "a lighthouse on a cliff"
# Settings of the caller's environment that would change what is measured or lock the harness out.
DROPPED_ENV = ("TORCHINDUCTOR_CACHE_DIR", "GATEWAY_API_KEYS", "GATEWAY_API_KEYS_FILE", "BROKER_CURVE_SECRET_KEY",
               "BROKER_AUTHORIZED_KEYS_DIR", "WORKER_CURVE_SECRET_KEY", "BROKER_CURVE_PUBLIC_KEY", "PUBLIC_BASE_URL")
# The issue's targets.
MIXED_P95_LIMIT = 1.5  # mixed traffic's p95 over square-only traffic's, at the same rate
LONE_OVER_RAW_LIMIT = 1.10  # a lone request over its size's raw compiled batch of one
FIRST_SIZE_LIMIT_S = 30.0  # restart / new host: first size warm, from the model loaded
ALL_SIZES_LIMIT_S = 120.0  # restart / new host: every listed size warm

# The worker's log lines (gpu_worker/__main__.py, gpu_worker/shell/worker.py).
LOADED = re.compile(r"loaded MODEL_ID=\S+ .* in ([0-9.]+)s")
SIZE_WARM = re.compile(r"size (\d+x\d+) warm ([0-9.]+)s after the model loaded \((\d+) of (\d+) sizes warm\)")
ALL_WARM = re.compile(r"every listed size is warm ([0-9.]+)s after the model loaded: [^;\n]*"
                      r"(?:; could not warm ([^\n]*))?")


# --------------------------------------------------------------------------- pure parts


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height); ValueError saying what is wrong."""
    width, separator, height = text.strip().lower().partition("x")
    if not separator or not width.isdigit() or not height.isdigit() or int(width) % 8 or int(height) % 8:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT with sides multiples of 8 (for example 512x768)")
    return int(width), int(height)


def parse_mix(text: str) -> dict[str, float]:
    """``--mix``: ``WxH:weight,...`` -> {WxH: share}, the shares normalised to sum to 1."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, separator, weight = item.partition(":")
        if not separator:
            raise ValueError(f"{item!r}: give each size with its weight, as 512x768:0.2")
        width, height = parse_size(size)
        try:
            share = float(weight)
        except ValueError:
            raise ValueError(f"{item!r}: the weight {weight!r} is not a number") from None
        if not (math.isfinite(share) and share > 0):
            raise ValueError(f"{item!r}: a weight must be a positive number")
        key = f"{width}x{height}"
        if key in weights:
            raise ValueError(f"{key} is listed twice in the mix")
        weights[key] = share
    if not weights:
        raise ValueError("the mix lists no size: give e.g. 512x512:0.6,512x768:0.2,768x512:0.2")
    total = sum(weights.values())
    return {size: round(share / total, 6) for size, share in weights.items()}


def default_mix(model: str, sizes: Sequence[str], square: str) -> dict[str, float]:
    """The mixed traffic when ``--mix`` is not given: SD-1.5 the issue's measured mix (60% 512x512,
    20% 512x768, 20% 768x512) when it serves those; otherwise half the requests at ``square`` (the
    size warmed first: the native square) and the other half spread evenly over the other sizes."""
    issue_mix = {"512x512": 0.6, "512x768": 0.2, "768x512": 0.2}
    if model == "sd15" and set(issue_mix) <= set(sizes):
        return issue_mix
    others = [size for size in sizes if size != square]
    if not others:
        return {square: 1.0}
    return {square: 0.5, **{size: round(0.5 / len(others), 6) for size in others}}


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Open-loop arrival times in [0, duration_s): exponential gaps at ``rate_per_s``, from ``seed``."""
    if not rate_per_s > 0:
        raise ValueError(f"the arrival rate must be positive, got {rate_per_s}")
    rng = random.Random(seed)
    times: list[float] = []
    at = rng.expovariate(rate_per_s)
    while at < duration_s:
        times.append(at)
        at += rng.expovariate(rate_per_s)
    return times


def assign_sizes(count: int, mix: dict[str, float], seed: int) -> list[str]:
    """``count`` sizes drawn by the mix's weights, from their own generator (seeded from ``seed``), so
    the arrival times do not depend on the mix: square-only and mixed traffic arrive at the same times."""
    rng = random.Random(f"sizes-{seed}")
    sizes = list(mix)
    return rng.choices(sizes, weights=[mix[size] for size in sizes], k=count)


def percentile(values: Iterable[float], pct: float) -> float:
    """Nearest rank, as the load test (scripts/test_batching.py): the ceil(pct% x n)-th smallest."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def summarize_run(outcomes: Sequence[dict], rate: float | None = None) -> dict:
    """One run's figures from its requests (each ``size``, ``sent_at``, ``received_at``, ``ok``,
    ``error``, ``batch_id``): served images per second from the first request sent to the last
    answer, latency p50 and p95 (nearest rank) of the served ones, overall and per size."""
    served = [o for o in outcomes if o["ok"]]
    span = (max(o["received_at"] for o in outcomes) - min(o["sent_at"] for o in outcomes)) if outcomes else 0.0
    latencies = [o["received_at"] - o["sent_at"] for o in served]
    by_size: dict[str, list[float]] = {}
    for outcome in served:
        by_size.setdefault(outcome["size"], []).append(outcome["received_at"] - outcome["sent_at"])
    batches = {o["batch_id"] for o in served if o.get("batch_id") is not None}
    return {
        "rate": None if rate is None else round(rate, 4),
        "throughput_img_s": round(len(served) / span, 4) if span > 0 else None,
        "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
        "p95_s": round(percentile(latencies, 95), 4) if latencies else None,
        "requests": len(outcomes),
        "served": len(served),
        "failed": dict(Counter(o["error"] or "error" for o in outcomes if not o["ok"])),
        "last_answer_s": round(span, 3),
        "max_s": round(max(latencies), 4) if latencies else None,
        "avg_batch_size": round(len(served) / len(batches), 2) if batches else None,
        "p50_by_size_s": {size: round(percentile(times, 50), 4) for size, times in sorted(by_size.items())},
        "requests_by_size": {size: len(times) for size, times in sorted(by_size.items())},
    }


def parse_warm_log(text: str) -> dict:
    """What a compiled worker's log says about its start: the model's load time, the first size warm
    and when, each size's warm time, when every listed size was warm (a worker serving one size is
    all warm with its first) and the sizes it could not warm. Times from the model loaded; None
    where the log has not said yet."""
    found: dict[str, Any] = {"load_s": None, "first_size": None, "first_warm_s": None, "sizes": None,
                             "warm_s_by_size": {}, "all_warm_s": None, "could_not_warm": []}
    for line in text.splitlines():
        if (match := LOADED.search(line)) and found["load_s"] is None:
            found["load_s"] = float(match.group(1))
        elif match := SIZE_WARM.search(line):
            size, seconds = match.group(1), float(match.group(2))
            count, total = int(match.group(3)), int(match.group(4))
            found["warm_s_by_size"][size] = seconds
            found["sizes"] = total
            if count == 1 and found["first_size"] is None:
                found["first_size"], found["first_warm_s"] = size, seconds
                if total == 1:
                    found["all_warm_s"] = seconds
        elif match := ALL_WARM.search(line):
            found["all_warm_s"] = float(match.group(1))
            if match.group(2):
                found["could_not_warm"] = [size.strip() for size in match.group(2).split(",") if size.strip()]
    return found


def _within(value: float | None, limit: float, name: str = "seconds") -> dict:
    return {"met": None if value is None else value <= limit, name: value, "limit": limit}


def evaluate_targets(document: dict, cold_baseline_s: float | None = None) -> dict:
    """The issue's targets, each ``met`` (None where not measured) with its figure and limit;
    ``all_met`` is None while any target is not evaluated (``not_evaluated`` names them)."""
    square, mixed = document.get("square_only") or {}, document.get("mixed") or {}
    ready = document.get("ready_s") or {}
    all_warm = ready.get("all_sizes_warm_after") or {}
    targets: dict[str, Any] = {}
    ratio = None
    if square.get("p95_s") and mixed.get("p95_s") is not None:
        ratio = round(mixed["p95_s"] / square["p95_s"], 3)
    targets["mixed_p95_within_1_5x_square"] = _within(ratio, MIXED_P95_LIMIT, "ratio")
    lone_sizes = document.get("lone_by_size") or {}
    ratios = {size: round(row["service_s"] / row["raw_batch1_s"], 3) for size, row in lone_sizes.items()
              if row.get("service_s") is not None and row.get("raw_batch1_s")}
    complete = bool(ratios) and len(ratios) == len(lone_sizes)
    targets["lone_within_10pct_of_raw_batch1"] = {
        "met": all(r <= LONE_OVER_RAW_LIMIT for r in ratios.values()) if complete else None,
        "ratios": ratios, "limit": LONE_OVER_RAW_LIMIT}
    for start in ("restart_with_cache", "new_host_with_cache"):
        name = start.replace("_with_cache", "")
        targets[f"{name}_first_size_within_30s"] = _within(ready.get(start), FIRST_SIZE_LIMIT_S)
        targets[f"{name}_all_sizes_within_120s"] = _within(all_warm.get(start), ALL_SIZES_LIMIT_S)
    cold = ready.get("cold")
    targets["cold_no_slower"] = {"met": None if cold is None or cold_baseline_s is None else cold <= cold_baseline_s,
                                 "seconds": cold, "baseline_s": cold_baseline_s,
                                 "ratio": round(cold / cold_baseline_s, 3) if cold and cold_baseline_s else None}
    verdicts = [target["met"] for target in targets.values()]
    targets["not_evaluated"] = [name for name, target in targets.items() if target["met"] is None]
    targets["all_met"] = None if None in verdicts else all(verdicts)
    return targets


def card_slug(card: str) -> str:
    """The card's part of the file name: "NVIDIA H200" -> "h200", "cpu" -> "cpu"."""
    name = re.sub(r"^nvidia\s+", "", card.split(",")[0].strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def file_name(card: str, model: str) -> str:
    return f"resolutions-{card_slug(card)}-{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}.json"


def new_document(card: str, model: str, command: str) -> dict:
    """The file's skeleton, the issue's fields first; each phase fills its part."""
    return {
        "card": card, "model": model,
        "square_only": {}, "mixed": {},
        "lone_by_size": {},
        "ready_s": {"cold": None, "restart_with_cache": None, "new_host_with_cache": None, "all_sizes_warm": None,
                    "all_sizes_warm_after": {}, "load_s": {}, "could_not_warm": {}},
        "command": command,
    }


def merge(earlier: dict, later: dict) -> dict:
    """``later`` over ``earlier``, dict by dict (a value None in ``later`` keeps ``earlier``'s): the
    results of a call that ran some phases over those of an earlier call that ran others."""
    merged = dict(earlier)
    for key, value in later.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


def parse_phases(text: str) -> list[str]:
    return ordered_choices(text, PHASES, "phase(s)")  # always in this order


# --------------------------------------------------------------------------- the service


class Cluster(Service):
    """Broker and gateway (bench/service.py's Service with no GPU of its own) and workers started and
    stopped one at a time; every process group is killed when the block exits, however it exits."""

    def __init__(self, log_dir: Path, **settings: str) -> None:
        super().__init__([], log_dir, **settings)
        for name in DROPPED_ENV:
            self.env.pop(name, None)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for process in self.processes:  # what the leaders left behind (compile workers)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def start_worker(self, name: str, settings: dict[str, str]) -> tuple[subprocess.Popen, Path, int]:
        """A worker with ``settings``; returns it, its log and where in the log its start begins."""
        log = self.log_dir / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        self._start(name, "gpu_worker", settings)
        return self.processes[-1], log, offset

    def stop_worker(self, process: subprocess.Popen, grace_s: float = 60) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait(timeout=30)

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                stats = self.stats()
                if predicate(stats):
                    return stats
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout_s:g}s; see the logs in {self.log_dir}")
            time.sleep(0.2)


def gpu_memory_used_mib(gpu: int) -> int | None:
    """The card's memory in use (nvidia-smi), MiB; None without nvidia-smi (CPU runs)."""
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                 "-i", str(gpu)], capture_output=True, text=True, timeout=30)
        return int(answer.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def wait_until_warm(cluster: Cluster, process: subprocess.Popen, log: Path, offset: int, timeout_s: float,
                    gpu: int = 0) -> dict:
    """Follow a worker's log until every listed size is warm; then until the broker shows it warm.
    The card's memory in use is sampled when the first size is warm and when every size is (the
    worker alone on the card: its weights, activations, compiled code and CUDA graphs' pools)."""
    deadline = time.monotonic() + timeout_s
    memory_mib: dict[str, int | None] = {}
    while True:
        with log.open("rb") as handle:
            handle.seek(offset)
            found = parse_warm_log(handle.read().decode(errors="replace"))
        if found["first_warm_s"] is not None and "first_size_warm" not in memory_mib:
            memory_mib["first_size_warm"] = gpu_memory_used_mib(gpu)
        if found["all_warm_s"] is not None:
            memory_mib["all_sizes_warm"] = gpu_memory_used_mib(gpu)
            found["gpu_memory_used_mib"] = memory_mib
            break
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited (code {process.returncode}) before every size was warm; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every size warm within {timeout_s:g}s (say --ready-timeout-s); see {log}")
        time.sleep(0.2)
    cluster.wait_for(lambda s: (s.get("worker") or {}).get("compile_state") == "warm", 120,
                     f"the broker showing the worker warm (log {log})")
    print(f"{log.stem}: loaded in {found['load_s']}s; first size {found['first_size']} warm "
          f"{found['first_warm_s']}s after, every size {found['all_warm_s']}s after", file=sys.stderr, flush=True)
    return found


def start_and_time(cluster: Cluster, name: str, settings: dict[str, str], timeout_s: float,
                   keep: bool = False, gpu: int = 0) -> tuple[dict, subprocess.Popen | None]:
    """Start a worker, wait until every size is warm; stop it unless ``keep``."""
    cluster.wait_for(lambda s: s.get("num_gpus") == 0, 120, "the previous worker gone from the broker")
    process, log, offset = cluster.start_worker(name, settings)
    try:
        found = wait_until_warm(cluster, process, log, offset, timeout_s, gpu)
    except BaseException:
        cluster.stop_worker(process)
        raise
    if keep:
        return found, process
    cluster.stop_worker(process)
    return found, None


# --------------------------------------------------------------------------- traffic over HTTP


async def _send(session, url: str, size: str, steps: int, seed: int, tag: str) -> dict:
    import aiohttp

    width, height = parse_size(size)
    body = {"prompt": f"{PROMPT}, {tag}", "width": width, "height": height, "num_inference_steps": steps,
            "guidance_scale": GUIDANCE, "seed": seed}
    sent = time.perf_counter()
    outcome = {"size": size, "steps": steps, "sent_at": sent, "ok": False, "error": None, "batch_id": None,
               "batch_size": None, "generation_ms": None}
    try:
        async with session.post(f"{url}/generate", json=body) as response:
            answer = await response.json(content_type=None)
            outcome["received_at"] = time.perf_counter()
            if response.status == 200 and isinstance(answer, dict):
                outcome.update(ok=True, batch_id=answer.get("batch_id"), batch_size=answer.get("batch_size"),
                               generation_ms=answer.get("generation_ms"))
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                code = error.get("code") if isinstance(error, dict) else None
                outcome["error"] = f"{response.status} {code}" if code else str(response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        outcome["received_at"] = time.perf_counter()
        outcome["error"] = type(exc).__name__
    return outcome


async def _arrivals(url: str, arrivals: Sequence[tuple[float, str] | tuple[float, str, int]], steps: int, seed: int,
                    tag: str, timeout_s: float) -> list[dict]:
    """Each request sent at its time from now, whatever happened to the others (open loop). An arrival
    is ``(at_s, size)``, with ``steps`` denoising steps, or ``(at_s, size, its_own_steps)``."""
    import aiohttp

    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        began = loop.time()

        async def one(index: int, at_s: float, size: str, *own_steps: int) -> dict:
            await asyncio.sleep(max(0.0, began + at_s - loop.time()))
            return await _send(session, url, size, own_steps[0] if own_steps else steps, seed + index,
                               f"{tag} #{index}")

        return list(await asyncio.gather(*(one(i, *arrival) for i, arrival in enumerate(arrivals))))


def send(url: str, arrivals: Sequence[tuple[float, str] | tuple[float, str, int]], steps: int, seed: int, tag: str,
         timeout_s: float = 900) -> list[dict]:
    return asyncio.run(_arrivals(url, arrivals, steps, seed, tag, timeout_s))


def traffic(cluster: Cluster, args: argparse.Namespace, sizes: list[str], square: str, max_batch: int) -> dict:
    """Burst, square-only and mixed Poisson arrivals, lone requests per size."""
    url, steps = cluster.url, args.steps
    burst_count = args.burst or 4 * max_batch
    burst = summarize_run(send(url, [(0.0, square)] * burst_count, steps, args.seed, "burst"))
    print(f"burst of {burst_count} x {square}: {burst['throughput_img_s']} images/s", file=sys.stderr, flush=True)
    if not burst["throughput_img_s"] or burst["served"] < burst_count:
        raise RuntimeError(f"the burst was not served ({burst['failed']}); see the logs in {cluster.log_dir}")
    rate = args.rate_fraction * burst["throughput_img_s"]
    mix = parse_mix(args.mix) if args.mix else default_mix(args.model, sizes, square)
    unlisted = sorted(set(mix) - set(sizes))
    if unlisted:
        print(f"note: the mix asks for {', '.join(unlisted)}, which the worker does not list "
              f"(served per UNLISTED_SIZE)", file=sys.stderr)
    times = poisson_arrivals(rate, args.arrival_s, args.seed)
    if len(times) < 20:
        print(f"note: {len(times)} arrivals in {args.arrival_s:g}s at {rate:.3g}/s: a p95 of so few says little "
              "(raise --arrival-s)", file=sys.stderr)
    square_only = summarize_run(send(url, [(t, square) for t in times], steps, args.seed, "square"), rate)
    print(f"square-only at {rate:.3f}/s: p50 {square_only['p50_s']} p95 {square_only['p95_s']}",
          file=sys.stderr, flush=True)
    mixed_sizes = assign_sizes(len(times), mix, args.seed)
    mixed = summarize_run(send(url, list(zip(times, mixed_sizes)), steps, args.seed, "mixed"), rate)
    mixed["mix"] = mix
    print(f"mixed at {rate:.3f}/s: p50 {mixed['p50_s']} p95 {mixed['p95_s']}", file=sys.stderr, flush=True)
    lone: dict[str, dict] = {}
    for size in sizes:
        outcomes = []
        for repeat in range(args.repeats):
            time.sleep(args.lone_pause_s)  # the card idle, as a lone request finds it
            outcomes += send(url, [(0.0, size)], steps, args.seed + repeat, f"lone {size}")
        served = [o for o in outcomes if o["ok"]]
        if len(served) < len(outcomes):
            raise RuntimeError(f"lone requests at {size} failed: {[o['error'] for o in outcomes if not o['ok']]}")
        seconds = [o["received_at"] - o["sent_at"] for o in served]
        generation = [o["generation_ms"] / 1000 for o in served if o["generation_ms"] is not None]
        lone[size] = {"service_s": round(statistics.median(seconds), 4),
                      "service_runs_s": [round(s, 4) for s in seconds],
                      "worker_batch_s": round(statistics.median(generation), 4) if generation else None}
        print(f"lone {size}: {lone[size]['service_s']} s", file=sys.stderr, flush=True)
    worker = cluster.stats().get("worker") or {}
    return {"burst": {**burst, "requests": burst_count, "size": square}, "square_only": {**square_only,
            "size": square}, "mixed": mixed, "lone_by_size": lone,
            "eager": {key: worker.get(key) for key in ("eager_batches", "eager_images")}}


# --------------------------------------------------------------------------- the raw batch of one


def raw_batch1(args: argparse.Namespace) -> dict:
    """In this process: the pipeline loaded as the worker loads it (its settings from --set, --model,
    --sizes, the cold host's STATE_DIR), each size warmed at batch 1 and timed (median of --repeats)."""
    os.environ.update(worker_settings(args, host_state(args.work, "a")))
    for name in DROPPED_ENV:
        os.environ.pop(name, None)
    import torch

    from gpu_worker.__main__ import optimizations, served_sizes
    from gpu_worker.config import DYNAMIC, WorkerSettings
    from gpu_worker.model.acceleration import configure_sizes
    from gpu_worker.model.compile_cache import use_compile_cache
    from gpu_worker.model.fake_backend import parse_fake_model_id
    from gpu_worker.model.pipelines import load_pipeline
    from bench.common import benchmark_jobs
    from imagegen import settings as settings_lib
    from imagegen.batch_key import BatchKey

    settings = settings_lib.load(WorkerSettings, [])
    use_compile_cache(settings.state_dir)
    started = time.perf_counter()
    pipeline = parse_fake_model_id(settings.model_id) or load_pipeline(
        settings.model_id, settings.device, settings.dtype, optimizations(settings))
    load_s = time.perf_counter() - started
    sizes = served_sizes(settings, pipeline)
    if pipeline.architecture != "fake":
        configure_sizes(len(sizes), dynamic_spatial=settings.size_compilation == DYNAMIC)
    on_cuda = torch.cuda.is_available()
    weights = torch.cuda.memory_allocated() if on_cuda else 0
    rows = {}
    for size in sizes:
        warm = pipeline.warm_up([1], size.width, size.height)
        reserved_gib = round(torch.cuda.memory_reserved() / 2**30, 2) if on_cuda else None
        key = BatchKey(size.width, size.height, args.steps, GUIDANCE)
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.repeats):
            time.sleep(args.lone_pause_s)
            began = time.perf_counter()
            pipeline.generate(benchmark_jobs(1), key)
            if on_cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
        rows[str(size)] = {"batch1_s": round(statistics.median(seconds), 4), "runs_s": [round(s, 4) for s in seconds],
                           "warm_up_s": round(warm.get(1, 0.0), 2),
                           # cumulative: weights, then each size's compiled code and CUDA graph pool
                           "reserved_after_warm_gib": reserved_gib,
                           "peak_above_weights_gib": round((torch.cuda.max_memory_allocated() - weights) / 2**30, 2)
                           if on_cuda else None}
        print(f"raw {size} batch 1: {rows[str(size)]['batch1_s']} s", file=sys.stderr, flush=True)
    return {"device": torch.cuda.get_device_name(0) if on_cuda else "cpu", "load_s": round(load_s, 1),
            "weights_gib": round(weights / 2**30, 2) if on_cuda else None,
            "steps": args.steps, "sizes": rows}


def run_raw_child(args: argparse.Namespace, out: Path, log: Path) -> dict:
    """This module with --raw-child in its own process group (stopped however this one exits)."""
    command = [sys.executable, "-m", "bench.resolutions", "--raw-child", "--model", args.model, "--sizes",
               args.sizes, "--steps", str(args.steps), "--repeats", str(args.repeats), "--lone-pause-s",
               str(args.lone_pause_s), "--max-batch-size", args.max_batch_size, "--gpu", str(args.gpu),
               "--work", str(args.work), "--out", str(out), *[f"--set={k}={v}" for k, v in args.settings.items()]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("ab") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        code = process.wait()
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
    if code != 0:
        raise RuntimeError(f"the raw batch-of-one process failed (code {code}); see {log}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the whole run


def host_state(work: Path, host: str) -> Path:
    return work / f"host-{host}" / "state"


def worker_settings(args: argparse.Namespace, state_dir: Path) -> dict[str, str]:
    settings = {"MODEL_ID": args.model, "TORCH_COMPILE": "true", "SIZES": args.sizes, "STATE_DIR": str(state_dir),
                "CUDA_VISIBLE_DEVICES": str(args.gpu), "GPU_ID": str(args.gpu), "PYTHONUNBUFFERED": "1"}
    if args.max_batch_size != "auto":
        settings["MAX_BATCH_SIZE"] = args.max_batch_size
    return {**settings, **args.settings}


def fresh(folder: Path) -> Path:
    """An empty ``folder`` (the harness owns everything under --work)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def record_start(document: dict, start: str, found: dict) -> None:
    ready = document["ready_s"]
    ready[start] = found["first_warm_s"]
    ready["all_sizes_warm_after"][start] = found["all_warm_s"]
    ready["load_s"][start] = found["load_s"]
    ready["could_not_warm"][start] = found["could_not_warm"]
    document.setdefault("gpu_memory_used_mib", {})[start] = found.get("gpu_memory_used_mib")
    if start == "cold":
        ready["all_sizes_warm"] = found["all_warm_s"]


def carry_cache(work: Path) -> dict:
    """Export the cold host's compile cache and import it into a fresh host's STATE_DIR, with the
    worker's own command. A backend that compiles nothing (fake) leaves no cache to carry."""
    from gpu_worker.model.compile_cache import cache_dir, holds_artefacts

    source, target = host_state(work, "a"), fresh(host_state(work, "b"))
    if not holds_artefacts(cache_dir(source)):
        return {"archive": None, "archive_mib": None,
                "note": f"{cache_dir(source)} holds nothing compiled: the new host starts with an empty STATE_DIR"}
    archive = work / "compile-cache.tar.gz"
    module = [sys.executable, "-m", "gpu_worker.model.compile_cache"]
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    exported = subprocess.run([*module, "export", str(archive), "--state-dir", str(source)], cwd=REPO, env=env,
                              check=True, capture_output=True, text=True, timeout=1800)
    imported = subprocess.run([*module, "import", str(archive), "--state-dir", str(target)], cwd=REPO, env=env,
                              check=True, capture_output=True, text=True, timeout=1800)
    return {"archive": str(archive), "archive_mib": round(archive.stat().st_size / 2**20, 1),
            "export": exported.stdout.strip(), "import": imported.stdout.strip()}


def versions() -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    return {"torch": version("torch"), "diffusers": version("diffusers"), "python": platform.python_version()}


def run(args: argparse.Namespace, document: dict, save: Callable[[], None]) -> None:
    work, logs = args.work, args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    phases = args.phases
    service_settings = {"MODEL_ID": args.model, "STATE_DIR": str(work / "service-state"), **args.settings}
    settings = document.setdefault("settings", {})
    with Cluster(logs, **service_settings) as cluster:
        if "cold" in phases or "traffic" in phases:
            if "cold" in phases:
                fresh(host_state(work, "a"))
            name = "worker-cold" if "cold" in phases else "worker-traffic"
            found, worker = start_and_time(cluster, name, worker_settings(args, host_state(work, "a")),
                                           args.ready_timeout_s, keep="traffic" in phases, gpu=args.gpu)
            if "cold" in phases:
                record_start(document, "cold", found)
                save()
            if worker is not None:
                try:
                    stats = cluster.stats()["worker"]
                    sizes, max_batch = stats["sizes"], stats["max_batch_size"]
                    settings.update(sizes=sizes, max_batch_size=max_batch, steps=args.steps,
                                    guidance_scale=GUIDANCE, arrival_s=args.arrival_s, seed=args.seed,
                                    rate_fraction=args.rate_fraction, repeats=args.repeats)
                    measured = traffic(cluster, args, sizes, found["first_size"], max_batch)
                finally:
                    cluster.stop_worker(worker)
                for size, row in measured.pop("lone_by_size").items():
                    document["lone_by_size"].setdefault(size, {}).update(row)
                document.update(measured)
                save()
        if ("restart" in phases or "new-host" in phases) and not host_state(work, "a").is_dir():
            raise SystemExit(f"the restart and new-host phases start from the cold host's STATE_DIR, "
                             f"{host_state(work, 'a')}, which does not exist: run the cold phase with this "
                             "--work first")
        if "restart" in phases:
            found, _ = start_and_time(cluster, "worker-restart", worker_settings(args, host_state(work, "a")),
                                      args.ready_timeout_s, gpu=args.gpu)
            record_start(document, "restart_with_cache", found)
            save()
        if "new-host" in phases:
            document["compile_cache"] = carry_cache(work)
            found, _ = start_and_time(cluster, "worker-new-host", worker_settings(args, host_state(work, "b")),
                                      args.ready_timeout_s, gpu=args.gpu)
            record_start(document, "new_host_with_cache", found)
            save()
    if "raw" in phases:  # the service is stopped: the card is the raw pipeline's alone
        raw = run_raw_child(args, work / "raw.json", logs / "raw.log")
        document["raw"] = {key: value for key, value in raw.items() if key != "sizes"}
        for size, row in raw["sizes"].items():
            document["lone_by_size"].setdefault(size, {})["raw_batch1_s"] = row["batch1_s"]
            document["lone_by_size"][size]["raw_runs_s"] = row["runs_s"]
            document["lone_by_size"][size]["raw_peak_above_weights_gib"] = row["peak_above_weights_gib"]
            document["lone_by_size"][size]["raw_reserved_after_warm_gib"] = row.get("reserved_after_warm_gib")
        save()


def parse_settings(items: list[str]) -> dict[str, str]:
    settings = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise SystemExit(f"--set {item!r}: give NAME=VALUE, e.g. --set SIZE_COMPILATION=dynamic")
        settings[name] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resolutions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", help="MODEL_ID: sd15, sdxl, tiny or fake:... (default sd15)")
    parser.add_argument("--sizes", default="auto", help="SIZES for the worker (default auto: the architecture's "
                        "buckets); tiny: give sizes of at least 64 (the gateway's MIN_IMAGE_SIDE)")
    parser.add_argument("--mix", help="mixed traffic as WxH:weight,... (default: SD-1.5 512x512:0.6,512x768:0.2,"
                        "768x512:0.2; otherwise half the native square, the rest spread over the other sizes)")
    parser.add_argument("--max-batch-size", default="16", help="MAX_BATCH_SIZE, or auto (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of every request (default 25)")
    parser.add_argument("--burst", type=int, default=0, help="square requests of the burst (default 4 x max batch)")
    parser.add_argument("--rate-fraction", type=float, default=0.5,
                        help="Poisson arrival rate as a fraction of the burst throughput (default 0.5)")
    parser.add_argument("--arrival-s", type=float, default=30.0, help="seconds of Poisson arrivals per traffic run")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrivals, the mix and the requests")
    parser.add_argument("--repeats", type=int, default=5, help="lone requests and raw calls per size (median)")
    parser.add_argument("--lone-pause-s", type=float, default=0.5, help="idle before each lone request / raw call")
    parser.add_argument("--cold-baseline-s", type=float,
                        help="the cold start's ready time before this change (bench.compile_cache's ready_s.cold "
                             "on the same card and settings), for the 'cold start no slower' target")
    parser.add_argument("--ready-timeout-s", type=float, default=3600.0, help="give up on a start after this long")
    parser.add_argument("--phases", type=parse_phases, default=list(PHASES),
                        help=f"which of {','.join(PHASES)} to run (default all); with some only, the results "
                             "merge into an existing --out of the same card and model")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU to use (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra setting for every process, e.g. SIZE_COMPILATION=dynamic (repeatable)")
    parser.add_argument("--work", type=Path, required=True,
                        help="a folder the harness owns: state dirs, the exported cache, logs")
    parser.add_argument("--out", type=Path, help="the result file (default WORK/resolutions-<card>-<model>.json)")
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)  # the raw phase's process
    args = parser.parse_args(argv)
    args.settings = parse_settings(args.set)
    if args.max_batch_size != "auto" and not (args.max_batch_size.isdigit() and int(args.max_batch_size) > 0):
        parser.error(f"--max-batch-size: a positive integer or auto, got {args.max_batch_size!r}")
    if args.sizes != "auto":
        try:
            [parse_size(size) for size in args.sizes.split(",")]
        except ValueError as exc:
            parser.error(f"--sizes: {exc}")
    if args.mix:
        try:
            parse_mix(args.mix)
        except ValueError as exc:
            parser.error(f"--mix: {exc}")
    if args.repeats < 1 or args.arrival_s <= 0 or not 0 < args.rate_fraction <= 1:
        parser.error("--repeats must be >= 1, --arrival-s > 0 and --rate-fraction within (0, 1]")
    exit_on_sigterm()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.raw_child:
        save_json(raw_batch1(args), args.out)
        return 0
    card = card_name()
    out = args.out or args.work / file_name(card, args.model)
    command = "python -m bench.resolutions " + " ".join(sys.argv[1:] if argv is None else argv)
    document = new_document(card, args.model, command)
    if args.phases != list(PHASES) and out.exists():
        earlier = json.loads(out.read_text())
        if (earlier.get("card"), earlier.get("model")) != (card, args.model):
            parser.error(f"{out} holds {earlier.get('model')} on {earlier.get('card')}: give another --out")
        document = merge(earlier, {"command": command})
        document.setdefault("earlier_commands", []).append(earlier.get("command"))
    document.update(date=datetime.date.today().isoformat(), versions=versions())
    if card == "cpu":
        document["note"] = "a run without a GPU (a smoke run of the harness): its figures say nothing about a card"
    document["phases_run"] = sorted(set(document.get("phases_run", [])) | set(args.phases), key=PHASES.index)

    if args.cold_baseline_s is not None:
        document["cold_baseline_s"] = args.cold_baseline_s

    def save() -> None:
        document["targets"] = evaluate_targets(document, document.get("cold_baseline_s"))
        save_json(document, out)

    run(args, document, save)
    save()
    print(json.dumps(document, indent=1))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
