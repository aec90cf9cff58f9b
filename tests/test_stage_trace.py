"""The stage trace (imagegen/stage_trace.py, bench/trace_stages.py): off unless IMAGEGEN_TRACE_FILE
is set; the real gateway, broker and worker processes write every stage of a request; the script
lines them up per request. The service runs the FAKE backend (no model): the serving path is under
test here, not the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import trace_stages
from imagegen import stage_trace

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tracing_off():
    stage_trace.close()
    yield
    stage_trace.close()


def test_nothing_is_written_without_the_variable(tmp_path, tracing_off):
    assert not stage_trace.open_from_environment({})
    stage_trace.stage("gateway_received", "r1")  # no file, no error
    assert list(tmp_path.iterdir()) == []


def test_each_stage_is_one_line_with_time_pid_stage_and_id(tmp_path, tracing_off):
    path = tmp_path / "trace.log"
    assert stage_trace.open_from_environment({stage_trace.TRACE_FILE_ENV: str(path)})
    stage_trace.stage("gateway_received", "r1")
    stage_trace.stage("gateway_sent_request", "r1")
    stage_trace.close()
    lines = [line.split() for line in path.read_text().splitlines()]
    assert [line[2:] for line in lines] == [["gateway_received", "r1"], ["gateway_sent_request", "r1"]]
    assert all(line[1] == str(os.getpid()) for line in lines)
    assert int(lines[0][0]) <= int(lines[1][0])


def trace_lines(request_id: str, start_ns: int, step_ns: int, stages=trace_stages.STAGES) -> list[str]:
    return [f"{start_ns + i * step_ns} 1 {stage} {request_id}" for i, stage in enumerate(stages)]


def test_hops_are_medians_over_the_complete_requests():
    lines = (trace_lines("a", 0, 1_000_000) + trace_lines("b", 10**9, 3_000_000)
             + trace_lines("c", 2 * 10**9, 5_000_000)
             + trace_lines("partial", 3 * 10**9, 1, trace_stages.STAGES[:4]) + ["123 cut"])
    result = trace_stages.hops_ms(trace_stages.parse(lines))
    assert result["requests"] == 3
    assert list(result["hops_ms"]) == [f"{a} -> {b}" for a, b in zip(trace_stages.STAGES, trace_stages.STAGES[1:])]
    assert set(result["hops_ms"].values()) == {3.0}  # the median of 1, 3 and 5 ms
    # Twelve hops, the batch's not counted: 11 x 3 ms.
    assert result["serving_ms"] == pytest.approx(33.0)


def test_no_complete_request_gives_an_empty_result(tmp_path):
    assert trace_stages.hops_ms(trace_stages.parse(trace_lines("x", 0, 1, trace_stages.STAGES[:3]))) == {
        "requests": 0, "hops_ms": {}, "serving_ms": None, "png_ms": {}}
    empty = tmp_path / "empty.log"
    empty.write_text("")
    result = subprocess.run([sys.executable, "-m", "bench.trace_stages", str(empty)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "no request passed every stage" in result.stderr


def test_the_service_traces_every_stage_of_each_request(tmp_path):
    """bench.gpu service --trace: the real processes write the trace, each row gets its own
    requests' hops, and bench.trace_stages reads the same file."""
    out, logs = tmp_path / "service.json", tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "service", "--model", "fake:delay=0.05,cell=1",
                             "--size", "128", "--steps", "2", "--service-runs", "lone", "--lone-repeats", "2",
                             "--trace", "--out", str(out), "--log-dir", str(logs)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["service"]["rows"]
    assert len(rows) == 2
    for row in rows:
        stages = row["stages"]
        assert stages["requests"] == 1, stages  # each row holds its own request only
        hops = stages["hops_ms"]
        assert hops["worker_batch_started -> worker_batch_done"] >= 50  # the fake's 50 ms sleep
        assert all(ms >= 0 for ms in hops.values()), hops
        png = stages["png_ms"]  # the image reached the encoder, which started, then finished
        assert set(png) == {"worker_image_handed_over -> worker_png_started",
                            "worker_png_started -> worker_png_encoded", "worker_png_encoded -> worker_png_ready"}
        assert all(ms >= 0 for ms in png.values()), png
        # The serving path is the request's latency less its batch and the HTTP outside the gateway.
        latency_ms = row["latency_p50_s"] * 1000
        assert 0 < stages["serving_ms"] < latency_ms - hops["worker_batch_started -> worker_batch_done"]
    printed = subprocess.run([sys.executable, "-m", "bench.trace_stages", str(logs / "stage-trace.log")], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert "median of 2 requests" in printed.stdout
