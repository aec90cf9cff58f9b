"""Backpressure under overload, with real processes: a short run of bench/overload.py.

A broker, a gateway and one worker on the FAKE backend (MODEL_ID=fake:delay=0.5, MAX_BATCH_SIZE=4:
no model, about 8 images/s) are offered 80 requests/s, ten times their capacity, for 5 s, open-loop.
Past the broker's bounded queue (MAX_QUEUE_SIZE=20 here, to keep the run short) every request must
be refused at once with 503 and Retry-After; the rest are served; nothing else happens.
"""

from __future__ import annotations

import pytest

from bench import overload

pytestmark = pytest.mark.timeout(90)

MAX_QUEUE_SIZE = 20
BATCH_SIZE = 4


def test_ten_times_capacity_gets_503_with_retry_after_past_the_bounded_queue(tmp_path):
    args = overload.parse_args(["--rate", "80", "--duration", "5", "--timeout", "20", "--settle", "0.5",
                                "--max-queue-size", str(MAX_QUEUE_SIZE), "--batch-size", str(BATCH_SIZE),
                                "--delay", "0.5", "--workdir", str(tmp_path)])
    result = overload.run(args)
    requests, queue, rss = result["requests"], result["broker_queue"], result["rss"]

    assert requests["sent"] >= 390, requests
    # No 5xx but 503, no timeouts, no connection errors.
    assert set(requests["statuses"]) <= {"200", "503"}, requests
    assert requests["other"] == {}, requests
    # Every 503 says when to retry, and says it is overload.
    assert requests["overloaded_503"] > 0, requests
    assert requests["503_without_retry_after"] == 0, requests
    assert requests["503_with_retry_after"] == requests["overloaded_503"], requests
    assert set(requests["503_codes"]) == {"overloaded"}, requests
    assert result["latency_s"]["503_p95"] < 1.0, result["latency_s"]  # refused at once, not after queueing
    # Some are served: about 8 images/s while the load lasts.
    assert requests["ok_200"] >= 20, requests
    # The broker's queue never went past its bound (sampled every 0.5 s, and its own high-water
    # mark, which also counts the requests the worker holds: at most 2 x MAX_BATCH_SIZE).
    assert queue["sampled_peak"] is not None and queue["sampled_peak"] <= MAX_QUEUE_SIZE, queue
    assert queue["high_water_current_queue_depth"] <= MAX_QUEUE_SIZE + 2 * BATCH_SIZE, queue
    assert queue["rejected_overloaded"] == requests["overloaded_503"], queue
    # Memory does not follow the backlog (a loose bound: the measured growth is about 2 MiB).
    for name in ("broker", "gateway", "worker"):
        assert rss[name]["peak_mib"] - rss[name]["start_mib"] < 50, rss
