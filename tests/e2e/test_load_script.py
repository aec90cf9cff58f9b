"""scripts/test_batching.py (the load-test client) run as a plain script: a usage error and --help
(tests/integration/test_load_script.py runs it in-process against a fake gateway)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO

SCRIPT = REPO / "scripts" / "test_batching.py"


def test_cli_subprocess_usage_error_and_help():
    # The file also works as a plain script (no project imports, shebang-style entry).
    bad = subprocess.run([sys.executable, str(SCRIPT), "--burst", "2", "--users", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not allowed with" in bad.stderr
    ok = subprocess.run([sys.executable, str(SCRIPT), "--help"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--requests-per-user" in ok.stdout
