"""The worker's two batching policies side by side through the whole service, in one invocation: the
measurement file ``docs/benchmarks/step-policy-<card>-<model>.json``.

For each policy in turn, ``BATCH_POLICY=run-to-completion`` (the default) and then ``BATCH_POLICY=step``
(gpu_worker/shell/step_loop.py; docs/scheduling.md, "Step-level scheduling"), a fresh service as
bench/service.py starts it (broker, gateway, one ``python -m gpu_worker``, every other setting the
same: ``--set NAME=VALUE``), one size (SIZES=<size>x<size>) and a STATE_DIR shared by both (the
compile cache: WORK/state unless given), runs:

1. ``lone``: ``--lone-count`` (3) single requests one after the other, ``--lone-pause-s`` apart
   (``median_s``: the median service latency);
2. ``burst``: ``scripts/test_batching.py --burst N`` (``--burst``, default 50);
3. ``users``: ``scripts/test_batching.py --users U --requests-per-user M`` (default 10 x 5);
4. ``staggered``: open-loop Poisson arrivals for ``--duration-s`` (30) at ``--rate-fraction`` (0.6) of
   run-to-completion's burst throughput (step 2 of the first policy; ``--rate`` gives it outright),
   every request with ``--steps``; the arrival times come from ``--seed``, so both policies get the
   same ones;
5. ``mixed_steps``: the same arrival times, each request's steps drawn from ``--mixed-steps``
   (10,25,50) with the same seed (``p50_by_steps_s``).

Each row: ``service_images_per_s``, ``latency_p50_s``, ``latency_p95_s``, ``latency_max_s``,
``avg_batch_size`` (images per distinct batch id; under the step policy a cohort's id),
``successful`` of ``images`` (bench.service.row). Each policy also records ``recompiles``: the
worker log's lines saying a compiled module's input "is not warm; it runs eager until a warm-up
compiles it" (gpu_worker/model/acceleration.py: with TORCH_COMPILE, a shape that would need a
recompile after the warm-up runs eager and says so once per shape), and the worker's
``eager_batches`` / ``eager_images`` from ``/stats``.

``--raw`` (the default where nvidia-smi sees a GPU, ``--no-raw`` otherwise) then times the raw
pipeline at batch 1, alone on the card, in a child process (bench/resolutions.py's raw batch of one:
the worker's settings and compile cache, ``--lone-count`` calls, median).

``ratios`` are step over run-to-completion (burst and users throughput, staggered and mixed-steps
p50 and p95, the lone latency) and each policy's lone latency over the raw batch of one. ``targets``
evaluates the step policy's targets: burst and users throughput of step at least 98% of run-to-completion's, the
step policy's lone request within 5% of the raw batch of one, no recompile under the step policy
(evaluated with TORCH_COMPILE only), every request served, and staggered and mixed-steps runs
measured beside run-to-completion; ``met`` is null where a figure is missing (no raw batch without
a GPU).

    python -m bench.step_policy --model sdxl --size 1024 --steps 25 --set TORCH_COMPILE=true \\
        --set MAX_BATCH_SIZE=16 --work /tmp/step-policy-sdxl

``--policies step`` runs the step policy alone and adds it to an existing ``--out`` of the same card,
model, size and steps (its run-to-completion rows and arrival rate), for a run split in two calls.
``--model tiny`` runs the real tiny random-weight pipeline on the CPU (how the script is tested):
its numbers say nothing about a card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from bench.common import card_name, exit_on_sigterm, ordered_choices, save_json
from bench.resolutions import (DROPPED_ENV, card_slug, percentile, poisson_arrivals, run_raw_child, send,
                               summarize_run, versions)
from bench.service import Service, row

REPO = Path(__file__).resolve().parent.parent
POLICIES = ("run-to-completion", "step")
BASELINE, CANDIDATE = POLICIES
WORKLOADS = ("lone", "burst", "users", "staggered", "mixed_steps")
# The step policy's targets (docs/benchmarks.md, "Step policy against run-to-completion").
THROUGHPUT_RATIO_FLOOR = 0.98  # step's burst and users throughput over run-to-completion's
LONE_OVER_RAW_LIMIT = 1.05  # the step policy's lone request over the raw batch of one
# gpu_worker/model/acceleration.py: a shape torch would have to recompile after the warm-up runs eager.
NOT_WARM = re.compile(r"input .* is not warm; it runs eager until a warm-up compiles it")


# --------------------------------------------------------------------------- pure parts


def parse_steps(text: str) -> list[int]:
    """``--mixed-steps``: ``10,25,50`` -> [10, 25, 50]; ArgumentTypeError saying what is wrong."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give step counts as 10,25,50") from None
    if not steps or any(count < 1 for count in steps):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive step counts, as 10,25,50")
    return steps


