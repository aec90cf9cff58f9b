"""Prometheus metrics served by the gateway at ``GET /metrics`` (docs/metrics.md lists every one).

Three sources, one exposition:

* the gateway's own HTTP traffic, counted by :func:`metrics_middleware`: requests by route,
  method, status and outcome, and their latency;
* the results the gateway receives: each carries the worker, the batch's id and size, the
  request's queue wait and the batch's generation time. Queue wait is observed per request;
  batch size and generation time once per *batch*, the first time a result of that batch arrives
  (a bounded set of recent batch ids remembers which were seen);
* the cluster's state, from the broker's stats document (the one behind ``/stats``), fetched when
  ``/metrics`` is scraped and turned into metric families by :class:`ClusterCollector`: queue
  depths, worker liveness, the broker's counters.

Each app owns its :class:`GatewayMetrics` and its own CollectorRegistry (never the process-wide
default), so several apps in one process (tests) keep separate counts.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Hashable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegen.protocol import PRIORITIES, SIZE_STATES, UNLISTED_SIZE_RULES, Result

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format
WORKER_LABELS = ("gpu_id", "host", "worker")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
RECENT_BATCHES = 10_000  # batch ids remembered to count each batch once (a few minutes of batches)

# Buckets in seconds: from a lone tiny-model request (~10 ms) to REQUEST_TIMEOUT_S's default (600 s).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                     120.0, 300.0, 600.0)
GENERATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

# What a response's error code was, set by gateway.app.error_response; the outcome label reads it.
# Typed response storage appeared in aiohttp 3.14; older releases take a plain string key.
OUTCOME = web.ResponseKey("outcome", str) if hasattr(web, "ResponseKey") else "imagegen_outcome"


class RecentKeys:
    """The last ``size`` keys seen, oldest forgotten first: says whether a key is new."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def first_sight(self, key: Hashable) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self, recent_batches: int = RECENT_BATCHES, owners: frozenset[str] = frozenset()) -> None:
        # The names of the configured API keys (gateway/key_policies.py key_name): the owner label's
        # values, so that label stays bounded whatever the broker's stats hold.
        self.owners = owners
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "imagegen_gateway_http_requests_total", "HTTP requests answered, by route, method, status and outcome "
            "(ok, or the JSON error code)", ("route", "method", "status", "outcome"), registry=r)
        self.http_duration = Histogram(
            "imagegen_gateway_http_request_duration_seconds", "Time from receiving an HTTP request to answering it",
            ("route",), buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests_waiting = Gauge(
            "imagegen_gateway_requests_waiting", "Generate requests waiting for the broker's answer", registry=r)
        self.queue_wait = Histogram(
            "imagegen_queue_wait_seconds", "Per request: time from the broker receiving it to its batch starting",
            WORKER_LABELS, buckets=LATENCY_BUCKETS_S, registry=r)
        self.generation = Histogram(
            "imagegen_batch_generation_seconds", "Per batch: inference time of the whole batch",
            WORKER_LABELS, buckets=GENERATION_BUCKETS_S, registry=r)
        self.batch_size = Histogram(
            "imagegen_batch_size", "Per batch: requests in the batch", WORKER_LABELS,
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.connections_refused = Counter(
            "imagegen_gateway_connections_refused_total",
            "Connections answered 503 too_many_connections and closed (GATEWAY_MAX_CONNECTIONS open already)",
            registry=r)
        self._batches = RecentKeys(recent_batches)

    def observe_http(self, route: str, method: str, status: int, outcome: str, duration_s: float) -> None:
        method = method if method in METHODS else "other"  # any token is a method: keep the label bounded
        self.http_requests.labels(route, method, str(status), outcome).inc()
        self.http_duration.labels(route).observe(duration_s)

    def observe_result(self, result: Result) -> None:
        """One image arrived: its queue wait counts for the request, its batch counts once."""
        labels = (str(result.gpu_id), result.host, result.worker_name)
        self.queue_wait.labels(*labels).observe(result.queue_wait_ms / 1000.0)
        # A worker's batch ids restart at 1 when its process restarts; every result of one batch
        # carries the same generation time, so the pair tells a new batch from a recent one.
        if self._batches.first_sight((result.batch_id, result.generation_ms)):
            self.batch_size.labels(*labels).observe(result.batch_size)
            self.generation.labels(*labels).observe(result.generation_ms / 1000.0)

    def exposition(self, stats: dict[str, Any] | None) -> bytes:
        """The text to serve: the gateway's metrics, then the cluster's from ``stats`` (None: no answer)."""
        return generate_latest(self.registry) + generate_latest(ClusterCollector(stats, self.owners))


def _route(request: web.Request) -> str:
    """The matched route's pattern ("/images/{name}"), so the label stays bounded; else "unmatched"."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _outcome(response: web.StreamResponse) -> str:
    code = response.get(OUTCOME)
    if code:
        return code
    if response.status < 400:
        return "ok"
    try:  # an error answered without gateway.app.error_response (the API-key check's 401)
        return HTTPStatus(response.status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def metrics_middleware(metrics: GatewayMetrics):
    """An aiohttp middleware that counts and times every request (place it outside json_errors)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        route, method = _route(request), request.method
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            metrics.observe_http(route, method, 499, "client_closed", time.perf_counter() - started)
            raise
        except web.HTTPException as exc:  # redirects and the like; json_errors turns errors into responses
            metrics.observe_http(route, method, exc.status, "ok" if exc.status < 400 else "error",
                                 time.perf_counter() - started)
            raise
        except Exception:
            metrics.observe_http(route, method, 500, "internal_error", time.perf_counter() - started)
            raise
        metrics.observe_http(route, method, response.status, _outcome(response), time.perf_counter() - started)
        return response

    return middleware


# ---------------------------------------------------------------------------------------------
# The cluster, from the broker's stats document


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value or 0))
    return family


