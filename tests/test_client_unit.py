"""Client and CLI tests against small in-process fake servicers; no chronorec server needed."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import types
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest

from chronorec.client import cli, convert
from chronorec.client import client as client_module
from chronorec.client.client import (
    RETRYABLE_METHODS,
    CatalogItem,
    ChronorecClient,
    ChronorecClientError,
    FeedbackEvent,
    HistoryItem,
    build_recommend_request,
    event_to_proto,
    history_to_proto,
    item_to_proto,
    overrides_to_proto,
    service_config,
)
from chronorec.server.core.catalog import Event, Item
from chronorec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

UTC = timezone.utc

# --------------------------------------------------------------------------------------------
# Fake servicers
# --------------------------------------------------------------------------------------------


class FakeEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    """Fails with the queued status codes first (with a pushback trailer when `pushback_ms` is
    set), then answers with a fixed 3-d vector per text."""

    def __init__(self):
        self.failures: list[grpc.StatusCode] = []
        self.pushback_ms: str | None = None
        self.delay = 0.0
        self.calls = 0
        self.arrivals: list[float] = []
        self.metadata: list[dict[str, str]] = []

    def Encode(self, request, context):
        self.calls += 1
        self.arrivals.append(time.monotonic())
        self.metadata.append(dict(context.invocation_metadata()))
        if self.delay:
            time.sleep(self.delay)
        if self.failures:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback_ms),))
            context.abort(self.failures.pop(0), "scripted failure")
        values = [0.6, 0.8, 0.0]
        return encoder_pb2.EncodeResponse(
            embeddings=[encoder_pb2.Embedding(values=values) for _ in request.texts], model_version="v-test", dimension=3
        )


class FakeRecommender(recommender_pb2_grpc.RecommenderServiceServicer):
    """Records requests; the stream fails with UNAVAILABLE after its first batch when told to."""

    def __init__(self):
        self.requests: list = []
        self.feedback_batches: list[list[common_pb2.Event]] = []
        self.fail_stream_once = False
        self.feedback_failures = 0
        self.seen_ids: set[str] = set()

    def Recommend(self, request, context):
        self.requests.append(request)
        at = request.at if request.HasField("at") else convert.to_timestamp(1_700_000_000)
        return recommender_pb2.RecommendResponse(
            items=[
                recommender_pb2.ScoredItem(
                    item_id="i1",
                    title="Toy Story (1995)",
                    category="Animation",
                    score=0.9,
                    reasons=recommender_pb2.Reasons(
                        semantic=0.5,
                        cooccurrence=0.25,
                        freshness=0.125,
                        trend=1.0,
                        history=[recommender_pb2.HistoryContribution(item_id="h1", title="Heat (1995)", contribution=0.4)],
                    ),
                )
            ],
            model_version="v-test",
            at=at,
            history_length=len(request.history),
        )

    def _store(self, events) -> recommender_pb2.FeedbackResponse:
        stored = duplicates = 0
        for event in events:
            if event.event_id in self.seen_ids:
                duplicates += 1
            else:
                self.seen_ids.add(event.event_id)
                stored += 1
        return recommender_pb2.FeedbackResponse(stored=stored, duplicates=duplicates)

    def Feedback(self, request, context):
        self.feedback_batches.append(list(request.events))
        result = self._store(request.events)
        if self.feedback_failures:
            # Stored, then the answer is lost: the retry must not store the events again.
            self.feedback_failures -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return result

    def FeedbackStream(self, request_iterator, context):
        total = recommender_pb2.FeedbackResponse()
        for number, request in enumerate(request_iterator):
            self.feedback_batches.append(list(request.events))
            result = self._store(request.events)
            total.stored += result.stored
            total.duplicates += result.duplicates
            if self.fail_stream_once and number == 0:
                self.fail_stream_once = False
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return total


class FakeCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self):
        self.items: dict[str, common_pb2.Item] = {}
        self.upsert_calls = 0
        self.delete_calls = 0

    def DeleteItems(self, request, context):
        self.delete_calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "store busy")

    def UpsertItems(self, request, context):
        self.upsert_calls += 1
        for item in request.items:
            self.items[item.item_id] = item
        return catalog_pb2.UpsertItemsResponse(upserted=len(request.items), index_size=len(self.items))

    def GetItem(self, request, context):
        if request.item_id not in self.items:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no item {request.item_id}")
        return catalog_pb2.GetItemResponse(item=self.items[request.item_id])


class FakeModels(models_pb2_grpc.ModelServiceServicer):
    def __init__(self):
        self.rollback_calls = 0
        self.activate_calls = 0

    def ActivateVersion(self, request, context):
        self.activate_calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "swap in flight")

    def GetStatus(self, request, context):
        return models_pb2.GetStatusResponse(
            serving_version="v2",
            manifest_json=json.dumps({"base_model": "all-MiniLM-L6-v2", "dimension": 384}),
            providers=["CPUExecutionProvider"],
            index_size=1682,
            loaded_at=convert.to_timestamp(1_700_000_000),
            metrics={"ndcg@10": 0.12},
            swap_count=1,
        )

    def ListVersions(self, request, context):
        return models_pb2.ListVersionsResponse(
            versions=[
                models_pb2.ModelVersion(version="v1", created_at="2026-01-01T00:00:00Z", metrics={"ndcg@10": 0.1}),
                models_pb2.ModelVersion(version="v2", parent_version="v1", serving=True, active=True),
                models_pb2.ModelVersion(version="v3", unusable_reason="invalid manifest: metrics must be an object"),
            ]
        )

    def Rollback(self, request, context):
        self.rollback_calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "swap in flight")


@dataclass
class FakeServer:
    address: str
    encoder: FakeEncoder
    recommender: FakeRecommender
    catalog: FakeCatalog
    models: FakeModels


@pytest.fixture
def server():
    encoder, recommender, catalog, models = FakeEncoder(), FakeRecommender(), FakeCatalog(), FakeModels()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(encoder, grpc_server)
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(recommender, grpc_server)
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(catalog, grpc_server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(models, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield FakeServer(f"127.0.0.1:{port}", encoder, recommender, catalog, models)
    grpc_server.stop(grace=None)


@pytest.fixture
def client(server):
    with ChronorecClient(server.address, timeout=5.0, backoff_base=0.001, backoff_max=0.01) as chronorec:
        yield chronorec


# --------------------------------------------------------------------------------------------
# Time conversions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 28, 8, 15, 0, 123456, tzinfo=UTC),
        datetime(1969, 7, 20, 20, 17, 40, 500000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_datetime_timestamp_round_trip(moment):
    assert convert.timestamp_to_datetime(convert.to_timestamp(moment)) == moment


def test_unix_timestamp_round_trip():
    for seconds in (0.0, 1_700_000_000.25, -1.5, 893_286_638.0, 1_700_000_000.999_999_9):
        timestamp = convert.to_timestamp(seconds)
        assert 0 <= timestamp.nanos < 1_000_000_000
        assert convert.timestamp_to_unix(timestamp) == pytest.approx(seconds, abs=1e-6)
    assert convert.to_timestamp(-1.5).seconds == -2 and convert.to_timestamp(-1.5).nanos == 500_000_000


def test_naive_datetimes_and_offsets_mean_utc():
    naive = datetime(2026, 1, 2, 3, 4, 5)
    assert convert.to_datetime(naive) == naive.replace(tzinfo=UTC)
    paris = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert convert.to_unix(paris) == convert.to_unix(naive)


def test_iso_strings():
    expected = datetime(2026, 11, 28, 8, 15, tzinfo=UTC)
    for text in ("2026-11-28T08:15:00Z", "2026-11-28T08:15:00+00:00", "2026-11-28 08:15", "2026-11-28T09:15:00+01:00"):
        assert convert.parse_iso(text) == expected
    assert convert.format_iso(expected) == "2026-11-28T08:15:00Z"
    assert convert.format_iso(convert.to_unix("2026-11-28T08:15:00.5Z")) == "2026-11-28T08:15:00.500000Z"
    assert convert.to_timestamp("1970-01-01T00:00:10Z").seconds == 10


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-01", float("nan"), float("inf"), True, None, [1]])
def test_invalid_times_raise_value_error(bad):
    with pytest.raises(ValueError):
        convert.to_timestamp(bad)


def test_optional_timestamp_unset_is_none():
    item = common_pb2.Item(item_id="a", title="A")
    assert convert.optional_timestamp(item, "published_at") is None
    item.published_at.CopyFrom(convert.to_timestamp(0))
    assert convert.optional_timestamp(item, "published_at") == datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Request building
# --------------------------------------------------------------------------------------------


def test_event_from_dict_dataclass_and_core_event():
    from_dict = event_to_proto({"user_id": "u", "item_id": "i", "action": "rating", "value": 4, "timestamp": 10.5})
    assert (from_dict.user_id, from_dict.item_id, from_dict.action, from_dict.value) == ("u", "i", "rating", 4.0)
    assert convert.timestamp_to_unix(from_dict.timestamp) == 10.5
    assert len(from_dict.event_id) == 36  # a generated uuid4

    from_dataclass = event_to_proto(FeedbackEvent("u", "i", "like", timestamp=datetime(2026, 1, 1), event_id="e1"))
    assert from_dataclass.event_id == "e1" and not from_dataclass.HasField("value")
    assert convert.timestamp_to_datetime(from_dataclass.timestamp) == datetime(2026, 1, 1, tzinfo=UTC)

    # The importers' core Event is accepted as is (duck-typed), so `chronorec import` needs no copy.
    core = event_to_proto(Event("e2", "u", "i", "view", 100.0))
    assert core.event_id == "e2" and convert.timestamp_to_unix(core.timestamp) == 100.0

    no_time = event_to_proto(FeedbackEvent("u", "i", "click"))
    assert not no_time.HasField("timestamp")
    assert event_to_proto(FeedbackEvent("u", "i", "click")).event_id != no_time.event_id


@pytest.mark.parametrize(
    "bad",
    [
        {"user_id": "u", "item_id": "i"},  # no action
        {"user_id": "u", "item_id": "i", "action": "like", "timestmp": 1},  # misspelt key
        {"user_id": "", "item_id": "i", "action": "like"},
        {"user_id": "u", "item_id": "x" * 257, "action": "like"},
        {"user_id": "u", "item_id": 7, "action": "like"},
        {"user_id": "u", "item_id": "i", "action": "rating", "value": float("nan")},
        {"user_id": "u", "item_id": "i", "action": "rating", "value": "5"},
        {"user_id": "u", "item_id": "i", "action": "like", "timestamp": "last week"},
        "u,i,like",
    ],
)
def test_invalid_events_raise_value_error(bad):
    with pytest.raises(ValueError):
        event_to_proto(bad)


def test_items_and_history():
    item = item_to_proto(Item("i1", "Toy Story (1995)", category="Animation", published_at=0.0, attributes={"year": "1995"}))
    assert item.category == "Animation" and item.attributes["year"] == "1995"
    assert item.HasField("published_at") and not item.HasField("expires_at")
    dict_item = item_to_proto({"item_id": "i2", "title": "Heat", "expires_at": "2030-01-01T00:00:00Z"})
    assert convert.timestamp_to_datetime(dict_item.expires_at) == datetime(2030, 1, 1, tzinfo=UTC)
    assert item_to_proto(CatalogItem("i3", "Up")).title == "Up"
    with pytest.raises(ValueError):
        item_to_proto({"item_id": "i1", "title": ""})
    with pytest.raises(ValueError):
        item_to_proto({"item_id": "i1", "title": "T", "attributes": {"year": 1995}})

    entry = history_to_proto(HistoryItem("i1", "rating", "2026-01-01T00:00:00Z", 5))
    assert entry.value == 5.0
    assert history_to_proto({"item_id": "i1", "action": "view", "timestamp": 5}).timestamp.seconds == 5
    with pytest.raises(ValueError, match="timestamp"):
        history_to_proto({"item_id": "i1", "action": "view"})


def test_overrides():
    message = overrides_to_proto({"alpha": 0.3, "history_max_events": 5.0, "w_trend": None})
    assert message.alpha == pytest.approx(0.3) and message.history_max_events == 5
    assert not message.HasField("w_trend") and not message.HasField("w_semantic")
    assert overrides_to_proto({}) is None and overrides_to_proto(None) is None
    for bad in ({"beta": 1.0}, {"alpha": float("inf")}, {"history_max_events": 2.5}, {"alpha": "high"}):
        with pytest.raises(ValueError):
            overrides_to_proto(bad)


def test_recommend_request():
    request = build_recommend_request(
        user_id=None,
        k=5,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        history=[{"item_id": "i1", "action": "like", "timestamp": 1.0}],
        exclude="i9",  # one bare id, not nine characters
        categories=["Comedy", "Drama"],
        overrides={"alpha": 0.5},
    )
    assert request.user_id == "" and request.k == 5 and len(request.history) == 1
    assert list(request.exclude_item_ids) == ["i9"] and list(request.categories) == ["Comedy", "Drama"]
    assert request.overrides.alpha == 0.5 and request.HasField("at")
    assert not build_recommend_request("u").HasField("at")
    for bad in ({"k": 0}, {"k": True}, {"k": 2.0}, {"user_id": 3}, {"exclude": [""]}, {"at": "soon"}):
        with pytest.raises(ValueError):
            build_recommend_request(**bad)


def test_invalid_input_fails_before_any_call(server, client):
    with pytest.raises(ValueError):
        client.recommend("u", k=0)
    with pytest.raises(ValueError):
        client.feedback([{"user_id": "u", "item_id": "i", "action": "like", "bogus": 1}])
    with pytest.raises(ValueError):
        client.feedback([])
    with pytest.raises(ValueError):
        client.encode([])
    with pytest.raises(ValueError):
        client.upsert_items([{"item_id": "i"}])
    assert server.recommender.requests == [] and server.recommender.feedback_batches == []
    assert server.encoder.calls == 0 and server.catalog.upsert_calls == 0


def test_client_constructor_checks():
    with pytest.raises(ValueError, match="mutual TLS"):
        ChronorecClient(tls_cert="cert.pem")
    with pytest.raises(ValueError):
        ChronorecClient(server_name_override="example")
    with pytest.raises(ValueError):
        ChronorecClient(timeout=0)
    with pytest.raises(ValueError):
        ChronorecClient(token="a\nb")


# --------------------------------------------------------------------------------------------
# Calls, retries and metadata against the fakes
# --------------------------------------------------------------------------------------------


def test_retries_unavailable_then_succeeds(server, client):
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    result = client.encode(["a", "b"])
    # gRPC's retry policy made the three attempts: the client itself called once.
    assert server.encoder.calls == 3
    assert result.dimension == 3 and result.model_version == "v-test"
    assert result.vectors == [[pytest.approx(0.6), pytest.approx(0.8), 0.0]] * 2
    array = result.array()
    assert array.dtype == np.float32 and array.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-6)


def test_other_codes_are_not_retried(server, client):
    server.encoder.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(ChronorecClientError) as caught:
        client.encode(["a"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "scripted failure"
    assert server.encoder.calls == 1


def test_retries_stop_after_max_retries(server):
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE] * 10
    with ChronorecClient(server.address, max_retries=2, backoff_base=0.001) as chronorec:
        with pytest.raises(ChronorecClientError) as caught:
            chronorec.encode("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.encoder.calls == 3


def test_deadline_applies_to_each_call(server, client):
    server.encoder.delay = 0.5
    started = time.monotonic()
    with pytest.raises(ChronorecClientError) as caught:
        client.encode("a", timeout=0.1)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.45
    assert server.encoder.calls == 1


def test_unreachable_server_is_unavailable_within_the_deadline():
    with ChronorecClient("127.0.0.1:1", timeout=1.0, backoff_base=0.01) as chronorec:
        started = time.monotonic()
        with pytest.raises(ChronorecClientError) as caught:
            chronorec.encode("a")
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 3.0


def test_calls_that_are_not_safe_to_repeat_are_not_retried(server, client):
    with pytest.raises(ChronorecClientError):
        client.rollback()
    with pytest.raises(ChronorecClientError):
        client.activate("v2")
    with pytest.raises(ChronorecClientError) as caught:
        client.delete_items(["i1"])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert (server.models.rollback_calls, server.models.activate_calls, server.catalog.delete_calls) == (1, 1, 1)


def test_the_retry_policy_names_each_safe_call_of_the_protos():
    by_service = {
        service.name: service
        for module in (encoder_pb2, recommender_pb2, catalog_pb2, models_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    config = service_config(4, 0.05, 2.0)
    [method_config] = config["methodConfig"]
    named = {(name["service"], name["method"]) for name in method_config["name"]}
    assert named == {(by_service[s].full_name, m) for s, m in RETRYABLE_METHODS}
    for service, method in RETRYABLE_METHODS:
        assert method in by_service[service].methods_by_name
    assert not named & {("chronorec.v1.CatalogService", "DeleteItems"), ("chronorec.v1.ModelService", "ActivateVersion"),
                        ("chronorec.v1.ModelService", "Rollback")}
    policy = method_config["retryPolicy"]
    assert policy == {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "2s", "backoffMultiplier": 2,
                      "retryableStatusCodes": ["UNAVAILABLE"]}
    # gRPC allows 5 attempts at most; no retries means no policy at all.
    assert service_config(9, 0.05, 2.0)["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "methodConfig" not in service_config(0, 0.05, 2.0)


def test_no_retries_at_all_with_max_retries_zero(server):
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE]
    with ChronorecClient(server.address, max_retries=0) as chronorec:
        with pytest.raises(ChronorecClientError) as caught:
            chronorec.encode("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and server.encoder.calls == 1


def test_the_servers_pushback_sets_the_wait_before_the_retry(server, client):
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE]
    server.encoder.pushback_ms = "400"
    assert client.encode("a").model_version == "v-test"
    first, second = server.encoder.arrivals
    # The client's own backoff is at most 10 ms: the 400 ms are the server's.
    assert second - first >= 0.38
    # A negative pushback means "do not retry".
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE]
    server.encoder.pushback_ms = "-1"
    with pytest.raises(ChronorecClientError):
        client.encode("a")
    assert server.encoder.calls == 3


def test_retries_stay_inside_the_calls_deadline(server, client):
    server.encoder.failures = [grpc.StatusCode.UNAVAILABLE] * 10
    server.encoder.pushback_ms = "300"
    started = time.monotonic()
    with pytest.raises(ChronorecClientError) as caught:
        client.encode("a", timeout=0.5)
    assert caught.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - started < 0.9
    assert server.encoder.calls == 2  # at 0 and 0.3 s; the next would start after the deadline


def test_a_retried_feedback_resends_the_same_event_ids(server, client):
    server.recommender.feedback_failures = 1
    result = client.feedback([{"user_id": "u", "item_id": "i", "action": "like"}])
    first, second = server.recommender.feedback_batches
    assert [e.event_id for e in first] == [e.event_id for e in second]
    # The lost answer's events were stored by the first attempt; the retry finds them stored.
    assert (result.stored, result.duplicates) == (0, 1) and len(server.recommender.seen_ids) == 1


def test_token_metadata_arrives_and_stays_out_of_repr(server):
    with ChronorecClient(server.address, token="s3cret") as chronorec:
        chronorec.encode("a")
        assert "s3cret" not in repr(chronorec)
    with ChronorecClient(server.address) as chronorec:
        chronorec.encode("a")
    with_token, without_token = server.encoder.metadata
    assert with_token["authorization"] == "Bearer s3cret"
    assert "authorization" not in without_token


def test_recommend_result_is_plain_data(server, client):
    result = client.recommend(
        "u1", k=3, at=datetime(2026, 5, 1, tzinfo=UTC), history=[HistoryItem("h1", "like", 1_700_000_000.0)]
    )
    assert result.at == datetime(2026, 5, 1, tzinfo=UTC) and result.history_length == 1
    (item,) = result.items
    assert (item.item_id, item.category, item.score, item.cooccurrence, item.trend) == ("i1", "Animation", 0.9, 0.25, 1.0)
    assert item.history[0].title == "Heat (1995)" and item.history[0].contribution == pytest.approx(0.4)
    item_id, title, contribution = item.history[0]
    assert item_id == "h1"


def test_feedback_and_stream_replay_after_unavailable(server, client):
    result = client.feedback([FeedbackEvent("u", "i", "like", event_id="e0")])
    assert (result.stored, result.duplicates) == (1, 0)
    assert client.feedback([{"user_id": "u", "item_id": "i", "action": "like", "event_id": "e0"}]).duplicates == 1

    def batches():  # a one-shot generator: the client must cache it to resend after a retry
        for start in range(0, 30, 10):
            yield [{"user_id": "u", "item_id": f"i{n}", "action": "view", "timestamp": n} for n in range(start, start + 10)]

    server.recommender.fail_stream_once = True
    total = client.feedback_stream(batches())
    # The failed attempt stored the first batch; the replay resends it (duplicates) and the rest.
    assert len(server.recommender.seen_ids) == 31
    assert total.stored + total.duplicates == 30 and total.duplicates >= 10


def test_a_failed_stream_longer_than_the_replay_limit_raises_instead_of_resending(server, client, monkeypatch):
    monkeypatch.setattr(client_module, "STREAM_REPLAY_BYTES", 200)

    def batches():
        for start in range(0, 30, 10):
            yield [{"user_id": "u", "item_id": f"long{n}", "action": "view", "timestamp": n, "event_id": f"long-{n}"}
                   for n in range(start, start + 10)]

    server.recommender.fail_stream_once = True
    with pytest.raises(ChronorecClientError) as caught:
        client.feedback_stream(batches())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    # Sent again whole (ids given: generated ones would differ), the failed attempt's events are duplicates.
    total = client.feedback_stream(batches())
    assert total.stored + total.duplicates == 30 and total.duplicates >= 10


def test_stream_with_an_invalid_event_raises_value_error(server, client):
    def batches():
        yield [{"user_id": "u", "item_id": "i", "action": "view"}]
        yield [{"user_id": "u", "item_id": "i"}]

    with pytest.raises(ValueError, match="missing"):
        client.feedback_stream(batches())


def test_catalog_round_trip(server, client):
    published = datetime(2026, 1, 1, tzinfo=UTC)
    result = client.upsert_items([CatalogItem("i1", "Up", category="Animation", published_at=published, attributes={"a": "b"})])
    assert (result.upserted, result.index_size) == (1, 1)
    assert client.get_item("i1") == CatalogItem("i1", "Up", category="Animation", published_at=published, attributes={"a": "b"})
    with pytest.raises(ChronorecClientError) as caught:
        client.get_item("missing")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_status_and_versions(client):
    status = client.status()
    assert status.manifest["dimension"] == 384 and status.providers == ["CPUExecutionProvider"]
    assert status.loaded_at == datetime.fromtimestamp(1_700_000_000, UTC) and status.metrics == {"ndcg@10": pytest.approx(0.12)}
    versions = client.list_versions()
    assert [v.version for v in versions] == ["v1", "v2", "v3"] and versions[1].serving and versions[1].parent_version == "v1"
    assert versions[1].unusable_reason == "" and "metrics" in versions[2].unusable_reason


# --------------------------------------------------------------------------------------------
# Table formatter and CLI
# --------------------------------------------------------------------------------------------


def test_format_table():
    table = cli.format_table(["rank", "item", "score"], [[1, "toy-story", 0.91234], [10, "up", None]])
    assert table.splitlines() == [
        "rank  item        score",
        "----  ---------  ------",
        "   1  toy-story  0.9123",
        "  10  up",
    ]
    assert cli.format_table(["a", "b"], [["x", 1]], align="rl").splitlines()[2] == "x  1"
    assert cli.format_table(["only"], []).splitlines() == ["only", "----"]
    with pytest.raises(ValueError):
        cli.format_table(["a", "b"], [[1]])


def test_format_pairs():
    assert cli.format_pairs([("version", "v1"), ("index size", 12)]) == "version     v1\nindex size  12"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_encode(server):
    code, out, _ = run_cli("--target", server.address, "encode", "hello world", "bye")
    assert code == 0
    assert "dimension 3" in out and "v-test" in out
    assert "hello world" in out and "1.0000" in out  # the norm column


def test_cli_recommend_with_overrides(server):
    code, out, _ = run_cli(
        "--target", server.address, "recommend", "u1", "--k", "3", "--at", "2026-05-01T00:00:00Z",
        "--category", "Animation", "--exclude", "i9", "--alpha", "0.25", "--history-max-events", "7",
    )  # fmt: skip
    assert code == 0, out
    request = server.recommender.requests[-1]
    assert request.k == 3 and list(request.categories) == ["Animation"] and list(request.exclude_item_ids) == ["i9"]
    assert request.overrides.alpha == 0.25 and request.overrides.history_max_events == 7
    assert "Toy Story (1995)" in out and "Heat (1995)" in out and "2026-05-01T00:00:00Z" in out


def test_cli_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("CHRONOREC_TOKEN", "from-env")
    assert run_cli("--target", server.address, "encode", "x")[0] == 0
    assert server.encoder.metadata[-1]["authorization"] == "Bearer from-env"


def test_cli_grpc_error_exits_1(server):
    server.encoder.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    code, _, err = run_cli("--target", server.address, "encode", "x")
    assert code == 1 and "INVALID_ARGUMENT" in err and "scripted failure" in err


def test_cli_usage_errors_exit_2(server, tmp_path, capsys):
    assert run_cli()[0] == 2
    assert run_cli("--target", server.address, "recommend", "u", "--k", "0")[0] == 2
    assert run_cli("--target", server.address, "recommend", "u", "--at", "someday")[0] == 2
    assert run_cli("--target", server.address, "feedback", "--user", "u")[0] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u", "item_id": "i", "action": "like"}\nnot json\n')
    code, _, err = run_cli("--target", server.address, "feedback", "--file", str(bad))
    assert code == 2 and ":2:" in err
    assert server.recommender.feedback_batches == []


def test_cli_feedback_file_in_batches(server, tmp_path):
    events = tmp_path / "events.jsonl"
    lines = [json.dumps({"user_id": "u", "item_id": f"i{n}", "action": "view", "timestamp": n}) for n in range(1200)]
    events.write_text("\n".join(lines) + "\n\n")
    code, out, _ = run_cli("--target", server.address, "feedback", "--file", str(events))
    assert code == 0 and "stored 1200" in out
    assert [len(batch) for batch in server.recommender.feedback_batches] == [500, 500, 200]


def test_cli_single_feedback(server):
    code, out, _ = run_cli(
        "--target", server.address, "feedback", "--user", "u", "--item", "i", "--action", "rating",
        "--value", "5", "--at", "2026-01-01T00:00:00Z", "--event-id", "e-1",
    )  # fmt: skip
    assert code == 0 and "stored 1" in out
    (event,) = server.recommender.feedback_batches[0]
    assert (event.event_id, event.value, event.timestamp.seconds) == ("e-1", 5.0, 1767225600)


def test_cli_import(server, tmp_path, monkeypatch):
    items = [Item(f"i{n}", f"Item {n}", category="c") for n in range(1200)]
    events = [Event(f"e{n}", "u", f"i{n % 1200}", "view", float(n)) for n in range(2500)]
    loaded = []
    fake = types.ModuleType("chronorec.server.core.importers")
    fake.detect_and_load = lambda path: loaded.append(path) or (items, events)
    monkeypatch.setitem(sys.modules, "chronorec.server.core.importers", fake)
    code, out, _ = run_cli("--target", server.address, "import", str(tmp_path))
    assert code == 0, out
    assert server.catalog.upsert_calls == 3 and len(server.catalog.items) == 1200
    assert [len(batch) for batch in server.recommender.feedback_batches] == [1000, 1000, 500]
    assert "events stored 2500" in out


def test_cli_status_and_versions(server):
    code, out, _ = run_cli("--target", server.address, "status")
    assert code == 0 and "v2" in out and "CPUExecutionProvider" in out and "1682" in out and "ndcg@10" in out
    code, out, _ = run_cli("--target", server.address, "versions")
    assert code == 0 and "serving,active" in out and "ndcg@10=0.1000" in out
    assert "unusable: invalid manifest: metrics must be an object" in out


def test_cli_unreachable_server_exits_1():
    code, _, err = run_cli("--target", "127.0.0.1:1", "--timeout", "0.5", "status")
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err)


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path):
    """A throwaway CA, a server certificate for chronorec.test and a client certificate."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=chronorec-test-ca", cwd=tmp_path)  # fmt: skip
    (tmp_path / "server.ext").write_text("subjectAltName=DNS:chronorec.test\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=tmp_path)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", *extra, cwd=tmp_path)  # fmt: skip
    return tmp_path


def test_mutual_tls(certificates):
    read = lambda name: (certificates / name).read_bytes()  # noqa: E731
    credentials = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))], root_certificates=read("ca.pem"), require_client_auth=True
    )
    encoder = FakeEncoder()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(encoder, grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        tls = {"tls_ca": certificates / "ca.pem", "server_name_override": "chronorec.test"}
        mutual = {"tls_cert": certificates / "client.pem", "tls_key": certificates / "client.key"}
        with ChronorecClient(f"127.0.0.1:{port}", token="t", timeout=5.0, **tls, **mutual) as chronorec:
            assert chronorec.encode("a").model_version == "v-test"
        assert encoder.metadata[0]["authorization"] == "Bearer t"
        # Without a client certificate the handshake fails and the server never sees the call.
        with ChronorecClient(f"127.0.0.1:{port}", timeout=2.0, max_retries=0, **tls) as chronorec:
            with pytest.raises(ChronorecClientError) as caught:
                chronorec.encode("a")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and encoder.calls == 1
    finally:
        grpc_server.stop(grace=None)
