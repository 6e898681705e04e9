"""One store contract over both backends (SQLite file, real PostgreSQL), plus PostgreSQL's log and outages."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.pg_store import (
    BUSY_MESSAGE,
    CHANGES_CHANNEL,
    NO_CONNECTION_MESSAGE,
    SCHEMA_VERSION,
    UNREACHABLE_MESSAGE,
    PostgresEventStore,
)
from chronorec.server.core.store import EventStore
from chronorec.server.core.stores import open_store
from pgcluster import PostgresCluster, postgres_cluster, postgres_url  # noqa: F401 - fixtures

WRITERS = 8


def items(n: int = 3) -> list[Item]:
    return [Item(f"i{k}", f"Title {k}", category="c", published_at=100.0, attributes={"k": str(k)}) for k in range(n)]


def ev(event_id: str, user: str = "u1", item: str = "i0", t: float = 1000.0, action: str = "view",
       value: float | None = None) -> Event:
    return Event(event_id, user, item, action, t, value)


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path: Path) -> str:
    """Where a store lives: an SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(target: str):
    s = open_store(target)
    s.upsert_items(items())
    yield s
    s.close()


def is_postgres(store) -> bool:
    return isinstance(store, PostgresEventStore)


def run_threads(targets: list[Callable[[], None]], timeout: float = 120) -> None:
    """Run each callable in its own thread; re-raise the first failure of any of them."""
    failures: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if failures:
        raise failures[0]


def event_seqs(store) -> list[int]:
    return [seq for seq, _ in store.iter_events()]


# -- the factory --------------------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path: Path, postgres_url: str):
    with open_store(tmp_path / "a.db") as s:
        assert type(s) is EventStore
    with open_store(str(tmp_path / "b.db")) as s:
        assert type(s) is EventStore and s.path == tmp_path / "b.db"
    with open_store(postgres_url) as s:
        assert type(s) is PostgresEventStore and s.schema_version() == SCHEMA_VERSION
    with open_store(postgres_url.replace("postgresql://", "postgres://"), read_only=True) as s:
        assert type(s) is PostgresEventStore and s.read_only
    with pytest.raises(errors.InvalidArgument, match="'mysql'"):
        open_store("mysql://localhost/db")


def test_postgres_url_without_the_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "chronorec.server.core.pg_store", raising=False)
    with pytest.raises(errors.FailedPrecondition, match="psycopg is missing.*`postgres` extra"):
        open_store("postgresql://chronorec@127.0.0.1/db")


# -- idempotency and atomicity ------------------------------------------------------------------


def test_idempotent_under_8_concurrent_writers_of_the_same_ids(target: str):
    """Eight writers, each with its own store object (its own connections, as separate processes
    would have), send the same event ids at the same moment: each id is stored exactly once."""
    with open_store(target) as setup:
        setup.upsert_items(items())
    rounds, shared_batch = 20, 30
    barrier = threading.Barrier(WRITERS, timeout=60)
    stored_by: dict[str, list[int]] = {}
    lock = threading.Lock()

    def writer(w: int) -> None:
        with open_store(target) as s:
            for r in range(rounds):
                barrier.wait()
                # One shared id, one of the writer's own, and a batch of shared ids in another order.
                many = [f"many-{r}-{k}" for k in range(shared_batch)]
                ids = [f"same-{r}", f"own-{w}-{r}"] + (many if w % 2 else many[::-1])
                stored, duplicates = s.add_events([ev(i, user=f"u{w}", t=1000.0 + r) for i in ids])
                assert len(stored) + duplicates == len(ids)
                with lock:
                    for e in stored:
                        stored_by.setdefault(e.event_id, []).append(w)

    run_threads([lambda w=w: writer(w) for w in range(WRITERS)])
    with open_store(target) as s:
        expected = rounds * (1 + WRITERS + shared_batch)
        assert s.count_events() == expected == len(stored_by)
        assert all(len(writers) == 1 for writers in stored_by.values()), "an id was stored twice"
        stored_ids = [e.event_id for _, e in s.iter_events()]
        assert len(stored_ids) == len(set(stored_ids)) == expected
        # A retry after the race changes nothing.
        assert s.add_events([ev("same-0"), ev("many-3-7")]) == ([], 2)


