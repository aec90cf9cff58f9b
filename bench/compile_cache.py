"""How long a compiled worker takes to be ready: on a cold cache, restarted with its cache, and on a
"new host" that imported another's exported cache (gpu_worker/model/compile_cache.py).

Each start is the real worker (``python -m gpu_worker``, TORCH_COMPILE=true) with its own STATE_DIR;
its ready time is the warm-up it logs ("warm-up at WxH took S s"), which runs from the moment the
model's weights are loaded until it would register. The worker is stopped as soon as it logs it (no
broker is needed: a worker warms up before it connects).

    python -m bench.compile_cache --model sd15 --max-batch-size 16 --work /tmp/cc --out result.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import card_name, exit_on_sigterm, save_json

WARM_UP_DONE = re.compile(r"warm-up at \d+x\d+ took ([0-9.]+)s")
LOADED = re.compile(r"loaded MODEL_ID=\S+ .* in ([0-9.]+)s")


def start_worker(model: str, max_batch_size: int, state_dir: Path, log_path: Path, timeout_s: float) -> dict:
    """One worker start until its warm-up ends: the seconds it logged for loading and warming up."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(MODEL_ID=model, TORCH_COMPILE="true", MAX_BATCH_SIZE=str(max_batch_size), STATE_DIR=str(state_dir),
               BROKER_WORKER_ADDRESS="tcp://127.0.0.1:9", PYTHONUNBUFFERED="1")
    found: dict = {}
    began = time.monotonic()
    with open(log_path, "w") as log, subprocess.Popen([sys.executable, "-m", "gpu_worker"], env=env,
                                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                if (match := LOADED.search(line)):
                    found["load_s"] = float(match.group(1))
                if (match := WARM_UP_DONE.search(line)):
                    found["ready_s"] = float(match.group(1))
                    break
                if time.monotonic() - began > timeout_s:
                    break
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
    if "ready_s" not in found:
        raise SystemExit(f"the worker did not finish its warm-up; see {log_path}")
    return found


def run(args: argparse.Namespace) -> dict:
    work = args.work
    first, second = work / "host-a" / "state", work / "host-b" / "state"
    archive = work / "compile-cache.tar.gz"
    starts = {}
    starts["cold"] = start_worker(args.model, args.max_batch_size, first, work / "cold.log", args.timeout_s)
    starts["restart_with_cache"] = start_worker(args.model, args.max_batch_size, first, work / "restart.log",
                                                args.timeout_s)
    module = [sys.executable, "-m", "gpu_worker.model.compile_cache"]
    subprocess.run([*module, "export", str(archive), "--state-dir", str(first)], check=True)
    subprocess.run([*module, "import", str(archive), "--state-dir", str(second)], check=True)
    starts["new_host_with_cache"] = start_worker(args.model, args.max_batch_size, second, work / "new-host.log",
                                                 args.timeout_s)
    import torch

    return {
        "card": card_name(),
        "model": args.model,
        "max_batch_size": args.max_batch_size,
        "ready_s": {name: start["ready_s"] for name, start in starts.items()},
        "load_s": {name: start.get("load_s") for name, start in starts.items()},
        "archive_mib": round(archive.stat().st_size / 2**20, 1),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python -m bench.compile_cache " + " ".join(sys.argv[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the state dirs and logs")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up on a start after this long")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    exit_on_sigterm()
    args.work.mkdir(parents=True, exist_ok=True)
    print(save_json(run(args), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
