"""Findings F2, F3, F4 and F10 over a real server: a broken version is refused, listed with its reason,
passed over at start-up, and never leaks a server path or breaks the model API."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest

from chronorec.server.core.manifest import MANIFEST_FILE
from chronorec.server.core.repository import HISTORY_FILE, POINTER_FILE, ModelRepository
from chronorec.v1 import encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR, wait_serving
from test_hot_swap import seeded_db, wait_for
from test_server import ts


def broken_copy(repo_root: Path, name: str, **manifest_changes) -> str:
    """A copy of the active version under `name` with its manifest fields replaced (raw JSON)."""
    repo = ModelRepository(repo_root)
    target = repo.version_dir(name)
    shutil.copytree(repo.version_dir(repo.current()), target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest.update(version=name, created_at="2999-01-01T00:00:00Z")
    for key, value in manifest_changes.items():
        if key == "time_model":
            manifest["time_model"].update(value)
        else:
            manifest[key] = value
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return name


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def versions(server) -> dict[str, models_pb2.ModelVersion]:
    return {v.version: v for v in server.models.ListVersions(models_pb2.ListVersionsRequest(), timeout=10).versions}


def still_serves(server, version: str) -> None:
    """Recommend for a user with history and Encode of a long text answer with `version`."""
    long_text = " ".join(["jazz concert review"] * 400)
    assert server.encoder.Encode(encoder_pb2.EncodeRequest(texts=[long_text]), timeout=30).model_version == version
    response = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5, at=ts(ANCHOR)), timeout=30)
    assert response.model_version == version and response.history_length > 0 and response.items


def assert_no_server_path(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text and str(root.resolve()) not in text, text
    assert "/tmp/" not in text and not any(part.startswith("/") and os.path.exists(part.strip("'\",:")) for part in text.split()), text


# ------------------------------------------------------------------------- F2


def test_f2_a_max_length_past_the_position_embeddings_is_refused(start_server, tiny_repo, tmp_path):
    server = start_server(tiny_repo, db=seeded_db(tmp_path))
    old = server.engine.serving_version()
    bad = broken_copy(tiny_repo, "v-long", max_length=4096)  # the tiny BERT's positions stop at 512

    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "max_length 4096" in error.details(), error.details()
    assert ModelRepository(tiny_repo).current() == old
    status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert status.serving_version == old and "v-long" in status.last_error and "max_length 4096" in status.last_error
    still_serves(server, old)

    # Named by the pointer behind the server's back (a trainer): the watcher refuses it the same way.
    ModelRepository(tiny_repo).activate(bad)
    assert wait_for(lambda: "v-long" in server.engine.status().last_error and server.engine.status().swap_count >= 1)
    still_serves(server, old)


def test_f2_minilm_with_max_length_4096_is_refused(start_server, minilm_repo, tmp_path):
    server = start_server(minilm_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    old = server.engine.serving_version()
    bad = broken_copy(minilm_repo, "v-minilm-4096", max_length=4096)
    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert status.serving_version == old and "max_length 4096" in status.last_error
    still_serves(server, old)


# ------------------------------------------------------------------------- F3


@pytest.mark.parametrize(
    "changes, reason",
    [({"time_model": {"alpha": 5}}, "alpha"), ({"time_model": {"history_max_events": "twenty"}}, "history_max_events")],
    ids=["alpha-5", "history-max-events-text"],
)
def test_f3_a_bad_time_model_makes_only_its_own_version_unusable(start_server, tiny_repo, tmp_path, changes, reason):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    good = server.engine.serving_version()
    bad = broken_copy(tiny_repo, "v-bad-time-model", **changes)

    listed = versions(server)
    assert listed[good].unusable_reason == "" and listed[good].serving
    assert reason in listed[bad].unusable_reason and not listed[bad].serving

    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and reason in error.details(), error.details()
    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=False))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ModelRepository(tiny_repo).current() == good
    still_serves(server, good)


def test_f3_a_restart_with_current_on_a_bad_manifest_falls_back_and_serves(start_server, tiny_repo, tmp_path, caplog):
    repo = ModelRepository(tiny_repo)
    good = repo.current()
    bad = broken_copy(tiny_repo, "v-alpha-5", time_model={"alpha": 5})
    # What a trainer of an older schema could leave: HISTORY ends with the bad one, CURRENT names it.
    (repo.encoder_dir / HISTORY_FILE).write_text(f"{good}\n{bad}\n")
    (repo.encoder_dir / POINTER_FILE).write_text(f"{bad}\n")

    with caplog.at_level(logging.INFO, logger="chronorec"):
        server = start_server(tiny_repo, db=seeded_db(tmp_path))
        wait_serving(server.channel, timeout=60)
    assert server.engine.serving_version() == good
    still_serves(server, good)
    status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert status.serving_version == good and bad in status.last_error and "alpha" in status.last_error
    listed = versions(server)
    assert listed[bad].active and not listed[bad].serving and listed[bad].unusable_reason

    # F10: the start-up lines name the version that serves, not the broken active one.
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine ready")]
    assert ready and ready[-1].endswith(f"model {good}"), ready
    serving_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SERVING model")]
    assert serving_lines == [f"SERVING model {good}"], serving_lines


# ------------------------------------------------------------------------- F4


@pytest.mark.parametrize(
    "changes, reason",
    [({"metrics": [1, 2]}, "metrics"), ({"created_at": 12345}, "created_at"), ({"parent_version": 7}, "parent_version"),
     ({"dimension": "32"}, "dimension"), ({"int8_cosine": {"mean": "high"}}, "int8_cosine"), ({"extra": 3}, "extra")],
    ids=["metrics-array", "created-at-number", "parent-version-number", "dimension-text", "int8-cosine-text", "extra-number"],
)
def test_f4_wrong_manifest_types_never_break_the_model_api(start_server, tiny_repo, tmp_path, changes, reason):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0.05)
    good = server.engine.serving_version()
    bad = broken_copy(tiny_repo, "v-wrong-types", **changes)

    assert reason in versions(server)[bad].unusable_reason
    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and reason in error.details()
    # Moved to by a trainer: refused by the watcher, and GetStatus and ListVersions keep answering.
    (ModelRepository(tiny_repo).encoder_dir / POINTER_FILE).write_text(f"{bad}\n")
    assert wait_for(lambda: bad in server.engine.status().last_error)
    status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert status.serving_version == good and reason in status.last_error
    assert set(versions(server)) == {good, bad}
    still_serves(server, good)


# ------------------------------------------------------------------------- F10


def test_f10_last_error_and_refusals_name_no_server_path(start_server, tiny_repo, tmp_path):
    cache_dir = tmp_path / "vector-cache-elsewhere"
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0, vector_cache_dir=cache_dir)
    repo = ModelRepository(tiny_repo)
    bad = broken_copy(tiny_repo, "v-truncated")
    onnx = repo.version_dir(bad) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])  # onnxruntime's error names the file it read

    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert_no_server_path(error.details(), tiny_repo, tmp_path)
    status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert "v-truncated" in status.last_error and "model.onnx" in status.last_error
    assert_no_server_path(status.last_error, tiny_repo, tmp_path)
    for version in versions(server).values():
        assert_no_server_path(version.unusable_reason, tiny_repo, tmp_path)


@pytest.mark.parametrize("field", ["onnx_file", "int8_file"])
@pytest.mark.parametrize("value", ["../../../../etc/hostname", "/etc/hostname", "../CURRENT"])
def test_f10_a_graph_file_outside_the_version_folder_is_refused(start_server, tiny_repo, tmp_path, field, value):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0, prefer_int8=True)
    good = server.engine.serving_version()
    bad = broken_copy(tiny_repo, "v-escape", **{field: value})
    assert field in versions(server)[bad].unusable_reason
    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and field in error.details()
    assert "hostname" not in error.details()
    still_serves(server, good)


def test_f10_a_graph_file_linked_out_of_the_version_folder_is_refused(start_server, tiny_repo, tmp_path):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    good = server.engine.serving_version()
    repo = ModelRepository(tiny_repo)
    bad = broken_copy(tiny_repo, "v-link")
    outside = tmp_path / "outside.onnx"
    shutil.copy(repo.version_dir(bad) / "model.onnx", outside)
    (repo.version_dir(bad) / "model.onnx").unlink()
    (repo.version_dir(bad) / "model.onnx").symlink_to(outside)
    error = rpc_error(server.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "outside the version folder" in error.details()
    assert_no_server_path(error.details(), tiny_repo, tmp_path)
    assert "model.onnx links outside" in versions(server)[bad].unusable_reason
    still_serves(server, good)