def _counter(name: str, doc: str, value: float | None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], float(value or 0))
    return family


# Outcomes of requests the broker received; they do not overlap (requests_failed includes the
# deadline_expired ones; rejections and cancellations are counted apart), so their sum plus
# imagegen_broker_requests_in_progress is imagegen_broker_requests_received_total.
BROKER_OUTCOMES = {
    "completed": "requests_completed",
    "failed": "requests_failed",
    "rejected_overloaded": "rejected_overloaded",
    "rejected_too_costly": "rejected_too_costly",
    "rejected_behind_queue": "rejected_behind_queue",
    "rejected_draining": "rejected_draining",
    "rejected_model": "rejected_model",
    "cancelled": "cancelled",
}

# (metric name without _total, stats key in the broker section, help)
BROKER_COUNTERS = (
    ("imagegen_broker_requests_received", "requests_received", "Generate requests the broker received"),
    ("imagegen_broker_deadline_expired", "deadline_expired",
     "Requests that waited in the broker's queue past their deadline (also counted as failed)"),
    ("imagegen_broker_requeued", "requeued", "Requests handed back to the queue because their worker left or died"),
    ("imagegen_broker_duplicate_results", "duplicate_results",
     "Results or failures for requests already answered (dropped)"),
    ("imagegen_broker_worker_registrations", "workers_registered", "Worker registrations accepted"),
    ("imagegen_broker_worker_expirations", "workers_expired", "Workers declared dead after missing heartbeats"),
    ("imagegen_broker_registrations_refused", "registrations_refused",
     "Worker registrations refused (protocol version, or a CurveZMQ key not allowed that name)"),
    ("imagegen_broker_connections_refused_unknown_key", "connections_refused_unknown_key",
     "Worker connections refused in the CurveZMQ handshake (unknown key)"),
    ("imagegen_broker_internal_errors", "internal_errors", "Messages dropped because handling them raised (a bug)"),
    ("imagegen_broker_workers_stuck", "workers_stuck",
     "Workers removed because they held requests and reported no progress for WORKER_PROGRESS_TIMEOUT_S"),
    ("imagegen_broker_unregistered_worker_messages", "unregistered_worker_messages",
     "Worker-link messages from a connection that is not a registered worker (refused)"),
    ("imagegen_broker_wrong_key_worker_messages", "wrong_key_worker_messages",
     "Worker messages whose CurveZMQ key is not the one the worker registered with (the worker is removed)"),
    ("imagegen_broker_unassigned_answers", "unassigned_answers",
     "Results, failures or progress for a request the sending worker does not hold (dropped)"),
)

