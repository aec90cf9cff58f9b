"""GET /metrics: the Prometheus exposition of the gateway (gateway/metrics.py, docs/metrics.md).

The gateway runs in-process on aiohttp's TestServer with a ScriptedFakeBroker
(tests/support/fake_brokers.py), a FAKE standing in for the ZeroMQ broker link: no broker, worker or
model runs here. Its stats documents are built by the real broker code (broker.state +
broker.stats) wherever the document's shape matters, so a change of that shape breaks these tests
rather than passing unnoticed.

Every exposition is read back with prometheus_client's own parser, so what is checked is what a
Prometheus server would ingest.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.state import BrokerPolicy, BrokerState
from broker.stats import build_stats
from gateway.app import create_app
from gateway.broker_client import BrokerFailure
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics, RecentKeys
from imagegen.protocol import BatchingConfig, Heartbeat, ImageSize, Register, Result, WorkerStatus
from tests.support.fake_brokers import ScriptedFakeBroker
from tests.support.gateway import generate_body


@pytest.fixture
def broker() -> ScriptedFakeBroker:
    """Behind the ``client`` fixture (tests/integration/conftest.py) in this module."""
    return ScriptedFakeBroker()


async def scrape(client: TestClient) -> dict[str, Any]:
    """GET /metrics, parsed: {family name: family}."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(await response.text())}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The one sample called ``sample_name`` whose labels include ``labels``."""
    family_name = sample_name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if family_name.endswith(suffix) and family_name[: -len(suffix)] in families:
            family_name = family_name[: -len(suffix)]
    matches = [s.value for s in families[family_name].samples
               if s.name == sample_name and labels.items() <= s.labels.items()]
    assert len(matches) == 1, (sample_name, labels, families[family_name].samples)
    return matches[0]


# --------------------------------------------------------------------------- the cluster, from /stats


def registration(name: str, gpu_id: int, host: str = "host-a") -> Register:
    batching = BatchingConfig(enable_batching=True, max_batch_size=8, max_wait_time=0.1, min_batch_size=1,
                              min_wait_time=0.05, adaptive_batching=True, adaptive_threshold=10)
    return Register(worker_name=name, host=host, gpu_id=gpu_id, pid=100 + gpu_id, model_id="tiny",
                    device=f"cuda:{gpu_id}", capacity=16, batching=batching)


def real_stats(workers: int) -> dict[str, Any]:
    """A stats document made by the real broker code: ``workers`` workers, a little history."""
    state = BrokerState(BrokerPolicy(), epoch="e" * 32)
    for gpu in range(workers):
        state.register(b"w%d" % gpu, registration(f"w{gpu}", gpu), now=10.0)
        state.heartbeat(b"w%d" % gpu, Heartbeat(WorkerStatus("ready", 2, 1, 5, 40 + gpu, 10, 1, 0.0, 0.0, 8,
                                                            stopped_batches=gpu, sum_stopped_ms=25.0 * gpu)), now=11.0)
    state.counters.requests_received, state.counters.requests_completed = 60, 50
    state.counters.rejected_overloaded, state.counters.requeued = 3, 2
    return build_stats(state, now=12.5, extra_broker_counters={"malformed_worker_messages": 4})


async def test_cluster_metrics_have_prometheus_names_types_and_per_gpu_labels(client, broker):
    broker.stats_document = real_stats(workers=2)
    families = await scrape(client)

    expected_types = {
        "imagegen_broker_up": "gauge", "imagegen_workers": "gauge", "imagegen_queue_depth": "gauge",
        "imagegen_broker_queue_depth": "gauge", "imagegen_worker_queue_depth": "gauge",
        "imagegen_worker_up": "gauge", "imagegen_worker_last_seen_age_seconds": "gauge",
        "imagegen_broker_requests": "counter", "imagegen_broker_requeued": "counter",
        "imagegen_broker_malformed_messages": "counter", "imagegen_batches": "counter",
        "imagegen_worker_batches": "counter",
        "imagegen_queue_wait_seconds": "histogram", "imagegen_batch_generation_seconds": "histogram",
        "imagegen_batch_size": "histogram", "imagegen_gateway_http_requests": "counter",
        "imagegen_gateway_http_request_duration_seconds": "histogram", "imagegen_gateway_requests_waiting": "gauge",
    }
    assert {name: families[name].type for name in expected_types if name in families} == expected_types
    for family in families.values():  # conventions: counters end in _total; no name reused
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family

    assert value(families, "imagegen_broker_up") == 1
    assert value(families, "imagegen_workers") == 2
    assert value(families, "imagegen_broker_requests_total", outcome="completed") == 50
    assert value(families, "imagegen_broker_requests_total", outcome="rejected_overloaded") == 3
    assert value(families, "imagegen_broker_requests_received_total") == 60
    assert value(families, "imagegen_broker_requeued_total") == 2
    assert value(families, "imagegen_broker_malformed_messages_total", link="worker") == 4
    assert value(families, "imagegen_broker_malformed_messages_total", link="client") == 0
    for gpu in (0, 1):
        labels = {"gpu_id": str(gpu), "host": "host-a", "worker": f"w{gpu}"}
        assert value(families, "imagegen_worker_up", **labels) == 1
        assert value(families, "imagegen_worker_accepting", **labels) == 1
        assert value(families, "imagegen_worker_batched_requests_total", **labels) == 40 + gpu
        assert value(families, "imagegen_worker_last_seen_age_seconds", **labels) == pytest.approx(1.5)
        assert value(families, "imagegen_worker_max_batch_size", **labels) == 8
        assert value(families, "imagegen_worker_stopped_batches_total", **labels) == gpu
        assert value(families, "imagegen_worker_stopped_batch_seconds_total", **labels) == pytest.approx(0.025 * gpu)