def parse_policies(text: str) -> list[str]:
    return ordered_choices(text, POLICIES, "policy")  # always run-to-completion first


def assign_steps(count: int, choices: Sequence[int], seed: int) -> list[int]:
    """``count`` step counts drawn evenly from ``choices``, from their own generator (seeded from
    ``seed``): the arrival times do not depend on them."""
    rng = random.Random(f"steps-{seed}")
    return [rng.choice(list(choices)) for _ in range(count)]


def load_summary(outcomes: Sequence[dict]) -> dict:
    """Open-loop outcomes (bench.resolutions.send) as the load test's summary, for bench.service.row."""
    run = summarize_run(outcomes)
    return {"successful": run["served"], "total": run["requests"], "duration_s": run["last_answer_s"],
            "throughput": run["throughput_img_s"] or 0.0, "avg_batch_size": run["avg_batch_size"],
            "latency_p50_s": run["p50_s"], "latency_p95_s": run["p95_s"], "latency_max_s": run["max_s"],
            "median_ms": None, "failed": run["failed"]}


def by_steps(outcomes: Sequence[dict]) -> dict:
    """The served requests' p50 latency and count per step count."""
    latencies: dict[int, list[float]] = {}
    for outcome in outcomes:
        if outcome["ok"]:
            latencies.setdefault(outcome["steps"], []).append(outcome["received_at"] - outcome["sent_at"])
    return {"p50_by_steps_s": {str(steps): round(percentile(times, 50), 4)
                               for steps, times in sorted(latencies.items())},
            "requests_by_steps": {str(steps): count
                                  for steps, count in sorted(Counter(o["steps"] for o in outcomes).items())}}


def count_recompiles(log_text: str) -> dict:
    """What a worker log says about shapes a compiled module met after its warm-up (each would have
    been a recompile; the worker runs it eager and says so once per shape)."""
    lines = [line.strip() for line in log_text.splitlines() if NOT_WARM.search(line)]
    return {"count": len(lines), "lines": lines[:10]}


def _quotient(numerator: Any, denominator: Any) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def compute_ratios(policies: dict, raw_batch1_s: float | None) -> dict:
    """Step over run-to-completion for each compared figure (None where a row is missing), and each
    policy's median lone latency over the raw batch of one (None without it)."""
    baseline, candidate = policies.get(BASELINE) or {}, policies.get(CANDIDATE) or {}

    def figure(policy: dict, workload: str, key: str) -> Any:
        return (policy.get(workload) or {}).get(key)

    def ratio(workload: str, key: str) -> float | None:
        return _quotient(figure(candidate, workload, key), figure(baseline, workload, key))

    return {
        "burst_throughput": ratio("burst", "service_images_per_s"),
        "users_throughput": ratio("users", "service_images_per_s"),
        "staggered_p50": ratio("staggered", "latency_p50_s"),
        "staggered_p95": ratio("staggered", "latency_p95_s"),
        "mixed_steps_p50": ratio("mixed_steps", "latency_p50_s"),
        "mixed_steps_p95": ratio("mixed_steps", "latency_p95_s"),
        "lone_latency": ratio("lone", "median_s"),
        "lone_over_raw_batch1": {policy: _quotient(figure(policies.get(policy) or {}, "lone", "median_s"), raw_batch1_s)
                                 for policy in POLICIES},
    }


