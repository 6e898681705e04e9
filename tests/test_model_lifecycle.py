"""The model lifecycle without gRPC: the load check's shapes, typed ranker inputs, the engine's model API,
the catalog state, the one item text and the one request type."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from chronorec.server.core import encoder as encoder_module
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.catalog_state import CatalogState
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.encoder import EncoderSettings, OnnxEncoder, load_encoder
from chronorec.server.core.engine import ChronorecEngine, ServingStatus
from chronorec.server.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from chronorec.server.core.itemtext import item_text, item_text_lookup
from chronorec.server.core.manifest import MANIFEST_FILE, TimeModelParams
from chronorec.server.core.ranking import RecommendQuery
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.store import EventStore
from conftest import ANCHOR


def edit_manifest(repo: ModelRepository, folder: str, **changes) -> None:
    path = repo.version_dir(folder) / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def copy_version(repo: ModelRepository, name: str, **changes) -> str:
    shutil.copytree(repo.version_dir(repo.current()), repo.version_dir(name))
    edit_manifest(repo, name, version=name, created_at="2999-01-01T00:00:00Z", **changes)
    return name


# ------------------------------------------------------------------ load check


def test_the_load_check_runs_max_length_and_the_serving_batch(tiny_repo, monkeypatch):
    repo = ModelRepository(tiny_repo)
    shapes: list[tuple[int, int]] = []
    original = OnnxEncoder._model_inputs

    def recording(self, encodings):
        inputs = original(self, encodings)
        shapes.append(inputs["input_ids"].shape)
        return inputs

    monkeypatch.setattr(OnnxEncoder, "_model_inputs", recording)
    encoder = load_encoder(repo, repo.current(), EncoderSettings(max_batch=24))
    assert encoder.max_batch_size == 24
    assert (1, encoder.max_length) in shapes and any(rows == 24 for rows, _ in shapes), shapes


def test_a_max_length_past_the_graphs_positions_fails_the_load_check(tiny_repo):
    repo = ModelRepository(tiny_repo)
    long = copy_version(repo, "v-4096", max_length=4096)
    with pytest.raises(Unavailable, match="max_length 4096"):
        load_encoder(repo, long, EncoderSettings())
    # The same manifest at the graph's real limit passes.
    edit_manifest(repo, long, max_length=512)
    assert load_encoder(repo, long, EncoderSettings()).max_length == 512


def test_load_encoder_tells_a_broken_manifest_from_a_broken_graph(tiny_repo, tmp_path):
    repo = ModelRepository(tiny_repo)
    with pytest.raises(FailedPrecondition, match="alpha"):
        load_encoder(repo, copy_version(repo, "v-alpha", time_model={"alpha": 5}), EncoderSettings())
    truncated = copy_version(repo, "v-truncated")
    graph = repo.version_dir(truncated) / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(Unavailable) as info:
        load_encoder(repo, truncated, EncoderSettings())
    assert str(tiny_repo) not in info.value.message and "<models>" in info.value.message
    with pytest.raises(Unavailable, match="missing or incomplete"):
        load_encoder(repo, "v-none", EncoderSettings())


def test_an_int8_file_linked_out_of_the_folder_is_refused(tiny_repo, tmp_path):
    repo = ModelRepository(tiny_repo)
    linked = copy_version(repo, "v-int8-link", int8_file="model.int8.onnx")
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(repo.version_dir(linked) / "model.onnx", outside)
    (repo.version_dir(linked) / "model.int8.onnx").symlink_to(outside)
    # The repository marks the version unusable, whatever graph the server would pick...
    assert "outside the version folder" in repo.describe(linked).problem
    for prefer_int8 in (True, False):
        with pytest.raises(FailedPrecondition, match="model.int8.onnx links outside the version folder"):
            load_encoder(repo, linked, EncoderSettings(prefer_int8=prefer_int8))
    # ...and the encoder itself never opens a graph outside its folder (a link made after that check).
    with pytest.raises(Unavailable, match="outside the version folder"):
        OnnxEncoder(repo.version_dir(linked), prefer_int8=True)
    assert OnnxEncoder(repo.version_dir(linked), prefer_int8=False).model_file == "model.onnx"


def test_serving_settings_round_trip_through_encoder_settings(tmp_path):
    settings = EncoderSettings(prefer_int8=True, vector_cache_dir=tmp_path / "c", hnsw_m=8, max_batch=16)
    recorded = settings.serving_settings()
    again = EncoderSettings.from_serving_settings(recorded)
    assert again.serving_settings() == recorded
    assert EncoderSettings.from_serving_settings(None) == EncoderSettings()
    assert EncoderSettings.from_serving_settings(recorded, prefer_int8=False).prefer_int8 is False
    assert encoder_module.__all__.count("load_encoder") == 1


def test_server_serves_int8_on_one_thread_per_core_by_default(monkeypatch):
    from chronorec.server.config import config_from_args

    assert config_from_args([]).prefer_int8 is True and EncoderSettings().prefer_int8 is True
    assert config_from_args(["--no-int8"]).prefer_int8 is False
    monkeypatch.setenv("CHRONOREC_INT8", "0")
    assert config_from_args([]).prefer_int8 is False
    monkeypatch.setattr(encoder_module.os, "cpu_count", lambda: 4)
    assert (EncoderSettings().run_threads(), EncoderSettings().batch_workers()) == (1, 4)
    assert (EncoderSettings(intra_op_threads=2).run_threads(), EncoderSettings(intra_op_threads=2).batch_workers()) == (2, 2)
    assert EncoderSettings(intra_op_threads=8).batch_workers() == 1


# ------------------------------------------------------------------ engine


@pytest.fixture
def engine(tmp_path, tiny_repo):
    items = [Item(f"i{i}", f"{topic} story {i}", category=topic, published_at=ANCHOR - 86400)
             for i, topic in enumerate(["jazz", "space"] * 10)]
    events = [Event(f"e{n}", f"u{n % 3}", f"i{(n * 7) % 20}", "view", ANCHOR - 5000 + n) for n in range(12)]
    store = EventStore(tmp_path / "engine.db")
    store.bulk_import(items, events)
    engine = ChronorecEngine(store, ModelRepository(tiny_repo), EncoderSettings(), cooccurrence_refresh_s=0,
                             watch_interval_s=None)
    engine.start()
    yield engine
    engine.close()
    store.close()


def test_every_version_reads_the_one_cooccurrence_model(engine, tiny_repo):
    before = engine.cooccurrence.model
    with engine.manager.acquire() as model:
        assert model.ranker.cooccurrence is before
    engine.state.add([Event("late", "u9", "i1", "like", ANCHOR - 10), Event("late2", "u9", "i2", "like", ANCHOR - 5)])
    engine.refit_cooccurrence()
    with engine.manager.acquire() as model:
        assert model.ranker.cooccurrence is engine.cooccurrence.model is not before
    # The refit reads the events' times too: with enough sessions of several items (two "jazz" or
    # two "space" items each, an hour apart), the learned ranker's session embedding is fitted.
    rng = np.random.default_rng(0)
    sessions = [(f"s{u}", ANCHOR - 200_000 + 3600 * k, rng.choice(range(k % 2, 20, 2), 2, replace=False))
                for u in range(60) for k in range(6)]
    engine.state.add([Event(f"s-{user}-{at}-{i}", user, f"i{i}", "view", at + j)
                      for user, at, pair in sessions for j, i in enumerate(pair)])
    engine.refit_cooccurrence()
    items, times = engine.state.user_items_and_times()
    expected = CooccurrenceModel.fit(items, list(engine.catalog), times=times)
    fitted = engine.cooccurrence.model.session_vectors
    assert fitted is not None
    np.testing.assert_array_equal(fitted, expected.session_vectors)
    # A version swapped in later reads the same source: nothing is carried over by hand.
    repo = ModelRepository(tiny_repo)
    second = copy_version(repo, "v-second")
    assert engine.activate(second) == second
    with engine.manager.acquire() as model:
        assert model.version == second and model.ranker.cooccurrence is engine.cooccurrence.model


def test_the_engine_model_api(engine, tiny_repo):
    repo = ModelRepository(tiny_repo)
    first = engine.serving_version()
    status = engine.status()
    assert isinstance(status, ServingStatus) and status.serving_version == first and status.index_size == 20
    assert status.swap_count == 1 and status.last_error == "" and status.encoder_queue_depth == 0
    second = copy_version(repo, "v-second")
    bad = copy_version(repo, "v-bad", metrics=[1, 2])
    listed = {v.version: v for v in engine.list_versions()}
    assert listed[first].serving and listed[first].active and listed[first].unusable_reason == ""
    assert "metrics" in listed[bad].unusable_reason and not listed[bad].metrics
    with pytest.raises(FailedPrecondition):
        engine.activate(bad)
    assert engine.activate(second) == second
    assert engine.rollback() == (first, first)
    assert engine.status().swap_count == 3


def test_recommend_resolves_one_query_with_the_manifests_time_model(engine):
    query = RecommendQuery(user_id="u1", k=3, at=ANCHOR, overrides={"w_trend": 0.0, "w_freshness": 0.0})
    answer = engine.recommend(query)
    assert answer.at == ANCHOR and len(answer.result.items) == 3
    for rec in answer.result.items:
        item = engine.get_item(rec.item_id)
        assert (rec.title, rec.category) == (item.title, item.category)
        assert all(h.title == engine.get_item(h.item_id).title for h in rec.top_history)
        # The overrides zeroed trend and freshness on top of the manifest's weights.
        params = TimeModelParams()
        assert rec.score == pytest.approx(params.w_semantic * rec.semantic + params.w_cooccurrence * rec.cooccurrence)
    with pytest.raises(InvalidArgument, match="alpha"):
        engine.recommend(RecommendQuery(user_id="u1", k=3, at=ANCHOR, overrides={"alpha": 5}))
    now = engine.recommend(RecommendQuery(user_id=None, k=2, inline_history=()))
    assert now.at > ANCHOR - 10**9


def test_query_resolution():
    params = TimeModelParams(alpha=0.2)
    query = RecommendQuery(user_id="u", k=1, overrides={"alpha": 0.9})
    resolved = query.resolved(params, now=123.0)
    assert resolved.at == 123.0 and resolved.params.alpha == 0.9 and resolved.overrides == {}
    assert resolved.resolved() is resolved
    assert RecommendQuery(user_id="u", k=1, at=5.0).resolved(params).params == params
    own = RecommendQuery(user_id="u", k=1, at=5.0, params=TimeModelParams(alpha=0.7))
    assert own.resolved(params).params.alpha == 0.7  # the query's own time model wins (evaluation)


# ------------------------------------------------------------------ catalog


def test_catalog_state_versions_and_changes():
    catalog = CatalogState([Item("a", "A")])
    assert catalog.version == 0 and list(catalog) == ["a"] and catalog["a"].title == "A" and len(catalog) == 1
    catalog.upsert([Item("b", "B"), Item("a", "A2")])
    assert catalog.version == 2 and sorted(catalog) == ["a", "b"] and catalog.changed_since(0) == ["b", "a"]
    assert catalog.delete(["b", "missing"]) == 1
    assert catalog.version == 4 and "b" not in catalog and set(catalog.changed_since(2)) == {"b", "missing"}
    assert [i.title for i in catalog.snapshot()] == ["A2"]


def test_catalog_snapshots_never_see_a_dict_changing_size():
    catalog = CatalogState([Item(f"i{n}", "x") for n in range(1000)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write():
        n = 0
        while not stop.is_set():
            catalog.upsert([Item(f"new{n}", "y")])
            catalog.delete([f"new{n - 5}"])
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(300):
            try:
                assert len(catalog.snapshot()) >= 1000 and len(list(catalog)) >= 1000
            except RuntimeError as exc:  # "dictionary changed size during iteration"
                errors.append(exc)
    finally:
        stop.set()
        writer.join()
    assert not errors


def test_one_item_text():
    item = Item("t1", " Toy Story (1995) ", text=" a toy comes alive ", category="Animation")
    assert item_text(item) == "Toy Story (1995) | Animation | a toy comes alive"
    assert item_text(Item("t2", "Heat")) == "Heat"
    lookup = item_text_lookup({"t1": item})
    assert lookup("t1") == item_text(item) and lookup("gone") == "gone"