async def test_worker_compile_metrics_show_sizes_state_and_eager_and_unlisted_counts(client, broker):
    """Each worker's listed and warm sizes (counts), compile state and UNLISTED_SIZE rule (one series
    per value, 1 for its own), and its eager batches and unlisted-size requests by outcome."""
    state = BrokerState(BrokerPolicy(), epoch="e" * 32)
    sizes = (ImageSize(512, 512), ImageSize(768, 768), ImageSize(1024, 1024))
    state.register(b"w0", replace(registration("w0", 0), sizes=sizes, warm_sizes=sizes[:1], unlisted_size="refuse"),
                   now=10.0)
    state.register(b"w1", registration("w1", 1), now=10.0)  # lists no sizes: torch.compile off
    state.heartbeat(b"w0", Heartbeat(WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0, 8, compile_state="warming",
                                                  warm_sizes=sizes[:2], eager_batches=4, eager_images=9,
                                                  unlisted_refused=3, unlisted_snapped=0)), now=11.0)
    broker.stats_document = build_stats(state, now=12.0)
    families = await scrape(client)
    w0 = {"gpu_id": "0", "host": "host-a", "worker": "w0"}
    w1 = {"gpu_id": "1", "host": "host-a", "worker": "w1"}
    assert {name: families[name].type for name in (
        "imagegen_worker_sizes", "imagegen_worker_warm_sizes", "imagegen_worker_compile_state",
        "imagegen_worker_unlisted_size_rule", "imagegen_worker_eager_batches", "imagegen_worker_eager_images",
        "imagegen_worker_unlisted_sizes")} == {
        "imagegen_worker_sizes": "gauge", "imagegen_worker_warm_sizes": "gauge",
        "imagegen_worker_compile_state": "gauge", "imagegen_worker_unlisted_size_rule": "gauge",
        "imagegen_worker_eager_batches": "counter", "imagegen_worker_eager_images": "counter",
        "imagegen_worker_unlisted_sizes": "counter"}
    for labels, listed, warm in ((w0, 3, 2), (w1, 0, 0)):
        assert value(families, "imagegen_worker_sizes", **labels) == listed
        assert value(families, "imagegen_worker_warm_sizes", **labels) == warm
    states = {state: value(families, "imagegen_worker_compile_state", state=state, **w0)
              for state in ("off", "warming", "warm")}
    assert states == {"off": 0, "warming": 1, "warm": 0}
    assert value(families, "imagegen_worker_compile_state", state="off", **w1) == 1
    assert value(families, "imagegen_worker_unlisted_size_rule", rule="refuse", **w0) == 1
    assert value(families, "imagegen_worker_unlisted_size_rule", rule="eager", **w0) == 0
    assert value(families, "imagegen_worker_unlisted_size_rule", rule="eager", **w1) == 1
    assert value(families, "imagegen_worker_eager_batches_total", **w0) == 4
    assert value(families, "imagegen_worker_eager_images_total", **w0) == 9
    assert value(families, "imagegen_worker_unlisted_sizes_total", outcome="refused", **w0) == 3
    assert value(families, "imagegen_worker_unlisted_sizes_total", outcome="snapped", **w0) == 0
    assert value(families, "imagegen_worker_eager_batches_total", **w1) == 0


async def test_a_single_worker_keeps_its_labels(client, broker):
    """With one worker, /stats has the seed's single-GPU shape; its ``worker`` entry feeds the labels."""
    broker.stats_document = real_stats(workers=1)
    assert "per_gpu_stats" not in broker.stats_document
    families = await scrape(client)
    assert value(families, "imagegen_worker_up", gpu_id="0", host="host-a", worker="w0") == 1
    assert value(families, "imagegen_worker_running", worker="w0") == 1


async def test_no_worker_means_no_worker_series(client, broker):
    broker.stats_document = real_stats(workers=0)
    families = await scrape(client)
    assert value(families, "imagegen_workers") == 0
    assert families["imagegen_worker_up"].samples == []


async def test_a_silent_broker_gives_broker_up_0_and_the_gateway_metrics_still(client, broker):
    broker.stats_document = None
    families = await scrape(client)
    assert value(families, "imagegen_broker_up") == 0
    assert "imagegen_workers" not in families and "imagegen_broker_requests" not in families
    assert "imagegen_gateway_http_requests" in families


# --------------------------------------------------------------------------- what results say


