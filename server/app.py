"""The chronorec gRPC server: wiring, health, reflection, lifecycle and the `chronorec-server` command."""

from __future__ import annotations

import os

# One BLAS thread: the ranking's small matrix-vector products are ~100x slower when OpenBLAS
# spreads them over busy cores, and gRPC already runs requests in parallel.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chronorec.server.config import ServerConfig, config_from_args
from chronorec.server.core.demo import ensure_demo
from chronorec.server.core.encoder import EncoderSettings, check_onnxruntime_install
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.store import EventStore
from chronorec.server.metrics import ServerMetrics, start_metrics_server
from chronorec.server.security import (
    AuthInterceptor,
    SecurityConfigError,
    TokenTable,
    check_bind_policy,
    is_loopback,
    server_credentials,
)
from chronorec.server.service.catalog import CatalogServicer
from chronorec.server.service.encoder import EncoderServicer
from chronorec.server.service.errors import MalformedRequestInterceptor
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


@dataclass
class RunningServer:
    """A started server: the gRPC server, its bound port, the engine, health and metrics."""

    server: grpc.Server
    port: int
    engine: ChronorecEngine
    health: health.HealthServicer
    loader: threading.Thread
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None
    _metrics_http: object | None = None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.engine.ready.wait(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        for name in SERVICE_NAMES + [""]:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.engine.close()
        self.engine.store.close()


def build_engine(config: ServerConfig, on_batch: Callable[[int], None] | None = None) -> ChronorecEngine:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = EventStore(config.database)
    if config.demo and ensure_demo(store):
        log.info("loaded the demo catalog into the empty database %s", config.database)
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
    )


def _grpc_server(
    config: ServerConfig,
    engine: ChronorecEngine,
    metrics: ServerMetrics,
    tokens: TokenTable | None,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """The gRPC server with its interceptors, servicers, health and reflection, bound but not started."""
    # Metrics outermost, so calls refused by authentication are counted with their status.
    interceptors: list[grpc.ServerInterceptor] = [metrics.interceptor()]
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens))
    # Innermost: authentication answers first, even to undecodable bytes.
    interceptors.append(MalformedRequestInterceptor())
    limits = config.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
        ],
        # Calls past this bound are answered RESOURCE_EXHAUSTED by gRPC's poller thread at once,
        # never queued behind running work.
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(engine, limits), server)
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(engine, limits), server)
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(engine, limits), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(engine), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICE_NAMES + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        hint = " (or the TLS key does not match the certificate)" if credentials else ""
        raise RuntimeError(f"could not bind {address}: the address is in use or not local{hint}")
    return server, port, health_servicer


def serve(config: ServerConfig, *, engine: ChronorecEngine | None = None) -> RunningServer:
    """Start the gRPC server (health NOT_SERVING) and load the engine in the background.

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
    if tokens is not None and credentials is None and not is_loopback(config.host):
        log.warning("bearer tokens travel in plaintext to %s: add --tls-cert/--tls-key or terminate TLS in front", config.host)

    metrics = ServerMetrics()
    owns_engine = engine is None
    engine = engine or build_engine(config, on_batch=metrics.observe_batch)
    try:
        metrics.attach_engine(engine)
        server, port, health_servicer = _grpc_server(config, engine, metrics, tokens, credentials)
        metrics_http = metrics_port = None
        if config.metrics_port is not None:
            metrics_http, metrics_port = start_metrics_server(metrics, config.metrics_host or config.host, config.metrics_port)
    except BaseException:
        if owns_engine:  # nothing was started: release the database it opened
            engine.close()
            engine.store.close()
        raise
    server.start()
    log.info(
        "listening on %s:%d, %s, %s (health NOT_SERVING until the model and index are loaded)",
        config.host,
        port,
        ("mutual TLS" if mutual_tls else "TLS") if credentials else "plaintext",
        f"bearer tokens {tokens.counts()}" if tokens is not None else "no bearer tokens",
    )
    if metrics_port is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics", config.metrics_host or config.host, metrics_port)

    def load() -> None:
        try:
            engine.start()
        except Exception:
            log.exception("the engine failed to start; health stays NOT_SERVING")
            return
        if not engine.ready.is_set():
            return  # stopped before a model version appeared
        for name in SERVICE_NAMES + [""]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING model %s", engine.serving_version())

    loader = threading.Thread(target=load, name="engine-loader", daemon=True)
    loader.start()
    return RunningServer(server, port, engine, health_servicer, loader, metrics, metrics_port, metrics_http)


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_json)
    log.info("configuration %s", json.dumps(config.redacted(), default=str))
    try:
        running = serve(config)
    except Exception as exc:
        log.error("server failed to start: %s", exc)
        return 1
    stopped = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping with %.0f s grace for in-flight calls", signum, config.grace_s)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    running.stop(config.grace_s)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
