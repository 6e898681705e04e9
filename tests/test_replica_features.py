"""Replicas over one PostgreSQL and one model repository: an erasure, a canary and attribution reach every replica."""

from __future__ import annotations

import time

import pytest

from chronorec.client.client import ChronorecClient, FeedbackEvent
from chronorec.server.core.repository import ModelRepository
from chronorec.trainer.export import publish_base_model
from pgcluster import postgres_cluster, postgres_url  # noqa: F401 - fixtures


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def pair(postgres_url, start_server, tiny_repo):
    # postgres_url first: its database is dropped after the servers stop, not under them.
    return [start_server(tiny_repo, db=postgres_url, demo=True) for _ in range(2)]


def test_an_erasure_on_one_replica_reaches_the_other(pair):
    a, b = pair
    items = sorted(a.engine.catalog)[:4]
    with ChronorecClient(a.target) as on_a, ChronorecClient(b.target) as on_b:
        then = time.time() - 60
        on_a.feedback([FeedbackEvent("leaving", item, "like", then, event_id=f"l-{n}") for n, item in enumerate(items)])
        wait_until(lambda: on_b.recommend("leaving", k=3).history_length == 4)
        events_before = b.engine.state.event_count
        assert on_a.delete_user("leaving").events_deleted == 4
        wait_until(lambda: on_b.recommend("leaving", k=3).history_length == 0)
        assert b.engine.state.event_count == events_before - 4
        # B also refuses to take the erased user's old events back.
        assert on_b.feedback([FeedbackEvent("leaving", items[0], "like", then, event_id="l-0")]).stored == 0


def test_a_canary_on_one_replica_serves_the_same_users_on_the_other(pair, tiny_bert_dir, tiny_repo):
    a, b = pair
    current = ModelRepository(tiny_repo).current()
    candidate = publish_base_model(tiny_bert_dir, tiny_repo, activate=False)
    with ChronorecClient(a.target) as on_a, ChronorecClient(b.target) as on_b:
        on_a.activate(candidate, canary_percent=40)
        wait_until(lambda: on_b.status().canary is not None, timeout=60)
        users = [f"shopper-{n}" for n in range(300)]
        assert [on_a.recommend(u, k=2).model_version for u in users] == [on_b.recommend(u, k=2).model_version for u in users]
        # A recommendation B made is attributed on A: the id carries its version, signed with the repository's key.
        shown = on_b.recommend("shopper-1", k=2)
        on_a.feedback([FeedbackEvent("shopper-1", shown.items[0].item_id, "impression", recommendation_id=shown.recommendation_id,
                                     position=1)])
        assert on_a.status().online_metrics[shown.model_version].impressions == 1
        on_a.abort_canary()
        wait_until(lambda: on_b.status().canary is None)
        assert {on_b.recommend(u, k=2).model_version for u in users} == {current}
