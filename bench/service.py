"""Benchmarks of the whole service on GPUs: the processes users run, driven by the seed's load test.

Each configuration starts a fresh broker, gateway and one worker per GPU (``python -m ...``, each
worker pinned with CUDA_VISIBLE_DEVICES, exactly as supervisord.conf starts them), waits until
every worker is registered, runs ``scripts/test_batching.py`` against it, and stops everything.

    # scale-out: 50 images per GPU on 1 and 2 GPUs, both balancing strategies (rows for docs/benchmarks)
    python -m bench.service scaling --model sdxl --size 1024 --gpus 1,2 --out $OUT/scaling.json
    # one GPU: lone request, burst of 50, 10 users x 5, and the burst with ENABLE_BATCHING=false
    python -m bench.service service --model sdxl --size 1024 --out $OUT/service.json

``--model fake:delay=0.2`` runs the same code on a CPU machine (the FAKE backend: no model), which
is how the script itself is tested. Rows carry the card's name: compare only rows of one card.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import card_name, exit_on_sigterm, save_json
from imagegen.local_cluster import loopback_settings

REPO = Path(__file__).resolve().parent.parent
LOAD_TEST = REPO / "scripts" / "test_batching.py"


class Service:
    """broker + gateway + one worker per GPU id, in their own process groups, logs in ``log_dir``."""

    def __init__(self, gpus: list[int], log_dir: Path, **settings: str) -> None:
        loopback, self.url = loopback_settings(log_dir / "images")
        self.gpus = gpus
        self.log_dir = log_dir
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    **loopback, **settings}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "Service":
        # A with statement calls __exit__ only once __enter__ has returned: stop what was started if
        # starting fails or is interrupted (SIGTERM during a worker's minutes-long warm-up, say).
        try:
            self._start("broker", "broker", {})
            self._start("gateway", "gateway", {})
            for gpu in self.gpus:
                self._start(f"worker{gpu}", "gpu_worker", {"CUDA_VISIBLE_DEVICES": str(gpu), "GPU_ID": str(gpu)})
            self._wait_ready(timeout_s=900)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def _start(self, name: str, module: str, extra: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes.append(subprocess.Popen([sys.executable, "-m", module], env={**self.env, **extra},
                                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as response:
            return json.loads(response.read())

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.stats().get("num_gpus") == len(self.gpus):
                    return
            except OSError:
                pass
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.5)
        raise RuntimeError(f"service not ready; see logs in {self.log_dir}")

    def load(self, *args: str, size: int, steps: int) -> dict:
        """Run the seed's load test; returns its JSON report's summary (plus the final /stats)."""
        with tempfile.NamedTemporaryFile(suffix=".json") as report:
            subprocess.run([sys.executable, str(LOAD_TEST), "--url", self.url, "--width", str(size), "--height",
                            str(size), "--steps", str(steps), "--no-progress", "--json", report.name, *args],
                           check=False, timeout=3600, stdout=sys.stderr)
            document = json.loads(Path(report.name).read_text())
        summary = document["summary"]
        summary["final_stats"] = document.get("final_stats")
        summary["median_ms"] = latency_parts_ms(document.get("results", []))
        return summary


def latency_parts_ms(results: list[dict]) -> dict | None:
    """Medians over the successful requests of where a request's latency went: waiting in the worker's
    queue (the batching policy's hold included), its batch's generation, and the rest (PNG encoding,
    ZeroMQ, HTTP, the gateway's file write): the serving layer's own cost."""
    done = [r for r in results if r.get("ok") and r.get("queue_wait_ms") is not None
            and r.get("generation_ms") is not None]
    if not done:
        return None
    return {"queue_wait": round(statistics.median(r["queue_wait_ms"] for r in done), 2),
            "generation": round(statistics.median(r["generation_ms"] for r in done), 2),
            "rest": round(statistics.median(r["latency_s"] * 1000 - r["queue_wait_ms"] - r["generation_ms"]
                                            for r in done), 2)}


def row(mode: str, args: argparse.Namespace, gpus: int, summary: dict, **extra) -> dict:
    print(f"{mode} gpus={gpus} {extra}: {summary['successful']}/{summary['total']} in {summary['duration_s']:.1f}s "
          f"= {summary['throughput']:.3f} img/s, avg batch {summary['avg_batch_size']}", file=sys.stderr)
    return {"card": args.card, "model": args.model, "resolution": f"{args.size}x{args.size}", "steps": args.steps,
            "gpus": gpus, "mode": mode, "images": summary["total"], "successful": summary["successful"],
            "duration_s": round(summary["duration_s"], 3), "service_images_per_s": round(summary["throughput"], 4),
            "avg_batch_size": summary["avg_batch_size"], "latency_p50_s": summary["latency_p50_s"],
            "latency_p95_s": summary["latency_p95_s"], "latency_max_s": summary["latency_max_s"],
            "median_ms": summary.get("median_ms"), **extra}


def scaling(args: argparse.Namespace, log_dir: Path) -> list[dict]:
    rows = []
    one_gpu = {}
    for count in [int(g) for g in args.gpus.split(",")]:
        for strategy in args.strategies.split(","):
            if count == 1 and strategy != args.strategies.split(",")[0]:
                continue  # with one GPU the strategy cannot matter
            settings = {"MODEL_ID": args.model, "GPU_LOAD_BALANCE_STRATEGY": strategy, **args.settings}
            with Service(list(range(count)), log_dir, **settings) as service:
                summary = service.load("--burst", str(args.per_gpu * count), size=args.size, steps=args.steps)
            r = row("burst", args, count, summary, load_balance_strategy=strategy, burst=args.per_gpu * count)
            if count == 1:
                one_gpu = r
            base = one_gpu.get("service_images_per_s")
            r["scaling_efficiency"] = round(r["service_images_per_s"] / (count * base), 3) if base else None
            rows.append(r)
    return rows


def service(args: argparse.Namespace, log_dir: Path) -> list[dict]:
    rows = []
    settings = {"MODEL_ID": args.model, **args.settings}
    with Service([0], log_dir, **settings) as svc:
        rows.append(row("lone", args, 1, svc.load("--burst", "1", size=args.size, steps=args.steps)))
        rows.append(row("burst50", args, 1, svc.load("--burst", "50", size=args.size, steps=args.steps)))
        rows.append(row("users10x5", args, 1, svc.load("--users", "10", "--requests-per-user", "5",
                                                       size=args.size, steps=args.steps)))
    with Service([0], log_dir, **settings, ENABLE_BATCHING="false") as svc:
        rows.append(row("burst50_no_batching", args, 1, svc.load("--burst", "50", size=args.size, steps=args.steps)))
    return rows


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["scaling", "service"])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--gpus", default="1,2", help="scaling: GPU counts to run, e.g. 1,2,4")
    parser.add_argument("--strategies", default="queue-depth,round-robin")
    parser.add_argument("--per-gpu", type=int, default=50, help="scaling: burst size per GPU")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra setting for every process (repeatable)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    args.settings = dict(item.split("=", 1) for item in args.set)
    args.card = card_name()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-service-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.service " + " ".join(sys.argv[1:])
    rows = (scaling if args.mode == "scaling" else service)(args, log_dir)
    print(save_json({"command": command, "card": args.card, "rows": rows}, args.out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
