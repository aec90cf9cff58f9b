"""The stage trace (imagegen/stage_trace.py, bench/trace_stages.py) from real processes: the gateway,
broker and worker processes write every stage of a request, and the script, run as a command, lines
them up per request. The service runs the FAKE backend (no model): the serving path is under test
here, not the pipeline. The trace's parts in one process: tests/unit/test_stage_trace.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import trace_stages
from tests.support.paths import REPO
from tests.support.trace_lines import trace_lines


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
