"""The benchmark suite at CI size: every benchmark runs and writes sane figures (nothing here is timed)."""

from __future__ import annotations

import json
import math
import os

import pytest

from bench import run_all

pytestmark = pytest.mark.slow


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    loaded = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert not (out / "work").exists(), "scratch data must be cleaned up"
    return loaded


def test_every_benchmark_wrote_its_json(results):
    assert set(results) == {"encode", "microbatch", "feedback", "recommend", "batch", "swap", "memory", "canary", "store",
                            "replicas", "summary"}
    for name, data in results.items():
        if name != "summary":
            assert data["conditions"]["quick"] is True
            assert len(data["conditions"]["load_average"]) == 3
    assert all(v.get("error") is None for v in results["summary"]["benchmarks"].values())


def test_encode_figures(results):
    cells = results["encode"]["results"]
    main = {(c["engine"], c["batch"]) for c in cells if not c["engine"].startswith("pytorch-")}
    assert main == {(e, b) for e in ("pytorch", "ort-fp32", "ort-int8") for b in (1, 8, 32)}
    assert all(_finite_positive(c["texts_per_s"]) and _finite_positive(c["ratio_to_pytorch"]) for c in cells)
    cosine = results["encode"]["int8_cosine"]
    assert -1.0 <= cosine["min"] <= cosine["mean"] <= 1.0 + 1e-6
    assert results["encode"]["fp32_vs_pytorch_max_abs_diff"] < 1e-3


def test_microbatch_and_feedback_figures(results):
    micro = results["microbatch"]
    assert _finite_positive(micro["batch32_texts_per_s"]) and _finite_positive(micro["single_texts_per_s"])
    assert micro["failed_calls"] == 0
    figures = results["feedback"]["figures"]
    for key in ("grpc_batch_1", "grpc_batch_100", "grpc_batch_1000", "stream_message_1", "stream_message_100"):
        assert _finite_positive(figures[key]["events_per_s"])
        assert figures[key]["stored"] == figures[key]["sent"], "every acknowledged event is stored"


def test_recommend_figures(results):
    for catalog in results["recommend"]["catalogs"].values():
        kinds = {(c["users"], c["concurrency"]) for c in catalog["cells"]}
        assert {"cached", "cold"} == {k for k, _ in kinds}
        for cell in catalog["cells"]:
            assert cell["calls"] > 0 and _finite_positive(cell["calls_per_s"])
            assert 0 < cell["p50_ms"] <= cell["p99_ms"]
            assert _finite_positive(cell["server_cpu_ms_per_call"])
        search = catalog["search"]
        assert 0.0 <= search["hnsw"]["recall_at_10"] <= 1.0
        assert _finite_positive(search["exact_numpy"]["ms_per_query"])
        assert 0.0 <= search["ranking"]["recall_at_10_vs_exhaustive"] <= 1.0


def test_swap_and_memory_figures(results):
    for swap in results["swap"]["swaps"]:
        assert swap["failed_calls"] == 0, swap["failures"]
        assert not swap["unexpected_versions"]
        assert _finite_positive(swap["seconds_to_all_responses_new"])
        assert swap["peak_rss_mb_during"] >= swap["rss_mb_before"] * 0.9
    memory = results["memory"]
    for start in ("empty", "cold", "warm"):
        assert _finite_positive(memory[start]["seconds_to_serving"]) and _finite_positive(memory[start]["rss_mb"])
    assert memory["cold"]["vector_cache"] == "cold" and memory["warm"]["vector_cache"] == "warm"


def test_batch_and_canary_figures(results):
    batch = results["batch"]
    for figures in batch["median"].values():
        assert _finite_positive(figures["users_per_s"]) and _finite_positive(figures["cpu_ms_per_user"])
    assert _finite_positive(batch["batch_vs_single_ratio"])
    assert all(0 < n <= batch["batch"] for n in batch["encoded_texts_per_batch"])
    canary = results["canary"]
    assert [v["role"] for v in canary["two_versions"]["loaded"]] == ["current", "canary"]
    assert [v["role"] for v in canary["after_abort"]["loaded"]] == ["current"]
    assert all(_finite_positive(v["estimated_mb"]) for v in canary["two_versions"]["loaded"])
    split = canary["split"]
    assert abs(split["served_percent"] - split["requested_percent"]) <= 3.0 and split["moved_on_second_call"] == 0


def test_trainer_benchmark_quick(tmp_path):
    from bench import bench_trainer

    assert bench_trainer.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "trainer-quick.json").read_text())
    assert result["status"] in ("activated", "gated") and result["events"] > 0
    assert _finite_positive(result["examples_per_second"]) and result["train_examples"] == 20 * 32
    rows = result["rows"]
    assert "before: serving base encoder, default time model" in rows
    # The rows name what the version ships: the fine-tuned weights only when both of the trainer's tests passed.
    shipped = "fine-tuned encoder" if result["encoder"]["fine_tuned"] else "starting weights (fine-tuning not kept)"
    assert any(name.startswith(f"after: {shipped}, tuned time model") for name in rows)
    assert all(0.0 <= m["NDCG@10"] <= 1.0 for m in rows.values())
    assert result["prepare"]["items"] == result["items"] or result["status"] == "gated"


def test_store_and_replica_figures(results):
    for cell in results["store"]["figures"].values():
        assert _finite_positive(cell["sqlite_events_per_s"]) and _finite_positive(cell["postgres_events_per_s"])
    replicas = results["replicas"]["figures"]
    for lag in replicas["propagation"].values():
        assert lag["samples"] > 0 and 0 < lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
    for rate in replicas["recommend"].values():
        assert rate["calls"] > 0 and _finite_positive(rate["calls_per_s"])
    assert replicas["cpus"] == os.cpu_count()
