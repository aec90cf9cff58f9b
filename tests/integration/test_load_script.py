"""Tests for scripts/test_batching.py (the load-test client), fast, no GPU, no model.

The integration tests run the script against `FakeGateway` below, which is a FAKE
gateway written only to exercise the client script: it speaks the /generate and
/stats JSON shapes but generates nothing and shares no code with the real gateway.
The script run as a plain script: tests/e2e/test_load_script.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from aiohttp import web
from PIL import Image

from tests.support.paths import REPO

SCRIPT = REPO / "scripts" / "test_batching.py"


def _load_script():
    # scripts/ is not a package; load the file as a module. Registered in sys.modules
    # before exec because dataclasses resolve string annotations through it.
    spec = importlib.util.spec_from_file_location("loadtest_script", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lt = _load_script()


def res(index: int, ok: bool = True, latency: float = 1.0, batch_id: str | None = "b0",
        batch_size: int | None = None, status: int | None = 200,
        error_code: str | None = None, sent_at: float = 0.0, message: str | None = None):
    return lt.RequestResult(
        index=index, user=None, ok=ok, sent_at=sent_at, received_at=sent_at + latency,
        status=status, error_code=error_code, error_message=message,
        batch_id=batch_id if ok else None, batch_size=batch_size,
    )


# --------------------------------------------------------------------------- unit tests


def test_percentile_nearest_rank_known_list():
    values = [float(v) for v in range(10, 0, -1)]  # 10..1, unsorted on purpose
    assert lt.percentile_nearest_rank(values, 50) == 5.0  # ceil(0.5*10)=5th smallest
    assert lt.percentile_nearest_rank(values, 95) == 10.0  # ceil(9.5)=10th
    assert lt.percentile_nearest_rank(values, 90) == 9.0
    assert lt.percentile_nearest_rank(values, 0) == 1.0
    assert lt.percentile_nearest_rank([3.0], 95) == 3.0
    twenty = [float(v) for v in range(1, 21)]
    assert lt.percentile_nearest_rank(twenty, 95) == 19.0  # ceil(19.0)=19th
    with pytest.raises(ValueError):
        lt.percentile_nearest_rank([], 50)


def test_summarize_avg_batch_size_from_distinct_batch_ids():
    # 7 successes in 3 batches (4 + 2 + 1) -> 7/3, regardless of batch_size fields.
    ids = ["a"] * 4 + ["b"] * 2 + ["c"]
    results = [res(i, batch_id=b, batch_size=99) for i, b in enumerate(ids)]
    s = lt.summarize(results, duration_s=14.0)
    assert s.successful == 7 and s.total == 7 and s.failed == 0 and s.all_ok
    assert s.distinct_batches == 3
    assert s.avg_batch_size == pytest.approx(7 / 3)
    assert s.throughput == pytest.approx(0.5)


def test_summarize_falls_back_to_mean_batch_size_without_batch_id():
    results = [res(0, batch_id=None, batch_size=4), res(1, batch_id=None, batch_size=2)]
    assert lt.summarize(results, 1.0).avg_batch_size == pytest.approx(3.0)
    none = [res(0, batch_id=None), res(1, batch_id=None)]
    assert lt.summarize(none, 1.0).avg_batch_size is None


def test_summarize_counts_failures_and_ignores_them_in_latency():
    results = [res(i, latency=float(i + 1), batch_id=f"b{i // 2}") for i in range(4)]
    results += [
        res(10, ok=False, status=503, error_code="overloaded", latency=100.0, message="queue full"),
        res(11, ok=False, status=503, error_code="overloaded", latency=100.0),
        res(12, ok=False, status=None, error_code="timeout", latency=100.0),
        res(13, ok=False, status=500, error_code=None, latency=100.0),
    ]
    s = lt.summarize(results, duration_s=8.0)
    assert (s.total, s.successful, s.failed) == (8, 4, 4)
    assert not s.all_ok
    assert s.failures == {"503 overloaded": 2, "500": 1, "timeout": 1}
    assert list(s.failures)[0] == "503 overloaded"  # biggest group first
    assert s.failure_examples["503 overloaded"] == "queue full"
    assert s.avg_batch_size == pytest.approx(2.0)  # 4 successes / 2 batches
    assert s.throughput == pytest.approx(0.5)  # successes only
    # latencies 1..4 (the 100 s failures are excluded)
    assert (s.latency_p50_s, s.latency_p95_s, s.latency_max_s) == (2.0, 4.0, 4.0)


def test_summarize_nothing_succeeded():
    s = lt.summarize([res(0, ok=False, status=503, error_code="overloaded")], 0.0)
    assert s.successful == 0 and s.throughput == 0.0 and s.avg_batch_size is None
    assert s.latency_p50_s is None
    text = lt.format_summary(s)
    assert "Successful: 0/1" in text and "Avg batch size: n/a" in text
    assert "Failed: 1 (503 overloaded: 1)" in text


def test_format_summary_matches_spec_lines():
    s = lt.Summary(
        total=50, successful=50, duration_s=258.04, throughput=50 / 258.04,
        avg_batch_size=7.8125, distinct_batches=7, latency_p50_s=130.24,
        latency_p95_s=250.06, latency_max_s=257.93,
    )
    assert lt.format_summary(s).splitlines() == [
        "Total Duration: 258.0s",
        "Successful: 50/50",
        "Avg batch size: 7.8",
        "Throughput: 0.19 images/second",
        "Latency p50: 130.2s  p95: 250.1s  max: 257.9s",
    ]


def test_format_summary_failed_line_and_slow_throughput():
    results = [res(0, latency=2.0)] + [
        res(i, ok=False, status=503, error_code="overloaded") for i in (1, 2, 3)
    ] + [res(4, ok=False, status=None, error_code="connection_error")]
    text = lt.format_summary(lt.summarize(results, duration_s=15.0))
    assert "Failed: 4 (503 overloaded: 3, connection_error: 1)" in text.splitlines()
    assert "Throughput: 0.067 images/second" in text  # third decimal kept below 0.1


def test_wall_duration_first_sent_to_last_received():
    results = [res(0, sent_at=10.0, latency=5.0), res(1, sent_at=12.0, latency=1.0),
               res(2, ok=False, status=503, sent_at=11.0, latency=9.0)]
    assert lt.wall_duration(results) == pytest.approx(10.0)  # 10.0 -> 20.0 (a failure)
    assert lt.wall_duration([]) == 0.0


def test_build_payload_distinct_and_seeded():
    t = lt.RequestTemplate(prompt="a cat", width=256, height=320, num_inference_steps=4,
                           guidance_scale=3.0, round_id="round-7", seed_base=100)
    p3 = lt.build_payload(t, 3)
    assert p3 == {
        "prompt": "a cat #3", "game_id": "loadtest", "round_id": "round-7",
        "player_id": "player-3", "width": 256, "height": 320,
        "num_inference_steps": 4, "guidance_scale": 3.0, "seed": 103,
    }
    unseeded = lt.build_payload(lt.RequestTemplate(), 0)
    assert "seed" not in unseeded and "negative_prompt" not in unseeded
    assert lt.build_payload(lt.RequestTemplate(negative_prompt="blurry"), 0)["negative_prompt"] == "blurry"


@pytest.mark.parametrize("argv", [
    [],                                          # neither mode
    ["--burst", "5", "--users", "2"],            # both modes
    ["--burst", "0"],
    ["--burst", "5", "--width", "500"],          # not a multiple of 8
    ["--burst", "5", "--requests-per-user", "3"],  # per-user count without --users
    ["--users", "2", "--timeout", "0"],
    ["--burst", "x"],
    ["--burst", "5", "--json", "/no/such/folder/run.json"],   # checked before the run, not after
    ["--burst", "5", "--plot", "/no/such/folder/run.png"],
    ["--burst", "5", "--stats-interval", "0"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert lt.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- fake gateway


@dataclass
class Seen:
    index: int
    user: int | None
    body: dict[str, Any]
    start: float
    end: float = 0.0


@dataclass
class FakeGateway:
    """A FAKE gateway, only for testing the load-test client script.

    /generate groups requests arriving within `window_s` of a batch's first request
    (up to `max_batch`) into one batch with a shared batch_id, sleeps `gen_s` as
    "generation", then answers each with plausible JSON. `reject(index)` -> True makes
    it answer 503 overloaded with Retry-After instead. `barrier` > 0 makes every
    request wait until that many are in flight at once (proves real concurrency).
    """

    window_s: float = 0.05
    max_batch: int = 8
    gen_s: float = 0.02
    reject: Callable[[int], bool] = lambda index: False
    barrier: int = 0
    hang_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)
    max_in_flight: int = 0
    _in_flight: int = 0
    _open: dict[str, Any] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/stats", self.stats)
        return app

    async def _join_batch(self) -> tuple[str, asyncio.Future]:
        if self._open is None or len(self._open["members"]) >= self.max_batch:
            batch = {"id": uuid.uuid4().hex, "members": [],
                     "done": asyncio.get_running_loop().create_future()}
            self._open = batch

            async def close_later() -> None:
                await asyncio.sleep(self.window_s)
                if self._open is batch:
                    self._open = None
                await asyncio.sleep(self.gen_s)
                self.batches[batch["id"]] = len(batch["members"])
                batch["done"].set_result(len(batch["members"]))

            asyncio.ensure_future(close_later())
        batch = self._open
        batch["members"].append(1)
        if len(batch["members"]) >= self.max_batch:
            self._open = None  # full: the next request opens a new batch
        return batch["id"], batch["done"]

    async def generate(self, request: web.Request) -> web.Response:
        t0 = time.monotonic()
        body = await request.json()
        index = int(request.headers.get("X-Loadtest-Request", "-1"))
        user_h = request.headers.get("X-Loadtest-User")
        rec = Seen(index=index, user=int(user_h) if user_h is not None else None, body=body, start=t0)
        self.seen.append(rec)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.hang_s:
                await asyncio.sleep(self.hang_s)
            if self.barrier:
                deadline = t0 + 5.0
                while self._in_flight < self.barrier and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
            if self.reject(index):
                return web.json_response(
                    {"error": {"code": "overloaded", "message": "queue is full", "field": None}},
                    status=503, headers={"Retry-After": "5"},
                )
            batch_id, done = await self._join_batch()
            size = await done
            return web.json_response({
                "image_id": uuid.uuid4().hex, "image_url": "http://fake/img.png",
                "duration_ms": (time.monotonic() - t0) * 1000,
                "game_id": body["game_id"], "round_id": body["round_id"],
                "player_id": body["player_id"], "width": body["width"],
                "height": body["height"], "seed": body.get("seed", 0),
                "batch_id": batch_id, "batch_size": size, "gpu_id": 0,
                "worker": "fake-0", "queue_wait_ms": 1.0, "generation_ms": self.gen_s * 1000,
            })
        finally:
            self._in_flight -= 1
            rec.end = time.monotonic()

    async def stats(self, request: web.Request) -> web.Response:
        n, b = sum(self.batches.values()), len(self.batches)
        return web.json_response({"total_requests": n, "total_batches": b,
                                  "avg_batch_size": round(n / b, 2) if b else 0.0,
                                  "current_queue_depth": self._in_flight})


async def start_fake(fake: FakeGateway) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # ephemeral port
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def run_main(argv: list[str]) -> int:
    # main() calls asyncio.run(), so it runs in a worker thread with its own loop
    # while the fake gateway keeps serving on this test's loop.
    return await asyncio.to_thread(lt.main, argv)


FAST = ["--width", "64", "--height", "64", "--steps", "2", "--timeout", "10"]


def parse_report(out: str) -> dict[str, Any]:
    m = {
        "duration": re.search(r"^Total Duration: (\d+\.\d)s$", out, re.M),
        "successful": re.search(r"^Successful: (\d+)/(\d+)$", out, re.M),
        "avg_batch": re.search(r"^Avg batch size: (\d+\.\d)$", out, re.M),
        "throughput": re.search(r"^Throughput: (\d+\.\d+) images/second$", out, re.M),
        "latency": re.search(r"^Latency p50: (\d+\.\d)s  p95: (\d+\.\d)s  max: (\d+\.\d)s$", out, re.M),
    }
    missing = [k for k, v in m.items() if v is None]
    assert not missing, f"missing {missing} in:\n{out}"
    return m


# --------------------------------------------------------------------------- integration


async def test_burst_against_fake_gateway(capsys):
    fake = FakeGateway(barrier=8)  # held until all 8 are in: a loaded machine may spread them past one window
    runner, url = await start_fake(fake)
    try:
        code = await run_main(["--url", url, "--burst", "8", "--seed-base", "40", *FAST])
    finally:
        await runner.cleanup()
    out = capsys.readouterr().out
    m = parse_report(out)
    assert code == 0, out
    assert m["successful"].groups() == ("8", "8")
    assert "Failed" not in out
    # The printed average is the definition applied to what the fake actually did.
    assert float(m["avg_batch"].group(1)) == pytest.approx(round(8 / len(fake.batches), 1))
    assert float(m["throughput"].group(1)) > 0
    assert "Gateway /stats (cumulative): total_requests=8" in out
    # Each request distinct, as the CLI flags asked.
    bodies = sorted((s.body for s in fake.seen), key=lambda b: b["seed"])
    assert [b["player_id"] for b in bodies] == [f"player-{i}" for i in range(8)]
    assert [b["seed"] for b in bodies] == list(range(40, 48))
    assert len({b["prompt"] for b in bodies}) == 8 and all(b["game_id"] == "loadtest" for b in bodies)
    assert len({b["round_id"] for b in bodies}) == 1
    assert all((b["width"], b["height"], b["num_inference_steps"]) == (64, 64, 2) for b in bodies)
    assert fake.max_in_flight == 8  # all 8 really were in flight together


async def test_burst_with_some_503s_exits_1(capsys):
    fake = FakeGateway(reject=lambda index: index % 3 == 0)  # 0, 3, 6 of 8
    runner, url = await start_fake(fake)
    try:
        code = await run_main(["--url", url, "--burst", "8", "--no-stats", *FAST])
    finally:
        await runner.cleanup()
    out = capsys.readouterr().out
    m = parse_report(out)
    assert code == 1, out
    assert m["successful"].groups() == ("5", "8")
    assert "Failed: 3 (503 overloaded: 3)" in out.splitlines()
    assert "Retry-After: 5" in out  # sample message shows the server's hint
    assert "Gateway /stats" not in out


async def test_users_mode_sequential_per_user(capsys):
    fake = FakeGateway()
    runner, url = await start_fake(fake)
    try:
        code = await run_main(["--url", url, "--users", "3", "--requests-per-user", "2", *FAST])
    finally:
        await runner.cleanup()
    out = capsys.readouterr().out
    m = parse_report(out)
    assert code == 0, out
    assert m["successful"].groups() == ("6", "6")
    assert len(fake.seen) == 6
    assert sorted(s.index for s in fake.seen) == list(range(6))
    by_user: dict[int, list[Seen]] = {}
    for s in fake.seen:
        by_user.setdefault(s.user, []).append(s)
    assert sorted(by_user) == [0, 1, 2]
    for user, reqs in by_user.items():
        assert len(reqs) == 2
        reqs.sort(key=lambda s: s.start)
        # a user's next request only starts after its previous response was sent
        assert reqs[0].end <= reqs[1].start, f"user {user} overlapped"
        assert [r.index for r in reqs] == [user * 2, user * 2 + 1]
    # ...while different users do run concurrently (their first requests overlap).
    firsts = [min(r, key=lambda s: s.start) for r in by_user.values()]
    assert max(f.start for f in firsts) < min(f.end for f in firsts)


async def test_burst_beyond_aiohttp_default_connection_limit(capsys):
    # aiohttp's default connector caps at 100 connections; the fake makes every
    # request wait until 110 are in flight, which only completes if none are queued
    # client-side.
    fake = FakeGateway(barrier=110, max_batch=200)
    runner, url = await start_fake(fake)
    try:
        code = await run_main(["--url", url, "--burst", "110", "--no-stats", *FAST])
    finally:
        await runner.cleanup()
    out = capsys.readouterr().out
    assert code == 0, out
    assert fake.max_in_flight == 110
    assert "Successful: 110/110" in out


async def test_timeout_is_a_failure(capsys):
    fake = FakeGateway(hang_s=2.0)
    runner, url = await start_fake(fake)
    try:
        code = await run_main(["--url", url, "--burst", "2", "--no-stats", "--timeout", "0.2"])
    finally:
        await runner.cleanup()
    out = capsys.readouterr().out
    assert code == 1
    assert "Successful: 0/2" in out and "Failed: 2 (timeout: 2)" in out


def test_connection_refused_is_a_failure(capsys):
    with socket.socket() as s:  # find a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = lt.main(["--url", f"http://127.0.0.1:{port}", "--burst", "3", "--timeout", "5"])
    out = capsys.readouterr().out
    assert code == 1
    assert "Failed: 3 (connection_error: 3)" in out


# --------------------------------------------------------------------------- progress, --json, --plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_format_progress():
    assert lt.format_progress(0, 0, 4, 0.0, width=8) == "[--------] 0/4 done, 0 failed, 0.0s"
    assert lt.format_progress(3, 1, 4, 2.25, width=8) == "[######--] 3/4 done, 1 failed, 2.2s"
    assert lt.format_progress(4, 0, 4, 9.0, width=8).startswith("[########] 4/4")


def test_progress_redraws_in_place_at_most_every_interval_and_always_at_the_end():
    now = [0.0]
    stream = io.StringIO()
    bar = lt.Progress(4, stream=stream, clock=lambda: now[0], min_interval_s=1.0)
    for t, ok in ((0.1, True), (0.2, False), (1.5, True), (1.6, True)):
        now[0] = t
        bar.update(res(0, ok=ok))
    bar.finish()
    frames = stream.getvalue().split("\r")[1:]
    # 0.1: drawn (first); 0.2: too soon; 1.5: drawn; 1.6: the last request, drawn; finish: the newline
    assert [f.split("] ")[1] for f in frames] == ["1/4 done, 0 failed, 0.1s", "3/4 done, 1 failed, 1.5s",
                                                   "4/4 done, 1 failed, 1.6s\n"]


def test_compact_stats_keeps_queue_and_batches_in_both_shapes():
    single = {"num_gpus": 1, "current_queue_depth": 3, "total_requests": 10, "total_batches": 4, "config": {}}
    assert lt.compact_stats(single, 1.23456) == {"t_s": 1.235, "current_queue_depth": 3, "total_requests": 10,
                                                 "total_batches": 4, "num_gpus": 1}
    multi = {**single, "num_gpus": 2, "per_gpu_stats": [
        {"gpu_id": 0, "worker": "w0", "current_queue_depth": 1, "total_batches": 3, "host": "h"},
        {"gpu_id": 1, "worker": "w1", "current_queue_depth": 2, "total_batches": 1}]}
    assert lt.compact_stats(multi, 0.0)["per_gpu"] == [
        {"gpu_id": 0, "worker": "w0", "current_queue_depth": 1, "total_batches": 3},
        {"gpu_id": 1, "worker": "w1", "current_queue_depth": 2, "total_batches": 1}]


def test_batch_points_one_per_batch_at_its_first_response():
    results = [res(0, sent_at=10.0, latency=2.0, batch_id="a", batch_size=2),
               res(1, sent_at=10.0, latency=1.5, batch_id="a", batch_size=2),
               res(2, sent_at=10.0, latency=3.0, batch_id="b", batch_size=1),
               res(3, ok=False, status=503, sent_at=10.0)]
    assert lt.batch_points(results, t0=10.0) == [(1.5, 2, None), (3.0, 1, None)]


def test_plot_of_a_run_with_nothing_to_show_is_still_a_png(tmp_path):
    path = tmp_path / "empty.png"
    lt.write_plot(str(path), [res(0, ok=False, status=503)], [], t0=0.0, title="nothing")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


async def test_json_plot_and_progress_of_a_real_run(tmp_path, capsys):
    fake = FakeGateway(window_s=0.1, gen_s=0.3, max_batch=4)
    runner, url = await start_fake(fake)
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    try:
        code = await run_main(["--url", url, "--burst", "8", "--seed-base", "5", "--json", str(json_path),
                               "--plot", str(png_path), "--stats-interval", "0.05", *FAST])
    finally:
        await runner.cleanup()
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "] 8/8 done, 0 failed," in captured.err and "\r[" in captured.err  # the bar, on stderr
    assert "done," not in captured.out  # stdout stays the report

    report = json.loads(json_path.read_text())
    assert report["format_version"] == 1 and report["run"]["mode"] == "burst" and report["run"]["total"] == 8
    assert report["summary"]["successful"] == 8 and report["summary"]["failed"] == 0
    assert report["summary"]["avg_batch_size"] == pytest.approx(8 / len(fake.batches))
    results = report["results"]
    assert [r["index"] for r in results] == list(range(8)) and all(r["ok"] for r in results)
    assert sorted(r["seed"] for r in results) == list(range(5, 13))
    assert all(0 <= r["sent_s"] <= r["received_s"] and r["batch_size"] >= 1 and r["batch_id"] for r in results)
    samples = report["stats_samples"]
    assert len(samples) >= 3, samples  # a 0.4 s run sampled every 0.05 s
    assert all(isinstance(s["current_queue_depth"], int) for s in samples)
    assert max(s["current_queue_depth"] for s in samples) > 0  # it saw the requests waiting
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert report["final_stats"]["total_requests"] == 8

    png = png_path.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert Image.open(io.BytesIO(png)).size == (900, 1100)


async def test_users_mode_with_no_stats_and_no_progress(tmp_path, capsys):
    fake = FakeGateway()
    runner, url = await start_fake(fake)
    json_path = tmp_path / "users.json"
    try:
        code = await run_main(["--url", url, "--users", "2", "--requests-per-user", "2", "--no-stats",
                               "--no-progress", "--json", str(json_path), *FAST])
    finally:
        await runner.cleanup()
    captured = capsys.readouterr()
    assert code == 0 and "done," not in captured.err
    report = json.loads(json_path.read_text())
    assert report["run"]["mode"] == "users" and report["run"]["requests_per_user"] == 2
    assert report["stats_samples"] == [] and report["final_stats"] is None
    assert sorted(r["user"] for r in report["results"]) == [0, 0, 1, 1]