# (metric name, stats key in a per_gpu_stats entry, help)
WORKER_GAUGES = (
    ("imagegen_worker_queue_depth", "current_queue_depth",
     "Requests the worker holds that are not in its running batch"),
    ("imagegen_worker_in_flight", "in_flight", "Requests the broker has handed the worker and not seen answered"),
    ("imagegen_worker_running", "running", "Requests in the batch on the worker's GPU now"),
    ("imagegen_worker_max_batch_size", "max_batch_size",
     "The worker's largest batch now (lowered after out-of-memory)"),
    ("imagegen_worker_last_seen_age_seconds", "last_seen_s_ago",
     "Seconds since the broker last heard from the worker (heartbeat or result)"),
)
WORKER_COUNTERS = (
    ("imagegen_worker_batched_requests", "total_requests", "Requests the worker completed in batches"),
    ("imagegen_worker_batches", "total_batches", "Batches the worker ran"),
    ("imagegen_worker_failed_requests", "failed_requests", "Requests that failed in the worker's batches"),
    ("imagegen_worker_stopped_batches", "stopped_batches",
     "Batches stopped at a step boundary: a lone request's batch so that newer requests could join it, or a "
     "batch whose rows were no longer wanted (its wanted requests ran in a later batch)"),
    ("imagegen_worker_stopped_batch_seconds", "stopped_batch_seconds",
     "GPU seconds the stopped batches had run (thrown away)"),
    ("imagegen_worker_eager_batches", "eager_batches",
     "Batches that ran eager because their image size was not warm (torch.compile on)"),
    ("imagegen_worker_eager_images", "eager_images", "Images in the batches that ran eager"),
)
# (metric name, stats key holding a list of "WxH" sizes in a per_gpu_stats entry, help): gauges of their count
WORKER_SIZE_COUNTS = (
    ("imagegen_worker_sizes", "sizes", "Image sizes the worker serves compiled (SIZES; 0: torch.compile off)"),
    ("imagegen_worker_warm_sizes", "warm_sizes",
     "Image sizes that run compiled on the worker now without compiling at any batch size"),
)
# (metric name, label, stats key, the label's values, help): one series per value, 1 for the worker's own
WORKER_STATE_SETS = (
    ("imagegen_worker_compile_state", "state", "compile_state", SIZE_STATES,
     "1 for the worker's torch.compile state (off: every size runs eager; warming: some listed sizes are "
     "not warm yet; warm: all are), 0 for the others"),
    ("imagegen_worker_unlisted_size_rule", "rule", "unlisted_size", UNLISTED_SIZE_RULES,
     "1 for what the worker does with a size it does not list (UNLISTED_SIZE), 0 for the others"),
)
# outcome label -> stats key: requests of a size the worker does not list, refused or snapped to a listed one
UNLISTED_OUTCOMES = {"refused": "unlisted_refused", "snapped": "unlisted_snapped"}


