"""Jobs under load: N jobs submitted at once through the job API, each followed by its own event stream.

Every job is ``POST /v1/jobs`` (64x64, 4 steps by default), all sent at the same moment; as soon as
its 202 comes, its listener opens ``GET /v1/jobs/{id}/events`` and reads it until the terminal event
(``succeeded``, ``failed`` or ``cancelled``). A listener behaves as docs/api.md asks of a client: a
429 or 503 ``too_many_streams`` (JOB_EVENT_STREAMS_MAX, JOB_EVENT_STREAMS_PER_JOB) or a 503
``too_many_connections`` (GATEWAY_MAX_CONNECTIONS) is retried after its ``Retry-After``, and a stream
that ends without the terminal event is reopened with ``Last-Event-ID``. A submission answered 503 is
retried the same way. Once every listener is done, each job's status (``GET /v1/jobs/{id}``) is read.

    .venv/bin/python -m bench.jobs_load                                  # 1,000 jobs on the CPU default (MODEL_ID=tiny)
    .venv/bin/python -m bench.jobs_load --jobs 100 --model fake:step_delay=0.05
    .venv/bin/python -m bench.jobs_load --set JOB_EVENT_STREAMS_MAX=2000 --json out.json
    .venv/bin/python -m bench.jobs_load --url http://gpu-box:8080 --api-key KEY --gateway-pid 1234

Without ``--url`` it starts the service itself, as the e2e tests do: broker, gateway and one CPU
worker (``CUDA_VISIBLE_DEVICES`` empty) on 127.0.0.1's free ports, with the settings' defaults
except ``--model`` and each ``--set NAME=VALUE``, in their own process groups (stopped on exit,
Ctrl-C, SIGTERM and errors), logs and state in ``--workdir`` (a temporary folder by default).

It reports the jobs' final statuses, how many listeners got their terminal event (and how many
were refused or reopened first), the wall time from the first submission to the last terminal
event, and the gateway's memory: VmRSS sampled every 0.5 s (before the jobs, its peak, after them)
and VmHWM (the peak since the gateway started), and its open file descriptors. With ``--url``,
memory is read only when ``--gateway-pid`` names the gateway's process on this machine.

Exit status 0 when every job ended and every listener got its job's terminal event; 1 otherwise.
It imports nothing from tests/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from bench.common import save_json
from bench.local_service import LocalService, interrupt_on_termination

TERMINAL = ("succeeded", "failed", "cancelled")
SAMPLE_INTERVAL_S = 0.5
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0
STATUS_READS_AT_ONCE = 50
# Settings of the caller's environment that would change what is measured (or lock us out).
DROPPED_ENV = ("GATEWAY_API_KEYS", "GATEWAY_API_KEYS_FILE", "BROKER_CURVE_SECRET_KEY", "BROKER_AUTHORIZED_KEYS_DIR",
               "WORKER_CURVE_SECRET_KEY", "BROKER_CURVE_PUBLIC_KEY", "PUBLIC_BASE_URL", "JOB_STORE", "REDIS_URL",
               "GATEWAY_ID", "STATE_DIR", "MODEL_ID", "GPU_MODEL_IDS", "MAX_BATCH_SIZE", "LOG_LEVEL")


# --------------------------------------------------------------------------- the service


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time ``pid`` has used (None: it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB, and its open file descriptors (empty: it is gone)."""
    figures: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0])
        figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return {}
    return figures


class Service(LocalService):
    """Broker, gateway and one CPU worker as subprocesses, each in its own process group."""

    def __init__(self, workdir: Path, model: str, settings: dict[str, str]) -> None:
        super().__init__(workdir, {
            "MODEL_ID": model, "STATE_DIR": str(workdir / "state"),
            "LOG_LEVEL": "WARNING",  # a log line per job and per request would be much of the gateway's work
            "CUDA_VISIBLE_DEVICES": "", "WORKER_NAME": "cpu0", **settings}, DROPPED_ENV, STOP_GRACE_S, READY_TIMEOUT_S)


# --------------------------------------------------------------------------- one job


@dataclass
class JobOutcome:
    index: int
    id: str | None = None
    submit_status: int | None = None     # the last answer to POST /v1/jobs (202 when submitted)
    submit_error: str | None = None
    submit_retries: int = 0
    terminal: str | None = None          # the terminal event the listener got
    events: Counter = field(default_factory=Counter)
    steps_seen: list[int] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # "503 too_many_streams": n, ...
    reopened: int = 0                    # streams that ended or broke before the terminal event
    listener_error: str | None = None
    ended_at: float | None = None        # seconds from the first submission
    status: str | None = None            # GET /v1/jobs/{id} at the end
    error_code: str | None = None


