"""DeleteUser over a real server: no trace through any RPC, durable across a restart, idempotent, audited, admin only."""

from __future__ import annotations

import logging
import sqlite3

import grpc
import pytest

from chronorec.client.client import ChronorecClient, ChronorecClientError, FeedbackEvent
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import EventStore
from chronorec.trainer.data import read_event_log
from conftest import ANCHOR

DAY = 86400.0
ADMIN, WRITER = "admin-token-0123456789", "write-token-0123456789"
TOKENS = f"admin {ADMIN} ops-desk; write {WRITER} ingest"
VICTIM = "victim"
# Only the victim engaged with both of these: their co-occurrence and "rare"'s trend are theirs alone.
RARE, PARTNER = "rare", "partner"


def catalog() -> list[Item]:
    items = [Item(f"item-{n:02d}", f"Film {n}", text=f"topic {n % 4}", category="films", published_at=ANCHOR - 900 * DAY)
             for n in range(30)]
    items += [Item(RARE, "A rare film", category="films", published_at=ANCHOR - 900 * DAY),
              Item(PARTNER, "Its partner", category="films", published_at=ANCHOR - 900 * DAY)]
    return items


def background() -> list[Event]:
    """Other users' history, long before the trend window; none of them touches RARE or PARTNER."""
    return [Event(f"bg-{u}-{n}", f"user-{u}", f"item-{(u + n) % 30:02d}", "view", ANCHOR - 200 * DAY + 60 * n)
            for u in range(8) for n in range(6)]


def victim_events() -> list[FeedbackEvent]:
    """Recent events: RARE is the most popular item of the last days, and co-occurs with PARTNER."""
    events = [FeedbackEvent(VICTIM, RARE, "like", ANCHOR - DAY + 60 * n, event_id=f"victim-evt-{n}") for n in range(6)]
    events.append(FeedbackEvent(VICTIM, PARTNER, "like", ANCHOR - DAY + 600, event_id="victim-evt-partner"))
    return events


def observe(client: ChronorecClient) -> dict:
    """Everything the RPCs say that the victim's events could have moved."""
    victim = client.recommend(VICTIM, k=5, at=ANCHOR)
    cold = client.recommend("someone-new", k=5, at=ANCHOR)
    peer = client.recommend(history=[{"item_id": PARTNER, "action": "like", "timestamp": ANCHOR - 60}], k=40, at=ANCHOR)
    similar = client.similar_items(PARTNER, k=40, at=ANCHOR, semantic_weight=0.0)
    return {
        "victim_history": victim.history_length,
        "victim_items": [i.item_id for i in victim.items],
        "cold_items": [i.item_id for i in cold.items],
        "rare_trend": max((i.trend for i in cold.items if i.item_id == RARE), default=0.0),
        "peer_rare_cooc": max((i.cooccurrence for i in peer.items if i.item_id == RARE), default=0.0),
        "similar_rare_cooc": max((i.cooccurrence for i in similar.items if i.item_id == RARE), default=0.0),
    }


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "erasure.db"
    with EventStore(path) as store:
        store.bulk_import(catalog(), background())
    return path