def test_retried_batch_is_idempotent(store):
    batch = [ev("e1"), ev("e2", t=1001), ev("e3", user="u2", item="i1")]
    stored, dup = store.add_events(batch)
    assert stored == batch and dup == 0
    assert store.add_events(batch) == ([], 3)
    # Duplicates inside one batch are stored once; the first copy wins.
    stored, dup = store.add_events([ev("e4"), ev("e4", t=5.0), ev("e1")])
    assert [e.event_id for e in stored] == ["e4"] and dup == 2
    assert store.count_events() == 4
    assert [e.timestamp for e in store.events_for_user("u1") if e.event_id == "e4"] == [1000.0]
    # Returned as stored: times and values as floats.
    stored, _ = store.add_events([Event("e5", "u1", "i0", "rating", 1002, 4)])
    assert stored == [Event("e5", "u1", "i0", "rating", 1002.0, 4.0)]
    assert isinstance(stored[0].timestamp, float) and isinstance(stored[0].value, float)


def _log_position(store) -> tuple:
    position = (store.count_items(), store.count_events(), store.max_seq())
    return position + ((store.max_change_seq(),) if is_postgres(store) else ())


def test_batches_are_all_or_nothing(store):
    store.add_events([ev("kept")])
    before = _log_position(store)
    with pytest.raises(errors.InvalidArgument, match=r"^event 3 \(id 'b'\): action 'teleport'"):
        store.add_events([ev("g1"), ev("g2"), ev("g3"), ev("b", action="teleport"), ev("g5")])
    with pytest.raises(errors.NotFound, match=r"^event 2 \(id 'g3'\): unknown item 'ghost'"):
        store.add_events([ev("g1"), ev("g2"), ev("g3", item="ghost")])
    with pytest.raises(errors.InvalidArgument, match=r"^item 1 \(id 'x'\): expires_at must be later"):
        store.upsert_items([Item("ok", "fine"), Item("x", "t", published_at=10.0, expires_at=10.0)])
    with pytest.raises(errors.NotFound, match="'nope'"):
        store.delete_items(["i0", "nope"])
    with pytest.raises(errors.NotFound, match="unknown item 'zz'"):
        store.bulk_import([Item("new", "New")], [ev("n1", item="new"), ev("n2", item="zz")])
    assert _log_position(store) == before
    assert store.get_item("ok") is None and store.get_item("new") is None and store.get_item("i0") is not None
    assert [e.event_id for _, e in store.iter_events()] == ["kept"]


def test_readers_never_see_half_a_batch(target: str):
    with open_store(target) as writer:
        writer.upsert_items(items())
        reader = open_store(target, read_only=True)
        done = threading.Event()
        n_batches, per_batch = 120, 4

        def write() -> None:
            try:
                for b in range(n_batches):
                    writer.add_events([ev(f"w{b}-{k}", user=f"u{k}", t=float(b)) for k in range(per_batch)])
            finally:
                done.set()

        def read() -> None:
            last = 0
            while not done.is_set():
                now = reader.count_events()
                assert now >= last and now % per_batch == 0  # whole batches only
                assert len(reader.events_for_user("u0")) * per_batch <= reader.count_events()
                last = now

        try:
            run_threads([write, read, read])
            assert reader.count_events() == n_batches * per_batch
            assert reader.max_seq() == writer.max_seq()
            with pytest.raises(errors.FailedPrecondition):
                reader.add_events([ev("from-reader")])
        finally:
            reader.close()