async def _error_code(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        return str(body["error"]["code"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return "?"


def _retry_after(response: aiohttp.ClientResponse, default_s: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default_s)))
    except ValueError:
        return default_s


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[int | None, str, Any]]:
    """(id, event type, data) for each event of a text/event-stream, until it ends."""
    fields: dict[str, str] = {}
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if "event" in fields or "data" in fields:
                data = fields.get("data")
                yield (int(fields["id"]) if fields.get("id", "").isdigit() else None, fields.get("event", "message"),
                       json.loads(data) if data else None)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value


class Load:
    """The jobs and their listeners, against the gateway at ``url``."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url.rstrip("/")
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.t0 = 0.0
        self.deadline = 0.0

    def body(self, i: int) -> dict[str, Any]:
        return {"prompt": f"jobs load {i}", "width": self.args.width, "height": self.args.height,
                "num_inference_steps": self.args.steps, "seed": i, "preview": self.args.preview}

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (with jitter, so refused clients do not come back all at once), never past the deadline."""
        await asyncio.sleep(max(0.0, min(seconds * random.uniform(0.5, 1.5), self.deadline - time.monotonic())))

    async def submit(self, session: aiohttp.ClientSession, job: JobOutcome, start: asyncio.Event) -> None:
        await start.wait()
        while time.monotonic() < self.deadline:
            try:
                async with session.post(f"{self.url}/v1/jobs", json=self.body(job.index),
                                        headers=self.headers) as response:
                    job.submit_status = response.status
                    if response.status == 202:
                        job.id = (await response.json())["id"]
                        job.submit_error = None
                        return
                    job.submit_error = await _error_code(response)
                    if response.status not in (429, 503):
                        return
                    delay = _retry_after(response, 1.0)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                job.submit_error, delay = type(exc).__name__, 1.0
            job.submit_retries += 1
            await self.pause(delay)

    async def listen(self, session: aiohttp.ClientSession, job: JobOutcome) -> None:
        last_id: int | None = None
        while time.monotonic() < self.deadline:
            headers = dict(self.headers)
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                async with session.get(f"{self.url}/v1/jobs/{job.id}/events", headers=headers) as response:
                    if response.status in (429, 503):
                        job.refused[f"{response.status} {await _error_code(response)}"] += 1
                        delay = _retry_after(response, 1.0)
                    elif response.status != 200:
                        job.listener_error = f"{response.status} {await _error_code(response)}"
                        return
                    else:
                        async for event_id, event, data in sse_events(response.content):
                            last_id = event_id if event_id is not None else last_id
                            job.events[event] += 1
                            if event == "progress" and isinstance(data, dict):
                                job.steps_seen.append(int(data.get("step", -1)))
                            if event in TERMINAL:
                                job.terminal = event
                                job.ended_at = time.monotonic() - self.t0
                                return
                        job.reopened += 1  # ended without the terminal event (the gateway stopping, say)
                        delay = 0.5
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                job.reopened += 1
                job.listener_error = type(exc).__name__
                delay = 1.0
            await self.pause(delay)
        job.listener_error = job.listener_error or "deadline"

    async def one(self, session: aiohttp.ClientSession, job: JobOutcome, start: asyncio.Event) -> None:
        await self.submit(session, job, start)
        if job.id is not None:
            await self.listen(session, job)

    async def read_status(self, session: aiohttp.ClientSession, job: JobOutcome, slots: asyncio.Semaphore) -> None:
        if job.id is None:
            return
        async with slots:
            for _ in range(3):
                try:
                    async with session.get(f"{self.url}/v1/jobs/{job.id}", headers=self.headers) as response:
                        if response.status == 200:
                            document = await response.json()
                            job.status = document["status"]
                            job.error_code = (document.get("error") or {}).get("code")
                            return
                        job.status = f"http {response.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    job.status = type(exc).__name__
                await asyncio.sleep(1.0)

    async def run(self) -> tuple[list[JobOutcome], float]:
        jobs = [JobOutcome(i) for i in range(self.args.jobs)]
        # No client-side cap on connections: every job's request leaves at once. sock_read: the
        # gateway sends a heartbeat every 15 s on an idle stream.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = asyncio.Event()
            tasks = [asyncio.create_task(self.one(session, job, start)) for job in jobs]
            await asyncio.sleep(0)  # every task waits at the start line
            self.t0 = time.monotonic()
            self.deadline = self.t0 + self.args.timeout
            start.set()
            await asyncio.gather(*tasks)
            wall_s = max((job.ended_at or 0.0 for job in jobs), default=0.0)
            slots = asyncio.Semaphore(STATUS_READS_AT_ONCE)
            await asyncio.gather(*(self.read_status(session, job, slots) for job in jobs))
        return jobs, wall_s


