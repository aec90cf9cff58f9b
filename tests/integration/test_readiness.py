"""GET /readyz: ready only when a request sent now could be answered (broker answers, a worker
accepts work, the image folder takes images). The decision is gateway/readiness.py's pure function;
the HTTP tests run the gateway in-process with a fake broker client (the ``client`` and ``broker``
fixtures of tests/integration/conftest.py)."""

from __future__ import annotations

import pytest


def worker(state: str, gpu_id: int = 0) -> dict:
    return {"gpu_id": gpu_id, "worker": f"w{gpu_id}", "state": state}


# The two shapes of the broker's /stats document: one worker under "worker", several under "per_gpu_stats".
ONE_DRAINING = {"num_gpus": 1, "worker": worker("draining")}
ALL_DRAINING = {"num_gpus": 2, "per_gpu_stats": [worker("draining", 0), worker("draining", 1)]}
ONE_OF_TWO_READY = {"num_gpus": 2, "per_gpu_stats": [worker("draining", 0), worker("ready", 1)]}
ONE_READY = {"num_gpus": 1, "worker": worker("ready")}


@pytest.mark.parametrize("document", [ONE_DRAINING, ALL_DRAINING], ids=["one", "all-of-two"])
async def test_not_ready_while_every_worker_drains(client, broker, document):
    broker.stats_document = document
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503, body
    assert body["status"] == "not_ready" and "draining" in body["reason"], body
    assert body["workers"] == 0 and body["registered_workers"] == document["num_gpus"]


@pytest.mark.parametrize("document", [ONE_READY, ONE_OF_TWO_READY], ids=["one", "one-of-two"])
async def test_ready_while_a_worker_accepts(client, broker, document):
    broker.stats_document = document
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200, body
    assert body == {"status": "ready", "workers": 1, "registered_workers": document["num_gpus"],
                    "image_store": "ok"}


def test_decision_gives_every_reason():
    from gateway.images import StorageFailure
    from gateway.readiness import readiness

    status, body = readiness(None, StorageFailure("read_only", "IMAGE_DIR 'x' is on a read-only file system"))
    assert status == 503
    assert "broker does not answer" in body["reason"] and "read-only" in body["reason"]
    assert body["image_store"] == "read_only"
    status, body = readiness({"num_gpus": 0}, None)
    assert status == 503 and "no GPU worker is registered" in body["reason"]
    assert readiness({"num_gpus": 3}, None) == (200, {"status": "ready", "workers": 3, "registered_workers": 3,
                                                      "image_store": "ok"})
