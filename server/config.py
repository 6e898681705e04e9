"""Server configuration: flags with environment fallbacks, parsed once in main() into one object."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from chronorec.server.core.stores import describe_store_target, store_target


@dataclass(frozen=True)
class Limits:
    """Request limits; each is enforced with a status whose message names it."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_texts_per_encode: int = 256
    max_text_chars: int = 20_000
    max_k: int = 1000
    max_feedback_batch: int = 5000
    max_history_events: int = 1000
    max_exclude_items: int = 10_000
    max_upsert_batch: int = 5000
    max_categories: int = 1000
    max_item_attributes: int = 64
    # Users one RecommendBatch may ask for.
    max_batch_users: int = 256
    # Calls being worked on at once: a unary call from its request to its answer, a stream while
    # one of its messages is handled. Health and reflection are not counted.
    max_concurrent_rpcs: int = 64
    # Calls open at once (from their headers to their status, idle or not). Per connection,
    # all but health calls count (HTTP/2's stream limit, twice this, bounds those); the totals
    # count each kind of call on its own, so no kind can take another's room.
    max_streams_per_connection: int = 100
    max_streams: int = 1000
    max_health_watches: int = 1000
    max_reflection_streams: int = 100
    # Work queued or running on each executor (compute, storage) before RESOURCE_EXHAUSTED.
    max_queued_work: int = 256

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, got {value!r}")

    def flag(self, name: str) -> str:
        """`--max-streams=1000`: how a message names the limit `name` and its value."""
        return f"{flag_name(name)}={getattr(self, name)}"


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (`max_streams` -> `--max-streams`)."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start; secrets are kept out of `redacted()`."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("var")
    # An SQLite file path, or a postgresql:// URL (replicas sharing one database follow its log).
    db_path: Path | str | None = None
    models_root: Path | None = None
    demo: bool = True
    workers: int = 16
    store_workers: int = 4
    encoder_max_batch: int = 64
    encoder_max_wait_ms: float = 2.0
    encoder_max_queue: int = 4096
    intra_op_threads: int | None = None
    # The int8 graph where a version has one: it ranks cold users as well as fp32 (NDCG@10 0.0974
    # against 0.0963 on ML-100K at 64 tokens, README "Benchmarks") for ~1.6x less encoder CPU.
    prefer_int8: bool = True
    vector_cache: bool = True
    vector_cache_dir: Path | None = None  # default: <models>/vector-cache
    watch_interval_s: float = 2.0
    cooccurrence_refresh_s: float = 300.0
    # Online metrics per model version are counted over this sliding window.
    online_metrics_window_s: float = 3600.0
    # Recommendations whose items are kept, to give a click without a position its rank.
    recommendations_remembered: int = 100_000
    grace_s: float = 10.0
    # Transport and stream timeouts in seconds; 0 turns a connection-age or idle setting off.
    stream_idle_timeout_s: float = 60.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    log_level: str = "INFO"
    log_json: bool = True
    metrics_port: int | None = None
    metrics_host: str | None = None
    # The operator's web dashboard (server/dashboard): off unless a port is given.
    dashboard_port: int | None = None
    dashboard_host: str | None = None  # default: host
    dashboard_reports: Path | None = None  # where chronorec-eval reports are written
    tokens_file: Path | None = None
    # The CHRONOREC_TOKENS environment variable (same format as the tokens file); never logged.
    inline_tokens: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    allow_insecure_public: bool = False
    # How this replica names itself to the others over a shared store (default HOSTNAME:PORT).
    replica_name: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        for name in ("workers", "store_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag_name(name)} must be a positive integer, got {value!r}")
        for name in ("stream_idle_timeout_s", "keepalive_time_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag_name(name[:-2])} must be more than 0 seconds, got {getattr(self, name)!r}")
        for name in ("max_connection_idle_s", "max_connection_age_s", "max_connection_age_grace_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag_name(name[:-2])} must be 0 (off) or more seconds, got {getattr(self, name)!r}")
        if not self.online_metrics_window_s > 0:
            raise ValueError(f"--online-metrics-window must be more than 0 seconds, got {self.online_metrics_window_s!r}")
        if isinstance(self.recommendations_remembered, bool) or not self.recommendations_remembered >= 0:
            raise ValueError(f"--recommendations-remembered must be 0 or more, got {self.recommendations_remembered!r}")
        if self.limits.max_texts_per_encode > self.encoder_max_queue:
            # An Encode's texts enter the encoder queue at once (its call then waits holding no thread).
            raise ValueError(
                f"{self.limits.flag('max_texts_per_encode')} exceeds --encoder-max-queue={self.encoder_max_queue}: "
                "one Encode request must fit in the encoder queue"
            )

    @property
    def database(self) -> Path | str:
        """The event store: an SQLite file path, or a postgresql:// URL kept as a string."""
        return self.db_path or self.data_dir / "chronorec.db"

    @property
    def models(self) -> Path:
        return self.models_root or self.data_dir / "models"

    def redacted(self) -> dict:
        """The configuration as loggable data (paths only; no token values ever)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("limits", "inline_tokens")}
        out["inline_tokens"] = "<redacted>" if self.inline_tokens else None
        out["limits"] = {f.name: getattr(self.limits, f.name) for f in fields(self.limits)}
        if self.db_path is not None:
            out["db_path"] = describe_store_target(self.db_path)  # a URL may carry a password
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def _env(name: str, default):
    return os.environ.get(f"CHRONOREC_{name.upper()}", default)


def _bool(text) -> bool:
    return str(text).strip().lower() in {"1", "true", "yes", "on"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronorec-server",
        description="Serve time-aware recommendations over gRPC. Every flag has a CHRONOREC_<NAME> environment fallback.",
    )
    d = ServerConfig()
    add = parser.add_argument
    add("--host", default=_env("host", d.host), help="bind address (default 127.0.0.1)")
    add("--port", type=int, default=int(_env("port", d.port)), help="port; 0 picks a free one")
    add("--data-dir", type=Path, default=Path(_env("data_dir", d.data_dir)), help="folder for the database and models")
    add("--db", dest="db_path", default=_env("db", None),
        help="event store: an SQLite file (default DATA_DIR/chronorec.db) or a postgresql:// URL shared by replicas")
    add("--models", dest="models_root", type=Path, default=_env("models", None), help="model repository (default DATA_DIR/models)")
    add("--no-demo", dest="demo", action="store_false", default=_bool(_env("demo", "1")), help="do not load the demo catalog into an empty database")
    add("--workers", type=int, default=int(_env("workers", d.workers)),
        help="threads for ranking and encoding work (an idle or waiting call holds none)")
    add("--store-workers", type=int, default=int(_env("store_workers", d.store_workers)),
        help="threads for the event store and the model repository")
    add("--encoder-max-batch", type=int, default=int(_env("encoder_max_batch", d.encoder_max_batch)))
    add("--encoder-max-wait-ms", type=float, default=float(_env("encoder_max_wait_ms", d.encoder_max_wait_ms)))
    add("--encoder-max-queue", type=int, default=int(_env("encoder_max_queue", d.encoder_max_queue)), help="texts queued before RESOURCE_EXHAUSTED")
    add("--intra-op-threads", type=int, default=_env("intra_op_threads", None),
        help="ONNX Runtime threads per encoder run (default 1: each core runs its own batch)")
    add("--int8", dest="prefer_int8", action=argparse.BooleanOptionalAction, default=_bool(_env("int8", "1")),
        help="serve the version's int8 graph when it has one (default; --no-int8 serves fp32)")
    add("--no-vector-cache", dest="vector_cache", action="store_false", default=_bool(_env("vector_cache", "1")),
        help="encode the catalog at every start and swap instead of keeping item vectors on disk")
    add("--vector-cache-dir", type=Path, default=_env("vector_cache_dir", None),
        help="where item vectors and saved graphs are kept (default MODELS/vector-cache)")
    add("--watch-interval", dest="watch_interval_s", type=float, default=float(_env("watch_interval", d.watch_interval_s)), help="seconds between checks of the model pointer")
    add("--cooccurrence-refresh", dest="cooccurrence_refresh_s", type=float, default=float(_env("cooccurrence_refresh", d.cooccurrence_refresh_s)))
    add("--online-metrics-window", dest="online_metrics_window_s", type=float,
        default=float(_env("online_metrics_window", d.online_metrics_window_s)),
        help="seconds of the sliding window of the online metrics per model version (impressions, CTR, conversions, MRR)")
    add("--recommendations-remembered", type=int, default=int(_env("recommendations_remembered", d.recommendations_remembered)),
        help="recent recommendations whose items are kept (~0.2 kB each), so a click sent without a position gets the rank it was shown at")
    add("--grace", dest="grace_s", type=float, default=float(_env("grace", d.grace_s)), help="seconds in-flight calls get on SIGTERM")
    add("--stream-idle-timeout", dest="stream_idle_timeout_s", type=float, default=float(_env("stream_idle_timeout", d.stream_idle_timeout_s)),
        help="seconds a call may wait for its client's next request message (a unary call's body, a stream's next message); "
        "then UNAVAILABLE. An established Health/Watch waits on the server, so it is not affected")
    add("--keepalive-time", dest="keepalive_time_s", type=float, default=float(_env("keepalive_time", d.keepalive_time_s)),
        help="seconds between the server's HTTP/2 pings on a connection (finds dead peers)")
    add("--keepalive-timeout", dest="keepalive_timeout_s", type=float, default=float(_env("keepalive_timeout", d.keepalive_timeout_s)),
        help="seconds to wait for a ping's answer before closing the connection")
    add("--max-connection-idle", dest="max_connection_idle_s", type=float, default=float(_env("max_connection_idle", d.max_connection_idle_s)),
        help="close a connection with no open call after this many seconds (0: never)")
    add("--max-connection-age", dest="max_connection_age_s", type=float, default=float(_env("max_connection_age", d.max_connection_age_s)),
        help="ask clients to reconnect after this many seconds, e.g. to rebalance (0: never)")
    add("--max-connection-age-grace", dest="max_connection_age_grace_s", type=float,
        default=float(_env("max_connection_age_grace", d.max_connection_age_grace_s)),
        help="seconds open calls get after --max-connection-age before the connection is closed")
    add("--log-level", default=_env("log_level", d.log_level))
    add("--log-text", dest="log_json", action="store_false", default=_bool(_env("log_json", "1")), help="plain-text logs instead of JSON lines")
    add("--metrics-port", type=int, default=_env("metrics_port", None), help="serve Prometheus metrics on this port (0 picks a free one)")
    add("--metrics-host", default=_env("metrics_host", None), help="bind address of the metrics endpoint (default: --host)")
    add("--dashboard-port", type=int, default=_env("dashboard_port", None),
        help="serve the web dashboard on this port (0 picks a free one); README: Dashboard")
    add("--dashboard-host", default=_env("dashboard_host", None),
        help="bind address of the dashboard (default: --host); a non-loopback one needs bearer tokens")
    add("--dashboard-reports", type=Path, default=_env("dashboard_reports", None),
        help="folder of chronorec-eval reports (report.json, PNG plots) the dashboard's Evaluation page shows")
    add("--tokens-file", type=Path, default=_env("tokens_file", None), help="bearer tokens file, lines `ROLE TOKEN [LABEL]` (README: Security and limits); CHRONOREC_TOKENS adds entries separated by ';'")
    add("--tls-cert", type=Path, default=_env("tls_cert", None), help="server certificate chain (PEM); enables TLS")
    add("--tls-key", type=Path, default=_env("tls_key", None), help="server private key (PEM)")
    add("--tls-client-ca", type=Path, default=_env("tls_client_ca", None), help="CA for client certificates (mutual TLS)")
    add("--allow-insecure-public", action="store_true", default=_bool(_env("allow_insecure_public", "0")), help="bind a non-loopback address without authentication")
    add("--replica-name", default=_env("replica_name", None),
        help="this replica's name in GetStatus over a shared PostgreSQL store (default HOSTNAME:PORT)")
    lim = Limits()
    for f in fields(Limits):
        add(f"--{f.name.replace('_', '-')}", type=int, default=int(_env(f.name, getattr(lim, f.name))), help=f"limit (default {getattr(lim, f.name)})")
    return parser


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    args = vars(build_parser().parse_args(argv))
    limits = Limits(**{f.name: args.pop(f.name) for f in fields(Limits)})
    for name in ("intra_op_threads", "metrics_port", "dashboard_port"):
        if args.get(name) is not None:
            args[name] = int(args[name])
    for name in ("models_root", "vector_cache_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "dashboard_reports"):
        if args.get(name) is not None:
            args[name] = Path(args[name])
    if args.get("db_path") is not None:
        args["db_path"] = store_target(args["db_path"])
    # Tokens come from the environment only: a flag would show them in `ps` and shell history.
    args["inline_tokens"] = os.environ.get("CHRONOREC_TOKENS") or None
    return ServerConfig(limits=limits, **args)
