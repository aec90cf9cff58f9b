"""The stage trace (imagegen/stage_trace.py, bench/trace_stages.py): off unless IMAGEGEN_TRACE_FILE
is set; the real gateway, broker and worker processes write every stage of a request; the script
lines them up per request. The service runs the FAKE backend (no model): the serving path is under
test here, not the pipeline."""

from __future__ import annotations

import os

import pytest

from bench import trace_stages
from imagegen import stage_trace
from tests.support.trace_lines import trace_lines


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
