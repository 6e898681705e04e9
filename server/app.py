"""The chronorec gRPC server (grpc.aio): wiring, health, reflection, lifecycle and the `chronorec-server` command."""

from __future__ import annotations

import os

# One BLAS thread: the ranking's small matrix-vector products are ~100x slower when OpenBLAS
# spreads them over busy cores, and the compute pool already runs requests in parallel.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio
import json
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chronorec.server.config import ServerConfig, config_from_args
from chronorec.server.core.demo import ensure_demo
from chronorec.server.core.encoder import EncoderSettings, check_onnxruntime_install
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.stores import open_store, run_once
from chronorec.server.metrics import ServerMetrics, start_metrics_server
from chronorec.server.security import (
    AuthInterceptor,
    SecurityConfigError,
    TokenTable,
    check_bind_policy,
    check_dashboard_bind_policy,
    is_loopback,
    server_credentials,
)
from chronorec.server.service.catalog import CatalogServicer
from chronorec.server.service.encoder import EncoderServicer
from chronorec.server.service.executors import Executors
from chronorec.server.service.interceptors import AdmissionInterceptor, MalformedRequestInterceptor
from chronorec.server.service.models import ModelServicer
from chronorec.server.service.recommender import RecommenderServicer
from chronorec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

log = logging.getLogger("chronorec.server")

SERVICE_NAMES = [
    encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,
    recommender_pb2.DESCRIPTOR.services_by_name["RecommenderService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
]


class JsonFormatter(logging.Formatter):
    """One JSON object per log line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed, else asyncio's.

    Every call crosses the loop several times (gRPC's completion queue, the hop to the compute
    pool and back); uvloop's loop cut the server's CPU per trivial call by ~100 µs of ~500 µs.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class EventLoopThread:
    """An asyncio event loop running in its own thread, so serve() keeps a synchronous API."""

    def __init__(self, name: str = "grpc-aio"):
        self.loop = _new_event_loop()
        self.loop.set_exception_handler(self._log_exception)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @staticmethod
    def _log_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        log.error("event loop: %s", context.get("message"), exc_info=context.get("exception"))

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class RunningServer:
    """A started server: the gRPC server on its event loop, its bound port, the engine, health and metrics."""

    server: grpc.aio.Server
    port: int
    engine: ChronorecEngine
    health: health.aio.HealthServicer
    loader: threading.Thread
    events: EventLoopThread
    executors: Executors
    admission: AdmissionInterceptor
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None
    _metrics_http: object | None = None
    # The web dashboard (server/dashboard) when --dashboard-port is given: its port and URL.
    dashboard: object | None = None
    _stopped: bool = field(default=False, repr=False)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.engine.ready.wait(timeout)

    def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING (from any thread)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.events.run(_set_health(self.health, status))

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, give open calls `grace` seconds, then release threads, engine and store."""
        if self._stopped:
            return
        self._stopped = True

        async def shutdown() -> None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)

        if self.dashboard is not None:
            self.dashboard.stop()
        self.events.run(shutdown())
        self.events.close()
        self.executors.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.engine.close()
        self.engine.store.close()


async def _set_health(servicer: health.aio.HealthServicer, status) -> None:
    for name in SERVICE_NAMES + [health.OVERALL_HEALTH]:
        await servicer.set(name, status)


