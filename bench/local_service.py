"""Broker, gateway and one worker started as subprocesses on loopback, each in its own process group,
for the load harnesses that drive the whole service over HTTP (bench.jobs_load, bench.overload).

:class:`LocalService` owns the processes: ``start`` launches them with logs in its folder,
``wait_ready`` polls ``/readyz`` (and fails at once, with the logs, when a process exits), ``stop``
sends SIGTERM to each process group, waits ``stop_grace_s`` and then SIGKILLs the groups, so that
nothing a harness started outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

from imagegen.local_cluster import loopback_settings

REPO = Path(__file__).resolve().parent.parent
SERVICES = (("broker", "broker"), ("gateway", "gateway"), ("worker", "gpu_worker"))


class LocalService:
    """The three processes, their settings the caller's environment without ``dropped_env``, plus
    loopback addresses, plus ``settings``."""

    def __init__(self, workdir: Path, settings: Mapping[str, str], dropped_env: Iterable[str] = (),
                 stop_grace_s: float = 10.0, ready_timeout_s: float = 180.0) -> None:
        self.dir = workdir
        self.stop_grace_s = stop_grace_s
        self.ready_timeout_s = ready_timeout_s
        loopback, self.url = loopback_settings(workdir / "images")
        dropped = set(dropped_env)
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.env = {**env, **loopback, **settings}
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "LocalService":
        """Started and ready (see ``ready_timeout_s``); stopped, with the logs printed after a failure,
        when the block exits however it exits."""
        try:
            self.start()
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            print(self.logs(), file=sys.stderr)
        self.stop()

    def start(self) -> None:
        for name, module in SERVICES:
            with open(self.dir / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", module], env=self.env, cwd=self.dir, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def exited(self) -> dict[str, int]:
        """The processes that have exited, with their exit codes."""
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def check_alive(self) -> None:
        if self.exited():
            raise RuntimeError(f"process(es) exited early: {self.exited()}\n{self.logs()}")

    def wait_ready(self, timeout_s: float, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(poll_s)
        raise RuntimeError(f"not ready within {timeout_s:g}s\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM each process group, wait, then SIGKILL the groups (whatever is left)."""
        for process in self.processes.values():
            kill_group(process.pid, signal.SIGCONT)  # a paused process could not act on SIGTERM
            kill_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes.values():
            kill_group(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.dir.glob("*.log")))


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so that a harness killed that way still stops
    every process it started (its ``with LocalService`` block exits)."""
    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def kill_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
