"""The on-disk item-vector cache: round trip, misses, corruption, compaction, pruning, and its use by index_catalog."""

from __future__ import annotations

import numpy as np

from chronorec.server.core import vector_cache as vc
from chronorec.server.core.catalog import Item
from chronorec.server.core.indexing import index_catalog
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.vector_cache import VectorCache, prune, text_key

DIM = 8


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_round_trip_across_instances_and_misses(tmp_path):
    keys = [text_key(f"text {i}") for i in range(5)]
    vectors = unit_rows(5)
    VectorCache(tmp_path, "k1", DIM).put(keys[:3], vectors[:3])
    reopened = VectorCache(tmp_path, "k1", DIM)
    got, found = reopened.get(keys)
    assert found.tolist() == [True, True, True, False, False]
    np.testing.assert_array_equal(got[:3], vectors[:3])
    assert not got[3:].any()
    # Another encoder's vectors of the same texts are another cache.
    assert not VectorCache(tmp_path, "k2", DIM).get(keys)[1].any()
    assert not VectorCache(tmp_path, "k3", DIM).get(keys)[1].any()


def test_unreadable_or_mismatched_segments_are_dropped(tmp_path):
    keys = [text_key("a"), text_key("b")]
    VectorCache(tmp_path, "k1", DIM).put(keys, unit_rows(2))
    folder = tmp_path / "k1"
    (folder / "seg-broken.npy").write_bytes(b"not a numpy file")
    cache = VectorCache(tmp_path, "k1", DIM)
    assert cache.get(keys)[1].all()
    assert not (folder / "seg-broken.npy").exists()
    # A dimension change (a corrupt manifest, say) reads nothing rather than wrong vectors.
    assert not VectorCache(tmp_path, "k1", DIM * 2).get(keys)[1].any()


def test_compaction_keeps_only_what_was_used(tmp_path, monkeypatch):
    monkeypatch.setattr(vc, "MAX_SEGMENTS", 2)
    cache = VectorCache(tmp_path, "k1", DIM)
    all_keys = [text_key(f"t{i}") for i in range(6)]
    vectors = unit_rows(6)
    for i in range(0, 6, 2):
        cache.put(all_keys[i : i + 2], vectors[i : i + 2])
    segments = list((tmp_path / "k1").glob("seg-*.npy"))
    assert len(segments) == 1
    reopened = VectorCache(tmp_path, "k1", DIM)
    got, found = reopened.get(all_keys)
    assert found.all()
    np.testing.assert_array_equal(got, vectors)
    # Entries nobody asked for since opening are dropped at the next compaction.
    fresh = VectorCache(tmp_path, "k1", DIM)
    fresh.get(all_keys[:1])
    for i in range(3):
        fresh.put([text_key(f"new{i}")], unit_rows(1, seed=i))
    after = VectorCache(tmp_path, "k1", DIM)
    assert after.get(all_keys)[1].tolist() == [True, False, False, False, False, False]
    assert len(after) == 4


def test_prune_removes_encoders_no_version_uses(tmp_path):
    for key in ("k1", "k2"):
        VectorCache(tmp_path, key, DIM).put([text_key("x")], unit_rows(1))
    assert prune(tmp_path, ["k2"]) == 1
    assert not (tmp_path / "k1").exists() and (tmp_path / "k2").exists()


def test_encoder_key_follows_file_content_not_version_name(tmp_path):
    import os
    import shutil

    from chronorec.server.core.vector_cache import encoder_key

    a, b = tmp_path / "models" / "v1", tmp_path / "models" / "v2"
    a.mkdir(parents=True)
    (a / "model.onnx").write_bytes(b"weights" * 1000)
    (a / "tokenizer.json").write_text("{}")
    shutil.copytree(a, b)
    root = tmp_path / "cache"
    assert encoder_key(root, a, "model.onnx", (384, 128)) == encoder_key(root, b, "model.onnx", (384, 128))
    assert encoder_key(root, a, "model.onnx", (384, 128)) != encoder_key(root, a, "model.onnx", (384, 64))
    (b / "model.onnx").write_bytes(b"retrained" * 1000)
    os.utime(b / "model.onnx", ns=(1, 1))
    assert encoder_key(root, a, "model.onnx", (384, 128)) != encoder_key(root, b, "model.onnx", (384, 128))


def test_index_catalog_encodes_only_what_the_cache_lacks(tmp_path):
    items = [Item(item_id=f"i{n}", title=f"title {n}", category="c") for n in range(40)]
    calls: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        # Deterministic per text, so cached and fresh vectors must agree exactly.
        return np.stack([unit_rows(1, seed=int(t.split()[1]))[0] for t in texts])

    cache = VectorCache(tmp_path, "k1", DIM)
    first = index_catalog(encode, items, DIM, cache=cache, workers=2)
    assert sum(calls) == 40
    calls.clear()
    items.append(Item(item_id="i40", title="title 40", category="c"))
    second = index_catalog(encode, items, DIM, cache=VectorCache(tmp_path, "k1", DIM))
    assert calls == [1]
    expected = np.stack([unit_rows(1, 3)[0], unit_rows(1, 40)[0]])
    np.testing.assert_allclose(second.vector_of(["i3", "i40"]), expected, atol=1e-6)
    assert first.search(unit_rows(1, 7)[0], 1)[0][0] == "i7"
    assert item_text(items[0]) == "title 0 | c"


