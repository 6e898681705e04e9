"""The Prometheus endpoint: per-RPC counts and latencies by status, encoder batches and engine state."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from chronorec.v1 import common_pb2, encoder_pb2, recommender_pb2
from conftest import ANCHOR
from hardening import seed_store, small_catalog, small_history, ts

WRITE_TOKEN = "write-token-for-metrics-0123"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(service: str, method: str, **extra) -> dict:
    return {"grpc_service": f"chronorec.v1.{service}", "grpc_method": method, **extra}


def test_metrics_endpoint(start_server, tiny_repo, tmp_path):
    db = tmp_path / "metrics.db"
    seed_store(db)
    server = start_server(
        tiny_repo, db=db, metrics_port=0, inline_tokens=f"write {WRITE_TOKEN}"
    )
    auth = (("authorization", f"Bearer {WRITE_TOKEN}"),)
    for _ in range(3):
        server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["jazz", "football"]), metadata=auth, timeout=10)
    with pytest.raises(grpc.RpcError):
        server.encoder.Encode(encoder_pb2.EncodeRequest(texts=[]), metadata=auth, timeout=10)
    with pytest.raises(grpc.RpcError):
        server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["no token"]), timeout=10)
    server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), metadata=auth, timeout=10)
    events = [common_pb2.Event(event_id=f"m-{i}", user_id="u1", item_id="i1", action="view", timestamp=ts(ANCHOR)) for i in range(4)]
    server.recommender.FeedbackStream(iter([recommender_pb2.FeedbackRequest(events=events)]), metadata=auth, timeout=10)
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=auth, timeout=10))

    samples = scrape(server.running.metrics_port)
    assert value(samples, "grpc_server_handled_total", **rpc("EncoderService", "Encode", grpc_code="OK")) == 3
    assert value(samples, "grpc_server_handled_total", **rpc("EncoderService", "Encode", grpc_code="INVALID_ARGUMENT")) == 1
    assert value(samples, "grpc_server_handled_total", **rpc("EncoderService", "Encode", grpc_code="UNAUTHENTICATED")) == 1
    assert value(samples, "grpc_server_handling_seconds_count", **rpc("EncoderService", "Encode", grpc_code="OK")) == 3
    assert value(samples, "grpc_server_handling_seconds_sum", **rpc("EncoderService", "Encode", grpc_code="OK")) > 0
    assert value(samples, "grpc_server_handled_total", **rpc("RecommenderService", "FeedbackStream", grpc_code="OK")) == 1
    assert value(samples, "grpc_server_handled_total", grpc_service="grpc.reflection.v1alpha.ServerReflection",
                 grpc_method="ServerReflectionInfo", grpc_code="OK") == 1
    assert value(samples, "grpc_server_started_total", **rpc("EncoderService", "Encode")) == 5
    assert value(samples, "chronorec_rpc_received_total", **rpc("EncoderService", "Encode")) == 5
    assert value(samples, "chronorec_rpcs_in_flight") == 0
    # Admission: nothing open or at work between calls.
    assert value(samples, "chronorec_calls_open", kind="service") == 0
    assert value(samples, "chronorec_calls_open", kind="health_watch") == 0
    assert value(samples, "chronorec_calls_working") == 0
    assert ("chronorec_calls_open", frozenset({("kind", "reflection")})) in samples

    assert value(samples, "chronorec_encoder_batch_size_count") >= 3
    assert value(samples, "chronorec_encoder_batch_size_sum") >= 6
    assert value(samples, "chronorec_encoder_queue_depth") == 0
    assert value(samples, "chronorec_index_size") == len(small_catalog())
    assert value(samples, "chronorec_catalog_items") == len(small_catalog())
    assert value(samples, "chronorec_model_info", version=server.engine.serving_version()) == 1
    assert value(samples, "chronorec_model_swaps_total") == 1
    assert value(samples, "chronorec_model_last_swap_seconds") > 0
    assert value(samples, "chronorec_model_swap_in_progress") == 0
    assert value(samples, "chronorec_model_last_swap_failed") == 0
    assert value(samples, "chronorec_feedback_events_stored") == len(small_history()) + 4
    assert value(samples, "chronorec_ready") == 1


def test_metrics_before_a_model_is_loaded(start_server, tmp_path):
    server = start_server(tmp_path / "empty-models", metrics_port=0, wait=False)
    samples = scrape(server.running.metrics_port)
    assert value(samples, "chronorec_ready") == 0
    assert value(samples, "chronorec_model_swaps_total") == 0
    assert not any(name == "chronorec_model_info" for name, _ in samples)
