"""The growth benchmark at CI size: generated vectors in the server's cache, a real server over them, every figure produced and sane."""

from __future__ import annotations

import json
import math

import numpy as np

from bench import bench_growth


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_generated_vectors_are_unit_and_seeded():
    basis = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    a = bench_growth.generated_vectors(basis, 250, seed=3, chunk=100)
    assert a.shape == (250, 16) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, bench_growth.generated_vectors(basis, 250, seed=3, chunk=100))


def test_exact_top_matches_a_full_sort():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((450, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    ids = [f"i{n}" for n in range(450)]
    expected = [{ids[i] for i in np.argsort(-(vectors @ q))[:10]} for q in queries]
    assert bench_growth.exact_top(vectors, ids, queries) == expected


def test_growth_quick(tmp_path):
    kept = tmp_path / "kept"
    bench_growth.main(["--quick", "--sizes", "300,1000", "--profile", "1", "--out", str(tmp_path), "--reuse", str(kept)])
    result = json.loads((tmp_path / "growth-quick.json").read_text())
    assert set(result["sizes"]) == {"300", "1000"}
    for size, figures in result["sizes"].items():
        assert figures["vectors"].startswith("generated")
        assert f"indexed {size} items: {size} vectors from the cache" in figures["server_indexing_log"]
        assert 0.5 <= figures["recall"]["recall_at_10"] <= 1.0
        assert [s["ef"] for s in figures["recall"]["ef_sweep"]] == sorted(s["ef"] for s in figures["recall"]["ef_sweep"])
        assert {(c["users"], c["concurrency"]) for c in figures["cells"]} == {("cached", 1), ("cached", 4), ("cold", 4)}
        for cell in figures["cells"]:
            assert cell["calls"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
            assert _positive(cell["server_cpu_ms_per_call"])
        assert _positive(figures["rss_mb_after_calls"]) and _positive(figures["index_build_s"])
    assert not (tmp_path / "work").exists(), "scratch data must be cleaned up"
    assert not any("reused" in figures for figures in result["sizes"].values())
    # A second run starts its server from the kept repository: nothing rebuilt, the build's figures carried over.
    first = result["sizes"]["300"]
    bench_growth.main(["--quick", "--sizes", "300", "--out", str(tmp_path), "--reuse", str(kept)])
    again = json.loads((tmp_path / "growth-quick.json").read_text())["sizes"]["300"]
    assert again["reused"] == str(kept / "growth-300")
    assert again["recall"] == first["recall"] and again["index_build_s"] == first["index_build_s"]
    assert "indexed 300 items: 300 vectors from the cache" in again["server_indexing_log"]
    assert all(cell["calls"] > 0 for cell in again["cells"])
