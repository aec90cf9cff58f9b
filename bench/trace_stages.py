"""Where requests' time went, from a stage trace (imagegen/stage_trace.py): the median milliseconds
of each hop, over the requests that passed every stage.

    IMAGEGEN_TRACE_FILE=/tmp/trace.log ./scripts/serve.sh      # or python -m bench.gpu service --trace
    python -m bench.trace_stages /tmp/trace.log

prints one line per hop (``gateway_received -> gateway_sent_request  0.21 ms``) in the order the
requests pass them, then the time inside the serving path (everything but the batch's own time,
``worker_batch_started -> worker_batch_done``). The processes of one machine share its clock; a
trace taken across machines mixes their clocks and says little about the hops between them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# The stages of one request, in the order it passes them (imagegen/stage_trace.py's callers).
STAGES = (
    "gateway_received",
    "gateway_sent_request",
    "broker_got_request",
    "broker_sent_request",
    "worker_got_request",
    "worker_batch_started",
    "worker_batch_done",
    "worker_png_ready",
    "worker_sent_result",
    "broker_got_result",
    "broker_sent_result",
    "gateway_got_result",
    "gateway_saved_image",
)
BATCH = ("worker_batch_started", "worker_batch_done")
# Inside the chain, in whatever order they fall against it: an image reaches the PNG encoder during
# its batch (as the VAE hands it over), its encoding starts and ends in an encoder thread, and the
# event loop picks the PNG up.
PNG_DETAIL = ("worker_image_handed_over", "worker_png_started", "worker_png_encoded", "worker_png_ready")


def parse(lines) -> dict[str, dict[str, int]]:
    """{request id: {stage: unix ns}} from trace lines; a stage seen twice for one id (a preempted
    batch started again, a resent request) keeps its last instant."""
    requests: dict[str, dict[str, int]] = defaultdict(dict)
    for line in lines:
        parts = line.split()
        if len(parts) != 4:
            continue  # a line cut short by a process killed mid-write
        ns, _pid, stage, request_id = parts
        requests[request_id][stage] = int(ns)
    return requests


def hops_ms(requests: dict[str, dict[str, int]]) -> dict:
    """Median milliseconds per hop over the requests that passed every stage, plus the serving
    path's total (all hops but the batch) and how many requests it is over."""
    complete = [stages for stages in requests.values() if all(name in stages for name in STAGES)]
    if not complete:
        return {"requests": 0, "hops_ms": {}, "serving_ms": None, "png_ms": {}}
    serving = statistics.median(
        (stages[STAGES[-1]] - stages[STAGES[0]] - (stages[BATCH[1]] - stages[BATCH[0]])) / 1e6
        for stages in complete)
    return {"requests": len(complete), "hops_ms": _median_hops_ms(complete, STAGES),
            "serving_ms": round(serving, 3), "png_ms": _median_hops_ms(complete, PNG_DETAIL)}


def _median_hops_ms(requests: list[dict[str, int]], chain: tuple[str, ...]) -> dict[str, float]:
    """Median milliseconds from each stage of ``chain`` to the next, over the requests that have both
    (a hop no request has is left out)."""
    hops = {}
    for earlier, later in zip(chain, chain[1:]):
        found = [(stages[later] - stages[earlier]) / 1e6 for stages in requests if earlier in stages and later in stages]
        if found:
            hops[f"{earlier} -> {later}"] = round(statistics.median(found), 3)
    return hops


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="the IMAGEGEN_TRACE_FILE the service wrote")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    with args.trace.open(errors="replace") as lines:
        result = hops_ms(parse(lines))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if not result["requests"]:
        print("no request passed every stage", file=sys.stderr)
        return 1
    for hop, ms in result["hops_ms"].items():
        print(f"{hop:55s} {ms:9.3f} ms")
    for hop, ms in result["png_ms"].items():
        print(f"  PNG: {hop:50s} {ms:9.3f} ms")
    print(f"serving path (all but the batch), median of {result['requests']} requests: {result['serving_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
