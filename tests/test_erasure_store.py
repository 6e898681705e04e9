"""Erasure and impressions in both store backends (SQLite file, real PostgreSQL): one contract, and the PostgreSQL log entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.pg_store import PostgresEventStore
from chronorec.server.core.stores import open_store
from pgcluster import postgres_cluster, postgres_url  # noqa: F401 - fixtures


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path: Path):
    target = str(tmp_path / "events.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_store(target)
    s.upsert_items([Item(f"i{k}", f"Title {k}") for k in range(3)])
    yield s
    s.close()


def ev(event_id: str, user: str, item: str = "i0", t: float = 1000.0) -> Event:
    return Event(event_id, user, item, "click", t)


def shown(event_id: str, user: str, position: int = 1, t: float = 1000.0) -> Impression:
    return Impression(event_id, user, "i1", "v1.nonce.mac", position, t)


def test_impressions_are_stored_once_and_apart_from_events(store):
    stored, duplicates = store.add_impressions([shown("s1", "u1"), shown("s2", "u1", 2), shown("s1", "u1")])
    assert [i.event_id for i in stored] == ["s1", "s2"] and duplicates == 1
    assert store.add_impressions([shown("s2", "u1", 2)]) == ([], 1)
    assert store.count_impressions() == 2 and store.count_impressions("u1") == 2
    assert store.count_events() == 0, "an impression is no event of the history"
    for bad in (shown("s3", "u1", position=0), Impression("s4", "u1", "i1", "", 1, 1000.0)):
        with pytest.raises(errors.InvalidArgument):
            store.add_impressions([bad])


def test_delete_user_removes_and_remembers(store):
    store.add_events([ev("a1", "alice"), ev("a2", "alice", "i1", 1001.0), ev("b1", "bob")])
    store.add_impressions([shown("sa", "alice"), shown("sb", "bob")])
    assert store.delete_user("alice") == (2, 1)
    assert store.events_for_user("alice") == [] and [e.event_id for e in store.events_for_user("bob")] == ["b1"]
    assert store.count_impressions("alice") == 0 and store.count_impressions("bob") == 1
    assert set(store.deleted_users()) == {"alice"}
    # Idempotent, and the erasure keeps the user's old events (same ids or not) out for good.
    assert store.delete_user("alice") == (0, 0)
    assert store.add_events([ev("a1", "alice"), ev("a3", "alice", t=500.0)]) == ([], 2)
    assert store.add_impressions([shown("sa", "alice")]) == ([], 1)
    store.bulk_import([], [ev("a4", "alice", t=900.0)])
    assert store.events_for_user("alice") == []
    # A user who comes back after the erasure starts a new history.
    later = store.deleted_users()["alice"] + 10
    stored, _ = store.add_events([ev("a5", "alice", t=later)])
    assert [e.event_id for e in stored] == ["a5"]
    with pytest.raises(errors.InvalidArgument):
        store.delete_user("")


def test_postgres_logs_the_erasure_for_replicas(request):
    store = open_store(request.getfixturevalue("postgres_url"))
    try:
        assert isinstance(store, PostgresEventStore)
        store.upsert_items([Item("i0", "Title")])
        store.add_events([ev("a1", "alice"), ev("b1", "bob")])
        before = store.max_change_seq()
        store.delete_user("alice")
        changes = store.changes_since(before)
        assert [(c.kind, c.user_id, c.item_id) for c in changes] == [("delete_user", "alice", "")]
        assert changes[0].seq == before + 1 == store.max_change_seq()
        # The erased user's event left the log; the erasure is in it, at its own seq.
        kinds = [(c.kind, c.event.event_id if c.event else c.user_id) for c in store.changes_since(0)]
        assert ("event", "a1") not in kinds and ("event", "b1") in kinds and ("delete_user", "alice") in kinds
    finally:
        store.close()