class ClusterCollector(Collector):
    """The cluster's state as metric families, from one stats document (None: the broker did not answer)."""

    def __init__(self, stats: dict[str, Any] | None, owners: frozenset[str] = frozenset()) -> None:
        self.stats = stats
        self.owners = owners

    def collect(self) -> Iterator[Metric]:
        yield _gauge("imagegen_broker_up", "1 if the broker answered this scrape's stats query, else 0",
                     0 if self.stats is None else 1)
        if self.stats is None:
            return
        yield from _cluster_families(self.stats)
        yield from _broker_families(self.stats.get("broker", {}))
        yield from _worker_families(_workers(self.stats))
        yield from _model_families(self.stats.get("models") or {})
        yield from _priority_families(self.stats.get("priorities") or {})
        yield from _owner_families((self.stats.get("fair_share") or {}).get("owners") or {}, self.owners)


# (metric name, key in a priority's entry of the stats document's "priorities", help, counter?)
PRIORITY_FAMILIES = (
    ("imagegen_priority_requests", "requests", "Generate requests the broker accepted, by priority", True),
    ("imagegen_priority_dispatched", "dispatched",
     "Requests the broker handed to a worker for the first time, by priority", True),
    ("imagegen_priority_queue_wait_seconds", "queue_wait_seconds",
     "Seconds the dispatched requests waited in the broker's queue, summed, by priority (divide by "
     "imagegen_priority_dispatched_total for the mean)", True),
    ("imagegen_priority_queued", "queued", "Requests waiting in the broker's queue now, by priority", False),
)
# (metric name, key in an owner's entry of the stats document's fair_share.owners, help, counter?)
OWNER_FAMILIES = (
    ("imagegen_owner_gpu_seconds", "gpu_seconds",
     "GPU-seconds of the API key's finished requests (each image's part of its batch's generation time)", True),
    ("imagegen_owner_recent_gpu_seconds", "recent_gpu_seconds",
     "The key's GPU-seconds as the broker's fair share counts them: halved every FAIR_SHARE_HALF_LIFE_S", False),
    ("imagegen_owner_queued", "queued", "The key's requests waiting in the broker's queue now", False),
)


def _priority_families(priorities: dict[str, Any]) -> Iterator[Metric]:
    for name, key, doc, counter in PRIORITY_FAMILIES:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["priority"])
        for priority in PRIORITIES:
            family.add_metric([priority], float((priorities.get(priority) or {}).get(key) or 0))
        yield family


def _owner_families(owners: dict[str, Any], known: frozenset[str]) -> Iterator[Metric]:
    """One series per configured API key (``known``), 0 until the broker has charged it; owners the
    broker reports that are not this gateway's keys are left out (the label set stays bounded)."""
    if not known:
        return
    for name, key, doc, counter in OWNER_FAMILIES:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["owner"])
        for owner in sorted(known):
            family.add_metric([owner], float((owners.get(owner) or {}).get(key) or 0))
        yield family


