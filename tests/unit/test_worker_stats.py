"""gpu_worker/decisions/stats.py: the worker's counters and the WorkerStatus they become."""

from __future__ import annotations

import dataclasses

from gpu_worker.decisions.stats import WorkerCounters
from imagegen.protocol import WorkerStatus

# WorkerStatus fields that are the worker's state now, not counted by WorkerCounters.
STATE_NOW = {"state", "queue_depth", "running", "max_batch_size", "compile_state", "warm_sizes"}


def test_every_counted_field_of_worker_status_is_a_counter():
    status_fields = {f.name: f.type for f in dataclasses.fields(WorkerStatus)}
    counter_fields = {f.name: f.type for f in dataclasses.fields(WorkerCounters)}
    assert set(status_fields) - STATE_NOW == set(counter_fields)
    assert all(status_fields[name] == kind for name, kind in counter_fields.items())


def test_status_carries_the_counts_and_the_state_now():
    counters = WorkerCounters()
    counters.observe_queue_depth(5)
    counters.observe_queue_depth(2)
    counters.record_batch([0.5, 1.5], generation_s=2.0)
    counters.record_failed(3)
    counters.record_stopped(0.25)
    assert counters.status("draining", queue_depth=4, running=1) == WorkerStatus(
        state="draining", queue_depth=4, running=1, max_queue_depth=5, total_requests=2, total_batches=1,
        total_failed=3, sum_wait_ms=2000.0, sum_generation_ms=2000.0, stopped_batches=1, sum_stopped_ms=250.0)


def test_a_fresh_worker_reports_zeros():
    assert WorkerCounters().status("ready", 0, 0) == WorkerStatus(
        state="ready", queue_depth=0, running=0, max_queue_depth=0, total_requests=0, total_batches=0,
        total_failed=0, sum_wait_ms=0.0, sum_generation_ms=0.0)