# --------------------------------------------------------------------------- measuring


@dataclass
class Samples:
    series: list[tuple[float, dict[str, int]]] = field(default_factory=list)


async def sample(pid: int, samples: Samples, stop: asyncio.Event, t0: float) -> None:
    while not stop.is_set():
        figures = proc_status(pid)
        if figures:
            samples.series.append((round(time.monotonic() - t0, 2), figures))
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def watch(service: Service, load: Load, stop: asyncio.Event) -> None:
    """A process of the service exited: give up at once instead of retrying until --timeout."""
    while not stop.is_set():
        if service.exited():
            load.deadline = 0.0
            return
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def measure(url: str, args: argparse.Namespace, gateway_pid: int | None,
                  service: Service | None = None) -> dict[str, Any]:
    pids = {name: p.pid for name, p in service.processes.items()} if service else {"gateway": gateway_pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items() if pid}
    before = proc_status(gateway_pid) if gateway_pid else {}
    samples = Samples()
    stop = asyncio.Event()
    t0 = time.monotonic()
    load = Load(url, args)
    helpers = [asyncio.create_task(sample(gateway_pid, samples, stop, t0))] if gateway_pid else []
    if service is not None:
        helpers.append(asyncio.create_task(watch(service, load, stop)))
    jobs, wall_s = await load.run()
    await asyncio.sleep(args.settle)  # every stream closed: let the gateway settle for the "after" figures
    after = proc_status(gateway_pid) if gateway_pid else {}
    cpu = {name: _difference(cpu_seconds(pids[name]), seconds) for name, seconds in cpu_before.items()}
    stop.set()
    await asyncio.gather(*helpers)
    result = summarise(jobs, wall_s, args, before, after, samples)
    result["cpu_seconds"] = cpu
    return result


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 1)


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def summarise(jobs: list[JobOutcome], wall_s: float, args: argparse.Namespace, before: dict[str, int],
              after: dict[str, int], samples: Samples) -> dict[str, Any]:
    submitted = [job for job in jobs if job.id is not None]
    statuses = Counter(job.status or "not read" for job in submitted)
    ended = sum(1 for job in submitted if job.status in TERMINAL)
    got_terminal = [job for job in submitted if job.terminal is not None]
    matching = sum(1 for job in got_terminal if job.terminal == job.status)
    refused = sum((job.refused for job in jobs), Counter())
    rss = [figures["VmRSS"] for _, figures in samples.series if "VmRSS" in figures]
    fds = [figures["fds"] for _, figures in samples.series if "fds" in figures]
    monotonic = sum(1 for job in got_terminal if job.steps_seen == sorted(job.steps_seen))
    ends = sorted(job.ended_at for job in got_terminal if job.ended_at is not None)
    return {
        "config": {
            "jobs": args.jobs, "width": args.width, "height": args.height, "steps": args.steps,
            "preview": args.preview, "model": args.model if args.url is None else None,
            "settings": dict(args.set), "url": args.url, "client_timeout_s": args.timeout,
            "cpus": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "machine": platform.machine(),
        },
        "jobs": {
            "submitted": len(submitted),
            "not_submitted": Counter(f"{job.submit_status} {job.submit_error}" for job in jobs if job.id is None),
            "submit_retries": sum(job.submit_retries for job in jobs),
            "ended": ended,
            "statuses": dict(statuses),
            "failure_codes": dict(Counter(job.error_code for job in submitted if job.error_code)),
        },
        "listeners": {
            "opened": len(submitted),
            "got_terminal_event": len(got_terminal),
            "terminal_matches_status": matching,
            "missed": len(submitted) - len(got_terminal),
            "errors": dict(Counter(job.listener_error for job in submitted if job.terminal is None)),
            "refused": dict(refused),
            "listeners_refused_at_least_once": sum(1 for job in jobs if job.refused),
            "reopened": sum(job.reopened for job in jobs),
            "events": dict(sum((job.events for job in jobs), Counter())),
            "steps_only_increase": monotonic,
        },
        "wall_s": round(wall_s, 2),
        "ended_by_s": {f"{share}%": round(ends[max(0, -(-share * len(ends) // 100) - 1)], 2) if ends else None
                       for share in (10, 50, 90, 100)},
        "gateway": {
            "rss_before_mib": _mib(before.get("VmRSS")),
            "rss_peak_sampled_mib": _mib(max(rss) if rss else None),
            "rss_after_mib": _mib(after.get("VmRSS")),
            "hwm_before_mib": _mib(before.get("VmHWM")),
            "hwm_after_mib": _mib(after.get("VmHWM")),
            "fds_before": before.get("fds"),
            "fds_peak_sampled": max(fds) if fds else None,
            "fds_after": after.get("fds"),
            "samples": [(t, figures.get("VmRSS"), figures.get("fds")) for t, figures in samples.series],
        },
    }


def passed(result: dict[str, Any]) -> bool:
    """Every job submitted and ended, and every listener got its job's terminal event."""
    j, l = result["jobs"], result["listeners"]
    return (j["submitted"] == result["config"]["jobs"] and j["ended"] == j["submitted"]
            and l["got_terminal_event"] == j["submitted"] and l["terminal_matches_status"] == j["submitted"])


def print_report(result: dict[str, Any]) -> None:
    c, j, l, g = result["config"], result["jobs"], result["listeners"], result["gateway"]
    where = c["url"] or f"MODEL_ID={c['model']}" + "".join(f" {k}={v}" for k, v in c["settings"].items())
    print(f"{c['jobs']} jobs, {c['width']}x{c['height']}, {c['steps']} steps, one event stream each ({where})")
    print(f"jobs: submitted {j['submitted']}/{c['jobs']} ({j['submit_retries']} submissions retried), ended "
          f"{j['ended']}: {j['statuses']}" + (f", failures {j['failure_codes']}" if j["failure_codes"] else "")
          + (f", not submitted {dict(j['not_submitted'])}" if j["not_submitted"] else ""))
    print(f"listeners: {l['got_terminal_event']}/{l['opened']} got their terminal event "
          f"({l['terminal_matches_status']} the same as the job's status), missed {l['missed']}"
          + (f" {l['errors']}" if l["errors"] else ""))
    print(f"  refused before opening: {l['listeners_refused_at_least_once']} listeners, {l['refused'] or 'never'}; "
          f"reopened {l['reopened']}; events {l['events']}")
    print(f"wall time, first submission to last terminal event: {result['wall_s']} s "
          f"(terminal events by: {', '.join(f'{k} {v} s' for k, v in result['ended_by_s'].items())})")
    if result.get("cpu_seconds"):
        print("CPU seconds used meanwhile: " + ", ".join(f"{k} {v}" for k, v in result["cpu_seconds"].items()))
    if g["rss_before_mib"] is not None:
        print(f"gateway VmRSS: before {g['rss_before_mib']} MiB, peak sampled {g['rss_peak_sampled_mib']} MiB, "
              f"after {g['rss_after_mib']} MiB; VmHWM before {g['hwm_before_mib']} MiB, after {g['hwm_after_mib']} "
              f"MiB; open fds before {g['fds_before']}, peak {g['fds_peak_sampled']}, after {g['fds_after']}")
    print("PASS" if passed(result) else "FAIL: a job did not end or a listener missed its terminal event")


# --------------------------------------------------------------------------- main


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs submitted at once (default 1000)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per job (default 4)")
    parser.add_argument("--preview", action="store_true", help="ask each job for preview events")
    parser.add_argument("--url", default=None, help="an already running gateway (default: start the service)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--gateway-pid", type=int, default=None,
                        help="with --url: the gateway's process id on this machine, for its memory figures")
    parser.add_argument("--model", default="tiny", help="MODEL_ID of the worker started (default tiny, the CPU default)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the processes started (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds from the first submission after which what has not ended counts as missed")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the end before the 'after' figures")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and state (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.gateway_pid is not None and args.url is None:
        parser.error("--gateway-pid goes with --url (without --url the gateway started is measured)")
    return args


def _enough_file_descriptors(jobs: int) -> None:
    """This client holds a connection per job: raise its own soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < jobs + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else max(soft, hard), hard))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the service (unless --url), run the jobs, stop the service (always); the summary."""
    _enough_file_descriptors(args.jobs)
    if args.url is not None:
        return asyncio.run(measure(args.url, args, args.gateway_pid))
    with tempfile.TemporaryDirectory(prefix="jobs-load-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with Service(workdir, args.model, dict(args.set)) as service:
            result = asyncio.run(measure(service.url, args, service.pid("gateway"), service))
            result["exited"] = service.exited()
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_termination()
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
