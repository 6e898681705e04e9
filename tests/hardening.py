"""Helpers of the hardening tests: a module-wide server, a small catalog, timestamps and test certificates."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import EventStore
from chronorec.v1 import catalog_pb2_grpc, encoder_pb2_grpc, models_pb2_grpc, recommender_pb2_grpc
from conftest import ANCHOR

TOPICS = ("cooking", "astronomy", "football", "jazz")


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def small_catalog(n: int = 40) -> list[Item]:
    return [
        Item(f"i{i}", f"{TOPICS[i % 4]} story number {i}", category=TOPICS[i % 4], published_at=ANCHOR - 30 * 86400)
        for i in range(n)
    ]


def small_history(n_users: int = 10, per_user: int = 8, n_items: int = 40) -> list[Event]:
    return [
        Event(f"seed-{u}-{j}", f"u{u}", f"i{(u * 7 + j) % n_items}", "view", ANCHOR - 86400 * (per_user - j))
        for u in range(n_users)
        for j in range(per_user)
    ]


def seed_store(db: Path, items=None, events=None) -> None:
    with EventStore(db) as store:
        store.bulk_import(small_catalog() if items is None else items, small_history() if events is None else events)


class Stubs:
    """The four service stubs over one channel."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(channel)
        self.recommender = recommender_pb2_grpc.RecommenderServiceStub(channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        self.models = models_pb2_grpc.ModelServiceStub(channel)


@contextlib.contextmanager
def running_server(root: Path, models_template: Path, *, seed: bool = True, **overrides):
    """A real server on 127.0.0.1:0 over a copy of `models_template` (for module-scoped fixtures,
    which cannot use the function-scoped `start_server`). Yields the RunningServer."""
    from chronorec.server.app import serve
    from chronorec.server.config import ServerConfig

    models = root / "models"
    shutil.copytree(models_template, models)
    db = root / "chronorec.db"
    if seed:
        seed_store(db)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        data_dir=root,
        db_path=db,
        models_root=models,
        demo=False,
        watch_interval_s=0.2,
        cooccurrence_refresh_s=0,
        log_json=False,
    )
    running = serve(replace(config, **overrides))
    try:
        assert running.wait_ready(120), "server did not become ready"
        yield running
    finally:
        running.stop(grace=1.0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A leaf certificate signed by `ca`, for 127.0.0.1/localhost (server) or a client: (certificate, key)."""
    extensions = folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", str(extensions),
        cwd=folder,
    )
    return folder / f"{name}.pem", folder / f"{name}.key"