def evaluate_targets(policies: dict, ratios: dict, compiled: bool) -> dict:
    """The step policy's targets, each ``met`` (None where not measurable) with its figure and limit;
    ``all_met`` is None while any is not evaluated (``not_evaluated`` names them)."""
    targets: dict[str, Any] = {}
    for workload in ("burst", "users"):
        value = ratios.get(f"{workload}_throughput")
        targets[f"{workload}_throughput_within_2pct"] = {
            "met": None if value is None else value >= THROUGHPUT_RATIO_FLOOR, "ratio": value,
            "floor": THROUGHPUT_RATIO_FLOOR}
    lone = (ratios.get("lone_over_raw_batch1") or {}).get(CANDIDATE)
    targets["lone_within_5pct_of_raw_batch1"] = {"met": None if lone is None else lone <= LONE_OVER_RAW_LIMIT,
                                                 "ratio": lone, "limit": LONE_OVER_RAW_LIMIT}
    recompiles = (policies.get(CANDIDATE) or {}).get("recompiles")
    count = recompiles.get("count") if isinstance(recompiles, dict) else None
    targets["no_recompiles_in_step"] = {
        "met": None if count is None or not compiled else count == 0, "recompiles": count,
        **({} if compiled else {"note": "TORCH_COMPILE is off: nothing compiles, nothing to recompile"})}
    rows = [policies[policy][workload] for policy in POLICIES if policy in policies
            for workload in WORKLOADS if (policies[policy] or {}).get(workload)]
    complete = len(rows) == len(POLICIES) * len(WORKLOADS)
    targets["every_request_served"] = {
        "met": all(r["successful"] == r["images"] for r in rows) if complete else None,
        "failed": sum(r["images"] - r["successful"] for r in rows)}
    beside = [ratios.get(name) for name in ("staggered_p50", "staggered_p95", "mixed_steps_p50", "mixed_steps_p95")]
    targets["staggered_and_mixed_steps_measured_beside"] = {"met": all(value is not None for value in beside)}
    verdicts = [target["met"] for target in targets.values()]
    targets["not_evaluated"] = [name for name, target in targets.items() if target["met"] is None]
    targets["all_met"] = None if None in verdicts else all(verdicts)
    return targets


def file_name(card: str, model: str) -> str:
    return f"step-policy-{card_slug(card)}-{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}.json"


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- the service


class PolicyService(Service):
    """bench/service.py's Service on GPU ``gpu``, without the caller's settings that would lock the
    harness out or change what is measured; what the process leaders left (compile workers) is
    killed when the block exits."""

    def __init__(self, gpu: int, log_dir: Path, **settings: str) -> None:
        super().__init__([gpu], log_dir, **settings)
        for name in DROPPED_ENV:
            if name not in settings:
                self.env.pop(name, None)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def lone(service: Service, args: argparse.Namespace, size: str) -> dict:
    outcomes = []
    for repeat in range(args.lone_count):
        time.sleep(args.lone_pause_s)  # the card idle, as a lone request finds it
        outcomes += send(service.url, [(0.0, size)], args.steps, args.seed + repeat, "lone")
    seconds = [o["received_at"] - o["sent_at"] for o in outcomes if o["ok"]]
    return row("lone", args, 1, load_summary(outcomes), policy=args.policy,
               median_s=round(statistics.median(seconds), 4) if seconds else None,
               runs_s=[round(s, 4) for s in seconds])


def measure_policy(args: argparse.Namespace, policy: str, settings: dict[str, str], rate: float | None,
                   on_rate: Any) -> dict:
    """One policy's rows on a fresh service; ``rate`` (None: from this policy's burst, via ``on_rate``)."""
    args.policy = policy
    size = f"{args.size}x{args.size}"
    log_dir = args.work / "logs" / policy
    log_dir.mkdir(parents=True, exist_ok=True)
    measured: dict[str, Any] = {}
    with PolicyService(args.gpu, log_dir, **settings, BATCH_POLICY=policy) as service:
        print(f"{policy}: the service is ready", file=sys.stderr, flush=True)
        measured["lone"] = lone(service, args, size)
        burst = service.load("--burst", str(args.burst), size=args.size, steps=args.steps)
        measured["burst"] = row("burst", args, 1, burst, policy=policy, burst=args.burst)
        users = service.load("--users", str(args.users), "--requests-per-user", str(args.requests_per_user),
                             size=args.size, steps=args.steps)
        measured["users"] = row("users", args, 1, users, policy=policy, users=args.users,
                                requests_per_user=args.requests_per_user)
        if rate is None:
            rate = on_rate(measured["burst"])
        times = poisson_arrivals(rate, args.duration_s, args.seed)
        if len(times) < 20:
            print(f"note: {len(times)} arrivals in {args.duration_s:g}s at {rate:.3g}/s: a p95 of so few says "
                  "little (raise --duration-s)", file=sys.stderr)
        staggered = send(service.url, [(at, size) for at in times], args.steps, args.seed, "staggered")
        measured["staggered"] = row("staggered", args, 1, load_summary(staggered), policy=policy,
                                    rate_per_s=round(rate, 4), duration_s_of_arrivals=args.duration_s)
        steps = assign_steps(len(times), args.mixed_steps, args.seed)
        mixed = send(service.url, [(at, size, own) for at, own in zip(times, steps)], args.steps, args.seed, "mixed")
        measured["mixed_steps"] = row("mixed_steps", args, 1, load_summary(mixed), policy=policy,
                                      rate_per_s=round(rate, 4), duration_s_of_arrivals=args.duration_s,
                                      step_choices=args.mixed_steps, **by_steps(mixed))
        try:
            worker = service.stats().get("worker") or {}
        except OSError:
            worker = {}
        measured["eager"] = {key: worker.get(key) for key in ("eager_batches", "eager_images")}
    log = log_dir / f"worker{args.gpu}.log"
    measured["recompiles"] = count_recompiles(log.read_text(errors="replace") if log.exists() else "")
    measured["worker_log"] = str(log)
    return measured


