"""Hot swap in the running server: no failed call under load, refused bad versions, rollback."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from chronorec.server.core.manifest import MANIFEST_FILE, load_manifest
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.store import EventStore
from chronorec.v1 import encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR
from test_server import small_catalog, ts


@pytest.fixture
def second_tiny_bert(tmp_path):
    from tinybert import make_tiny_bert

    return make_tiny_bert(tmp_path / "tiny-bert-2", seed=11)


def publish(model_dir: Path, repo: Path, activate: bool) -> str:
    from chronorec.trainer.export import publish_base_model

    return publish_base_model(model_dir, repo, activate=activate)


def seeded_db(tmp_path: Path) -> Path:
    from chronorec.server.core.catalog import Event

    db = tmp_path / "swap.db"
    items = small_catalog(200)
    events = [Event(f"e{i}", f"u{i % 7}", f"i{(i * 13) % 200}", "view", ANCHOR - 5000 + i) for i in range(300)]
    with EventStore(db) as store:
        store.bulk_import(items, events)
    return db


def wait_for(predicate, timeout=60.0, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def test_hot_swap_under_load_fails_no_call(start_server, tiny_repo, tmp_path, second_tiny_bert):
    server = start_server(tiny_repo, db=seeded_db(tmp_path))
    old_version = server.engine.serving_version()
    failures: list[str] = []
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    def recommend_loop(user):
        while not stop.is_set():
            try:
                response = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=ts(ANCHOR)), timeout=10)
                answers.append((time.time(), response.model_version))
            except grpc.RpcError as error:
                failures.append(f"Recommend {error.code()}: {error.details()}")

    def encode_loop():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                response = server.encoder.Encode(encoder_pb2.EncodeRequest(texts=[f"jazz concert {n}", "cooking soup"]), timeout=10)
                answers.append((time.time(), response.model_version))
            except grpc.RpcError as error:
                failures.append(f"Encode {error.code()}: {error.details()}")

    threads = [threading.Thread(target=recommend_loop, args=(f"u{i}",)) for i in range(3)]
    threads += [threading.Thread(target=encode_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        new_version = publish(second_tiny_bert, tiny_repo, activate=True)
        assert wait_for(lambda: server.engine.serving_version() == new_version), server.engine.status().last_error
        swapped_at = time.time()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:5]
    versions = {v for _, v in answers}
    assert versions == {old_version, new_version}
    # Every call that started after the swap completed names the new version.
    late = [v for t, v in answers if t > swapped_at + 0.2]
    assert late and set(late) == {new_version}
    status = server.models.GetStatus(models_pb2.GetStatusRequest())
    assert status.serving_version == new_version and status.swap_count >= 2 and not status.swap_in_progress


def _corrupt_copy(repo: ModelRepository, name: str, damage) -> str:
    import shutil

    source = repo.version_dir(repo.current())
    target = repo.version_dir(name)
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["version"] = name
    manifest["created_at"] = "2999-01-01T00:00:00Z"
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    damage(target)
    return name


def _truncate_onnx(folder: Path) -> None:
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])


def _wrong_dimension(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["dimension"] = manifest["dimension"] * 2
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_truncate_onnx, _wrong_dimension], ids=["truncated-onnx", "wrong-dimension"])
def test_a_corrupt_version_is_refused_and_the_old_keeps_serving(start_server, tiny_repo, tmp_path, damage):
    server = start_server(tiny_repo, db=seeded_db(tmp_path))
    repo = ModelRepository(tiny_repo)
    old_version = server.engine.serving_version()
    bad = _corrupt_copy(repo, "v-corrupt", damage)
    # Activating through the API refuses it and leaves the pointer where it was.
    with pytest.raises(grpc.RpcError) as info:
        server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=bad, wait=True))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert repo.current() == old_version
    # A pointer moved behind the server's back (by a trainer) is tried by the watcher and refused.
    repo.activate(bad)
    assert wait_for(lambda: "v-corrupt" in server.engine.status().last_error), "the watcher never tried the bad version"
    status = server.models.GetStatus(models_pb2.GetStatusRequest())
    assert status.serving_version == old_version
    assert "v-corrupt" in status.last_error
    response = server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["still serving"]))
    assert response.model_version == old_version


def test_a_restart_with_an_unusable_active_version_serves_the_previous_one(start_server, tiny_repo, tmp_path):
    repo = ModelRepository(tiny_repo)
    good = repo.current()
    repo.activate(_corrupt_copy(repo, "v-corrupt", _truncate_onnx))
    server = start_server(tiny_repo, db=seeded_db(tmp_path))
    assert server.engine.serving_version() == good
    assert server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["hello"])).model_version == good


def test_activate_and_rollback_through_the_models_service(start_server, tiny_repo, tmp_path, second_tiny_bert):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    first = server.engine.serving_version()
    second = publish(second_tiny_bert, tiny_repo, activate=False)
    listed = server.models.ListVersions(models_pb2.ListVersionsRequest()).versions
    assert [v.version for v in listed] == [first, second]
    assert [v.serving for v in listed] == [True, False]

    activated = server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=second, wait=True))
    assert activated.serving_version == second
    assert server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["x"])).model_version == second

    rolled = server.models.Rollback(models_pb2.RollbackRequest(wait=True))
    assert rolled.active_version == first and rolled.serving_version == first
    assert ModelRepository(tiny_repo).current() == first
    assert server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["x"])).model_version == first

    with pytest.raises(grpc.RpcError) as info:
        server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version="no-such-version", wait=True))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_killed_publish_leaves_nothing_the_server_would_load(tiny_repo, second_tiny_bert):
    from chronorec.trainer import export

    repo = ModelRepository(tiny_repo)
    before = repo.list_versions()
    current = repo.current()

    class Killed(BaseException):
        pass

    original = export.write_manifest

    def die(*args, **kwargs):
        raise Killed()

    export.write_manifest = die
    try:
        with pytest.raises(Killed):
            publish(second_tiny_bert, tiny_repo, activate=True)
    finally:
        export.write_manifest = original
    assert repo.list_versions() == before
    assert repo.current() == current
    for child in repo.encoder_dir.iterdir():
        if child.is_dir() and child.name not in before:
            assert not repo.is_complete(child.name)
    assert load_manifest(repo.version_dir(current)).version == current
