"""Impressions, attribution and online metrics per version: exact counts on a scripted session over a real server."""

from __future__ import annotations

import io
import urllib.request

import grpc
import pytest

from chronorec.client.cli import main as cli
from chronorec.client.client import ChronorecClient, ChronorecClientError, FeedbackEvent
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.online_metrics import OnlineMetrics, RecommendationIds
from chronorec.server.core.store import EventStore
from conftest import ANCHOR

DAY = 86400.0


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "online.db"
    items = [Item(f"item-{n:02d}", f"Film {n}", category="films", published_at=ANCHOR - 400 * DAY) for n in range(20)]
    events = [Event(f"e-{u}-{n}", f"user-{u}", f"item-{(u * 3 + n) % 20:02d}", "like", ANCHOR - 10 * DAY + n)
              for u in range(4) for n in range(5)]
    with EventStore(path) as store:
        store.bulk_import(items, events)
    return path


def impressions(user: str, result, prefix: str) -> list[FeedbackEvent]:
    return [FeedbackEvent(user, item.item_id, "impression", ANCHOR - 50, event_id=f"{prefix}-{n}",
                          recommendation_id=result.recommendation_id, position=n + 1)
            for n, item in enumerate(result.items)]


def test_attribution_counts_are_exact_on_a_scripted_session(start_server, tiny_repo, db):
    server = start_server(tiny_repo, db=db, metrics_port=0)
    with ChronorecClient(server.target) as client:
        first = client.recommend("user-0", k=5, at=ANCHOR)
        second = client.recommend("user-1", k=4, at=ANCHOR)
        version = first.model_version
        assert first.recommendation_id != second.recommendation_id
        assert first.recommendation_id.startswith(version + ".")

        assert client.feedback(impressions("user-0", first, "imp-a")).stored == 5
        # A retried batch stores nothing twice and counts nothing twice.
        assert client.feedback(impressions("user-0", first, "imp-a")).duplicates == 5
        assert client.feedback(impressions("user-1", second, "imp-b")).stored == 4
        items_a, items_b = [i.item_id for i in first.items], [i.item_id for i in second.items]
        rid_a, rid_b = first.recommendation_id, second.recommendation_id
        client.feedback([
            FeedbackEvent("user-0", items_a[0], "click", ANCHOR - 40, event_id="c1", recommendation_id=rid_a, position=1),
            # No position: the server's record of what it returned says 3.
            FeedbackEvent("user-0", items_a[2], "click", ANCHOR - 39, event_id="c2", recommendation_id=rid_a),
            FeedbackEvent("user-0", items_a[2], "purchase", ANCHOR - 38, event_id="p1", recommendation_id=rid_a),
            FeedbackEvent("user-0", items_a[0], "like", ANCHOR - 37, event_id="l1", recommendation_id=rid_a),
            FeedbackEvent("user-0", items_a[1], "view", ANCHOR - 36, event_id="v1", recommendation_id=rid_a),
            FeedbackEvent("user-1", items_b[1], "click", ANCHOR - 35, event_id="c3", recommendation_id=rid_b, position=2),
        ])
        # Stored, but not attributed: an id the server never issued, and another user's id.
        unknown = client.feedback([
            FeedbackEvent("user-2", items_a[0], "click", ANCHOR - 30, event_id="x1",
                          recommendation_id=f"{version}.AAAAAAAAAAAA.AAAAAAAAAAAAAAAA"),
            FeedbackEvent("user-3", items_a[0], "click", ANCHOR - 29, event_id="x2", recommendation_id=rid_a),
        ])
        assert unknown.stored == 2

        status = client.status()
        figures = status.online_metrics[version]
        assert (figures.impressions, figures.clicks, figures.conversions) == (9, 3, 2)
        assert figures.ctr == pytest.approx(3 / 9) and figures.conversion_rate == pytest.approx(2 / 9)
        assert figures.clicks_with_position == 3 and figures.mrr == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
        assert status.unattributed_feedback == 2
        listed = {v.version: v for v in client.list_versions()}
        assert listed[version].online == figures

        for bad in (
            FeedbackEvent("user-0", items_a[0], "impression", ANCHOR, recommendation_id=rid_a),  # no position
            FeedbackEvent("user-0", items_a[0], "impression", ANCHOR, position=1),  # no recommendation id
        ):
            with pytest.raises(ValueError):
                client.feedback([bad])  # the client refuses before the call
    # The server refuses them too, whatever client sends them.
    from chronorec.v1 import common_pb2, recommender_pb2

    for event in (
        common_pb2.Event(event_id="i1", user_id="user-0", item_id="item-01", action="impression", recommendation_id=rid_a),
        common_pb2.Event(event_id="i2", user_id="user-0", item_id="item-01", action="impression", position=1),
        common_pb2.Event(event_id="i3", user_id="user-0", item_id="item-01", action="impression", recommendation_id=rid_a,
                         position=0),
    ):
        with pytest.raises(grpc.RpcError) as info:
            server.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[event]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read().decode()
    assert f'chronorec_online_impressions{{version="{version}"}} 9.0' in scrape
    assert f'chronorec_online_clicks{{version="{version}"}} 3.0' in scrape
    assert f'chronorec_online_conversions{{version="{version}"}} 2.0' in scrape
    assert "chronorec_online_unattributed_feedback_total 2.0" in scrape
    assert f'chronorec_model_memory_bytes{{role="current",version="{version}"}}' in scrape

    out = io.StringIO()
    assert cli(["--target", server.target, "versions"], out=out) == 0
    assert "impressions=9 CTR=0.3333 conversions=2 MRR=0.6111" in out.getvalue()

    # Ids are signed with the repository's key: a restarted server still attributes them.
    server.stop()
    restarted = start_server(tiny_repo, db=db)
    with ChronorecClient(restarted.target) as client:
        client.feedback([FeedbackEvent("user-0", items_a[3], "click", ANCHOR - 20, event_id="c4",
                                       recommendation_id=rid_a, position=4)])
        after = client.status().online_metrics[version]
        assert (after.clicks, after.mrr) == (1, pytest.approx(0.25))
        with pytest.raises(ChronorecClientError):
            client.feedback([FeedbackEvent("user-0", "no-such-item", "click", recommendation_id=rid_a)])


