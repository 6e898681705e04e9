"""EventStore: schema, validation, idempotency, as-of reads, concurrency and durability."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import BUSY_MESSAGE, SCHEMA_VERSION, EventStore


def items(n: int = 3) -> list[Item]:
    return [Item(f"i{k}", f"Title {k}", category="c", published_at=100.0, attributes={"k": str(k)}) for k in range(n)]


def ev(event_id: str, user: str = "u1", item: str = "i0", t: float = 1000.0, action: str = "view",
       value: float | None = None) -> Event:
    return Event(event_id, user, item, action, t, value)


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(tmp_path / "events.db")
    s.upsert_items(items())
    yield s
    s.close()


# -- schema -----------------------------------------------------------------------------


def test_wal_user_version_and_pragmas(tmp_path: Path):
    path = tmp_path / "e.db"
    with EventStore(path) as s:
        assert s.journal_mode() == "wal"
        assert s.schema_version() == SCHEMA_VERSION >= 1
        assert s._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    index_names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"events_user_time", "events_item_time", "events_time"} <= index_names
    raw.close()
    # Reopening runs no migration again and keeps the data.
    with EventStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "e.db"
    EventStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(errors.Unavailable, match="newer"):
        EventStore(path)


def test_read_only_refuses_missing_or_unmigrated(tmp_path: Path):
    with pytest.raises(errors.Unavailable):
        EventStore(tmp_path / "missing.db", read_only=True)
    sqlite3.connect(tmp_path / "blank.db").execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(errors.Unavailable, match="schema version is 0"):
        EventStore(tmp_path / "blank.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_check_constraint_backs_validation(store: EventStore):
    with pytest.raises(sqlite3.IntegrityError):
        with store._write() as conn:
            conn.execute("INSERT INTO items (item_id, title, published_at, expires_at, updated_at) "
                         "VALUES ('x', 't', 10, 5, 0)")
    assert store.get_item("x") is None


# -- catalog ----------------------------------------------------------------------------


def test_upsert_get_iter_count(store: EventStore):
    assert store.count_items() == 3
    assert store.get_item("i1") == items()[1]
    assert store.get_item("nope") is None
    assert set(store.get_items(["i2", "i0", "nope"])) == {"i0", "i2"}
    assert [it.item_id for it in store.iter_items()] == ["i0", "i1", "i2"]
    store.upsert_items([Item("i1", "New title", expires_at=5.0)])
    assert store.get_item("i1") == Item("i1", "New title", expires_at=5.0)
    assert store.count_items() == 3


@pytest.mark.parametrize("bad, fragment", [
    (Item("", "t"), "item_id"),
    (Item("x" * 257, "t"), "longer than 256"),
    (Item("a\x9fb", "t"), "item_id contains control characters"),
    (Item("x", "  "), "title"),
    (Item("x", "t", published_at=math.nan), "published_at"),
    (Item("x", "t", expires_at=math.inf), "expires_at"),
    (Item("x", "t", published_at=10.0, expires_at=10.0), "later than published_at"),
    (Item("x", "t", attributes={"a": 1}), "attributes"),
])
def test_upsert_rejects_bad_item_and_writes_nothing(store: EventStore, bad: Item, fragment: str):
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        store.upsert_items([Item("ok", "fine"), bad])
    assert info.value.message.startswith(f"item 1 (id {bad.item_id!r})")
    assert store.get_item("ok") is None


def test_delete_is_soft_all_or_nothing_and_upsert_revives(store: EventStore):
    with pytest.raises(errors.NotFound, match="'nope'"):
        store.delete_items(["i0", "nope"])
    assert store.count_items() == 3
    assert store.delete_items(["i0", "i1"]) == 2
    assert store.delete_items(["i0"]) == 0  # a retried delete succeeds
    assert store.get_item("i0") is None and store.count_items() == 1
    assert [it.item_id for it in store.iter_items()] == ["i2"]
    store.upsert_items([Item("i0", "Back")])
    assert store.get_item("i0").title == "Back"


def test_iter_items_pages_through_large_catalog(tmp_path: Path):
    with EventStore(tmp_path / "e.db") as s:
        s.upsert_items([Item(f"item-{k:05d}", "t") for k in range(4500)])
        ids = [it.item_id for it in s.iter_items()]
        assert ids == sorted(ids) and len(ids) == 4500 == s.count_items()


# -- events -----------------------------------------------------------------------------


def test_retried_batch_is_idempotent(store: EventStore):
    batch = [ev("e1"), ev("e2", t=1001), ev("e3", user="u2", item="i1")]
    stored, dup = store.add_events(batch)
    assert stored == batch and dup == 0
    stored, dup = store.add_events(batch)
    assert stored == [] and dup == 3
    # Duplicates inside one batch are stored once; the first copy wins.
    stored, dup = store.add_events([ev("e4"), ev("e4", t=5.0), ev("e1")])
    assert [e.event_id for e in stored] == ["e4"] and dup == 2
    assert store.count_events() == 4
    assert [e.timestamp for e in store.events_for_user("u1") if e.event_id == "e4"] == [1000.0]


@pytest.mark.parametrize("bad, fragment", [
    (ev(""), "event_id"),
    (ev("b", user=""), "user_id"),
    (ev("b", item="x" * 300), "item_id is longer"),
    (ev("b", user="a\x85b"), "user_id contains control characters"),  # C1 (NEL), as C0 below
    (ev("b", item="a\x1bb"), "item_id contains control characters"),
    (ev("b", action="teleport"), "action 'teleport'"),
    (ev("b", t=math.nan), "timestamp"),
    (ev("b", t=-1.0), "timestamp"),
    (ev("b", t=1.7e12), "timestamp"),  # milliseconds by mistake
    (ev("b", action="rating", value=math.inf), "value"),
])
def test_one_bad_event_stores_nothing_and_is_named(store: EventStore, bad: Event, fragment: str):
    batch = [ev("g1"), ev("g2"), ev("g3"), bad, ev("g5")]
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        store.add_events(batch)
    assert info.value.message.startswith(f"event 3 (id {bad.event_id!r}): ")
    assert store.count_events() == 0


def test_unknown_or_deleted_item_is_not_found(store: EventStore):
    with pytest.raises(errors.NotFound, match=r"event 1 \(id 'e2'\): unknown item 'ghost'"):
        store.add_events([ev("e1"), ev("e2", item="ghost")])
    store.delete_items(["i2"])
    with pytest.raises(errors.NotFound, match="'i2' is deleted"):
        store.add_events([ev("e3", item="i2")])
    assert store.count_events() == 0


def test_events_for_user_as_of(store: EventStore):
    store.add_events([ev("a", t=300), ev("b", t=100), ev("c", t=200), ev("d", t=200, item="i1"),
                      ev("x", user="u2", t=150)])
    assert [e.event_id for e in store.events_for_user("u1")] == ["b", "c", "d", "a"]
    assert [e.event_id for e in store.events_for_user("u1", until=200)] == ["b", "c", "d"]
    assert [e.event_id for e in store.events_for_user("u1", until=199.5)] == ["b"]
    assert store.events_for_user("u1", until=50) == []
    assert [e.event_id for e in store.events_for_user("u1", until=250, limit=2)] == ["c", "d"]
    assert store.events_for_user("nobody") == []
    e = store.events_for_user("u2")[0]
    assert e == Event("x", "u2", "i0", "view", 150.0, None)


def test_iter_events_in_arrival_order(store: EventStore):
    assert store.max_seq() == 0
    store.add_events([ev("z", t=5), ev("a", t=1)])
    store.add_events([ev("m", t=3)])
    seqs_events = list(store.iter_events())
    assert [e.event_id for _, e in seqs_events] == ["z", "a", "m"]
    assert store.max_seq() == seqs_events[-1][0]
    assert [e.event_id for _, e in store.iter_events(since_seq=seqs_events[0][0])] == ["a", "m"]
    assert store.count_users() == 1


def test_bulk_import_idempotent_and_checked(tmp_path: Path):
    with EventStore(tmp_path / "e.db") as s:
        its = items(2)
        events = [ev(f"b{k}", user=f"u{k % 7}", item=f"i{k % 2}", t=float(k)) for k in range(1200)]
        stats = s.bulk_import(its, events, batch_size=500)
        assert stats == (2, 1200, 0)
        assert s.bulk_import(its, events, batch_size=500) == (2, 0, 1200)
        assert [e.event_id for _, e in s.iter_events()] == [e.event_id for e in events]
        with pytest.raises(errors.NotFound, match="unknown item 'zz'"):
            s.bulk_import([], [ev("n1", item="i0"), ev("n2", item="zz")])
        with pytest.raises(errors.InvalidArgument, match="event 1"):
            s.bulk_import([], [ev("n1"), ev("n2", action="nope")])
        assert s.bulk_import([], [ev("n1", item="i1")]) == (0, 1, 0)  # items already stored
        assert s.count_events() == 1201


def test_busy_database_is_unavailable(tmp_path: Path):
    path = tmp_path / "e.db"
    with EventStore(path, busy_timeout_ms=50) as s:
        s.upsert_items(items(1))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(errors.Unavailable) as info:
                s.add_events([ev("e1")])
            assert info.value.message == BUSY_MESSAGE
            assert s.count_items() == 1  # reads go on in WAL mode
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert s.add_events([ev("e1")])[0]


def test_closed_store_is_unavailable(tmp_path: Path):
    s = EventStore(tmp_path / "e.db")
    s.close()
    s.close()
    with pytest.raises(errors.Unavailable):
        s.count_items()
    with pytest.raises(errors.Unavailable):
        s.upsert_items(items(1))


# -- concurrency ------------------------------------------------------------------------


def test_read_only_reader_follows_busy_writer(tmp_path: Path):
    path = tmp_path / "e.db"
    writer = EventStore(path)
    writer.upsert_items(items())
    reader = EventStore(path, read_only=True)
    with pytest.raises(errors.FailedPrecondition):
        reader.add_events([ev("nope")])
    failures: list[BaseException] = []
    done = threading.Event()
    n_batches, per_batch = 150, 4

    def write():
        try:
            for b in range(n_batches):
                writer.add_events([ev(f"w{b}-{k}", user=f"u{k}", t=float(b)) for k in range(per_batch)])
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    def read():
        try:
            last = 0
            while not done.is_set():
                now = reader.count_events()
                assert now >= last and now % per_batch == 0  # whole batches only
                assert len(reader.events_for_user("u0")) * per_batch <= reader.count_events()
                last = now
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert reader.count_events() == n_batches * per_batch
    assert reader.max_seq() == writer.max_seq()
    reader.close()
    writer.close()


def test_concurrent_writers_from_threads(store: EventStore):
    failures: list[BaseException] = []
    new_counts: list[int] = []

    def write(w: int):
        try:
            for b in range(40):
                # Every thread also retries a shared batch: exactly one copy may win.
                stored, _ = store.add_events([ev(f"t{w}-{b}", user=f"u{w}", t=float(b)), ev(f"shared-{b}")])
                new_counts.append(len(stored))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert store.count_events() == 8 * 40 + 40 == sum(new_counts)
    assert len(store.events_for_user("u3")) == 40


def test_acked_events_survive_sigkill(tmp_path: Path):
    path = tmp_path / "e.db"
    with EventStore(path) as s:
        s.upsert_items(items(1))
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from chronorec.server.core.catalog import Event
        from chronorec.server.core.store import EventStore
        store = EventStore({str(path)!r})
        b = 0
        while True:
            ids = [f"k{{b}}-{{j}}" for j in range(3)]
            store.add_events([Event(i, "u", "i0", "click", 1000.0 + b) for i in ids])
            print("acked", *ids, flush=True)
            b += 1
    """))
    acked: list[str] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as child:
        try:
            for line in child.stdout:
                words = line.split()
                assert words[0] == "acked"
                acked += words[1:]
                if len(acked) >= 60:
                    child.send_signal(signal.SIGKILL)  # while it is still writing
                    break
        finally:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with EventStore(path) as s:
        stored = {e.event_id for _, e in s.iter_events()}
        assert set(acked) <= stored
        assert len(stored) % 3 == 0  # no batch was half stored