def test_sequence_has_no_gaps_under_concurrent_writers(target: str):
    """Event seqs under 8 writers (batches of 1 to 5, some ids shared so some rows are skipped)
    are consecutive, and a follower polling iter_events(cursor) meanwhile sees every event exactly
    once, in seq order: no seq ever becomes visible after a larger one it already read."""
    with open_store(target) as setup:
        setup.upsert_items(items())
        start = setup.max_seq()
    rounds, shared_ids = 30, 7
    writing = [WRITERS]
    writing_lock = threading.Lock()
    followed: list[int] = []

    def writer(w: int) -> None:
        try:
            with open_store(target) as s:
                for b in range(rounds):
                    size = 1 + (w + b) % 5
                    s.add_events([ev(f"w{w}-{b}-{k}", user=f"u{w}") for k in range(size)]
                                 + [ev(f"shared-{b % shared_ids}")])
        finally:
            with writing_lock:
                writing[0] -= 1

    def follower() -> None:
        with open_store(target, read_only=True) as s:
            cursor = start
            while True:
                with writing_lock:
                    finished = writing[0] == 0  # one more pass after the last writer is done
                for seq, _ in s.iter_events(since_seq=cursor):
                    followed.append(seq)
                    cursor = seq
                if finished:
                    return

    run_threads([lambda w=w: writer(w) for w in range(WRITERS)] + [follower])
    with open_store(target) as s:
        seqs = event_seqs(s)
        assert len(seqs) == sum(1 + (w + b) % 5 for w in range(WRITERS) for b in range(rounds)) + shared_ids
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the event sequence has a gap"
        assert seqs[0] > start
        assert followed == seqs, "the follower missed or repeated an event"


# -- the catalog ---------------------------------------------------------------------------------


def test_upsert_get_iter_count(store):
    assert store.count_items() == 3
    assert store.get_item("i1") == items()[1]
    assert store.get_item("nope") is None
    assert set(store.get_items(["i2", "i0", "nope"])) == {"i0", "i2"}
    assert [it.item_id for it in store.iter_items()] == ["i0", "i1", "i2"]
    store.upsert_items([Item("i1", "New title", expires_at=5.0)])
    assert store.get_item("i1") == Item("i1", "New title", expires_at=5.0)
    assert store.count_items() == 3
    # Within one batch the last copy of an id wins.
    assert store.upsert_items([Item("dup", "first"), Item("dup", "second", attributes={"a": "b"})]) == 2
    assert store.get_item("dup") == Item("dup", "second", attributes={"a": "b"})


def test_items_are_ordered_by_code_point_like_sqlite(store):
    ids = ["B", "a", "é", "Z-1", "z", "a b", "ä", "10", "9"]
    store.upsert_items([Item(i, "t") for i in ids])
    assert [it.item_id for it in store.iter_items()] == sorted(ids + ["i0", "i1", "i2"])


@pytest.mark.parametrize("bad, fragment", [
    (Item("", "t"), "item_id"),
    (Item("x" * 257, "t"), "longer than 256"),
    (Item("a\x9fb", "t"), "item_id contains control characters"),
    (Item("x", "  "), "title"),
    (Item("x", "t", published_at=float("nan")), "published_at"),
    (Item("x", "t", attributes={"a": 1}), "attributes"),
])
def test_upsert_rejects_bad_item_and_writes_nothing(store, bad: Item, fragment: str):
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        store.upsert_items([Item("ok", "fine"), bad])
    assert info.value.message.startswith(f"item 1 (id {bad.item_id!r})")
    assert store.get_item("ok") is None


