"""A client-only install: chronorec.client runs on grpcio and protobuf alone, the server's dependencies are an extra."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What `pip install chronorec` leaves out: the server extra, ONNX Runtime, the trainer's stack, and
# chronorec's own server and trainer code, which import them.
FORBIDDEN = (
    "numpy", "scipy", "hnswlib", "sqlite_utils", "tokenizers", "prometheus_client", "grpc_health",
    "grpc_reflection", "onnxruntime", "torch", "transformers", "psycopg",
    "chronorec.server", "chronorec.trainer",
)

CLIENT_ONLY = textwrap.dedent(
    """
    import importlib.abc, io, sys
    from concurrent import futures

    FORBIDDEN = {forbidden!r}

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                raise ImportError(f"a client-only install has no {{name}}")
            return None

    sys.meta_path.insert(0, Forbid())
    for name in [m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]:
        raise SystemExit(f"{{name}} was imported before the client")

    import grpc
    from chronorec.client import cli
    from chronorec.client.client import ChronorecClient
    from chronorec.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc, recommender_pb2, recommender_pb2_grpc

    class Encoder(encoder_pb2_grpc.EncoderServiceServicer):
        def Encode(self, request, context):
            return encoder_pb2.EncodeResponse(
                embeddings=[encoder_pb2.Embedding(values=[0.6, 0.8]) for _ in request.texts], model_version="v1",
                dimension=2)

    class Recommender(recommender_pb2_grpc.RecommenderServiceServicer):
        def Recommend(self, request, context):
            item = recommender_pb2.ScoredItem(item_id="i1", title="Up", score=0.5, reasons=recommender_pb2.Reasons(trend=1.0))
            return recommender_pb2.RecommendResponse(items=[item], model_version="v1", at=request.at)

        def Feedback(self, request, context):
            return recommender_pb2.FeedbackResponse(stored=len(request.events))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(Encoder(), server)
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(Recommender(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    target = f"127.0.0.1:{{port}}"
    with ChronorecClient(target, timeout=5) as client:
        assert client.encode(["a", "b"]).vectors == [[0.6000000238418579, 0.800000011920929]] * 2
        assert client.recommend("u1", k=1, at=1_790_000_000).items[0].item_id == "i1"
        assert client.feedback([{{"user_id": "u1", "item_id": "i1", "action": "like"}}]).stored == 1
    out, err = io.StringIO(), io.StringIO()
    for argv in (["encode", "a sentence"], ["recommend", "u1", "--k", "1"]):
        code = cli.main(["--target", target, *argv], out=out, err=err)
        assert code == 0, (argv, err.getvalue())
    # Reading a data set needs the server's importers: a clear usage error, not a traceback.
    assert cli.main(["--target", target, "import", "."], out=out, err=err) == 2
    assert "chronorec[server]" in err.getvalue(), err.getvalue()
    server.stop(None)
    print("client-only OK")
    """
)


def test_the_client_and_its_command_line_run_without_the_server_dependencies():
    result = subprocess.run([sys.executable, "-c", CLIENT_ONLY.format(forbidden=FORBIDDEN)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "client-only OK" in result.stdout


def test_the_base_dependencies_are_the_clients_and_the_rest_is_the_server_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    assert names(project["dependencies"]) == {"grpcio", "protobuf"}
    extras = project["optional-dependencies"]
    assert {"numpy", "hnswlib", "scipy", "sqlite-utils", "tokenizers", "prometheus-client", "grpcio-health-checking",
            "grpcio-reflection"} <= names(extras["server"])
    # The trainer runs the server's code, so it brings the server extra along.
    assert "chronorec[server]" in extras["trainer"]
    # The scripts behind the README's two commands install it.
    assert re.search(r'-e "\.\[server,', (REPO / "server" / "setup.sh").read_text())
