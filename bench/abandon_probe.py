"""How soon work nobody waits for frees the GPU, measured against a running service.

    # the service started with REQUEST_TIMEOUT_S=20 (the deadline case needs it); its worker's log given
    python -m bench.abandon_probe --url http://127.0.0.1:8080 --deadline-s 20 --size 1024 --n 4 \\
        --steps 150 --abandon-after-s 5 --worker-log run/logs/gpu_worker_0.log --out abandon.json

Two cases, each a large request through /v1/images/generations (``n`` images of ``size``, b64_json,
``steps`` denoising steps), one batch on the worker:

* ``deadline``: the client waits; the gateway's REQUEST_TIMEOUT_S (``--deadline-s``, the service's
  setting) passes and the broker answers 504 ``deadline_exceeded`` and cancels the batch at the
  worker. The instant the 504 arrives is the abandon instant.
* ``disconnect``: the client closes its connection ``--abandon-after-s`` after sending; the gateway
  cancels the request. The instant of the close is the abandon instant.

Admission refuses a request whose estimate exceeds the deadline (400 ``too_costly``, or 503 with
work ahead): a refused large request is sent again with half the steps until one is accepted, so
the accepted one is, by admission's own estimate, within twice the deadline, and the one refused
before it beyond it (the deadline case then passes its deadline while it runs). The disconnect case
uses the steps the deadline case was accepted with (``--cases disconnect`` alone: ``--steps``).

Right after the abandon instant a small probe request (``--probe-size``, ``--probe-steps``, another
batch key) goes to /generate: it waits behind the abandoned batch until that stops, so the GPU was
free by ``probe done - probe generation_ms`` (an upper bound: the probe's own serving time is in
it). With ``--worker-log`` the worker's own lines give the instants directly: when the cancel
reached it ("cancelled while its batch runs (step s of S)") and when the batch stopped ("stopped
after X s at step s of S, no request in it is wanted any more"), and the batch's step time
(X / s). Every instant is wall-clock seconds after the case started (the worker's log has
millisecond timestamps in local time, read on the same machine).

Figures per case: ``stop_after_abandon_s`` (worker's stop line minus the abandon instant; in the
deadline case the worker may stop before the 504 reaches the client, so it can be negative),
``stop_after_abandon_minus_step_s`` ("one step + X s"), ``stop_after_abandon_steps`` (in steps),
``gpu_free_by_after_abandon_s`` (from the probe alone).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from importlib import metadata
from pathlib import Path


CASES = ("deadline", "disconnect")
REFUSED = (400, 503)
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")
CANCEL_LINE = re.compile(r"request \S+ (cancelled|passed its deadline) while its batch runs \(step (\d+) of (\d+)\)")
# The first stop after the cancel: every row unwanted, or (the cancels of one client's n images
# straddling a step boundary) most of them, the rest restarted and cancelled while queued.
STOP_LINE = re.compile(r"batch (\S+): stopped after ([\d.]+)s at step (\d+) of (\d+), "
                       r"(?:no request in it is wanted|most of it is no longer wanted)")


def log_lines(path: Path) -> list[tuple[float, str]]:
    """(wall-clock seconds, line) of every timestamped line of a worker's text log."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if match:
            found.append((datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return found


def worker_events(path: Path, since: float, steps: int) -> dict:
    """The worker's first cancel line and first stop line (a batch no request is wanted in) of a
    batch of ``steps`` steps logged at or after ``since`` (wall clock; log times are cut to the
    millisecond; the steps tell the request's batch from a refused attempt's, which had more)."""
    events: dict = {}
    for moment, line in log_lines(path):
        if moment < since - 0.001:
            continue
        cancel = CANCEL_LINE.search(line)
        if cancel and int(cancel[3]) != steps:
            cancel = None
        stop = STOP_LINE.search(line)
        if stop and int(stop[4]) != steps:
            stop = None
        if cancel and "cancel" not in events:
            events["cancel"] = {"at": moment, "why": cancel[1], "step": int(cancel[2]), "steps": int(cancel[3])}
        if stop and "stop" not in events:
            ran_s, step = float(stop[2]), int(stop[3])
            events["stop"] = {"at": moment, "batch_id": stop[1], "ran_s": ran_s, "step": step,
                              "steps": int(stop[4]), "step_s": round(ran_s / step, 4) if step else None}
    return events


def post_json(url: str, path: str, body: dict, timeout_s: float) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}


class LargeRequest:
    """The large request on a connection of its own, so the client can close it whenever it likes."""

    def __init__(self, url: str, body: dict, label: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
        self.connection.request("POST", "/v1/images/generations", json.dumps(body),
                                {"Content-Type": "application/json", "X-Request-ID": label})
        self.sent_at = time.time()

    def answer_within(self, timeout_s: float) -> tuple[int, dict] | None:
        """(status, body) if the answer comes within ``timeout_s``, else None (the connection is then
        unusable: close it)."""
        self.connection.sock.settimeout(max(0.001, timeout_s))
        try:
            response = self.connection.getresponse()
            raw = response.read()
        except (socket.timeout, TimeoutError):
            return None
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, {}

    def close(self) -> None:
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the gateway sees the client go at once
            except OSError:
                pass
        self.connection.close()


def large_body(args: argparse.Namespace, steps: int, seed: int) -> dict:
    return {"prompt": "an abandoned request", "n": args.n, "size": f"{args.size}x{args.size}",
            "response_format": "b64_json", "num_inference_steps": steps, "seed": seed}


def probe(args: argparse.Namespace, zero: float) -> dict:
    """The small request sent right after the abandon instant: it runs once the GPU is free."""
    sent = time.time()
    status, answer = post_json(args.url, "/generate",
                               {"prompt": "a probe", "width": args.probe_size, "height": args.probe_size,
                                "num_inference_steps": args.probe_steps, "seed": 7}, args.probe_timeout_s)
    done = time.time()
    out = {"status": status, "sent_at": round(sent - zero, 4), "done_at": round(done - zero, 4)}
    if status == 200:
        generation_s = answer["generation_ms"] / 1000.0
        out.update({"generation_s": round(generation_s, 4), "queue_wait_s": round(answer["queue_wait_ms"] / 1000.0, 4),
                    "batch_size": answer.get("batch_size"), "gpu_free_by": round(done - generation_s - zero, 4)})
    else:
        out["error"] = answer.get("error")
    return out


def run_case(args: argparse.Namespace, case: str, steps: int, seed: int) -> dict:
    """One case: the large request (halving its steps while admission refuses it), its abandon,
    the probe, and the worker's lines about it."""
    zero = time.time()
    attempts: list[dict] = []
    result: dict = {"case": case, "attempts": attempts}
    while True:
        large = LargeRequest(args.url, large_body(args, steps, seed), f"abandon-probe-{case}-{steps}")
        wait_s = args.abandon_after_s if case == "disconnect" else args.deadline_s + args.answer_grace_s
        answer = large.answer_within(wait_s)
        if case == "disconnect" and answer is None:
            large.close()
            abandoned = time.time()
            result.update({"steps": steps, "sent_at": round(large.sent_at - zero, 4),
                           "abandoned_at": round(abandoned - zero, 4)})
            break
        large.close()
        if answer is None:  # no answer at all: the service is stuck
            result.update({"steps": steps, "error": f"no answer within {wait_s:g} s"})
            return result
        status, body = answer
        error = body.get("error") or {}
        attempts.append({"steps": steps, "status": status, "code": error.get("code"),
                         "message": error.get("message"), "after_s": round(time.time() - large.sent_at, 4)})
        if status in REFUSED and steps // 2 >= args.min_steps:
            steps //= 2
            time.sleep(args.retry_pause_s)  # a refused request's siblings are being cancelled
            continue
        if case == "deadline" and status == 504:
            result.update({"steps": steps, "sent_at": round(large.sent_at - zero, 4),
                           "abandoned_at": round(time.time() - zero, 4),
                           "answer": {"status": status, "code": error.get("code"), "message": error.get("message")}})
            break
        result.update({"steps": steps, "error": f"the large request was answered {status} ({error.get('code')}), "
                                                "not abandoned: see attempts"})
        return result
    result["probe"] = probe(args, zero)
    if args.worker_log:
        events = wait_for_stop(Path(args.worker_log), large.sent_at, steps, args.log_wait_s)
        result["worker"] = {name: {**event, "at": round(event["at"] - zero, 4)} for name, event in events.items()}
    result.update(figures(result))
    return result


def wait_for_stop(path: Path, since: float, steps: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        events = worker_events(path, since, steps) if path.exists() else {}
        if "stop" in events or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


def figures(result: dict) -> dict:
    """The case's figures from its instants (absent where an instant is)."""
    out: dict = {}
    abandoned = result["abandoned_at"]
    probe_result = result.get("probe", {})
    if "gpu_free_by" in probe_result:
        out["gpu_free_by_after_abandon_s"] = round(probe_result["gpu_free_by"] - abandoned, 4)
    stop = result.get("worker", {}).get("stop")
    if stop:
        after = stop["at"] - abandoned
        out["stop_after_abandon_s"] = round(after, 4)
        if stop["step_s"]:
            out["step_s"] = stop["step_s"]
            out["stop_after_abandon_steps"] = round(after / stop["step_s"], 3)
            out["stop_after_abandon_minus_step_s"] = round(after - stop["step_s"], 4)
    cancel = result.get("worker", {}).get("cancel")
    if cancel:
        out["cancel_reached_worker_after_abandon_s"] = round(cancel["at"] - abandoned, 4)
    return out


def versions() -> dict:
    found = {}
    for package in ("torch", "diffusers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main() -> int:
    from bench.common import card_name, save_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the running service's gateway")
    parser.add_argument("--cases", default=",".join(CASES), help="which, of " + ", ".join(CASES) + ", in this order")
    parser.add_argument("--deadline-s", type=float, required=True,
                        help="the service's REQUEST_TIMEOUT_S (the deadline case waits that long plus a grace)")
    parser.add_argument("--size", type=int, default=1024, help="the large request's width and height")
    parser.add_argument("--n", type=int, default=4, help="the large request's images (one batch)")
    parser.add_argument("--steps", type=int, default=150, help="the large request's steps (halved while refused)")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--abandon-after-s", type=float, default=5.0, help="disconnect: close the connection after this")
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--probe-steps", type=int, default=4)
    parser.add_argument("--probe-timeout-s", type=float, default=300.0)
    parser.add_argument("--answer-grace-s", type=float, default=30.0,
                        help="deadline: how long past --deadline-s to wait for the 504")
    parser.add_argument("--retry-pause-s", type=float, default=1.0)
    parser.add_argument("--log-wait-s", type=float, default=30.0, help="how long to wait for the worker's stop line")
    parser.add_argument("--worker-log", help="the worker's text log (its stop and cancel lines)")
    parser.add_argument("--model", help="recorded: the service's MODEL_ID")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="recorded: a setting the service was started with (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if set(cases) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    document = {"command": "python -m bench.abandon_probe " + " ".join(sys.argv[1:]), "card": card_name(),
                "versions": versions(), "model": args.model, "settings": dict(s.split("=", 1) for s in args.set),
                "large_request": {"size": f"{args.size}x{args.size}", "n": args.n, "steps_asked": args.steps},
                "probe_request": {"size": f"{args.probe_size}x{args.probe_size}", "steps": args.probe_steps},
                "deadline_s": args.deadline_s, "abandon_after_s": args.abandon_after_s, "cases": {}}
    steps = args.steps
    for index, case in enumerate(cases):
        result = run_case(args, case, steps, seed=1000 + index)
        document["cases"][case] = result
        save_json(document, args.out)
        if "error" in result:
            print(json.dumps(result, indent=1), file=sys.stderr)
            return 1
        steps = result["steps"]  # admission accepted these: the next case runs the same batch
    print(save_json(document, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
