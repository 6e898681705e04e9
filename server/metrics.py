"""Prometheus metrics: per-RPC counts and latencies, encoder batches, and engine state read at scrape time."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from chronorec.server.core.replication import version_skew
from chronorec.server.service.interceptors import (
    AdmissionInterceptor,
    CallKind,
    HandlerCache,
    behavior_of,
    replace_behavior,
    run_behavior,
)

log = logging.getLogger("chronorec.metrics")

# Seconds; from a cached Encode (~1 ms) to a hot swap triggered by ActivateVersion(wait=True).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_RPC_LABELS = ("grpc_service", "grpc_method")


def split_method(method: str) -> tuple[str, str]:
    """("package.Service", "Method") of "/package.Service/Method"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class ServerMetrics:
    """The server's metrics in their own registry (several servers may share one process in tests).

    RPC metrics use the grpc-ecosystem names (grpc_server_started_total, grpc_server_handled_total,
    grpc_server_handling_seconds) so existing gRPC dashboards work.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.received = Counter(
            "chronorec_rpc_received",
            "Calls whose headers reached the server (a call refused by authentication or by a "
            "bound is counted here and in grpc_server_handled_total with its status)",
            _RPC_LABELS,
            registry=self.registry,
        )
        self.started = Counter("grpc_server_started", "Calls whose handler started", _RPC_LABELS, registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled",
            "Calls completed, by status code",
            _RPC_LABELS + ("grpc_code",),
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the handler's start to its status, by status code",
            _RPC_LABELS + ("grpc_code",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("chronorec_rpcs_in_flight", "Calls being handled now", registry=self.registry)
        self.encoder_batch = Histogram(
            "chronorec_encoder_batch_size",
            "Texts per ONNX Runtime batch formed by the micro-batcher",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe_batch(self, size: int) -> None:
        """The encoder micro-batcher's on_batch callback."""
        self.encoder_batch.observe(size)

    def attach_engine(self, engine) -> None:
        """Report the engine's state (model, index, queue, swaps, events) at each scrape."""
        self.registry.register(ServingStateCollector(engine))

    def attach_admission(self, admission: AdmissionInterceptor) -> None:
        """Report open calls and calls being worked on at each scrape."""
        self.registry.register(AdmissionCollector(admission))

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return MetricsInterceptor(self)