def raw_batch1_s(args: argparse.Namespace, settings: dict[str, str]) -> dict:
    """bench.resolutions' raw batch of one, in its own process, with the worker's settings."""
    raw_args = argparse.Namespace(
        model=args.model, sizes=f"{args.size}x{args.size}", steps=args.steps, repeats=args.lone_count,
        lone_pause_s=args.lone_pause_s, max_batch_size=settings.get("MAX_BATCH_SIZE", "auto"), gpu=args.gpu,
        work=args.work / "raw", settings={"TORCH_COMPILE": "false", **settings})
    raw_args.work.mkdir(parents=True, exist_ok=True)
    raw = run_raw_child(raw_args, args.work / "raw.json", args.work / "logs" / "raw.log")
    size = raw["sizes"][f"{args.size}x{args.size}"]
    return {"batch1_s": size["batch1_s"], "runs_s": size["runs_s"], "device": raw.get("device"),
            "load_s": raw.get("load_s")}


# --------------------------------------------------------------------------- the whole run


def new_document(args: argparse.Namespace, card: str, command: str) -> dict:
    return {"card": card, "model": args.model, "size": f"{args.size}x{args.size}", "steps": args.steps,
            "versions": versions(), "command": command, "date": datetime.date.today().isoformat(),
            "settings": args.settings,
            "workloads": {"lone": args.lone_count, "burst": args.burst, "users": args.users,
                          "requests_per_user": args.requests_per_user, "duration_s": args.duration_s,
                          "rate_fraction": args.rate_fraction, "mixed_steps": args.mixed_steps, "seed": args.seed},
            "rate": None, "policies": {}, "raw": None, "ratios": {}, "targets": {}}