def test_delete_is_soft_all_or_nothing_and_upsert_revives(store):
    store.add_events([ev("before")])
    with pytest.raises(errors.NotFound, match="'nope'"):
        store.delete_items(["i0", "nope"])
    assert store.count_items() == 3
    assert store.delete_items(["i0", "i1", "i0"]) == 2
    assert store.delete_items(["i0"]) == 0  # a retried delete succeeds
    assert store.get_item("i0") is None and store.count_items() == 1
    assert [it.item_id for it in store.iter_items()] == ["i2"]
    assert store.get_items(["i0", "i2"]).keys() == {"i2"}
    with pytest.raises(errors.NotFound, match="'i0' is deleted"):
        store.add_events([ev("after", item="i0")])
    # The events of a deleted item stay in the log.
    assert [e.event_id for e in store.events_for_user("u1")] == ["before"]
    store.upsert_items([Item("i0", "Back")])
    assert store.get_item("i0").title == "Back"
    assert store.add_events([ev("after", item="i0")])[0]


def test_iter_items_pages_through_large_catalog(target: str):
    with open_store(target) as s:
        s.upsert_items([Item(f"item-{k:05d}", "t") for k in range(4500)])
        ids = [it.item_id for it in s.iter_items()]
        assert ids == sorted(ids) and len(ids) == 4500 == s.count_items()


# -- the event log --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, fragment", [
    (ev(""), "event_id"),
    (ev("b", user=""), "user_id"),
    (ev("b", item="x" * 300), "item_id is longer"),
    (ev("b", user="a\x85b"), "user_id contains control characters"),
    (ev("b", user="a\x00b"), "user_id contains control characters"),
    (ev("b", action="teleport"), "action 'teleport'"),
    (ev("b", t=float("nan")), "timestamp"),
    (ev("b", t=1.7e12), "timestamp"),
    (ev("b", action="rating", value=float("inf")), "value"),
])
def test_one_bad_event_stores_nothing_and_is_named(store, bad: Event, fragment: str):
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        store.add_events([ev("g1"), ev("g2"), ev("g3"), bad, ev("g5")])
    assert info.value.message.startswith(f"event 3 (id {bad.event_id!r}): ")
    assert store.count_events() == 0


def test_events_for_user_as_of(store):
    store.add_events([ev("a", t=300), ev("b", t=100), ev("c", t=200), ev("d", t=200, item="i1"),
                      ev("x", user="u2", t=150)])
    assert [e.event_id for e in store.events_for_user("u1")] == ["b", "c", "d", "a"]
    assert [e.event_id for e in store.events_for_user("u1", until=200)] == ["b", "c", "d"]
    assert [e.event_id for e in store.events_for_user("u1", until=199.5)] == ["b"]
    assert store.events_for_user("u1", until=50) == []
    assert [e.event_id for e in store.events_for_user("u1", until=250, limit=2)] == ["c", "d"]
    assert store.events_for_user("u1", limit=0) == []
    assert store.events_for_user("nobody") == []
    assert store.events_for_user("u2")[0] == Event("x", "u2", "i0", "view", 150.0, None)


def test_iter_events_in_arrival_order(store):
    assert store.max_seq() == 0
    store.add_events([ev("z", t=5), ev("a", t=1)])
    store.add_events([ev("m", t=3)])
    seqs_events = list(store.iter_events())
    assert [e.event_id for _, e in seqs_events] == ["z", "a", "m"]
    assert store.max_seq() == seqs_events[-1][0]
    assert [e.event_id for _, e in store.iter_events(since_seq=seqs_events[0][0])] == ["a", "m"]
    assert list(store.iter_events(since_seq=store.max_seq())) == []
    assert store.count_users() == 1


def test_bulk_import_idempotent_and_checked(target: str):
    with open_store(target) as s:
        its = items(2)
        events = [ev(f"b{k}", user=f"u{k % 7}", item=f"i{k % 2}", t=float(k)) for k in range(2500)]
        assert s.bulk_import(its, events, batch_size=1000) == (2, 2500, 0)
        assert s.bulk_import(its, events, batch_size=1000) == (2, 0, 2500)
        assert [e.event_id for _, e in s.iter_events()] == [e.event_id for e in events]
        with pytest.raises(errors.InvalidArgument, match="event 1"):
            s.bulk_import([], [ev("n1"), ev("n2", action="nope")])
        with pytest.raises(errors.InvalidArgument, match="batch_size"):
            s.bulk_import([], [ev("n1")], batch_size=0)
        assert s.bulk_import([], [ev("n1", item="i1"), ev("n1", item="i0")]) == (0, 1, 1)
        assert s.count_events() == 2501 and s.count_users() == 7


