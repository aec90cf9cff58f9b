"""The package layout is the architecture, seen from a fresh interpreter: the broker is not built on
the worker's code."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO


def test_the_broker_imports_nothing_from_the_worker_package():
    """Importing the broker (its shell, state, admission, stats and entry point) loads no module of
    gpu_worker/, directly or through imagegen/: what both need (BatchKey, work units) is shared."""
    code = ("import sys, broker.__main__, broker.server, broker.state, broker.admission, broker.stats; "
            "print(sorted(m for m in sys.modules if m == 'gpu_worker' or m.startswith('gpu_worker.')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