def test_erasure_leaves_no_trace_and_survives_a_restart(start_server, tiny_repo, db, caplog):
    server = start_server(tiny_repo, db=db, inline_tokens=TOKENS)
    with ChronorecClient(server.target, token=ADMIN) as client:
        shown = client.recommend(VICTIM, k=3, at=ANCHOR)
        client.feedback(victim_events())
        client.feedback([FeedbackEvent(VICTIM, item.item_id, "impression", ANCHOR - 30, event_id=f"victim-imp-{n}",
                                       recommendation_id=shown.recommendation_id, position=n + 1)
                         for n, item in enumerate(shown.items)])
        server.engine.refit_cooccurrence()  # as the periodic refresh would
        before = observe(client)
        assert before["victim_history"] == 7
        assert before["cold_items"][0] == RARE and before["rare_trend"] > 0
        assert before["peer_rare_cooc"] > 0 and before["similar_rare_cooc"] > 0

        with caplog.at_level(logging.INFO, logger="chronorec.audit"):
            erased = client.delete_user(VICTIM)
        assert (erased.events_deleted, erased.impressions_deleted) == (7, 3)
        audit = [r.getMessage() for r in caplog.records if r.name == "chronorec.audit"]
        assert audit == [f"user erased: user_id='{VICTIM}' by=ops-desk events=7 impressions=3"]

        after = observe(client)
        assert after["victim_history"] == 0
        assert after["victim_items"] == after["cold_items"], "the victim is a cold start"
        assert RARE not in after["cold_items"][:1] and after["rare_trend"] == 0.0
        assert after["peer_rare_cooc"] == 0.0 and after["similar_rare_cooc"] == 0.0
        # Replaying the victim's events (a retry, a re-import) does not bring them back.
        assert client.feedback(victim_events()).stored == 0
        assert observe(client) == after
        # Idempotent: nothing is left to delete.
        again = client.delete_user(VICTIM)
        assert (again.events_deleted, again.impressions_deleted) == (0, 0)
    with ChronorecClient(server.target, token=WRITER) as writer, pytest.raises(ChronorecClientError) as info:
        writer.delete_user("someone")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    server.stop()

    # Gone from the database files too (zeroed pages, checkpointed WAL), not only from the tables.
    raw = b"".join(path.read_bytes() for path in db.parent.glob(db.name + "*"))
    assert b"victim-evt" not in raw and b"victim-imp" not in raw
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE user_id = ?", (VICTIM,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM impressions WHERE user_id = ?", (VICTIM,)).fetchone() == (0,)

    restarted = start_server(tiny_repo, db=db, inline_tokens=TOKENS)
    with ChronorecClient(restarted.target, token=ADMIN) as client:
        assert observe(client) == after


def test_the_trainer_leaves_out_erased_users(tmp_path):
    path = tmp_path / "trainer.db"
    with EventStore(path) as store:
        store.bulk_import(catalog(), background())
        store.add_events([Event(f"v-{n}", VICTIM, RARE, "like", ANCHOR - DAY + n) for n in range(3)])
        assert store.delete_user(VICTIM) == (3, 0)
        # A copy of the events restored from an old backup, written behind the store's back.
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO events (event_id, user_id, item_id, action, timestamp, received_at) "
                         "VALUES ('restored', ?, ?, 'like', ?, 0)", (VICTIM, RARE, ANCHOR - DAY))
        # Events after the erasure are a returning user's new history, kept.
        later = store.deleted_users()[VICTIM] + 60
        store.add_events([Event("v-later", VICTIM, PARTNER, "like", later)])
    log = read_event_log(path)
    victim_events_read = [e.event_id for e in log.events if e.user_id == VICTIM]
    assert victim_events_read == ["v-later"]
    assert len(log.events) == len(background()) + 1


def test_forgetting_a_user_leaves_the_state_of_never_having_seen_them():
    import random

    import numpy as np

    from chronorec.server.core.interactions import InteractionState

    rng = random.Random(3)
    events = [Event(f"e{n}", f"u{rng.randrange(4)}", f"i{rng.randrange(6)}", "view", float(rng.randrange(50)))
              for n in range(300)]
    with_victim, without = InteractionState(), InteractionState()
    with_victim.add(events[:150])
    with_victim.trend_counts(100.0, 100.0)  # merged once, then more events wait in the pending list
    with_victim.add(events[150:])
    without.add([e for e in events if e.user_id != "u0"])
    assert with_victim.remove_user("u0") == sum(e.user_id == "u0" for e in events)
    assert with_victim.remove_user("u0") == 0
    items = [f"i{n}" for n in range(6)]
    for at, window in ((10.0, 5.0), (30.0, 30.0), (49.0, 49.0)):
        assert list(with_victim.trend_counts(at, window, items)) == list(without.trend_counts(at, window, items))
        assert with_victim.trending(at, window, 6) == without.trending(at, window, 6)
        first = with_victim.first_event_times(at, with_victim.indices_of(items))
        assert np.array_equal(first, without.first_event_times(at, without.indices_of(items)), equal_nan=True)
    assert with_victim.history("u0", 100.0) == [] and with_victim.event_count == without.event_count
    assert with_victim.user_items() == without.user_items()
    # Its event ids are forgotten too: the same ids may be stored again.
    assert with_victim.add([events[0]]) == (1 if events[0].user_id == "u0" else 0)
