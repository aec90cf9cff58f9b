"""Jobs under load, with real processes: a short run of bench/jobs_load.py.

A broker, a gateway and one worker on the FAKE backend get 100 jobs (64x64, 4 steps) at once, each
followed by its own event stream. JOB_EVENT_STREAMS_MAX is 40 here, so most listeners are refused
(503 too_many_streams, Retry-After: 1) at first and come back as the gateway asks: every job must
still end, and every listener get its job's terminal event.
"""

from __future__ import annotations

import pytest

from bench import jobs_load

pytestmark = pytest.mark.timeout(180)

JOBS = 100
STREAMS_MAX = 40


def test_every_job_ends_and_every_listener_gets_its_terminal_event(tmp_path):
    args = jobs_load.parse_args(["--jobs", str(JOBS), "--model", "fake:step_delay=0.05", "--timeout", "90",
                                 "--settle", "0.5", "--workdir", str(tmp_path),
                                 "--set", f"JOB_EVENT_STREAMS_MAX={STREAMS_MAX}", "--set", "RETRY_AFTER_S=1"])
    result = jobs_load.run(args)
    jobs, listeners, gateway = result["jobs"], result["listeners"], result["gateway"]

    assert result["exited"] == {}, result["exited"]
    assert jobs["submitted"] == JOBS and jobs["ended"] == JOBS, jobs
    assert jobs["statuses"] == {"succeeded": JOBS}, jobs
    assert listeners["got_terminal_event"] == JOBS and listeners["terminal_matches_status"] == JOBS, listeners
    assert listeners["missed"] == 0 and listeners["errors"] == {}, listeners
    # More listeners than streams allowed: some were refused, as the gateway's bound says, and came back.
    assert listeners["listeners_refused_at_least_once"] > 0, listeners
    assert set(listeners["refused"]) == {"503 too_many_streams"}, listeners
    assert listeners["events"]["started"] == JOBS and listeners["steps_only_increase"] == JOBS, listeners
    assert jobs_load.passed(result)
    # The gateway was measured, and every stream's connection is closed again.
    assert gateway["rss_before_mib"] and gateway["rss_peak_sampled_mib"] and gateway["rss_after_mib"], gateway
    assert gateway["fds_peak_sampled"] >= STREAMS_MAX, gateway
    assert gateway["fds_after"] < gateway["fds_peak_sampled"], gateway