def _cluster_families(stats: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge("imagegen_workers", "Workers registered with the broker now", stats.get("num_gpus"))
    yield _gauge("imagegen_queue_depth", "Requests accepted and not yet in a running batch (broker queue plus "
                 "every worker's)", stats.get("current_queue_depth"))
    yield _counter("imagegen_batches", "Batches run since the broker started (workers that left included)",
                   stats.get("total_batches"))
    yield _counter("imagegen_batched_requests", "Requests completed in batches since the broker started "
                   "(workers that left included)", stats.get("total_requests"))


def _broker_families(broker: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge("imagegen_broker_queue_depth", "Requests waiting in the broker for a worker",
                 broker.get("queue_depth"))
    yield _gauge("imagegen_broker_queue_limit", "Requests the broker queues at most (MAX_QUEUE_SIZE)",
                 broker.get("max_queue_size"))
    yield _gauge("imagegen_broker_requests_in_progress", "Requests the broker holds (queued or at a worker)",
                 broker.get("in_progress"))
    yield _gauge("imagegen_broker_draining", "1 while the broker drains for shutdown",
                 int(bool(broker.get("draining"))))
    outcomes = CounterMetricFamily("imagegen_broker_requests", "Requests the broker finished, by outcome",
                                   labels=["outcome"])
    for outcome, key in BROKER_OUTCOMES.items():
        outcomes.add_metric([outcome], float(broker.get(key, 0)))
    yield outcomes
    for name, key, doc in BROKER_COUNTERS:
        yield _counter(name, doc, broker.get(key))
    for kind, doc in (("malformed", "Messages dropped as malformed, by link"),
                      ("undeliverable", "Messages the broker could not send, by link")):
        family = CounterMetricFamily(f"imagegen_broker_{kind}_messages", doc, labels=["link"])
        for link in ("client", "worker"):
            family.add_metric([link], float(broker.get(f"{kind}_{link}_messages", 0)))
        yield family


# (metric name, key in a model's entry of the stats document's "models", help)
MODEL_GAUGES = (
    ("imagegen_model_workers", "workers", "Workers registered now that serve the model"),
    ("imagegen_model_accepting_workers", "accepting_workers", "Workers of the model that take new work now"),
    ("imagegen_model_broker_queue_depth", "broker_queue_depth",
     "Requests for the model waiting in the broker for one of its workers"),
    ("imagegen_model_queue_depth", "current_queue_depth",
     "Requests for the model accepted and not yet in a running batch (the broker's queue plus its workers')"),
)


def _model_families(models: dict[str, Any]) -> Iterator[Metric]:
    for name, key, doc in MODEL_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["model"])
        for model, entry in sorted(models.items()):
            family.add_metric([str(model)], float(entry.get(key) or 0))
        yield family


def _workers(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Each registered worker's entry: per_gpu_stats with two or more, the ``worker`` entry with one."""
    if "per_gpu_stats" in stats:
        return stats["per_gpu_stats"]
    return [stats["worker"]] if stats.get("worker") else []


def _worker_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    def labels(entry: dict[str, Any]) -> list[str]:
        return [str(entry.get("gpu_id")), str(entry.get("host")), str(entry.get("worker"))]

    up = GaugeMetricFamily("imagegen_worker_up", "1 for each worker registered with the broker (a worker "
                           "declared dead or gone has no series)", labels=WORKER_LABELS)
    accepting = GaugeMetricFamily("imagegen_worker_accepting", "1 if the worker takes new work, 0 while it "
                                  "drains", labels=WORKER_LABELS)
    for entry in workers:
        up.add_metric(labels(entry), 1.0)
        accepting.add_metric(labels(entry), 1.0 if entry.get("state") == "ready" else 0.0)
    yield up
    yield accepting
    for name, key, doc in WORKER_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=WORKER_LABELS)
        for entry in workers:
            family.add_metric(labels(entry), float(entry.get(key) or 0))
        yield family
    for name, key, doc in WORKER_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=WORKER_LABELS)
        for entry in workers:
            family.add_metric(labels(entry), float(entry.get(key) or 0))
        yield family
    for name, key, doc in WORKER_SIZE_COUNTS:
        family = GaugeMetricFamily(name, doc, labels=WORKER_LABELS)
        for entry in workers:
            family.add_metric(labels(entry), float(len(entry.get(key) or ())))
        yield family
    for name, label, key, values, doc in WORKER_STATE_SETS:
        family = GaugeMetricFamily(name, doc, labels=[*WORKER_LABELS, label])
        for entry in workers:
            for value in values:
                family.add_metric([*labels(entry), value], 1.0 if entry.get(key) == value else 0.0)
        yield family
    unlisted = CounterMetricFamily("imagegen_worker_unlisted_sizes", "Requests of an image size the worker "
                                   "does not list, by outcome: refused (size_not_served) or snapped to a listed "
                                   "size (UNLISTED_SIZE)", labels=[*WORKER_LABELS, "outcome"])
    for entry in workers:
        for outcome, key in UNLISTED_OUTCOMES.items():
            unlisted.add_metric([*labels(entry), outcome], float(entry.get(key) or 0))
    yield unlisted
