"""Bounded load on loopback: no failures below the concurrency bound, RESOURCE_EXHAUSTED above it, flat memory."""

from __future__ import annotations

import pytest

from bench.load import LoadClients, Workload, rss_mb
from chronorec.server.config import Limits
from chronorec.v1 import recommender_pb2
from hardening import seed_store, small_catalog, small_history

pytestmark = pytest.mark.slow

USERS = sorted({event.user_id for event in small_history()})
ITEMS = [item.item_id for item in small_catalog()]


def _counter(metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_mixed_load_below_the_bound_has_no_failures_and_flat_memory(start_server, tiny_repo, tmp_path):
    db = tmp_path / "load.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db)
    workload = Workload(server.target, USERS, ITEMS, deadline_s=10.0)
    rounds = []
    # 3 processes x 3 threads = 9 concurrent calls, well below max_concurrent_rpcs (64).
    with LoadClients(workload, processes=3, threads=3) as clients:
        for _ in range(3):
            report = clients.run(1.5)
            rounds.append((report, rss_mb()))
    for report, _ in rounds:
        assert report.errors == {}, report.summary()
        assert report.ok > 30 and set(report.latencies_ms) == {"Recommend", "Encode", "Feedback"}, report.summary()
    # The first round warms caches and allocator pools; later rounds must not keep growing.
    first_rss, last_rss = rounds[0][1], rounds[-1][1]
    assert last_rss - first_rss < 60, f"RSS grew from {first_rss:.0f} MB to {last_rss:.0f} MB"
    stored = sum(len(report.latencies_ms["Feedback"]) for report, _ in rounds)
    assert server.engine.store.count_events() >= len(small_history()) + stored


def test_calls_above_the_bound_are_refused_with_resource_exhausted_not_timeouts(start_server, tiny_repo, tmp_path):
    db = tmp_path / "overload.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db, workers=4, limits=Limits(max_concurrent_rpcs=4))
    workload = Workload(server.target, USERS, ITEMS, deadline_s=10.0)
    # 2 processes x 12 threads = 24 concurrent calls against a bound of 4.
    with LoadClients(workload, processes=2, threads=12) as clients:
        report = clients.run(2.0)
    assert set(report.errors) == {"RESOURCE_EXHAUSTED"}, report.summary()
    assert report.ok > 20, report.summary()
    # Every shed call is in the metrics with its status, and nothing else was refused.
    metrics = server.running.metrics
    shed = 0.0
    for service, method in [
        ("chronorec.v1.RecommenderService", "Recommend"),
        ("chronorec.v1.RecommenderService", "Feedback"),
        ("chronorec.v1.EncoderService", "Encode"),
    ]:
        labels = {"grpc_service": service, "grpc_method": method}
        shed += _counter(metrics, "grpc_server_handled_total", **labels, grpc_code="RESOURCE_EXHAUSTED")
        assert _counter(metrics, "chronorec_rpc_received_total", **labels) == sum(
            _counter(metrics, "grpc_server_handled_total", **labels, grpc_code=code)
            for code in ("OK", "RESOURCE_EXHAUSTED")
        )
    assert shed == report.errors["RESOURCE_EXHAUSTED"]
    # The server is healthy once the burst is over.
    assert server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=USERS[0], k=3), timeout=10).items
