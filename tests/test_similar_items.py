"""SimilarItems over a real server: availability as of `at`, co-occurrence and semantic neighbours, bad input."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import EventStore
from chronorec.v1 import catalog_pb2, recommender_pb2
from conftest import ANCHOR

DAY = 86400.0
PUBLISHED_LATER = ANCHOR - 10 * DAY  # "late": published at this time
EXPIRES = ANCHOR - 5 * DAY  # "short": expires at this time


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def catalog() -> list[Item]:
    items = [Item(f"item-{n:02d}", f"Film number {n}", text=f"a story about topic {n % 5}", category=f"c{n % 3}",
                  published_at=ANCHOR - 400 * DAY) for n in range(24)]
    items += [
        Item("seed", "The seed film", text="a heist in a rainy city", category="c0", published_at=ANCHOR - 400 * DAY),
        Item("late", "Published later", text="a heist sequel", category="c0", published_at=PUBLISHED_LATER),
        Item("short", "Expires early", text="a heist remake", category="c1", published_at=ANCHOR - 400 * DAY,
             expires_at=EXPIRES),
        Item("gone", "Deleted soon", text="a heist parody", category="c0", published_at=ANCHOR - 400 * DAY),
    ]
    return items


def events() -> list[Event]:
    """Six users engage with the seed and each of late, short and gone: those are its co-occurrence neighbours."""
    out = []
    for user in range(6):
        for step, item in enumerate(("seed", "late", "short", "gone", f"item-{user:02d}")):
            out.append(Event(f"e-{user}-{step}", f"user-{user}", item, "like", ANCHOR - 30 * DAY + 60 * step + user))
    return out


@pytest.fixture
def server(start_server, tiny_repo, tmp_path):
    db = tmp_path / "similar.db"
    with EventStore(db) as store:
        store.bulk_import(catalog(), events())
    handle = start_server(tiny_repo, db=db)
    handle.catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(item_ids=["gone"]))
    return handle


def similar(server, at: float, **fields) -> recommender_pb2.SimilarItemsResponse:
    fields.setdefault("item_id", "seed")
    fields.setdefault("k", 100)
    return server.recommender.SimilarItems(recommender_pb2.SimilarItemsRequest(at=ts(at), **fields))


def test_similar_items_respect_availability_as_of_at(server):
    before_publication = {i.item_id for i in similar(server, PUBLISHED_LATER - DAY).items}
    between = {i.item_id for i in similar(server, (PUBLISHED_LATER + EXPIRES) / 2).items}
    after_expiry = {i.item_id for i in similar(server, ANCHOR).items}

    assert "short" in before_publication and "late" not in before_publication
    assert {"late", "short"} <= between
    assert "late" in after_expiry and "short" not in after_expiry
    for returned in (before_publication, between, after_expiry):
        assert "gone" not in returned, "a deleted item is never returned"
        assert "seed" not in returned, "the query item is never its own neighbour"
    # Everything else in the catalog is available at ANCHOR and k covers it all.
    assert len(after_expiry) == 24 + 1


def test_cooccurrence_neighbours_lead_with_their_reasons(server):
    response = similar(server, ANCHOR, semantic_weight=0.0)
    first = response.items[0]
    assert first.item_id == "late" and first.cooccurrence == pytest.approx(1.0)
    assert first.score == pytest.approx(first.cooccurrence)
    assert response.semantic_weight == 0.0 and response.model_version == server.engine.serving_version()
    # Each user's own item co-occurs with the seed through one user only: weaker than "late".
    weaker = {i.item_id: i.cooccurrence for i in response.items}
    assert 0 < weaker["item-00"] < 1.0
    assert weaker["item-23"] == 0.0
    # Semantic similarity alone orders by the vectors, and each reason is the cosine.
    semantic = similar(server, ANCHOR, semantic_weight=1.0)
    scores = [i.score for i in semantic.items]
    assert scores == sorted(scores, reverse=True)
    assert all(i.score == pytest.approx(i.semantic) and -1.0001 <= i.semantic <= 1.0001 for i in semantic.items)


def test_filters_and_a_text_query(server):
    response = similar(server, ANCHOR, categories=["c0"], exclude_item_ids=["late"], k=5)
    assert len(response.items) == 5
    assert all(i.category == "c0" and i.item_id != "late" for i in response.items)
    by_text = server.recommender.SimilarItems(
        recommender_pb2.SimilarItemsRequest(text="a heist in a rainy city", k=3, at=ts(ANCHOR))
    )
    assert len(by_text.items) == 3
    assert all(i.cooccurrence == 0.0 for i in by_text.items), "a text has no co-occurrence"
    assert "short" not in {i.item_id for i in by_text.items}


@pytest.mark.parametrize(
    "request_fields, code",
    [
        (dict(item_id="no-such-item", k=3), grpc.StatusCode.NOT_FOUND),
        (dict(item_id="gone", k=3), grpc.StatusCode.NOT_FOUND),
        (dict(k=3), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(item_id="seed", k=0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(item_id="seed", k=3, semantic_weight=1.5), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(text="   ", k=3), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_similar_items_requests(server, request_fields, code):
    with pytest.raises(grpc.RpcError) as info:
        server.recommender.SimilarItems(recommender_pb2.SimilarItemsRequest(**request_fields))
    assert info.value.code() == code