# -- reopening ------------------------------------------------------------------------------------


def test_everything_reads_back_after_reopening(target: str):
    with open_store(target) as s:
        s.upsert_items(items() + [Item("gone", "Gone")])
        s.add_events([ev("a", t=10), ev("b", user="u2", item="i1", t=20, action="rating", value=4.5)])
        s.delete_items(["gone"])
        version = s.schema_version()
        before = (list(s.iter_items()), list(s.iter_events()), s.max_seq(), s.count_users())
    with pytest.raises(errors.Unavailable, match="closed"):
        s.count_items()
    with pytest.raises(errors.Unavailable, match="closed"):
        s.add_events([ev("late")])
    s.close()  # closing twice is harmless
    with open_store(target) as again:
        assert again.schema_version() == version
        assert (list(again.iter_items()), list(again.iter_events()), again.max_seq(), again.count_users()) == before
        assert again.add_events([ev("a"), ev("c", t=30)])[1] == 1
        assert again.max_seq() > before[2]
    with open_store(target, read_only=True) as reader:
        assert reader.count_events() == 3


def test_read_only_store_needs_a_migrated_schema(target: str):
    with pytest.raises(errors.Unavailable):
        open_store(target, read_only=True)


# -- PostgreSQL: the change log --------------------------------------------------------------------


@pytest.fixture
def pg_store(postgres_url: str):
    s = PostgresEventStore(postgres_url, connect_timeout_s=2)
    s.upsert_items(items())
    yield s
    s.close()


def replay(changes) -> tuple[dict[str, Item], dict[str, Event]]:
    """The live catalog and the events that applying `changes` in order gives."""
    live: dict[str, Item] = {}
    events: dict[str, Event] = {}
    for change in changes:
        if change.kind == "upsert":
            live[change.item_id] = change.item
        elif change.kind == "delete":
            live.pop(change.item_id, None)
        else:
            events[change.event.event_id] = change.event
    return live, events


def test_change_log_numbers_events_and_catalog_changes_without_gaps(pg_store: PostgresEventStore):
    pg_store.add_events([ev("e1"), ev("e1"), ev("e2", item="i1")])
    pg_store.upsert_items([Item("i3", "Three", attributes={"x": "y"}), Item("i3", "Three again")])
    assert pg_store.delete_items(["i1", "i1"]) == 1
    assert pg_store.delete_items(["i1"]) == 0  # nothing changed, nothing logged
    changes = list(pg_store.iter_changes())
    assert [(c.seq, c.kind, c.item_id) for c in changes] == [
        (1, "upsert", "i0"), (2, "upsert", "i1"), (3, "upsert", "i2"),
        (4, "event", "i0"), (5, "event", "i1"),
        (6, "upsert", "i3"),
        (7, "delete", "i1"),
    ]
    assert changes[3].event == ev("e1") and changes[5].item == Item("i3", "Three again")
    assert pg_store.max_change_seq() == 7 and pg_store.max_seq() == 5
    assert [c.seq for c in pg_store.changes_since(5, limit=1)] == [6]
    assert pg_store.changes_since(7) == []


