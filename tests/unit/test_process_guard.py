"""This test is not marked e2e, so tests/conftest.py runs it with processes refused: each way of
starting one raises, saying where the test belongs (tests/support/process_guard.py). The guard seen
from a whole pytest run, folders and marks included: tests/e2e/test_process_guard.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys

import pytest

from tests.support.process_guard import ENTRY_POINTS, ProcessStartedOutsideE2e, processes_refused

WAYS_TO_START_A_PROCESS = {
    "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
    "subprocess.Popen": lambda: subprocess.Popen([sys.executable, "-c", "pass"]),
    "asyncio.create_subprocess_exec": lambda: asyncio.run(asyncio.create_subprocess_exec(sys.executable, "-c", "pass")),
    "multiprocessing.Process.start": lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    "os.posix_spawn": lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], dict(os.environ)),
    "os.system": lambda: os.system("true"),
}


@pytest.mark.parametrize("start", WAYS_TO_START_A_PROCESS.values(), ids=WAYS_TO_START_A_PROCESS.keys())
def test_a_test_outside_tests_e2e_that_starts_a_process_fails_saying_where_it_belongs(start):
    with pytest.raises(ProcessStartedOutsideE2e, match="this test starts a process: move it to tests/e2e/"):
        start()


def test_leaving_the_guard_puts_back_what_was_there():
    before = [getattr(owner, name) for owner, name, _ in ENTRY_POINTS]
    with processes_refused():
        pass
    assert [getattr(owner, name) for owner, name, _ in ENTRY_POINTS] == before