async def test_histograms_move_and_each_batch_is_counted_once(client, broker):
    batch = dict(worker_name="w1", host="host-b", gpu_id=1, batch_size=2, generation_ms=800.0)
    broker.results = [
        dict(batch, batch_id="w1:7", queue_wait_ms=100.0),
        dict(batch, batch_id="w1:7", queue_wait_ms=300.0),  # the same batch: its second request
        dict(batch, batch_id="w1:8", batch_size=1, generation_ms=500.0, queue_wait_ms=20.0),
    ]
    for seed in range(3):
        assert (await client.post("/generate", json=generate_body(seed))).status == 200
    families = await scrape(client)
    labels = {"gpu_id": "1", "host": "host-b", "worker": "w1"}

    # Queue wait: per request.
    assert value(families, "imagegen_queue_wait_seconds_count", **labels) == 3
    assert value(families, "imagegen_queue_wait_seconds_sum", **labels) == pytest.approx(0.42)
    assert value(families, "imagegen_queue_wait_seconds_bucket", le="0.25", **labels) == 2
    # Batch size and generation time: per batch, though batch w1:7 answered two requests.
    assert value(families, "imagegen_batch_size_count", **labels) == 2
    assert value(families, "imagegen_batch_size_sum", **labels) == 3
    assert value(families, "imagegen_batch_size_bucket", le="1.0", **labels) == 1
    assert value(families, "imagegen_batch_generation_seconds_count", **labels) == 2
    assert value(families, "imagegen_batch_generation_seconds_sum", **labels) == pytest.approx(1.3)


def test_recent_keys_forget_the_oldest_beyond_their_size():
    seen = RecentKeys(size=2)
    assert [seen.first_sight(k) for k in ("a", "a", "b", "c", "b")] == [True, False, True, True, False]
    assert seen.first_sight("a")  # forgotten: "b" and "c" came after it


def test_a_restarted_worker_reusing_a_batch_id_is_counted_again():
    """Batch ids restart at 1 with the worker process; the generation time tells the batches apart."""
    metrics = GatewayMetrics()
    for generation_ms in (100.0, 100.0, 250.0):
        metrics.observe_result(Result("r", "w0", "h", 0, "w0:1", 2, 1.0, generation_ms, 64, 64, 1))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition(None).decode())}
    assert value(families, "imagegen_batch_size_count", worker="w0") == 2


# --------------------------------------------------------------------------- HTTP traffic


async def test_http_requests_are_counted_by_route_status_and_outcome(client, broker):
    assert (await client.post("/generate", json=generate_body())).status == 200
    assert (await client.post("/generate", json={"prompt": ""})).status == 400
    broker.failure = BrokerFailure("overloaded", "queue full")
    assert (await client.post("/generate", json=generate_body())).status == 503
    assert (await client.get("/no/such/path/12345")).status == 404
    assert (await client.request("PROPFIND", "/generate")).status == 405  # a method outside METHODS
    families = await scrape(client)

    def count(**labels: str) -> float:
        return value(families, "imagegen_gateway_http_requests_total", **labels)

    assert count(route="/generate", method="POST", status="200", outcome="ok") == 1
    assert count(route="/generate", method="POST", status="400", outcome="invalid_request") == 1
    assert count(route="/generate", method="POST", status="503", outcome="overloaded") == 1
    assert count(route="unmatched", status="404") == 1  # the path itself never becomes a label
    assert count(route="unmatched", method="other", status="405") == 1  # method labels stay bounded
    assert value(families, "imagegen_gateway_http_request_duration_seconds_count", route="/generate") == 3


async def test_requests_waiting_counts_generates_in_flight(client, broker):
    broker.hold = asyncio.Event()
    pending = asyncio.create_task(client.post("/generate", json=generate_body()))
    for _ in range(200):
        if broker.request_ids:
            break
        await asyncio.sleep(0.01)
    assert value(await scrape(client), "imagegen_gateway_requests_waiting") == 1
    broker.hold.set()
    assert (await pending).status == 200
    assert value(await scrape(client), "imagegen_gateway_requests_waiting") == 0


async def test_each_app_has_its_own_registry(tmp_path, broker):
    """Two gateways in one process (tests do this) count apart; the global registry stays clean."""
    from prometheus_client import REGISTRY

    clients = []
    for name in ("a", "b"):
        app = create_app(GatewaySettings(image_dir=str(tmp_path / name)), broker)
        clients.append(TestClient(TestServer(app)))
        await clients[-1].start_server()
    try:
        assert (await clients[0].post("/generate", json=generate_body())).status == 200
        first, second = await scrape(clients[0]), await scrape(clients[1])
        assert value(first, "imagegen_gateway_http_requests_total", route="/generate") == 1
        assert not [s for s in second["imagegen_gateway_http_requests"].samples if s.labels.get("route") == "/generate"]
        assert REGISTRY.get_sample_value("imagegen_gateway_http_requests_total",
                                         {"route": "/generate", "method": "POST", "status": "200",
                                          "outcome": "ok"}) is None
    finally:
        for c in clients:
            await c.close()
