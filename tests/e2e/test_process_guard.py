"""The suite's rules, seen from a whole pytest run: a small project with this suite's tests/conftest.py
runs in a pytest process of its own. Its tests under e2e/ are marked e2e and may start processes;
elsewhere, a test that starts one, or a module fixture that does, fails saying where it belongs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

OUTSIDE_E2E = '''
import subprocess, sys
import pytest

@pytest.fixture(scope="module")
def finished_process():
    return subprocess.run([sys.executable, "-c", "pass"])

def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"])

def test_uses_a_module_fixture_that_started_one(finished_process):
    pass

def test_starts_none():
    pass
'''

INSIDE_E2E = '''
import subprocess, sys

def test_starts_a_process(request):
    assert request.node.get_closest_marker("e2e") is not None
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
'''


def project(root: Path) -> Path:
    (root / "unit").mkdir(parents=True)
    (root / "e2e").mkdir()
    (root / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (root / "unit" / "test_outside.py").write_text(OUTSIDE_E2E)
    (root / "e2e" / "test_inside.py").write_text(INSIDE_E2E)
    (root / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
                                     "markers =\n    e2e: starts processes\n")
    return root


def run_pytest(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # its conftest imports tests.support.process_guard
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_outside_e2e_starting_a_process_fails_and_inside_it_is_marked_and_allowed(tmp_path):
    done = run_pytest(project(tmp_path))
    summary = done.stdout.strip().splitlines()[-1]
    assert "1 failed, 2 passed, 1 error" in summary, done.stdout
    assert "FAILED unit/test_outside.py::test_starts_a_process" in done.stdout
    assert "ERROR unit/test_outside.py::test_uses_a_module_fixture_that_started_one" in done.stdout
    assert done.stdout.count("this test starts a process: move it to tests/e2e/") >= 2, done.stdout


def test_not_e2e_leaves_out_everything_under_e2e(tmp_path):
    done = run_pytest(project(tmp_path), "-m", "not e2e", "e2e")
    assert "1 deselected" in done.stdout.strip().splitlines()[-1], done.stdout
