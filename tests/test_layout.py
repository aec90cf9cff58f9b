"""The package layout is the architecture: the broker is not built on the worker's code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_broker_imports_nothing_from_the_worker_package():
    """Importing the broker (its shell, state, admission, stats and entry point) loads no module of
    gpu_worker/, directly or through imagegen/: what both need (BatchKey, work units) is shared."""
    code = ("import sys, broker.__main__, broker.server, broker.state, broker.admission, broker.stats; "
            "print(sorted(m for m in sys.modules if m == 'gpu_worker' or m.startswith('gpu_worker.')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_worker_still_offers_the_shared_names_where_its_modules_used_them():
    from gpu_worker.decisions.batcher import BatchKey as batcher_key
    from gpu_worker.decisions.cost_model import work_units as cost_model_units
    from imagegen.batch_key import BatchKey, work_units

    assert batcher_key is BatchKey and cost_model_units is work_units
