"""The model repository on its own: the serving-settings contract between server and trainer."""

from __future__ import annotations

import json

from chronorec.server.core.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, ItemIndex
from chronorec.server.core.repository import SERVING_SETTINGS_FILE, ModelRepository, ServingSettings


def settings(**changes) -> ServingSettings:
    values = dict(vector_cache=True, vector_cache_dir="/srv/cache", prefer_int8=True, hnsw_m=16,
                  hnsw_ef_construction=200, hnsw_ef_search=100)
    values.update(changes)
    return ServingSettings(**values)


def test_serving_settings_round_trip(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    assert repo.read_serving_settings() is None  # nothing recorded yet
    repo.write_serving_settings(settings())
    assert repo.read_serving_settings() == settings()
    repo.write_serving_settings(settings(vector_cache_dir=None, prefer_int8=False))
    assert repo.read_serving_settings() == settings(vector_cache_dir=None, prefer_int8=False)
    # Written atomically: no temporary file is left beside it.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["encoder", SERVING_SETTINGS_FILE]


def test_garbled_serving_settings_read_as_none(tmp_path):
    repo = ModelRepository(tmp_path / "models").ensure()
    path = tmp_path / "models" / SERVING_SETTINGS_FILE
    good = json.loads(settings().to_json())
    for text in ["{not json", "[1, 2]", b"\xff\xfe".decode("latin-1"),
                 json.dumps({**good, "hnsw_m": "16"}), json.dumps({**good, "prefer_int8": 1}),
                 json.dumps({**good, "hnsw_ef_search": 0}), json.dumps({k: v for k, v in good.items() if k != "hnsw_m"})]:
        path.write_text(text, encoding="utf-8")
        assert repo.read_serving_settings() is None, text
    path.write_bytes(b"\xff\xfe\x00")
    assert repo.read_serving_settings() is None


def test_hnsw_defaults_are_the_index_defaults():
    index = ItemIndex(4)
    assert (index.M, index.ef_construction, index.ef_search) == (HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)


def test_server_records_its_serving_settings_at_start(start_server, tiny_repo, tmp_path):
    cache = tmp_path / "elsewhere"
    start_server(tiny_repo, prefer_int8=True, vector_cache_dir=cache)
    recorded = ModelRepository(tiny_repo).read_serving_settings()
    assert recorded == ServingSettings(
        vector_cache=True, vector_cache_dir=str(cache.resolve()), prefer_int8=True,
        hnsw_m=HNSW_M, hnsw_ef_construction=HNSW_EF_CONSTRUCTION, hnsw_ef_search=HNSW_EF_SEARCH,
    )