# -- storage failures -------------------------------------------------------------------


@contextlib.contextmanager
def immutable(*paths: Path):
    """Make files immutable (chattr +i) for the block: even root cannot write them, and writes
    through already open descriptors fail too, as on a database gone read-only under a server."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and e2fsprogs")
    present = [str(p) for p in paths if p.exists()]
    done = subprocess.run(["chattr", "+i", *present], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this filesystem has no immutable flag: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *present], check=True)


def fill_up(store: EventStore) -> None:
    """Cap the database at its current size: the next write that needs a page fails with SQLITE_FULL,
    exactly as on a full disk (works for any user, on any filesystem)."""
    conn = store._writer.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def test_read_only_database_is_unavailable_and_logged(tmp_path: Path, caplog):
    path = tmp_path / "e.db"
    with EventStore(path) as s:
        s.upsert_items(items())
        s.add_events([ev("kept")])
        with immutable(path, Path(f"{path}-wal")), caplog.at_level(logging.ERROR, "chronorec.store"):
            with pytest.raises(errors.Unavailable, match="retry later") as info:
                s.add_events([ev(f"lost-{k}", t=2000.0 + k) for k in range(50)])
            assert str(path) not in info.value.message  # callers never see server paths
            with pytest.raises(errors.Unavailable):
                s.upsert_items([Item("new", "New")])
            assert s.count_events() == 1 and s.count_items() == 3  # reads go on
            logged = [r.getMessage() for r in caplog.records]
            assert len(logged) == 1, logged  # a second failure of the same kind within seconds is held back
            assert str(path) in logged[0] and "SQLITE_IOERR" in logged[0] and "lsattr" in logged[0]
        # Once writable again, nothing of the failed writes is there and writing works.
        assert [e.event_id for _, e in s.iter_events()] == ["kept"]
        assert s.add_events([ev("after")])[0]
    with EventStore(path) as reopened:
        assert reopened.count_events() == 2 and reopened.get_item("new") is None


def test_full_database_is_unavailable(tmp_path: Path, caplog):
    with EventStore(tmp_path / "e.db") as s:
        s.upsert_items(items())
        fill_up(s)
        with caplog.at_level(logging.ERROR, "chronorec.store"):
            with pytest.raises(errors.Unavailable, match="full"):
                s.add_events([ev(f"e{k}", t=1000.0 + k) for k in range(500)])
            with pytest.raises(errors.Unavailable, match="full"):
                s.upsert_items([Item("big", "Big", text="x" * 20_000)])
        assert "SQLITE_FULL" in caplog.text and "free disk space" in caplog.text
        assert s.count_events() == 0 and s.get_item("big") is None
        assert s.get_item("i1") == items()[1]


def test_constraint_errors_stay_bugs(tmp_path: Path):
    """Only storage failures become Unavailable: a broken invariant must still surface as a bug."""
    with EventStore(tmp_path / "e.db") as s, pytest.raises(sqlite3.IntegrityError):
        with s._write() as conn:
            conn.execute("INSERT INTO events (event_id, user_id, item_id, action, timestamp, received_at) "
                         "VALUES ('x', 'u', 'no-such-item', 'view', 1, 1)")


def _unavailable_with_pushback(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert int(dict(error.trailing_metadata())["grpc-retry-pushback-ms"]) > 0
    return error.details()


@pytest.mark.parametrize("failure", ["read-only", "full"])
def test_storage_failure_is_unavailable_over_grpc(start_server, tiny_repo, tmp_path: Path, failure: str):
    """Feedback and UpsertItems on a database that cannot be written: UNAVAILABLE with the
    standard pushback trailer (not INTERNAL), nothing half-written, and the server recovers."""
    from chronorec.v1 import catalog_pb2, common_pb2, recommender_pb2
    from hardening import seed_store, ts

    db = tmp_path / "data" / "chronorec.db"
    db.parent.mkdir()
    seed_store(db)
    server = start_server(tiny_repo, db=db)
    store = server.engine.store
    before = (store.count_items(), store.count_events(), store.max_seq())
    events = [common_pb2.Event(event_id=f"f-{k}", user_id="u1", item_id=f"i{k % 40}", action="view",
                               timestamp=ts(1_789_000_000 + k)) for k in range(300)]
    item = common_pb2.Item(item_id="fresh", title="Fresh", text="jazz " * 3000)
    feedback = lambda: server.recommender.Feedback(recommender_pb2.FeedbackRequest(events=events), timeout=30)
    upsert = lambda: server.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30)

    if failure == "read-only":
        context = immutable(db, Path(f"{db}-wal"))
    else:
        fill_up(store)
        context = contextlib.nullcontext()
    with context:
        assert "retry" in _unavailable_with_pushback(feedback)
        assert "retry" in _unavailable_with_pushback(upsert)
        # Reads still answer, and the failed writes reached neither the store nor the serving state.
        assert server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), timeout=30).items
        assert (store.count_items(), store.count_events(), store.max_seq()) == before
        with pytest.raises(grpc.RpcError) as missing:
            server.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="fresh"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    if failure == "full":
        store._writer.conn.execute("PRAGMA max_page_count = 1073741823")
    assert feedback().stored == len(events)
    assert upsert().upserted == 1
    assert store.count_events() == before[1] + len(events)