def test_change_log_has_no_gaps_and_replays_to_the_tables(postgres_url: str):
    """Writers of events, upserts and deletes (some failing half-way and rolled back) in parallel,
    with a follower reading changes_since(cursor): the seqs are 1..n without a gap, the follower
    sees each once in order, and replaying the log gives exactly the stored catalog and events."""
    with PostgresEventStore(postgres_url) as setup:
        setup.upsert_items(items(10))
    writing = [WRITERS]
    writing_lock = threading.Lock()
    followed = []

    def writer(w: int) -> None:
        try:
            with PostgresEventStore(postgres_url) as s:
                for b in range(25):
                    if b % 5 == 1:
                        s.upsert_items([Item(f"i{(w + b) % 10}", f"by {w} at {b}"), Item(f"w{w}", "own")])
                    elif b % 5 == 3:
                        s.delete_items([f"w{w}"])
                    elif b % 5 == 4:
                        with pytest.raises(errors.NotFound):  # rolled back after taking the counter
                            s.add_events([ev(f"lost-{w}-{b}"), ev(f"lost2-{w}-{b}", item=f"missing-{w}")])
                    else:
                        s.add_events([ev(f"w{w}-{b}-{k}", user=f"u{w}", item=f"i{k}") for k in range(1 + b % 3)]
                                     + [ev(f"shared-{b}")])
        finally:
            with writing_lock:
                writing[0] -= 1

    def follower() -> None:
        with PostgresEventStore(postgres_url, read_only=True) as s:
            cursor = 0
            while True:
                with writing_lock:
                    finished = writing[0] == 0
                for change in s.iter_changes(cursor):
                    followed.append(change)
                    cursor = change.seq
                if finished:
                    return

    run_threads([lambda w=w: writer(w) for w in range(WRITERS)] + [follower])
    with PostgresEventStore(postgres_url) as s:
        changes = list(s.iter_changes())
        assert [c.seq for c in changes] == list(range(1, s.max_change_seq() + 1))
        assert followed == changes
        live, events = replay(changes)
        assert live == {it.item_id: it for it in s.iter_items()}
        assert events == {e.event_id: e for _, e in s.iter_events()}
        assert not any(e.startswith("lost") for e in events)


def test_commit_notifies_followers(pg_store: PostgresEventStore, postgres_url: str):
    with psycopg.connect(postgres_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANGES_CHANNEL}")
        pg_store.add_events([ev("a"), ev("b")])
        with pytest.raises(errors.NotFound):
            pg_store.add_events([ev("c", item="ghost")])  # rolled back: no notification
        pg_store.add_events([ev("a")])  # only duplicates: nothing changed
        pg_store.delete_items(["i2"])
        payloads = [n.payload for n in listener.notifies(timeout=5.0, stop_after=2)]
    assert payloads == [str(pg_store.max_seq()), str(pg_store.max_change_seq())] == ["5", "6"]


# -- PostgreSQL: schema, settings, input only PostgreSQL refuses -----------------------------------


def test_migrations_run_once_under_concurrent_opens(postgres_url: str):
    opened: list[PostgresEventStore] = []
    barrier = threading.Barrier(6, timeout=30)

    def open_one() -> None:
        barrier.wait()
        opened.append(PostgresEventStore(postgres_url))

    try:
        run_threads([open_one] * 6)
    finally:
        for s in opened:
            s.close()
    with psycopg.connect(postgres_url) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        assert conn.execute("SELECT last_seq FROM change_counter").fetchall() == [(0,)]


