"""Stage-trace lines as the services write them (imagegen/stage_trace.py): ``time_ns pid stage id``."""

from __future__ import annotations

from bench import trace_stages


def trace_lines(request_id: str, start_ns: int, step_ns: int, stages=trace_stages.STAGES) -> list[str]:
    return [f"{start_ns + i * step_ns} 1 {stage} {request_id}" for i, stage in enumerate(stages)]