def build_engine(config: ServerConfig, on_batch: Callable[[int], None] | None = None) -> ChronorecEngine:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.database)
    try:
        if config.demo:
            # Replicas starting together over one PostgreSQL load it once: the first takes the
            # lock and loads, the others then find items and skip it.
            with run_once(store, "demo-catalog"):
                if ensure_demo(store):
                    log.info("loaded the demo catalog into the empty event store %s", store.location)
    except BaseException:
        store.close()
        raise
    repository = ModelRepository(config.models).ensure()
    settings = EncoderSettings(
        max_batch=config.encoder_max_batch,
        max_wait_ms=config.encoder_max_wait_ms,
        max_queue=config.encoder_max_queue,
        intra_op_threads=config.intra_op_threads,
        prefer_int8=config.prefer_int8,
        on_batch=on_batch,
        vector_cache=config.vector_cache,
        vector_cache_dir=config.vector_cache_dir,
    )
    return ChronorecEngine(
        store,
        repository,
        settings,
        cooccurrence_refresh_s=config.cooccurrence_refresh_s,
        watch_interval_s=config.watch_interval_s,
        online_metrics_window_s=config.online_metrics_window_s,
        served_log_capacity=config.recommendations_remembered,
        replica_name=config.replica_name or "",
    )


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC core settings: message sizes, keepalive and connection lifetimes."""
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # HTTP/2's own bound on streams per connection, above the admission bound (which leaves
        # health calls out): streams past it wait in the client and cost the server nothing.
        ("grpc.max_concurrent_streams", 2 * limits.max_streams_per_connection),
        # The server pings each connection after keepalive_time without traffic and closes it
        # when no answer comes within keepalive_timeout: a peer that vanished (power loss, NAT
        # drop) frees its calls and counts instead of holding them forever. Pings continue while
        # calls are open but silent (an idle Health/Watch, an idle stream) ...
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # ... and clients' own keepalive pings are accepted down to one every 10 s (gRPC's
        # default answers anything more frequent than 5 min with GOAWAY "too_many_pings").
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if config.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", _ms(config.max_connection_idle_s)))
    if config.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_s)))
    return options


async def _start_grpc(
    config: ServerConfig,
    engine: ChronorecEngine,
    executors: Executors,
    admission: AdmissionInterceptor,
    metrics: ServerMetrics,
    tokens: TokenTable | None,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The asyncio gRPC server with its interceptors, servicers, health and reflection, started."""
    # Outermost first. Metrics sees every call, refused ones included, with its status.
    # Authentication answers at the headers, so a caller without a token holds nothing.
    # Admission bounds what the remaining calls may hold; the malformed-request check sits
    # next to the servicers, which it shields from bytes that are not their message.
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.interceptor()]
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens))
    interceptors += [admission, MalformedRequestInterceptor()]
    # No maximum_concurrent_rpcs: gRPC's own bound answers "Concurrent RPC limit exceeded!"
    # without pushback and counts idle calls; admission bounds calls by what they hold instead.
    server = grpc.aio.server(interceptors=interceptors, options=channel_options(config))
    limits = config.limits
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(engine, limits, executors), server)
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(engine, limits, executors), server)
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(engine, limits, executors), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(engine, executors), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        hint = " (or the TLS key does not match the certificate)" if credentials else ""
        raise RuntimeError(f"could not bind {address}: the address is in use or not local{hint}")
    await server.start()
    return server, port, health_servicer


def _start_dashboard(config: ServerConfig, engine: ChronorecEngine, executors: Executors, tokens: TokenTable | None):
    """The web dashboard on its own event loop thread, sharing the engine, pools and tokens."""
    try:
        from chronorec.server.dashboard.web import DashboardSettings, start_dashboard
    except ImportError as exc:
        raise RuntimeError(f"--dashboard-port needs the dashboard extra (pip install 'chronorec[dashboard]'): {exc}") from None
    settings = DashboardSettings(
        host=config.dashboard_host or config.host,
        port=config.dashboard_port,
        reports=config.dashboard_reports,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        tls_client_ca=config.tls_client_ca,
        limits=config.limits,
    )
    dashboard = start_dashboard(engine, executors, tokens, settings, EventLoopThread("dashboard"))
    log.info("dashboard on %s", dashboard.url)
    return dashboard


