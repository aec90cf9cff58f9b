"""Starting a process fails loudly in tests that are not marked ``e2e``.

Tests that start processes are the slow ones, and the ones that leave processes behind when they
fail; they live under tests/e2e/ (tests/conftest.py marks everything there ``e2e``), so
``-m "not e2e"`` stays a fast loop of tests in one process. tests/conftest.py runs every other test
inside :func:`processes_refused`, so a test that starts one fails at once instead of hiding outside
tests/e2e/.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import multiprocessing.process
import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

MOVE_TO_E2E = "this test starts a process: move it to tests/e2e/"


class ProcessStartedOutsideE2e(RuntimeError):
    pass


def _refuse(*_args, **_kwargs):
    raise ProcessStartedOutsideE2e(MOVE_TO_E2E)


async def _refuse_async(*_args, **_kwargs):
    raise ProcessStartedOutsideE2e(MOVE_TO_E2E)


# Every way the tests' code, and the code it calls, starts a process: subprocess.run, call and
# check_output go through Popen, and so do asyncio's subprocesses (their coroutines are replaced too,
# so the error comes from the test's own call); multiprocessing through BaseProcess.start; the rest
# through os.
ENTRY_POINTS = [
    (subprocess.Popen, "__init__", _refuse),
    (asyncio, "create_subprocess_exec", _refuse_async),
    (asyncio, "create_subprocess_shell", _refuse_async),
    (asyncio.subprocess, "create_subprocess_exec", _refuse_async),
    (asyncio.subprocess, "create_subprocess_shell", _refuse_async),
    (multiprocessing.process.BaseProcess, "start", _refuse),
    *[(os, name, _refuse) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")
      if hasattr(os, name)],
]


@contextmanager
def processes_refused() -> Iterator[None]:
    """Inside, every way of starting a process raises :class:`ProcessStartedOutsideE2e`; on leaving,
    each is what it was before."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in ENTRY_POINTS]
    for owner, name, refusal in ENTRY_POINTS:
        setattr(owner, name, refusal)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
