"""What the benchmark modules share: the card they ran on, the batch they time, their saved result,
and stopping cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from pathlib import Path
from typing import Sequence


def ordered_choices(text: str, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``known`` (an argparse type), in ``known``'s order whatever the order
    given; ArgumentTypeError naming the ``what`` it does not know and the choices."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(known)}")
    return [name for name in known if name in chosen]


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = sorted(set(out.stdout.split("\n")) - {""})
        return ", ".join(names) or "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, a killed job) unwinds like Ctrl-C: every Service context exits and
    stops its process groups. Without this the workers, which run in their own sessions, outlive the
    benchmark and hold GPU memory (a later run on the machine then auto-detects smaller batches)."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def benchmark_jobs(count: int) -> list:
    """The batch every benchmark module times: ``count`` requests with their own prompt and seed."""
    from gpu_worker.model.pipelines import GenerationJob

    return [GenerationJob(f"a lighthouse on a cliff, variant {i}", None, 1000 + i) for i in range(count)]


def save_json(document: dict, out: Path | None, indent: int = 1) -> str:
    """The benchmark modules' result: ``document`` as JSON text, also written to ``out`` when given."""
    text = json.dumps(document, indent=indent)
    if out:
        out.write_text(text + "\n")
    return text
