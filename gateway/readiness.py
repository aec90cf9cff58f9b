"""GET /readyz's decision (pure): may a load balancer send this gateway work?

Ready means a request sent now could be answered: the broker answers, at least one worker accepts
work (registered and not draining), and the image folder takes images. Every reason that holds is
given, so one probe says everything that is wrong.
"""

from __future__ import annotations

from typing import Any

from gateway.images import StorageFailure


def worker_counts(document: dict[str, Any]) -> tuple[int, int]:
    """(registered, accepting work) from the broker's /stats document.

    One worker is listed under ``worker``, several under ``per_gpu_stats``; each has a ``state``
    ("ready" or "draining"). A worker whose state is not given counts as accepting."""
    registered = int(document.get("num_gpus", 0) or 0)
    listed = document.get("per_gpu_stats")
    if listed is None and isinstance(document.get("worker"), dict):
        listed = [document["worker"]]
    if not isinstance(listed, list):
        return registered, registered
    return registered, sum(1 for worker in listed if isinstance(worker, dict) and worker.get("state", "ready") == "ready")


def readiness(document: dict[str, Any] | None, store_problem: StorageFailure | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for /readyz; ``document`` None: the broker did not answer."""
    reasons = []
    body: dict[str, Any] = {}
    if document is None:
        reasons.append("the broker does not answer")
    else:
        registered, accepting = worker_counts(document)
        body.update(workers=accepting, registered_workers=registered)
        if registered < 1:
            reasons.append("no GPU worker is registered")
        elif accepting < 1:
            reasons.append(f"no worker accepts work: all {registered} registered are draining")
    body["image_store"] = "ok" if store_problem is None else store_problem.cause
    if store_problem is not None:
        reasons.append(f"the image store cannot take images: {store_problem.message}")
    if reasons:
        return 503, {"status": "not_ready", "reason": "; ".join(reasons), **body}
    return 200, {"status": "ready", **body}