def earlier_document(out: Path, document: dict) -> dict | None:
    """The run-to-completion half of an earlier call's --out, when it measured the same thing."""
    if not out.exists():
        return None
    earlier = json.loads(out.read_text())
    same = ("card", "model", "size", "steps")
    if any(earlier.get(key) != document[key] for key in same) or BASELINE not in (earlier.get("policies") or {}):
        return None
    return earlier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", help="MODEL_ID: sdxl, sd15, tiny ... (default sdxl)")
    parser.add_argument("--size", type=int, default=1024, help="square side of every request (default 1024)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of every request but mixed-steps'")
    parser.add_argument("--burst", type=int, default=50, help="requests of the burst (default 50)")
    parser.add_argument("--users", type=int, default=10, help="concurrent users (default 10)")
    parser.add_argument("--requests-per-user", type=int, default=5, help="requests each user sends (default 5)")
    parser.add_argument("--lone-count", type=int, default=3, help="lone requests, and raw calls (median; default 3)")
    parser.add_argument("--lone-pause-s", type=float, default=0.5, help="idle before each lone request / raw call")
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds of Poisson arrivals per open-loop run")
    parser.add_argument("--rate-fraction", type=float, default=0.6,
                        help="arrival rate as a fraction of run-to-completion's burst throughput (default 0.6)")
    parser.add_argument("--rate", type=float, help="the arrival rate in requests/s (instead of --rate-fraction)")
    parser.add_argument("--mixed-steps", type=parse_steps, default=[10, 25, 50],
                        help="the step counts mixed-steps requests draw from (default 10,25,50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrivals, the steps and the requests")
    parser.add_argument("--policies", type=parse_policies, default=list(POLICIES),
                        help="run-to-completion,step (default both; step alone adds to an existing --out)")
    parser.add_argument("--raw", action=argparse.BooleanOptionalAction, default=None,
                        help="time the raw pipeline at batch 1 (default: on where nvidia-smi sees a GPU)")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU to use (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every process of both services, e.g. TORCH_COMPILE=true (repeatable)")
    parser.add_argument("--work", type=Path, help="a folder for logs and the shared STATE_DIR (default: a new one)")
    parser.add_argument("--out", type=Path, help="the result file (default docs/benchmarks/step-policy-<card>-"
                        "<model>.json)")
    args = parser.parse_args(argv)
    args.settings = {}
    for item in args.set:
        name, separator, value = item.partition("=")
        if not separator or not name:
            parser.error(f"--set {item!r}: give NAME=VALUE, e.g. --set TORCH_COMPILE=true")
        args.settings[name] = value
    if "BATCH_POLICY" in args.settings:
        parser.error("--set BATCH_POLICY: the harness runs each policy itself (see --policies)")
    counts = (args.size, args.steps, args.burst, args.users, args.requests_per_user, args.lone_count)
    if min(counts) < 1 or args.duration_s <= 0 or not 0 < args.rate_fraction <= 1 or (args.rate or 1) <= 0:
        parser.error("sizes, steps and counts must be >= 1, --duration-s and --rate > 0, --rate-fraction in (0, 1]")
    exit_on_sigterm()
    args.card = card_name()
    raw = args.card != "cpu" if args.raw is None else args.raw
    out = args.out or REPO / "docs" / "benchmarks" / file_name(args.card, args.model)
    command = shlex.join(["python", "-m", "bench.step_policy", *(sys.argv[1:] if argv is None else argv)])
    document = new_document(args, args.card, command)
    if args.card == "cpu":
        document["note"] = "a run without a GPU (a smoke run of the harness): its figures say nothing about a card"
    rate = args.rate
    if BASELINE not in args.policies:
        earlier = earlier_document(out, document)
        if earlier is not None:
            document["policies"][BASELINE] = earlier["policies"][BASELINE]
            document["raw"] = earlier.get("raw")  # this call's, if it times one, replaces it
            document["earlier_command"] = earlier.get("command")
            if rate is None:
                document["rate"] = earlier.get("rate")
                rate = (earlier.get("rate") or {}).get("per_s")
        if rate is None:
            parser.error(f"--policies step needs --rate or an --out ({out}) holding run-to-completion's rows "
                         "and arrival rate, of the same card, model, size and steps")
    if args.rate is not None:
        document["rate"] = {"per_s": round(args.rate, 4), "from": "--rate"}
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="bench-step-policy-"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {"MODEL_ID": args.model, "SIZES": f"{args.size}x{args.size}", "STATE_DIR": str(args.work / "state"),
                **args.settings}

    def from_burst(burst: dict) -> float:
        if not burst["service_images_per_s"] or burst["successful"] < burst["images"]:
            raise RuntimeError(f"run-to-completion's burst was not served; see the logs in {args.work / 'logs'}")
        per_s = args.rate_fraction * burst["service_images_per_s"]
        document["rate"] = {"per_s": round(per_s, 4), "from": f"{args.rate_fraction} x run-to-completion's burst "
                            f"throughput ({burst['service_images_per_s']} images/s)"}
        return per_s

    def save() -> None:
        raw_s = (document["raw"] or {}).get("batch1_s")
        document["ratios"] = compute_ratios(document["policies"], raw_s)
        document["targets"] = evaluate_targets(document["policies"], document["ratios"],
                                               is_true(settings.get("TORCH_COMPILE")))
        save_json(document, out, indent=1)

    for policy in args.policies:
        document["policies"][policy] = measure_policy(args, policy, settings, rate, from_burst)
        rate = document["rate"]["per_s"]
        save()
    if raw:  # the services are stopped: the card is the raw pipeline's alone
        document["raw"] = raw_batch1_s(args, settings)
        print(f"raw batch 1: {document['raw']['batch1_s']} s", file=sys.stderr, flush=True)
    save()
    print(json.dumps({"ratios": document["ratios"], "targets": document["targets"]}, indent=1))
    print(f"written to {out}; logs in {args.work / 'logs'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