def test_the_window_slides_and_ids_bind_version_and_user():
    now = [1000.0]
    metrics = OnlineMetrics(window_s=60.0, clock=lambda: now[0])
    metrics.impression("v1")
    metrics.click("v1", 2)
    now[0] += 30
    metrics.impression("v1")
    assert metrics.window()["v1"].impressions == 2
    now[0] += 35  # the first second's bucket has left the window
    window = metrics.window()["v1"]
    assert (window.impressions, window.clicks) == (1, 0)
    now[0] += 61
    assert metrics.window() == {}
    assert metrics.totals("v1").impressions == 2 and metrics.totals("v1").mrr == 0.5

    ids = RecommendationIds(b"k" * 32)
    issued = ids.issue("v2.1-beta", "alice")
    assert ids.version_of(issued, "alice") == "v2.1-beta"
    assert ids.version_of(issued, "bob") is None
    assert ids.version_of(issued.replace("v2.1-beta", "v3"), "alice") is None
    assert RecommendationIds(b"x" * 32).version_of(issued, "alice") is None
    anonymous = ids.issue("v2", None)
    assert ids.version_of(anonymous, "anyone") == "v2"
    assert ids.version_of("not-an-id", "alice") is None


def test_recommendation_ids_are_distinct_and_verify_across_nonce_blocks():
    # Nonces are cut from blocks of system randomness: ids stay distinct past a block's end.
    ids = RecommendationIds(b"k" * 32)
    issued = [ids.issue("v1", f"user{n % 7}") for n in range(1000)]
    assert len(set(issued)) == len(issued)
    assert all(ids.version_of(rid, f"user{n % 7}") == "v1" for n, rid in enumerate(issued))
    assert ids.version_of(issued[0], "user3") is None
