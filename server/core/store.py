"""SQLite-backed catalog and event log: idempotent, durable, safe to share between threads."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

from chronorec.client import rules
from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.timetext import KNOWN_ACTIONS

log = logging.getLogger("chronorec.store")

BUSY_MESSAGE = "event store is busy (database locked); retry in a moment"

# SQLite's default limit on bound variables is 32766 since 3.32 and 999 before; stay under both.
_IN_CHUNK = 500
_PAGE = 2000


def _migrate_v1_initial(db: sqlite_utils.Database) -> None:
    # Raw DDL because sqlite-utils' create_table cannot express table CHECKs or AUTOINCREMENT.
    db.execute(
        """
        CREATE TABLE items (
            item_id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            text TEXT NOT NULL DEFAULT '',
            category TEXT NOT NULL DEFAULT '',
            published_at REAL,
            expires_at REAL,
            attributes TEXT NOT NULL DEFAULT '{}',
            updated_at REAL NOT NULL,
            deleted_at REAL,
            CHECK (expires_at IS NULL OR published_at IS NULL OR expires_at > published_at)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL CHECK (length(user_id) > 0),
            item_id TEXT NOT NULL REFERENCES items(item_id),
            action TEXT NOT NULL,
            timestamp REAL NOT NULL,
            value REAL,
            received_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX events_user_time ON events(user_id, timestamp)")
    db.execute("CREATE INDEX events_item_time ON events(item_id, timestamp)")
    db.execute("CREATE INDEX events_time ON events(timestamp)")


def _migrate_v2_impressions_and_erasure(db: sqlite_utils.Database) -> None:
    # What users were shown, apart from what they did (events): no history reads it.
    db.execute(
        """
        CREATE TABLE impressions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL CHECK (length(user_id) > 0),
            item_id TEXT NOT NULL,
            recommendation_id TEXT NOT NULL,
            position INTEGER NOT NULL CHECK (position >= 1),
            timestamp REAL NOT NULL,
            received_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX impressions_user ON impressions(user_id)")
    # Erased users: their events are gone, and this says since when (the trainer reads it too).
    db.execute("CREATE TABLE deleted_users (user_id TEXT PRIMARY KEY, deleted_at REAL NOT NULL)")


# Applied in order at open; migration i brings the schema from user_version i to i + 1.
# Append new migrations, never edit or reorder shipped ones.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_v1_initial, _migrate_v2_impressions_and_erasure]
SCHEMA_VERSION = len(MIGRATIONS)


class ImportStats(NamedTuple):
    items: int
    events_added: int
    events_duplicate: int


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _id_problem(name: str, value: object) -> str | None:
    problem = rules.id_problem(value)
    return f"{name} {problem}" if problem else None


def item_problem(item: Item) -> str | None:
    """What is wrong with `item` in one phrase, or None when the store accepts it."""
    problem = _id_problem("item_id", item.item_id)
    if problem:
        return problem
    if not isinstance(item.title, str) or not item.title.strip():
        return "title must not be empty"
    if not isinstance(item.text, str) or not isinstance(item.category, str):
        return "text and category must be strings"
    for name in ("published_at", "expires_at"):
        t = getattr(item, name)
        if t is not None and (not _is_number(t) or not math.isfinite(t)):
            return f"{name} must be a finite number of unix seconds or unset, got {t!r}"
    if item.published_at is not None and item.expires_at is not None and item.expires_at <= item.published_at:
        return "expires_at must be later than published_at"
    if not isinstance(item.attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in item.attributes.items()
    ):
        return "attributes must map strings to strings"
    return None


def event_problem(event: Event) -> str | None:
    """What is wrong with `event` in one phrase (item existence aside), or None when it is valid."""
    for name in ("event_id", "user_id", "item_id"):
        problem = _id_problem(name, getattr(event, name))
        if problem:
            return problem
    if event.action not in KNOWN_ACTIONS:
        return f"action {event.action!r} is not one of {', '.join(KNOWN_ACTIONS)}"
    problem = rules.time_problem(event.timestamp)
    if problem:
        return f"timestamp {problem}"
    v = event.value
    if v is not None and (not _is_number(v) or not math.isfinite(v)):
        return f"value must be a finite number or unset, got {v!r}"
    return None


def impression_problem(impression: Impression) -> str | None:
    """What is wrong with `impression` in one phrase, or None when it is valid."""
    for name in ("event_id", "user_id", "item_id", "recommendation_id"):
        problem = _id_problem(name, getattr(impression, name))
        if problem:
            return problem
    problem = rules.position_problem(impression.position)
    if problem:
        return f"position {problem}"
    problem = rules.time_problem(impression.timestamp)
    return f"timestamp {problem}" if problem else None


def _validate_impressions(impressions: Sequence[Impression]) -> None:
    for i, impression in enumerate(impressions):
        problem = impression_problem(impression)
        if problem:
            raise errors.InvalidArgument(f"impression {i} (id {getattr(impression, 'event_id', None)!r}): {problem}")


def _validate_items(items: Sequence[Item]) -> None:
    for i, item in enumerate(items):
        problem = item_problem(item)
        if problem:
            raise errors.InvalidArgument(f"item {i} (id {getattr(item, 'item_id', None)!r}): {problem}")


def _validate_events(events: Sequence[Event]) -> None:
    for i, event in enumerate(events):
        problem = event_problem(event)
        if problem:
            raise errors.InvalidArgument(f"event {i} (id {getattr(event, 'event_id', None)!r}): {problem}")


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _item_row(item: Item, now: float) -> tuple:
    attributes = json.dumps(item.attributes, sort_keys=True, ensure_ascii=False)
    return (
        item.item_id, item.title, item.text, item.category,
        None if item.published_at is None else float(item.published_at),
        None if item.expires_at is None else float(item.expires_at),
        attributes, now,
    )


def _event_row(event: Event, received_at: float) -> tuple:
    value = None if event.value is None else float(event.value)
    return (event.event_id, event.user_id, event.item_id, event.action, float(event.timestamp), value, received_at)


_ITEM_COLUMNS = "item_id, title, text, category, published_at, expires_at, attributes"
_EVENT_COLUMNS = "event_id, user_id, item_id, action, timestamp, value"
_UPSERT_ITEM = """
    INSERT INTO items (item_id, title, text, category, published_at, expires_at, attributes, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (item_id) DO UPDATE SET
        title = excluded.title, text = excluded.text, category = excluded.category,
        published_at = excluded.published_at, expires_at = excluded.expires_at,
        attributes = excluded.attributes, updated_at = excluded.updated_at, deleted_at = NULL
"""
# The NOT EXISTS skips a stored event_id before a seq is drawn: INSERT OR IGNORE alone burns an
# AUTOINCREMENT number on every duplicate, and followers of the log rely on seqs without gaps.
_INSERT_EVENT = """
    INSERT OR IGNORE INTO events (event_id, user_id, item_id, action, timestamp, value, received_at)
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE NOT EXISTS (SELECT 1 FROM events WHERE event_id = ?1)
"""
_INSERT_IMPRESSION = """
    INSERT OR IGNORE INTO impressions (event_id, user_id, item_id, recommendation_id, position, timestamp, received_at)
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE NOT EXISTS (SELECT 1 FROM impressions WHERE event_id = ?1)
"""


def _item_from_row(row: Sequence) -> Item:
    return Item(
        item_id=row[0], title=row[1], text=row[2], category=row[3],
        published_at=row[4], expires_at=row[5], attributes=json.loads(row[6]),
    )


def _event_from_row(row: Sequence) -> Event:
    return Event(event_id=row[0], user_id=row[1], item_id=row[2], action=row[3], timestamp=row[4], value=row[5])


class _StorageFailure(NamedTuple):
    message: str  # for the caller: what happened, never a server path
    hint: str  # for the operator, in the log


# SQLite failures of the storage rather than of the request, by primary result code: the caller
# gets errors.Unavailable (UNAVAILABLE with a retry hint) and the operator a logged cause. Any
# other SQLite error (a constraint, a misuse) is a bug and stays one.
_STORAGE_FAILURES = {
    "SQLITE_BUSY": _StorageFailure(BUSY_MESSAGE, "another process holds the write lock"),
    "SQLITE_LOCKED": _StorageFailure(BUSY_MESSAGE, "another connection holds a conflicting lock"),
    "SQLITE_READONLY": _StorageFailure(
        "event store is read-only right now; writes fail until an operator fixes it, retry later",
        "the database file, its -wal/-shm files or their folder cannot be written: "
        "check ownership, permissions, the immutable flag (lsattr) and whether the mount is read-only",
    ),
    "SQLITE_IOERR": _StorageFailure(
        "event store hit a disk I/O error; retry later",
        "a read or write of the database files failed: check the immutable flag (lsattr), "
        "the disk and the kernel log",
    ),
    "SQLITE_FULL": _StorageFailure(
        "event store is full (no space left for the database); retry later",
        "free disk space on the database's filesystem",
    ),
    "SQLITE_CANTOPEN": _StorageFailure(
        "event store cannot open its database files; retry later",
        "the database file or its folder is missing or not accessible",
    ),
    "SQLITE_CORRUPT": _StorageFailure(
        "event store database is damaged; retry later",
        "the database file is corrupt: restore it from a backup (sqlite3 .recover may salvage it)",
    ),
    "SQLITE_NOTADB": _StorageFailure(
        "event store database is damaged; retry later",
        "the database path holds a file that is not an SQLite database",
    ),
}
# Pythons before 3.11 give no result code; their messages name the failure.
_FAILURE_BY_TEXT = (
    ("locked", "SQLITE_LOCKED"),
    ("busy", "SQLITE_BUSY"),
    ("readonly", "SQLITE_READONLY"),
    ("disk i/o error", "SQLITE_IOERR"),
    ("database or disk is full", "SQLITE_FULL"),
    ("unable to open", "SQLITE_CANTOPEN"),
    ("malformed", "SQLITE_CORRUPT"),
    ("not a database", "SQLITE_NOTADB"),
)
_PRIMARY_NAMES = {getattr(sqlite3, name, None): name for name in _STORAGE_FAILURES}
# A read-only database under traffic fails every write: log each kind of failure at most this often.
_LOG_EVERY_S = 10.0


def _failure_kind(exc: sqlite3.Error) -> str | None:
    """The primary result code name of a storage failure, None for any other SQLite error."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return _PRIMARY_NAMES.get(code & 0xFF)
    message = str(exc).lower()
    return next((kind for fragment, kind in _FAILURE_BY_TEXT if fragment in message), None)


class EventStore:
    """The catalog (items) and the event log (events) in one SQLite file.

    Durability: the database runs in WAL mode with ``synchronous=FULL``, so every
    commit fsyncs the write-ahead log before a write method returns. A method that
    returned has therefore survived a killed process (SIGKILL, OOM) and also an OS
    crash or power loss; with ``synchronous=NORMAL`` only the process kill would be
    survived. Writes are serialised by a lock inside the process and by SQLite's
    write lock between processes (waiting up to ``busy_timeout_ms``, then raising
    ``errors.Unavailable``). Reads use one connection per thread, so in WAL mode they
    run beside writes and always see the latest commit.

    ``read_only=True`` (for the trainer, reading while the server writes) opens the
    file with ``mode=ro``: no writes, no migrations, and ``errors.Unavailable`` when
    the file is missing or its schema is not the one this build knows.
    """

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._timeout_s = busy_timeout_ms / 1000.0
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer: sqlite_utils.Database | None = None
        # Per failure kind: when it was last logged and how many reports were held back since.
        self._failure_log: dict[str, tuple[float, int]] = {}
        self._failure_log_lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        with self._sqlite_errors():
            if self.read_only:
                self._check_schema_read_only()
            else:
                self._writer = sqlite_utils.Database(self._connect(), execute_plugins=False)
                # journal_mode must be set outside a transaction and persists in the file.
                self._writer.enable_wal()
                self._writer.execute("PRAGMA synchronous = FULL")
                # Deleted rows are overwritten with zeros, not left in free pages: an erased
                # user's events are gone from the file, not only from its tables.
                self._writer.execute("PRAGMA secure_delete = ON")
                self._writer.execute("PRAGMA foreign_keys = ON")
                self._migrate()

    # -- connections and transactions -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self._timeout_s, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA query_only = ON")
        else:
            conn = sqlite3.connect(str(self.path), timeout=self._timeout_s, check_same_thread=False,
                                   isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise errors.Unavailable("event store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            with self._readers_lock:
                if self._closed:
                    conn.close()
                    raise errors.Unavailable("event store is closed")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """Storage failures become errors.Unavailable with their cause logged; other errors pass."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if self.read_only and "unable to open" in str(exc).lower():
                raise errors.Unavailable(f"event store {str(self.path)!r} cannot be opened: {exc}") from exc
            kind = _failure_kind(exc)
            if kind is None:
                raise
            failure = _STORAGE_FAILURES[kind]
            if failure.message != BUSY_MESSAGE:
                # Busy is contention between writers, expected under load and gone on retry:
                # nothing for an operator to fix, so it is not logged.
                self._log_failure(kind, exc, failure.hint)
            raise errors.Unavailable(failure.message) from exc

    def _log_failure(self, kind: str, exc: sqlite3.Error, hint: str) -> None:
        now = time.monotonic()
        with self._failure_log_lock:
            last, suppressed = self._failure_log.get(kind, (-math.inf, 0))
            if now - last < _LOG_EVERY_S:
                self._failure_log[kind] = (last, suppressed + 1)
                return
            self._failure_log[kind] = (now, 0)
        log.error(
            "event store %s: %s (%s); %s%s", self.path, exc, getattr(exc, "sqlite_errorname", kind), hint,
            f" [{suppressed} more since the last report]" if suppressed else "",
        )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front, so a
        transaction never fails half-way for lock upgrade; it is committed on exit."""
        if self.read_only:
            raise errors.FailedPrecondition("event store is open read-only")
        with self._write_lock:
            if self._closed or self._writer is None:
                raise errors.Unavailable("event store is closed")
            conn = self._writer.conn
            with self._sqlite_errors():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            # SQLite rolls back by itself after I/O errors; the first error is the one to report.
                            log.warning("event store %s: rollback failed", self.path, exc_info=True)
                    raise

    def _migrate(self) -> None:
        assert self._writer is not None
        with self._write() as conn:
            # Read inside the write transaction: another process may be migrating the same file.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise errors.Unavailable(
                    f"event store schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
                )
            for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(self._writer)
                conn.execute(f"PRAGMA user_version = {target}")

    def _check_schema_read_only(self) -> None:
        if not self.path.exists():
            raise errors.Unavailable(f"event store {str(self.path)!r} does not exist")
        version = self._reader().execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise errors.Unavailable(
                f"event store schema version is {version}, this build reads version {SCHEMA_VERSION}; "
                "open it once read-write (start the server) to migrate"
            )

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._sqlite_errors():
            return self._reader().execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return self._read("PRAGMA user_version")[0][0]

    @property
    def location(self) -> str:
        """Where the store lives, for logs and reports: the file's path."""
        return str(self.path)

    def journal_mode(self) -> str:
        return self._read("PRAGMA journal_mode")[0][0]

    def close(self) -> None:
        """Close every connection; later calls raise errors.Unavailable."""
        with self._write_lock, self._readers_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog ----------------------------------------------------------------------

    def upsert_items(self, items: Sequence[Item]) -> int:
        """Insert or replace items (all or none); an upsert revives a deleted item.
        Within one batch the last copy of an item_id wins. Returns len(items)."""
        items = list(items)
        _validate_items(items)
        if not items:
            return 0
        now = time.time()
        with self._write() as conn:
            conn.executemany(_UPSERT_ITEM, [_item_row(item, now) for item in items])
        return len(items)

    def delete_items(self, item_ids: Sequence[str]) -> int:
        """Soft-delete items (all or none). Unknown ids raise errors.NotFound; ids already
        deleted are accepted, so a retried request succeeds. Returns how many were live."""
        item_ids = list(dict.fromkeys(item_ids))
        for i, item_id in enumerate(item_ids):
            problem = _id_problem("item_id", item_id)
            if problem:
                raise errors.InvalidArgument(f"item {i} (id {item_id!r}): {problem}")
        if not item_ids:
            return 0
        with self._write() as conn:
            known = self._deleted_at_of(conn, item_ids)
            unknown = [item_id for item_id in item_ids if item_id not in known]
            if unknown:
                raise errors.NotFound(f"unknown item ids: {', '.join(map(repr, unknown[:20]))}"
                                      + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
            live = [item_id for item_id in item_ids if known[item_id] is None]
            now = time.time()
            conn.executemany("UPDATE items SET deleted_at = ?, updated_at = ? WHERE item_id = ?",
                             [(now, now, item_id) for item_id in live])
        return len(live)

    @staticmethod
    def _deleted_at_of(conn: sqlite3.Connection, item_ids: Sequence[str]) -> dict[str, float | None]:
        """deleted_at of each known item among `item_ids` (None for live ones)."""
        found: dict[str, float | None] = {}
        for chunk in _chunks(list(item_ids), _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for item_id, deleted_at in conn.execute(
                f"SELECT item_id, deleted_at FROM items WHERE item_id IN ({marks})", list(chunk)
            ):
                found[item_id] = deleted_at
        return found

    def get_item(self, item_id: str) -> Item | None:
        """The live item with this id, or None (unknown or deleted)."""
        rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ? AND deleted_at IS NULL", (item_id,))
        return _item_from_row(rows[0]) if rows else None

    def get_items(self, item_ids: Iterable[str]) -> dict[str, Item]:
        """Live items by id; unknown and deleted ids are left out."""
        found: dict[str, Item] = {}
        for chunk in _chunks(list(dict.fromkeys(item_ids)), _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for row in self._read(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id IN ({marks}) AND deleted_at IS NULL", list(chunk)
            ):
                found[row[0]] = _item_from_row(row)
        return found

    def iter_items(self) -> Iterator[Item]:
        """Live items ordered by item_id, read page by page (no read transaction is held
        between pages, so a slow consumer does not pin the WAL)."""
        after = None
        while True:
            if after is None:
                rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted_at IS NULL "
                                  f"ORDER BY item_id LIMIT {_PAGE}")
            else:
                rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted_at IS NULL AND item_id > ? "
                                  f"ORDER BY item_id LIMIT {_PAGE}", (after,))
            for row in rows:
                yield _item_from_row(row)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def count_items(self) -> int:
        """Number of live items."""
        return self._read("SELECT count(*) FROM items WHERE deleted_at IS NULL")[0][0]

    # -- event log --------------------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> tuple[list[Event], int]:
        """Store a batch of events in one transaction, at most once per event_id.

        Every event is validated before anything is written (errors name the first bad
        event by its index in the batch). An event whose event_id is already stored, or
        repeats an earlier one of the same batch, is a duplicate: not stored again (the
        first copy wins). Returns (newly stored events in batch order, as stored: times and
        values as floats; duplicate count) only after the commit is durable.
        """
        events = list(events)
        _validate_events(events)
        if not events:
            return [], 0
        received_at = time.time()
        stored: list[Event] = []
        with self._write() as conn:
            known = self._deleted_at_of(conn, list({e.item_id: None for e in events}))
            for i, event in enumerate(events):
                if event.item_id not in known:
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): unknown item {event.item_id!r}")
                if known[event.item_id] is not None:
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): item {event.item_id!r} is deleted")
            erased = self._erased_before(conn, {e.user_id for e in events})
            for event in events:
                if event.timestamp <= erased.get(event.user_id, -math.inf):
                    continue
                row = _event_row(event, received_at)
                if conn.execute(_INSERT_EVENT, row).rowcount == 1:
                    stored.append(_event_from_row(row))
        return stored, len(events) - len(stored)

    @staticmethod
    def _erased_before(conn: sqlite3.Connection, user_ids: Iterable[str]) -> dict[str, float]:
        """When each erased user among `user_ids` was erased: their events dated at or before it
        are never stored again (a retried or replayed batch cannot bring them back)."""
        found: dict[str, float] = {}
        for chunk in _chunks(list(user_ids), _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(f"SELECT user_id, deleted_at FROM deleted_users WHERE user_id IN ({marks})",
                                      list(chunk)).fetchall())
        return found

    def add_impressions(self, impressions: Sequence[Impression]) -> tuple[list[Impression], int]:
        """Store impressions in one transaction, at most once per event_id (as add_events does for
        events). An impression of an erased user dated at or before the erasure is not stored.
        Returns (newly stored impressions in batch order, duplicate count) once durable."""
        impressions = list(impressions)
        _validate_impressions(impressions)
        if not impressions:
            return [], 0
        received_at = time.time()
        stored: list[Impression] = []
        with self._write() as conn:
            erased = self._erased_before(conn, {i.user_id for i in impressions})
            for impression in impressions:
                if impression.timestamp <= erased.get(impression.user_id, -math.inf):
                    continue
                row = (impression.event_id, impression.user_id, impression.item_id, impression.recommendation_id,
                       int(impression.position), float(impression.timestamp), received_at)
                if conn.execute(_INSERT_IMPRESSION, row).rowcount == 1:
                    stored.append(Impression(*row[:5], row[5]))
        return stored, len(impressions) - len(stored)

    def count_impressions(self, user_id: str | None = None) -> int:
        """Impressions stored (of one user, or of all)."""
        if user_id is None:
            return self._read("SELECT count(*) FROM impressions")[0][0]
        return self._read("SELECT count(*) FROM impressions WHERE user_id = ?", (user_id,))[0][0]

    def delete_user(self, user_id: str) -> tuple[int, int]:
        """Erase a user: delete their events and impressions and record the erasure, in one
        transaction; idempotent (a second call deletes nothing). Returns (events, impressions)
        deleted. The freed pages are zeroed (secure_delete) and the WAL is checkpointed, so the
        rows are gone from the files too, not only from the tables."""
        problem = _id_problem("user_id", user_id)
        if problem:
            raise errors.InvalidArgument(problem)
        now = time.time()
        with self._write() as conn:
            events = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            impressions = conn.execute("DELETE FROM impressions WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("INSERT INTO deleted_users (user_id, deleted_at) VALUES (?, ?) "
                         "ON CONFLICT (user_id) DO UPDATE SET deleted_at = excluded.deleted_at", (user_id, now))
        self._checkpoint()
        return events, impressions

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it, where no reader holds it back."""
        with self._write_lock:
            if self._closed or self._writer is None:
                return
            try:
                busy = self._writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.DatabaseError:
                busy = 1
            if busy:
                # A reader in the middle of a long read: the next checkpoint (SQLite's own, at
                # 1000 pages) copies the zeroed pages over the old ones.
                log.info("event store %s: WAL checkpoint after an erasure deferred by a reader", self.path)

    def deleted_users(self) -> dict[str, float]:
        """Erased users and when each was erased (unix seconds)."""
        return dict(self._read("SELECT user_id, deleted_at FROM deleted_users"))

    def events_for_user(self, user_id: str, until: float | None = None, limit: int | None = None) -> list[Event]:
        """The user's events with timestamp <= until (all when None), oldest first (ties in
        arrival order). With `limit`, only the most recent `limit` of them, still oldest first."""
        if limit is not None and limit <= 0:
            return []
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = ?"
        params: list = [user_id]
        if until is not None:
            sql += " AND timestamp <= ?"
            params.append(float(until))
        sql += " ORDER BY timestamp DESC, seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_event_from_row(row) for row in reversed(self._read(sql, params))]

    def iter_events(self, since_seq: int = 0) -> Iterator[tuple[int, Event]]:
        """(seq, event) for every event with seq > since_seq, in arrival order (an import
        keeps its file order). Read page by page like iter_items."""
        after = since_seq
        while True:
            rows = self._read(f"SELECT seq, {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT {_PAGE}",
                              (after,))
            for row in rows:
                yield row[0], _event_from_row(row[1:])
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def count_events(self) -> int:
        return self._read("SELECT count(*) FROM events")[0][0]

    def count_users(self) -> int:
        return self._read("SELECT count(DISTINCT user_id) FROM events")[0][0]

    def max_seq(self) -> int:
        """The seq of the newest event, 0 when there is none (a cursor for iter_events)."""
        return self._read("SELECT coalesce(max(seq), 0) FROM events")[0][0]

    # -- import -----------------------------------------------------------------------

    def bulk_import(self, items: Sequence[Item], events: Sequence[Event], batch_size: int = 5000) -> ImportStats:
        """Fast path for importers: upsert `items`, then append `events` in batches of
        `batch_size`, each batch its own transaction so live writers get turns. Everything
        is validated first (events may name items of this import or live stored ones);
        re-running the same import stores no event twice."""
        items = list(items)
        events = list(events)
        _validate_items(items)
        _validate_events(events)
        if batch_size <= 0:
            raise errors.InvalidArgument("batch_size must be positive")
        importing = {item.item_id for item in items}
        outside = list(dict.fromkeys(e.item_id for e in events if e.item_id not in importing))
        if outside:
            with self._sqlite_errors():
                known = self._deleted_at_of(self._reader(), outside)
            for i, event in enumerate(events):
                if event.item_id not in importing and known.get(event.item_id, 0.0) is not None:
                    state = "deleted" if event.item_id in known else "unknown"
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): {state} item {event.item_id!r}")
        now = time.time()
        if items:
            with self._write() as conn:
                conn.executemany(_UPSERT_ITEM, [_item_row(item, now) for item in items])
        added = 0
        for batch in _chunks(events, batch_size):
            with self._write() as conn:
                erased = self._erased_before(conn, {e.user_id for e in batch})
                rows = [_event_row(e, now) for e in batch if e.timestamp > erased.get(e.user_id, -math.inf)]
                before = conn.total_changes
                conn.executemany(_INSERT_EVENT, rows)
                added += conn.total_changes - before
        return ImportStats(items=len(items), events_added=added, events_duplicate=len(events) - added)