def test_saved_graph_is_reused_only_for_the_same_catalog(tmp_path, monkeypatch):
    from chronorec.server.core import indexing

    monkeypatch.setattr(indexing, "SAVE_GRAPH_MIN_ITEMS", 10)
    items = [Item(item_id=f"i{n}", title=f"title {n}", category="c") for n in range(60)]
    calls: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return np.stack([unit_rows(1, seed=int(t.split()[1]))[0] for t in texts])

    built = index_catalog(encode, items, DIM, cache=VectorCache(tmp_path, "k1", DIM))
    graphs = list((tmp_path / "k1").glob("hnsw-*.bin"))
    assert len(graphs) == 1
    loads = []
    original_load = indexing.ItemIndex.load
    monkeypatch.setattr(indexing.ItemIndex, "load", classmethod(lambda cls, *a, **k: loads.append(1) or original_load(*a, **k)))
    calls.clear()
    reloaded = index_catalog(encode, list(reversed(items)), DIM, cache=VectorCache(tmp_path, "k1", DIM))
    assert calls == [] and loads == [1]
    assert len(reloaded) == 60 and sorted(reloaded.ids()) == sorted(built.ids())
    for n in (0, 17, 59):
        query = unit_rows(1, seed=n)[0]
        assert reloaded.search(query, 5) == built.search(query, 5)
    # The loaded index takes writes like a built one.
    reloaded.upsert(["new"], unit_rows(1, seed=99))
    reloaded.delete(["i3"])
    assert reloaded.search(unit_rows(1, seed=99)[0], 1)[0][0] == "new" and "i3" not in reloaded

    # A changed catalog does not use the old graph; a corrupt graph is dropped and rebuilt.
    loads.clear()
    index_catalog(encode, items[:-1], DIM, cache=VectorCache(tmp_path, "k1", DIM))
    assert loads == []
    graph = next((tmp_path / "k1").glob("hnsw-*.bin"))
    graph.write_bytes(graph.read_bytes()[:100])
    rebuilt = index_catalog(encode, items[:-1], DIM, cache=VectorCache(tmp_path, "k1", DIM))
    assert len(rebuilt) == 59 and rebuilt.search(unit_rows(1, seed=5)[0], 1)[0][0] == "i5"


def test_index_with_deletions_is_not_saved(tmp_path):
    from chronorec.server.core.index import ItemIndex

    index = ItemIndex(DIM)
    index.build([f"i{n}" for n in range(5)], unit_rows(5))
    index.delete(["i1"])
    try:
        index.save(tmp_path / "g.bin")
    except ValueError:
        pass
    else:
        raise AssertionError("saving an index with deleted items must refuse")


def test_prepare_version_fills_the_cache_the_server_reads(tiny_repo):
    from chronorec.server.core.encoder import OnnxEncoder
    from chronorec.server.core.repository import ModelRepository
    from chronorec.server.core.encoder import EncoderSettings
    from chronorec.server.core.indexing import VECTOR_CACHE_DIR, open_vector_cache, prepare_version

    repo = ModelRepository(tiny_repo)
    version = repo.current()
    items = [Item(item_id=f"i{n}", title=f"jazz concert {n}", category="music") for n in range(30)]
    figures = prepare_version(repo, version, items, EncoderSettings(), workers=2)
    assert figures["items"] == 30 and figures["cached_before"] == 0
    encoder = OnnxEncoder(repo.version_dir(version))
    cache = open_vector_cache(repo, version, encoder, EncoderSettings())
    assert cache is not None and cache.folder.parent == tiny_repo / VECTOR_CACHE_DIR
    vectors, found = cache.get([text_key(item_text(i)) for i in items])
    assert found.all()
    np.testing.assert_allclose(vectors, encoder.encode([item_text(i) for i in items]), atol=1e-5)


def test_server_flags_choose_or_disable_the_vector_cache(tiny_repo, start_server, tmp_path):
    from chronorec.server.config import config_from_args
    from chronorec.server.core.indexing import VECTOR_CACHE_DIR

    config = config_from_args(["--no-vector-cache", "--vector-cache-dir", str(tmp_path / "vc")])
    assert config.vector_cache is False and config.vector_cache_dir == tmp_path / "vc"
    assert config_from_args([]).vector_cache is True

    elsewhere = tmp_path / "elsewhere"
    start_server(tiny_repo, demo=True, vector_cache_dir=elsewhere).stop()
    assert any(elsewhere.rglob("*")), "item vectors are kept in the chosen folder"
    assert not (tiny_repo / VECTOR_CACHE_DIR).exists()
    start_server(tiny_repo, demo=True, vector_cache=False, db=tmp_path / "other.db").stop()
    assert not (tiny_repo / VECTOR_CACHE_DIR).exists(), "--no-vector-cache writes no vectors"
