"""bench/throttle_ab.py on the CPU with the tiny model: every way runs every round, in rotated
order, and the summary is computed from the rounds (no durations asserted)."""

from __future__ import annotations

from bench.throttle_ab import preemption_for


def test_the_ways_wait_where_the_worker_would():
    now = [100.0]
    assert preemption_for("plain", 25) is None
    window = preemption_for("window", 25, clock=lambda: now[0])
    every = preemption_for("every_step", 25, clock=lambda: now[0])
    waits = {"window": 0, "every": 0}

    def counter(name):
        def synchronize():
            waits[name] += 1
        return synchronize

    now[0] = 200.0  # long past the window: only a batch stoppable for its rows still waits
    for _ in range(3):
        window.before_step(counter("window"))
        every.before_step(counter("every"))
    assert waits == {"window": 0, "every": 3}
    assert every.rows == 1 and every.steps == 25