def test_newer_schema_is_refused(postgres_url: str):
    PostgresEventStore(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(errors.Unavailable, match="newer"):
        PostgresEventStore(postgres_url)
    with pytest.raises(errors.Unavailable, match=f"schema version is {SCHEMA_VERSION + 1}"):
        PostgresEventStore(postgres_url, read_only=True)


def test_commits_are_synchronous_whatever_the_server_default(postgres_url: str):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    with PostgresEventStore(postgres_url) as s, s._connection() as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "off"
    with PostgresEventStore(postgres_url, read_only=True) as s, s._connection() as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"


def test_nul_characters_are_refused_with_a_reason(pg_store: PostgresEventStore):
    with pytest.raises(errors.InvalidArgument, match=r"item 1 \(id 'n'\): text contains a NUL"):
        pg_store.upsert_items([Item("ok", "fine"), Item("n", "t", text="a\x00b")])
    with pytest.raises(errors.InvalidArgument, match="attributes contain a NUL"):
        pg_store.bulk_import([Item("n", "t", attributes={"k": "\x00"})], [])
    assert pg_store.get_item("ok") is None


def test_constraint_errors_stay_bugs_and_roll_back(pg_store: PostgresEventStore):
    """Only failures of the server or the connection become Unavailable: a broken invariant still
    surfaces as a bug, its transaction is rolled back, and the connection serves the next call."""
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        with pg_store._write() as (conn, sequencer):
            conn.execute("INSERT INTO events (seq, event_id, user_id, item_id, action, timestamp, received_at) "
                         "VALUES (%s, 'x', 'u', 'no-such-item', 'view', 1, 1)", (sequencer.take(1)[0],))
            conn.execute("INSERT INTO item_changes (seq, item_id, kind, changed_at) VALUES (%s, 'i0', 'delete', 1)",
                         (sequencer.take(1)[0],))
    with pytest.raises(errors.NotFound):
        pg_store.add_events([ev("ok"), ev("bad", item="ghost")])
    assert pg_store.max_change_seq() == 3 and pg_store.count_events() == 0
    assert pg_store.add_events([ev("ok")])[0] and pg_store.max_change_seq() == 4
    assert pg_store.get_item("i0") is not None


# -- PostgreSQL: failures and recovery --------------------------------------------------------------


def store_backends(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'chronorec' AND pid <> pg_backend_pid()")]


def test_lock_wait_past_the_busy_timeout_is_unavailable(postgres_url: str):
    with PostgresEventStore(postgres_url, busy_timeout_ms=300) as s:
        s.upsert_items(items(1))
        with psycopg.connect(postgres_url) as blocker:
            blocker.execute("SELECT last_seq FROM change_counter FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(errors.Unavailable) as info:
                s.add_events([ev("e1")])
            assert info.value.message == BUSY_MESSAGE and time.monotonic() - started < 3
            assert s.count_items() == 1  # reads go on
            blocker.rollback()
        assert s.add_events([ev("e1")])[0]


def test_lost_connections_are_unavailable_then_replaced(postgres_url: str, caplog):
    """A connection killed in the middle of a write fails that call with Unavailable (nothing of
    it stored); connections killed while idle are replaced unseen; the same store object goes on."""
    with PostgresEventStore(postgres_url) as s:
        s.upsert_items(items(1))
        outcome: list[BaseException | None] = []
        with psycopg.connect(postgres_url) as blocker:
            blocker.execute("SELECT last_seq FROM change_counter FOR UPDATE")

            def write() -> None:
                try:
                    s.add_events([ev("doomed")])
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    outcome.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            deadline = time.monotonic() + 10
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                while True:
                    waiting = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = 'chronorec' "
                        "AND wait_event_type = 'Lock' AND datname = current_database()").fetchall()
                    if waiting or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                assert waiting, "the write never waited for the counter row"
                with caplog.at_level(logging.ERROR, "chronorec.store"):
                    admin.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
                    writer.join(timeout=10)
            blocker.rollback()
        assert isinstance(outcome[0], errors.Unavailable) and outcome[0].message == UNREACHABLE_MESSAGE
        assert "retry" in outcome[0].message
        assert "AdminShutdown" in caplog.text or "terminat" in caplog.text
        assert "postgresql://127.0.0.1" in caplog.text
        assert s.count_events() == 0
        # Every pooled connection dies while idle: the next calls still succeed.
        s.count_items()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = store_backends(postgres_url)
            assert killed
            for pid in killed:
                # With a timeout, pg_terminate_backend returns once the backend has exited.
                assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
        assert s.add_events([ev("after")])[0] and s.count_events() == 1


def test_no_free_connection_is_unavailable(postgres_url: str):
    with PostgresEventStore(postgres_url, pool_size=1, connect_timeout_s=0.3) as s:
        with s._connection():  # the pool's only connection stays busy
            with pytest.raises(errors.Unavailable) as info:
                s.count_items()
        assert info.value.message == NO_CONNECTION_MESSAGE
        assert s.count_items() == 0


def test_unreachable_server_is_unavailable_at_open(postgres_cluster: PostgresCluster):
    from pgcluster import free_port

    url = f"postgresql://chronorec:s3cret-password@127.0.0.1:{free_port()}/nowhere"
    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match="cannot be reached") as info:
        PostgresEventStore(url, connect_timeout_s=2)
    assert time.monotonic() - started < 10
    assert "s3cret" not in info.value.message and "postgresql://127.0.0.1:" in info.value.message


def test_bad_url_is_refused_without_echoing_it():
    with pytest.raises(errors.InvalidArgument, match="cannot be parsed") as info:
        open_store("postgresql://user:s3cret@host/db?no_such_option=1")
    assert "s3cret" not in info.value.message


def test_server_restart_under_load_loses_no_acknowledged_event(postgres_cluster: PostgresCluster,
                                                                postgres_url: str):
    """Writers keep sending 3-event batches, retrying a batch on Unavailable as a client would,
    while the server is killed (immediate stop: no shutdown checkpoint) and started again.
    During the outage calls fail with Unavailable; afterwards the same store objects write again;
    every acknowledged event is stored, no batch is half stored, and the log has no gap."""
    per_batch, batches_after = 3, 8
    acked: list[str] = []
    unavailable: list[str] = []
    lock = threading.Lock()
    restarted = threading.Event()
    stores = [PostgresEventStore(postgres_url, connect_timeout_s=1, busy_timeout_ms=2000) for _ in range(4)]
    stores[0].upsert_items(items())

    def writer(w: int) -> None:
        s = stores[w]
        b = after = 0
        deadline = time.monotonic() + 90
        while after < batches_after:
            assert time.monotonic() < deadline, "the writer never recovered"
            ids = [f"w{w}-b{b}-{k}" for k in range(per_batch)]
            try:
                s.add_events([ev(i, user=f"u{w}", item=f"i{k}") for k, i in enumerate(ids)])
            except errors.Unavailable as exc:
                with lock:
                    unavailable.append(exc.message)
                time.sleep(0.05)
                continue  # retry the same batch
            with lock:
                acked.extend(ids)
            b += 1
            after += restarted.is_set()

    def outage() -> None:
        while len(acked) < 60:
            time.sleep(0.01)
        postgres_cluster.stop("immediate")
        try:
            time.sleep(0.5)
            with pytest.raises(errors.Unavailable, match="retry"):
                stores[0].count_events()  # reads fail the same way
        finally:
            postgres_cluster.start()
        restarted.set()

    try:
        run_threads([lambda w=w: writer(w) for w in range(len(stores))] + [outage], timeout=180)
    finally:
        for s in stores:
            s.close()
    assert unavailable, "no write saw the outage"
    assert set(unavailable) <= {UNREACHABLE_MESSAGE, NO_CONNECTION_MESSAGE}
    with PostgresEventStore(postgres_url) as s:
        stored = [e.event_id for _, e in s.iter_events()]
        assert set(acked) <= set(stored)
        assert len(stored) == len(set(stored)) and len(stored) % per_batch == 0
        batches: dict[str, int] = {}
        for event_id in stored:
            batch = event_id.rsplit("-", 1)[0]
            batches[batch] = batches.get(batch, 0) + 1
        assert set(batches.values()) == {per_batch}, "a batch was half stored"
        assert [c.seq for c in s.iter_changes()] == list(range(1, s.max_change_seq() + 1))