class _MethodMetrics:
    """One method's labelled children, looked up once: prometheus_client's labels() takes a lock
    and builds a key on every call otherwise (four times per call)."""

    def __init__(self, metrics: ServerMetrics, method: str):
        self.metrics = metrics
        self.labels = split_method(method)
        self.received = metrics.received.labels(*self.labels)
        self.started = metrics.started.labels(*self.labels)
        self._by_code: dict[grpc.StatusCode, tuple] = {}

    def finished(self, code: grpc.StatusCode, seconds: float) -> None:
        children = self._by_code.get(code)
        if children is None:
            # Created at a code's first call, so only codes that happened are exported.
            children = self._by_code[code] = (
                self.metrics.handled.labels(*self.labels, code.name),
                self.metrics.latency.labels(*self.labels, code.name),
            )
        children[0].inc()
        children[1].observe(seconds)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status code (outermost interceptor, so
    calls refused by authentication or by a bound are counted too)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        # By method: only methods with a handler get here, so the names are bounded.
        self._methods: dict[str, tuple[_MethodMetrics, HandlerCache]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown methods are not counted: their names would be unbounded labels
        method = handler_call_details.method
        entry = self._methods.get(method)
        if entry is None:
            counted = _MethodMetrics(self.metrics, method)
            entry = self._methods[method] = (counted, HandlerCache(lambda handler: self._observed(handler, counted)))
        entry[0].received.inc()
        return entry[1].get(handler)

    def _observed(self, handler: grpc.RpcMethodHandler, counted: _MethodMetrics) -> grpc.RpcMethodHandler:
        inner = behavior_of(handler)
        in_flight = self.metrics.in_flight

        async def observed(request, context):
            counted.started.inc()
            in_flight.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                result = await run_behavior(inner, request, context)
                code = _status_code(context.code()) or grpc.StatusCode.OK
                return result
            except grpc.aio.AbortError:
                code = _status_code(context.code()) or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                # The caller left (cancel or deadline) mid-call.
                remaining = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
                raise
            finally:
                counted.finished(code, time.perf_counter() - started)
                in_flight.dec()

        return replace_behavior(handler, observed)


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(code) -> grpc.StatusCode | None:
    """The aio context reports a status set by abort() as a StatusCode or its integer value."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return _CODES_BY_VALUE.get(int(code))


class AdmissionCollector(Collector):
    """Open calls by kind and calls being worked on, read from the admission interceptor at scrape time."""

    def __init__(self, admission: AdmissionInterceptor):
        self.admission = admission

    def collect(self) -> Iterator:
        open_calls = GaugeMetricFamily("chronorec_calls_open", "Calls open now (headers received, no status yet), by kind", labels=["kind"])
        # A copy: the event loop's thread updates the counter while a scrape reads it.
        by_kind = dict(self.admission.open_by_kind)
        for kind in CallKind:
            open_calls.add_metric([kind.name.lower()], float(by_kind.get(kind, 0)))
        yield open_calls
        working = GaugeMetricFamily("chronorec_calls_working", "Calls of the chronorec services being worked on (bounded by --max-concurrent-rpcs)")
        working.add_metric([], float(self.admission.working))
        yield working
        connections = GaugeMetricFamily("chronorec_connections_with_open_calls", "Client connections with at least one open call")
        connections.add_metric([], float(len(self.admission.open_by_connection)))
        yield connections


class ServingStateCollector(Collector):
    """Engine state read when Prometheus scrapes, so the core needs no metrics code."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self) -> Iterator:
        engine = self.engine
        status = engine.status()
        ready = GaugeMetricFamily("chronorec_ready", "1 once the model and the index are loaded")
        ready.add_metric([], 1.0 if engine.ready.is_set() else 0.0)
        yield ready
        events = GaugeMetricFamily("chronorec_feedback_events_stored", "Feedback events in the event log")
        events.add_metric([], float(engine.state.event_count))
        yield events
        items = GaugeMetricFamily("chronorec_catalog_items", "Live items in the catalog")
        items.add_metric([], float(len(engine.catalog)))
        yield items
        swaps = CounterMetricFamily("chronorec_model_swaps", "Model versions loaded (the first load included)")
        swaps.add_metric([], float(status.swap_count))
        yield swaps
        last_swap = GaugeMetricFamily("chronorec_model_last_swap_seconds", "Duration of the last successful swap")
        last_swap.add_metric([], float(status.last_swap_seconds or 0.0))
        yield last_swap
        swapping = GaugeMetricFamily("chronorec_model_swap_in_progress", "1 while a new version is being loaded")
        swapping.add_metric([], 1.0 if status.swap_in_progress else 0.0)
        yield swapping
        refused = GaugeMetricFamily(
            "chronorec_model_last_swap_failed", "1 when the last attempted version was refused (see GetStatus.last_error)"
        )
        refused.add_metric([], 1.0 if status.last_error else 0.0)
        yield refused
        yield from self._online(status)
        yield from _replication_families(engine, status)
        if not status.serving_version:
            return  # still loading: no serving model to describe
        version, index_size, queue_depth = status.serving_version, status.index_size, status.encoder_queue_depth
        info = GaugeMetricFamily("chronorec_model_info", "The serving model version (value is always 1)", labels=["version"])
        info.add_metric([version], 1.0)
        yield info
        index = GaugeMetricFamily("chronorec_index_size", "Items in the serving HNSW index")
        index.add_metric([], float(index_size))
        yield index
        queue = GaugeMetricFamily("chronorec_encoder_queue_depth", "Texts waiting for the encoder")
        queue.add_metric([], float(queue_depth))
        yield queue

    @staticmethod
    def _online(status) -> Iterator:
        """Online metrics per model version over the sliding window, the canary, and memory."""
        window = "over the sliding window (--online-metrics-window)"
        families = {
            "impressions": GaugeMetricFamily("chronorec_online_impressions", f"Impressions logged, {window}", labels=["version"]),
            "clicks": GaugeMetricFamily("chronorec_online_clicks", f"Clicks attributed, {window}", labels=["version"]),
            "ctr": GaugeMetricFamily("chronorec_online_ctr", f"Clicks / impressions, {window}", labels=["version"]),
            "conversions": GaugeMetricFamily(
                "chronorec_online_conversions", f"Likes and purchases attributed, {window}", labels=["version"]),
            "mrr": GaugeMetricFamily(
                "chronorec_online_mrr", f"Mean reciprocal rank of the clicked position, {window}", labels=["version"]),
        }
        for version, figures in sorted(status.online.items()):
            for name, family in families.items():
                family.add_metric([version], float(getattr(figures, name)))
        yield from families.values()
        unattributed = CounterMetricFamily(
            "chronorec_online_unattributed_feedback",
            "Feedback carrying a recommendation id that did not verify (unknown, made up, another user's)")
        unattributed.add_metric([], float(status.unattributed_feedback))
        yield unattributed
        canary = GaugeMetricFamily("chronorec_canary_percent", "Share of users the canary version serves", labels=["version"])
        if status.canary is not None:
            canary.add_metric([status.canary.plan.candidate], status.canary.plan.percent)
        yield canary
        memory = GaugeMetricFamily("chronorec_model_memory_bytes", "Estimated bytes a loaded model version holds "
                                   "(vectors, HNSW graph, encoder graph, caches)", labels=["version", "role"])
        for loaded in status.loaded_versions:
            memory.add_metric([loaded.version, loaded.role], float(loaded.memory_bytes))
        yield memory
        resident = GaugeMetricFamily("chronorec_resident_memory_bytes", "Resident memory of the server process")
        resident.add_metric([], float(status.resident_memory_bytes))
        yield resident


def _replication_families(engine, status) -> Iterator:
    """Replicas over a shared store: how far this one follows the log, and what every live one serves."""
    replicas = GaugeMetricFamily("chronorec_replicas", "Live replicas of the service by the version they serve "
                                 "(as of this replica's last heartbeat; this server alone over SQLite)",
                                 labels=["version"])
    by_version = collections.Counter(r.serving_version or "(loading)" for r in status.replicas)
    for version, count in sorted(by_version.items()):
        replicas.add_metric([version], float(count))
    yield replicas
    skew = GaugeMetricFamily("chronorec_replica_version_skew",
                             "Distinct versions served by live replicas, less one: 0 when they all serve one version")
    skew.add_metric([], float(version_skew(status.replicas)))
    yield skew
    follower = getattr(engine, "follower", None)
    if follower is None:
        return
    position = follower.status()
    applied = GaugeMetricFamily("chronorec_replication_applied_seq", "Changes of the shared log applied to this replica")
    applied.add_metric([], float(position.applied_seq))
    yield applied
    behind = GaugeMetricFamily("chronorec_replication_behind_changes",
                               "Changes committed (as far as this replica has heard) and not yet applied here")
    behind.add_metric([], float(position.known_seq - position.applied_seq))
    yield behind
    connected = GaugeMetricFamily("chronorec_replication_connected",
                                  "1 while this replica listens to the shared log; 0 while the store is unreachable")
    connected.add_metric([], 1.0 if position.connected else 0.0)
    yield connected
    reconnects = CounterMetricFamily("chronorec_replication_reconnects", "Times the log follower lost the store")
    reconnects.add_metric([], float(position.reconnects))
    yield reconnects


def start_metrics_server(metrics: ServerMetrics, host: str, port: int):
    """Serve /metrics over HTTP; returns (http server, bound port)."""
    httpd, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd, httpd.server_address[1]
