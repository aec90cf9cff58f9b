#!/usr/bin/env python3
"""Simulate the serving cluster in virtual time with the real policy code (docs/scheduling.md).

    python scripts/simulate.py --compare --json      # every workload x policy, as a JSON list
    python scripts/simulate.py --compare             # the same as a markdown table, then the checks
    python scripts/simulate.py --validate            # the window policy on the seed's costs vs the seed's tables
    python scripts/simulate.py --robustness          # other arrival seeds and PNG costs (~40 s)
    python scripts/simulate.py --scaling             # a burst of 50 per GPU, 1-64 GPUs: broker dispatch (~40 s)
    python scripts/simulate.py --write docs/scheduling   # all of the above as JSON, and the PNG plots
    python scripts/simulate.py --workload poisson --load 0.9 --gpus 8 --policy default
    python scripts/simulate.py --workload sd15-mixed --costs sd15-h200 --load 0.6 --json   # waits per size

No sleeping, no sockets: broker.state.BrokerState, broker.balancing.Balancer and the batchers of
gpu_worker.decisions.policies run against a virtual clock, and a GPU cost model fitted to measured tables
says how long each batch takes (each denoising step, under the step policy). The whole --compare takes
about a minute.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from gpu_worker.decisions.policies import POLICY_ALIASES, RUN_TO_COMPLETION  # noqa: E402
from simulator import costs as cost_models  # noqa: E402
from simulator import runs  # noqa: E402
from simulator import workloads as wl  # noqa: E402
from simulator.metrics import group_waits, latencies_s  # noqa: E402

COMPARE_COLUMNS = ("workload", "gpus", "policy", "throughput_img_s", "p50_s", "p95_s", "p99_s",
                   "avg_batch_size", "gpu_busy_fraction")
VALIDATION_COLUMNS = ("row", "seed_50_images_s", "sim_50_images_s", "diff_50_images", "lower_bound_50_images_s",
                      "seed_throughput_img_s", "sim_sustained_img_s", "diff_throughput", "sim_avg_batch_size")
ROBUSTNESS_COLUMNS = ("workload", "variants", "p95_ratio_max", "p95_cleared", "throughput_ratio_min",
                      "throughput_cleared")
SWEEP_COLUMNS = ("workload", "offered_load", "runs", "changed", "throughput_ratio_min", "throughput_ratio_median",
                 "p95_ratio_max", "p95_ratio_median")
CDF_WORKLOADS = ("burst-50", "users-10x5", "poisson-30", "poisson-60", "poisson-90", "mixed-60")
SWEEP_LOADS = tuple(round(0.1 * i, 1) for i in range(1, 14))


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], raw: bool = False) -> str:
    """A markdown table; ``raw`` prints values as they are (already rounded) instead of 3 digits."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) if raw else _cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def side_by_side(rows: Sequence[dict[str, Any]], policies: Sequence[str] = runs.COMPARED) -> str:
    """One line per workload; each cell lists the policies' values in ``policies`` order."""
    fields = ("throughput_img_s", "p50_s", "p95_s", "p99_s", "avg_batch_size")
    by = {(r["workload"], r["policy"]): r for r in rows}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    lines = ["| workload | GPUs | " + " | ".join(fields) + " |", "|" + "---|" * (len(fields) + 2),
             "| | | " + " | ".join([" / ".join(policies)] * len(fields)) + " |"]
    for name in workloads:
        mine = [by[(name, p)] for p in policies]
        cells = [" / ".join(_cell(r[f]) for r in mine) for f in fields]
        lines.append(f"| {name} | {mine[0]['gpus']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (setup, GPUs, speed spread): efficiency and per-GPU images, before -> after."""
    by = {(r["setup"], r["gpus"], r["speed_spread"], r["strategy"], r["dispatch"]): r for r in rows}
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    lines = ["| setup | GPUs | images | speed spread | " + " | ".join(f"efficiency, {s}" for s in strategies)
             + " | makespan (s), " + strategies[0] + " | images per GPU (min-max), " + strategies[0] + " |",
             "|" + "---|" * (6 + len(strategies))]
    for setup, gpus, spread in dict.fromkeys((r["setup"], r["gpus"], r["speed_spread"]) for r in rows):
        before = {s: by[(setup, gpus, spread, s, "greedy-refill")] for s in strategies}
        after = {s: by[(setup, gpus, spread, s, "fair-share")] for s in strategies}
        first = strategies[0]
        cells = [f"{before[s]['efficiency']} → **{after[s]['efficiency']}**" for s in strategies]
        spread_cell = f"{spread:.0%}" if spread else "0"
        lines.append(f"| {setup} | {gpus} | {after[first]['images']} | {spread_cell} | " + " | ".join(cells)
                     + f" | {before[first]['makespan_s']} → {after[first]['makespan_s']}"
                     + f" | {before[first]['per_gpu_images_min']}-{before[first]['per_gpu_images_max']} → "
                       f"{after[first]['per_gpu_images_min']}-{after[first]['per_gpu_images_max']} |")
    return "\n".join(lines)


def print_scaling(report: dict[str, Any]) -> int:
    print("Bursts of 50 per GPU, without (greedy-refill) -> with the broker's fair share:\n")
    print(scaling_table(report["bursts"]))
    print("\nGPUs that are not quite equal (GPU i slower by speed_spread x i / (GPUs - 1)):\n")
    print(scaling_table(report["skew"]))
    changed = report["compare_rows_changed"]
    print(f"\n--compare rows changed by the fair share: {len(changed)}")
    for row in changed:
        print("  ", row)
    print("\nAround and above capacity (default policy; ratios with / without the fair share):\n")
    print(markdown(report["sweep"], SWEEP_COLUMNS, raw=True))
    failures = runs.check_scaling(report["bursts"])
    for line in failures:
        print("FAIL:", line)
    print("all scaling checks pass: fair-share efficiency >= 0.95 at 2 GPUs or more" if not failures
          else f"{len(failures)} scaling checks fail")
    return 1 if failures else 0


def size_groups_table(rows: Sequence[dict[str, Any]], policies: Sequence[str] = ("window", "default")) -> str:
    """Per size group of the mixed-resolution rows: requests, where its costs come from, and the
    wait (client sends -> its batch starts) p50 / p95 / max under each policy in ``policies``."""
    fields = ("wait_p50_s", "wait_p95_s", "wait_max_s")
    by = {(r["workload"], r["policy"]): r for r in rows if "groups" in r}
    lines = ["| workload | size | requests | costs | " + " | ".join(fields) + " |", "|" + "---|" * (len(fields) + 4),
             "| | | | | " + " | ".join([" / ".join(policies)] * len(fields)) + " |"]
    for name in dict.fromkeys(w for w, _ in by):
        mine = [by[(name, p)] for p in policies]
        for size, group in mine[0]["groups"].items():
            cells = [" / ".join(_cell(r["groups"][size][f]) for r in mine) for f in fields]
            lines.append(f"| {name} | {size} | {group['requests']} | {group['costs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_checks(rows: list[dict[str, Any]]) -> int:
    failures = runs.check_default(rows)
    for line in runs.near_capacity_ties(rows):
        print(f"TIE (mixed resolutions at {runs.NEAR_CAPACITY_LOAD:.0%} of capacity or more, "
              f"p95 band {runs.NEAR_CAPACITY_P95_BAND:.0%}):", line)
    for line in failures:
        print("FAIL:", line)
    print(f"{'all checks pass' if not failures else f'{len(failures)} checks fail'}: default vs window on "
          f"{len({r['workload'] for r in rows if r['policy'] == 'window'})} workloads")
    step_failures = runs.check_step(rows)
    for line in step_failures:
        print("FAIL (step):", line)
    print(f"{'all step checks pass' if not step_failures else f'{len(step_failures)} step checks fail'}: "
          f"step vs run-to-completion (default) on {len({r['workload'] for r in rows if r['policy'] == 'step'})} workloads")
    return 1 if failures or step_failures else 0


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib only here, imported when asked for: pip install -e '.[sim]')


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {"window": dict(color="#c0392b", ls="-"), "default": dict(color="#1f6fb2", ls="-"),
         "greedy": dict(color="#7f8c8d", ls="--"), "step": dict(color="#27ae60", ls="-.")}


def plot_latency_cdfs(path: Path) -> None:
    plt = _pyplot()
    cases = {c.workload.name: c for c in runs.comparison_cases()}
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), dpi=80)
    for ax, name in zip(axes.flat, CDF_WORKLOADS):
        case = cases[name]
        for label in runs.BATCH_COMPARED:
            sim, _ = runs.run(case.workload, runs.cluster_for(label, case.gpus), case.costs, label)
            lat = sorted(latencies_s(sim))
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label, **STYLE[label])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("latency (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("fraction of requests", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Latency CDFs, SDXL 1024x1024 on one GPU (H200 cost table), max batch 16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_load_sweep(path: Path) -> None:
    plt = _pyplot()
    reports = runs.load_sweep(SWEEP_LOADS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for label in runs.BATCH_COMPARED:
        mine = [r for r in reports if r.policy == label]
        loads = [r.extra["offered_load"] * 100 for r in mine]
        left.plot(loads, [r.throughput_img_s for r in mine], marker="o", ms=3, label=label, **STYLE[label])
        right.plot(loads, [r.p95_s for r in mine], marker="o", ms=3, label=label, **STYLE[label])
    left.set_title("throughput vs offered load", fontsize=10)
    left.set_ylabel("images/s", fontsize=8)
    right.set_title("p95 latency vs offered load", fontsize=10)
    right.set_ylabel("p95 latency (s, log)", fontsize=8)
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("offered load (% of capacity at batch 16)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Poisson arrivals, SDXL 1024x1024 on one GPU (H200 cost table), 1000 requests each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


STEP_WORKLOAD_NAMES = ("mixed-steps", "mixed-guidance", "priority", "cancel")  # runs.step_cases, in order


def single_run(args: argparse.Namespace) -> dict[str, Any]:
    costs = cost_models.get(args.costs)
    key = costs.reference_key
    if args.workload in STEP_WORKLOAD_NAMES:  # one GPU, as in --compare
        case = runs.step_cases(costs, args.load, args.requests, args.seed)[STEP_WORKLOAD_NAMES.index(args.workload)]
        [report] = runs.compare((args.policy,), [case])
        return report.row()
    capacity = args.gpus * cost_models.capacity_img_s(costs, key, runs.MAX_BATCH)
    workload = {
        "burst": lambda: wl.burst(args.requests, key),
        "users": lambda: wl.users(10, 5, key),
        "poisson": lambda: wl.poisson(args.load * capacity, args.requests, [key], seed=args.seed),
        "mixed": lambda: wl.mixed(args.load * wl.mixed_capacity_img_s(costs, runs.MAX_BATCH, args.gpus),
                                  args.requests, seed=args.seed),
        "lone": lambda: wl.lone(key),
        **{mix: functools.partial(_size_mix, mix, args, costs) for mix in wl.SIZE_MIXES},
    }[args.workload]()
    sim, report = runs.run(workload, runs.cluster_for(args.policy, args.gpus), costs, args.policy)
    row = report.row()
    if args.workload in wl.SIZE_MIXES:
        row["groups"] = group_waits(sim, [k for k, _ in wl.SIZE_MIXES[args.workload]])
    return row


def _size_mix(mix: str, args: argparse.Namespace, costs: cost_models.CostModel) -> wl.Workload:
    keys = wl.SIZE_MIXES[mix]
    capacity = wl.mixed_capacity_img_s(costs, runs.MAX_BATCH, args.gpus, keys=keys)
    return wl.size_mix(mix, args.load * capacity, args.requests, seed=args.seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="every workload x policy (docs/scheduling.md)")
    parser.add_argument("--validate", action="store_true", help="the window policy on the seed's costs vs the seed's tables")
    parser.add_argument("--robustness", action="store_true",
                        help="Poisson and mixed workloads over 10 arrival seeds x 3 PNG-encoding costs (~40 s)")
    parser.add_argument("--scaling", action="store_true",
                        help="bursts of 50 per GPU on 1-64 GPUs with and without the broker's fair share (~40 s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--write", metavar="DIR", type=Path,
                        help="write compare.json, validation.json, robustness.json, scaling.json, latency_cdf.png "
                             "and load_sweep.png")
    parser.add_argument("--workload", choices=("burst", "users", "poisson", "mixed", "lone") + tuple(wl.SIZE_MIXES)
                        + STEP_WORKLOAD_NAMES,
                        help="one run of one workload (with --policy, --gpus, --costs, --load, --requests); "
                             "sdxl-buckets and sd15-mixed are mixed resolutions (pick a matching --costs) and "
                             "report each size group's waits; mixed-steps, mixed-guidance, priority (each class's "
                             "latencies) and cancel (a fifth cancelled) are the step policy's workloads, on one GPU")
    parser.add_argument("--policy", default="default",
                        choices=tuple(dict.fromkeys((*runs.POLICIES, RUN_TO_COMPLETION, *POLICY_ALIASES))),
                        help="window, run-to-completion (default), greedy or step (seed: the same as window)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--costs", choices=tuple(cost_models.COST_MODELS), default="sdxl-h200")
    parser.add_argument("--load", type=float, default=0.9, help="fraction of capacity (poisson, mixed)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.policy = POLICY_ALIASES.get(args.policy, args.policy)
    if not (args.compare or args.validate or args.robustness or args.scaling or args.write or args.workload):
        parser.error("say what to run: --compare, --validate, --robustness, --scaling, --write DIR or --workload NAME")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    status = 0
    # Each run once, also when it is both printed and written (--scaling alone takes ~40 s).
    compare_rows = functools.cache(lambda: [r.row() for r in runs.compare()])
    validation, robustness = functools.cache(runs.validate), functools.cache(runs.robustness)
    scaling_report = functools.cache(runs.scaling_report)
    if args.workload:
        row = single_run(args)
        print(json.dumps(row, indent=1) if args.json else markdown([row], COMPARE_COLUMNS))
    if args.compare:
        rows = compare_rows()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(side_by_side(rows))
            print("\nMixed resolutions, per size group (costs: measured at that size, or scaled from the "
                  "table's measured size by work units):\n")
            print(size_groups_table(rows))
            print()
            status = print_checks(rows)
    if args.validate:
        rows = validation()
        print(json.dumps(rows, indent=1) if args.json else markdown(rows, VALIDATION_COLUMNS, raw=True))
    if args.robustness:
        rows = robustness()
        print(json.dumps(rows, indent=1) if args.json else markdown(rows, ROBUSTNESS_COLUMNS, raw=True))
    if args.scaling:
        report = scaling_report()
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            status = print_scaling(report) or status
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, document in (("compare.json", compare_rows()), ("validation.json", validation()),
                               ("robustness.json", robustness()), ("scaling.json", scaling_report())):
            (args.write / name).write_text(json.dumps(document, indent=1) + "\n")
        plot_latency_cdfs(args.write / "latency_cdf.png")
        plot_load_sweep(args.write / "load_sweep.png")
        print(f"wrote compare.json, validation.json, robustness.json, scaling.json, latency_cdf.png, load_sweep.png "
              f"to {args.write}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