def serve(config: ServerConfig, *, engine: ChronorecEngine | None = None) -> RunningServer:
    """Start the gRPC server (health NOT_SERVING) and load the engine in the background.

    The server runs on an asyncio event loop in a thread of its own: an open call, idle or
    waiting, costs no thread, and the engine's blocking work runs on bounded pools.
    Security settings are checked before anything is bound or loaded: a bad tokens file, a
    missing certificate or an unauthenticated public address raise SecurityConfigError.
    """
    check_onnxruntime_install()
    tokens = TokenTable(config.tokens_file, config.inline_tokens) if (config.tokens_file or config.inline_tokens) else None
    if tokens is not None and not len(tokens):
        raise SecurityConfigError("the tokens file and CHRONOREC_TOKENS hold no token; every call would be refused")
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    mutual_tls = config.tls_client_ca is not None
    check_bind_policy(config.host, authenticated=tokens is not None or mutual_tls, allow_insecure_public=config.allow_insecure_public)
    if config.dashboard_port is not None:
        check_dashboard_bind_policy(config.dashboard_host or config.host, tokens)
    if tokens is not None and credentials is None and not is_loopback(config.host):
        log.warning("bearer tokens travel in plaintext to %s: add --tls-cert/--tls-key or terminate TLS in front", config.host)

    limits = config.limits
    metrics = ServerMetrics()
    owns_engine = engine is None
    engine = engine or build_engine(config, on_batch=metrics.observe_batch)
    executors = Executors.create(config.workers, config.store_workers, limits.max_queued_work, limits.flag("max_queued_work"))
    admission = AdmissionInterceptor(limits, config.stream_idle_timeout_s)
    events = EventLoopThread()
    try:
        metrics.attach_engine(engine)
        metrics.attach_admission(admission)
        server, port, health_servicer = events.run(
            _start_grpc(config, engine, executors, admission, metrics, tokens, credentials)
        )
        metrics_http = metrics_port = dashboard = None
        try:
            if config.metrics_port is not None:
                metrics_http, metrics_port = start_metrics_server(metrics, config.metrics_host or config.host, config.metrics_port)
            if config.dashboard_port is not None:
                dashboard = _start_dashboard(config, engine, executors, tokens)
        except BaseException:
            if metrics_http is not None:
                metrics_http.shutdown()
                metrics_http.server_close()
            events.run(server.stop(None))
            raise
    except BaseException:
        events.close()
        executors.shutdown()
        if owns_engine:  # nothing was started: release the database it opened
            engine.close()
            engine.store.close()
        raise
    log.info(
        "listening on %s:%d, %s, %s (health NOT_SERVING until the model and index are loaded)",
        config.host,
        port,
        ("mutual TLS" if mutual_tls else "TLS") if credentials else "plaintext",
        f"bearer tokens {tokens.counts()}" if tokens is not None else "no bearer tokens",
    )
    if metrics_port is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics", config.metrics_host or config.host, metrics_port)

    running: RunningServer | None = None

    def load() -> None:
        try:
            engine.start()
        except Exception:
            log.exception("the engine failed to start; health stays NOT_SERVING")
            return
        if not engine.ready.is_set() or running is None or running._stopped:
            return  # stopped before a model version appeared
        try:
            running.set_serving(True)
        except RuntimeError:
            return  # the server stopped meanwhile; its loop is gone
        log.info("SERVING model %s", engine.serving_version())

    if not engine.replica_name:
        # Known only now that the port is bound (--port 0 picks one).
        engine.replica_name = f"{socket.gethostname()}:{port}"
    loader = threading.Thread(target=load, name="engine-loader", daemon=True)
    running = RunningServer(
        server, port, engine, health_servicer, loader, events, executors, admission, metrics, metrics_port, metrics_http,
        dashboard,
    )
    loader.start()
    return running


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_json)
    log.info("configuration %s", json.dumps(config.redacted(), default=str))
    try:
        running = serve(config)
    except Exception as exc:
        log.error("server failed to start: %s", exc)
        return 1
    received: list[int] = []

    def on_signal(signum, _frame):
        # Only an append, no lock: a handler runs wherever the main thread happens to be, even
        # inside another handler (Ctrl-C's SIGINT and a supervisor's SIGTERM together), and the
        # lock inside Event.set() then deadlocked the second one against the first.
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A short sleep, not an untimed wait: Python runs handlers only in the main thread, and the
    # kernel may deliver the signal to one of gRPC's threads, which leaves a blocked main thread asleep.
    while not received:
        time.sleep(0.2)
    log.info("signal %d: stopping with %.0f s grace for in-flight calls", received[0], config.grace_s)
    running.stop(config.grace_s)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
