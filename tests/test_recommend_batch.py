"""RecommendBatch over a real server: one answer per entry in order, bad entries fail alone, texts encoded together."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.client.client import ChronorecClient
from chronorec.server.config import Limits
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.store import EventStore
from chronorec.v1 import common_pb2, recommender_pb2
from conftest import ANCHOR

MAX_BATCH = 8


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


@pytest.fixture(scope="module")
def drift():
    return generate_drift_dataset(seed=5, n_items=300, n_users=12, n_events_per_user=20, anchor=ANCHOR)


@pytest.fixture
def server(start_server, tiny_repo, tmp_path, drift):
    db = tmp_path / "batch.db"
    with EventStore(db) as store:
        store.bulk_import(drift.items, drift.events)
    return start_server(tiny_repo, db=db, limits=Limits(max_batch_users=MAX_BATCH))


def test_a_batch_with_bad_entries_answers_the_rest_in_order(server, drift):
    users = [u.user_id for u in drift.users[:5]]
    at = ts(drift.anchor)
    requests = [recommender_pb2.RecommendRequest(user_id=u, k=5, at=at) for u in users]
    requests.insert(2, recommender_pb2.RecommendRequest(user_id=users[0], k=0, at=at))  # bad k
    unknown_item = common_pb2.HistoryEvent(item_id="no-such-item", action="view", timestamp=ts(drift.anchor - 60))
    requests.insert(4, recommender_pb2.RecommendRequest(k=5, at=at, history=[unknown_item]))  # unknown history item
    response = server.recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest(requests=requests))

    assert len(response.results) == len(requests)
    codes = [entry.code for entry in response.results]
    assert codes == [0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, grpc.StatusCode.NOT_FOUND.value[0], 0, 0]
    assert "k must be between" in response.results[2].message and "no-such-item" in response.results[4].message
    answered = [entry.response for entry in response.results if entry.code == 0]
    # In order, and each the answer a single Recommend gives (same user, same as-of time).
    for user, entry in zip(users, answered):
        single = server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=at))
        assert [i.item_id for i in entry.items] == [i.item_id for i in single.items]
        assert entry.history_length == single.history_length > 0
        assert entry.model_version == single.model_version
    ids = [entry.recommendation_id for entry in answered]
    assert all(ids) and len(set(ids)) == len(ids)
    # Five users with histories, none cached before: their texts went to the encoder together.
    assert response.encoded_texts == len(users)


def test_history_texts_are_encoded_in_one_micro_batch(server, drift):
    users = [u.user_id for u in drift.users[5:5 + MAX_BATCH]]
    at = ts(drift.anchor - 3600)
    registry = server.running.metrics.registry

    def encoder_batches() -> tuple[float, float]:
        return (registry.get_sample_value("chronorec_encoder_batch_size_count") or 0.0,
                registry.get_sample_value("chronorec_encoder_batch_size_sum") or 0.0)

    batches, texts = encoder_batches()
    response = server.recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest(
        requests=[recommender_pb2.RecommendRequest(user_id=u, k=3, at=at) for u in users]))
    assert response.encoded_texts == len(users) and all(entry.code == 0 for entry in response.results)
    # Every user's history text went to the encoder in one request: the micro-batcher cuts a
    # request into at most one share per worker, never one run per user.
    ran, encoded = encoder_batches()
    workers = os.cpu_count() or 1  # the CPU micro-batcher's workers (ServerConfig.batch_workers)
    assert encoded == texts + len(users)
    assert 1 <= ran - batches <= min(workers, len(users))
    # Asked again, every text is in the short-term cache: nothing is encoded.
    again = server.recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest(
        requests=[recommender_pb2.RecommendRequest(user_id=u, k=3, at=at) for u in users]))
    assert again.encoded_texts == 0
    assert [[i.item_id for i in e.response.items] for e in again.results] == \
        [[i.item_id for i in e.response.items] for e in response.results]


def test_batch_bounds_and_the_client(server, drift):
    too_many = [recommender_pb2.RecommendRequest(user_id=f"u{n}", k=1) for n in range(MAX_BATCH + 1)]
    with pytest.raises(grpc.RpcError) as info:
        server.recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest(requests=too_many))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_users=8" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        server.recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with ChronorecClient(server.target) as client:
        users = [drift.users[0].user_id, {"user_id": drift.users[1].user_id, "k": 0}, "a-new-user"]
        batch = client.recommend_batch(users, k=4, at=drift.anchor)
    assert [entry.ok for entry in batch.entries] == [True, False, True]
    assert batch.entries[1].code == grpc.StatusCode.INVALID_ARGUMENT and "k must be a positive integer" in batch.entries[1].message
    assert len(batch.entries[0].result.items) == 4 and batch.entries[0].result.recommendation_id
    assert batch.entries[2].result.history_length == 0  # a cold start is still an answer
