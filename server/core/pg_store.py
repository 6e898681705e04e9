"""PostgreSQL-backed catalog and event log: the SQLite store's semantics plus one gap-free change sequence."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import select
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import psycopg
import psycopg.errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from chronorec.client import rules
from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.store import ImportStats, event_problem, impression_problem, item_problem

log = logging.getLogger("chronorec.store")

BUSY_MESSAGE = "event store is busy (waited too long for the write lock); retry in a moment"
UNREACHABLE_MESSAGE = "event store (PostgreSQL) is unreachable or restarting; retry in a moment"
NO_CONNECTION_MESSAGE = ("event store (PostgreSQL) gave no connection in time: the server is unreachable "
                         "or every connection is busy; retry in a moment")
# NOTIFY channel a write transaction signals at commit, with the newest change seq as payload:
# followers LISTEN on it to wake up, then read changes_since(their cursor).
CHANGES_CHANNEL = "chronorec_changes"
# Key of the transaction-level advisory lock under which one process at a time migrates.
MIGRATION_LOCK_KEY = 0x6368726F6E6F  # "chrono"
# Session-level advisory locks of run-once work (`exclusive(name)`) live in their own key space:
# the two-key form pg_advisory_lock(int4, int4) never collides with the one-key migration lock.
RUN_ONCE_LOCK_CLASS = 0x6372  # "cr"
# A replica whose heartbeat is older than this is forgotten by the next heartbeat of any replica.
FORGET_REPLICA_AFTER_S = 3600.0

_PAGE = 2000
_ANY_CHUNK = 10_000
_LOG_EVERY_S = 10.0


# -- schema ---------------------------------------------------------------------------------

# Ids are compared byte-wise (COLLATE "C") so iter_items pages in the same order as SQLite,
# whatever the database's locale, and their indexes skip locale-aware comparison.
_V1_INITIAL = """
CREATE TABLE change_counter (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_seq bigint NOT NULL CHECK (last_seq >= 0)
);
INSERT INTO change_counter (last_seq) VALUES (0);

CREATE TABLE items (
    item_id text COLLATE "C" PRIMARY KEY,
    title text NOT NULL,
    text text NOT NULL DEFAULT '',
    category text NOT NULL DEFAULT '',
    published_at double precision,
    expires_at double precision,
    attributes jsonb NOT NULL DEFAULT '{}',
    updated_at double precision NOT NULL,
    deleted_at double precision,
    CHECK (expires_at IS NULL OR published_at IS NULL OR expires_at > published_at)
);

-- Catalog half of the change log: every upsert with the item as written, every delete.
CREATE TABLE item_changes (
    seq bigint PRIMARY KEY,
    item_id text COLLATE "C" NOT NULL REFERENCES items (item_id),
    kind text NOT NULL CHECK (kind IN ('upsert', 'delete')),
    title text,
    text text,
    category text,
    published_at double precision,
    expires_at double precision,
    attributes jsonb,
    changed_at double precision NOT NULL,
    CHECK ((kind = 'upsert') = (title IS NOT NULL AND text IS NOT NULL AND category IS NOT NULL
                                AND attributes IS NOT NULL))
);

-- Event half of the change log: an event's seq is its change seq.
CREATE TABLE events (
    seq bigint PRIMARY KEY,
    event_id text COLLATE "C" NOT NULL UNIQUE,
    user_id text COLLATE "C" NOT NULL CHECK (length(user_id) > 0),
    item_id text COLLATE "C" NOT NULL REFERENCES items (item_id),
    action text NOT NULL,
    timestamp double precision NOT NULL,
    value double precision,
    received_at double precision NOT NULL
);
CREATE INDEX events_user_time ON events (user_id, timestamp);
CREATE INDEX events_item_time ON events (item_id, timestamp);
CREATE INDEX events_time ON events (timestamp);

-- The whole log in seq order; a "WHERE seq > n ORDER BY seq" over it is a merge of two primary keys.
CREATE VIEW changes AS
    SELECT seq, 'event'::text AS kind, item_id, event_id, user_id, action, timestamp, value,
           NULL::text AS title, NULL::text AS text, NULL::text AS category,
           NULL::double precision AS published_at, NULL::double precision AS expires_at,
           NULL::jsonb AS attributes
    FROM events
    UNION ALL
    SELECT seq, kind, item_id, NULL, NULL, NULL, NULL, NULL,
           title, text, category, published_at, expires_at, attributes
    FROM item_changes;
"""

# What users were shown, kept apart from what they did (events), and erased users. An erasure is
# a change of the log (kind 'delete_user', the user's latest erasure), so replicas that follow the
# log forget the user too; the erased user's events leave holes in the log's seqs.
_V3_IMPRESSIONS_AND_ERASURE = """
CREATE TABLE impressions (
    event_id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL CHECK (length(user_id) > 0),
    item_id text COLLATE "C" NOT NULL,
    recommendation_id text NOT NULL,
    position integer NOT NULL CHECK (position >= 1),
    timestamp double precision NOT NULL,
    received_at double precision NOT NULL
);
CREATE INDEX impressions_user ON impressions (user_id);

CREATE TABLE deleted_users (
    user_id text COLLATE "C" PRIMARY KEY,
    deleted_at double precision NOT NULL,
    seq bigint NOT NULL UNIQUE
);

CREATE OR REPLACE VIEW changes AS
    SELECT seq, 'event'::text AS kind, item_id, event_id, user_id, action, timestamp, value,
           NULL::text AS title, NULL::text AS text, NULL::text AS category,
           NULL::double precision AS published_at, NULL::double precision AS expires_at,
           NULL::jsonb AS attributes
    FROM events
    UNION ALL
    SELECT seq, kind, item_id, NULL, NULL, NULL, NULL, NULL,
           title, text, category, published_at, expires_at, attributes
    FROM item_changes
    UNION ALL
    SELECT seq, 'delete_user', NULL, NULL, user_id, NULL, deleted_at, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL
    FROM deleted_users;
"""

# Replicas sharing the database say who they are, what they serve and how far they have followed
# the log. Times are the database server's clock, so replicas on machines whose clocks disagree
# still agree on how old a heartbeat is.
_V2_REPLICAS = """
CREATE TABLE replicas (
    name text COLLATE "C" PRIMARY KEY,
    serving_version text NOT NULL DEFAULT '',
    applied_seq bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
"""

# Applied in order, each in the transaction that records it in schema_migrations; migration i
# brings the schema from version i to i + 1. Append new migrations, never edit or reorder shipped ones.
MIGRATIONS: list[str] = [_V1_INITIAL, _V2_REPLICAS, _V3_IMPRESSIONS_AND_ERASURE]
SCHEMA_VERSION = len(MIGRATIONS)


# -- rows -------------------------------------------------------------------------------------


class Change(NamedTuple):
    """One entry of the change log: an event stored, an item upserted (as written) or deleted, or a
    user erased (kind "delete_user", `user_id` set, `item_id` empty)."""

    seq: int
    kind: str  # "event", "upsert", "delete" or "delete_user"
    item_id: str
    event: Event | None = None
    item: Item | None = None
    user_id: str | None = None


_ITEM_COLUMNS = "item_id, title, text, category, published_at, expires_at, attributes"
_EVENT_COLUMNS = "event_id, user_id, item_id, action, timestamp, value"


class ReplicaRecord(NamedTuple):
    """One server replica as its last heartbeat described it."""

    name: str
    serving_version: str
    applied_seq: int
    heartbeat_age_s: float
    started_at: float  # Unix time


def _item_from_row(row: Sequence) -> Item:
    return Item(item_id=row[0], title=row[1], text=row[2], category=row[3],
                published_at=row[4], expires_at=row[5], attributes=row[6])


def _event_from_row(row: Sequence) -> Event:
    return Event(event_id=row[0], user_id=row[1], item_id=row[2], action=row[3], timestamp=row[4], value=row[5])


def _change_from_row(row: Sequence) -> Change:
    seq, kind, item_id = row[0], row[1], row[2]
    if kind == "event":
        return Change(seq, kind, item_id, event=Event(row[3], row[4], item_id, row[5], row[6], row[7]))
    if kind == "upsert":
        return Change(seq, kind, item_id, item=Item(item_id, row[8], row[9], row[10], row[11], row[12], row[13]))
    if kind == "delete_user":
        return Change(seq, kind, "", user_id=row[4])
    return Change(seq, kind, item_id)


def _float_or_none(x: float | None) -> float | None:
    return None if x is None else float(x)


def _has_nul(value: str) -> bool:
    return "\x00" in value


def _nul_problem(item: Item) -> str | None:
    """PostgreSQL text and jsonb cannot hold NUL, which SQLite's TEXT can: say so instead of failing inside."""
    for name in ("title", "text", "category"):
        if _has_nul(getattr(item, name)):
            return f"{name} contains a NUL character, which the PostgreSQL store cannot hold"
    if any(_has_nul(k) or _has_nul(v) for k, v in item.attributes.items()):
        return "attributes contain a NUL character, which the PostgreSQL store cannot hold"
    return None


def _validate_items(items: Sequence[Item]) -> None:
    for i, item in enumerate(items):
        problem = item_problem(item) or _nul_problem(item)
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


def _last_copy_per_id(items: Sequence[Item]) -> list[Item]:
    """One item per id, the batch's last copy (as SQLite's row-by-row upsert leaves it)."""
    return list({item.item_id: item for item in items}.values())


def describe_target(url: str) -> str:
    """host:port/dbname of a connection URL, for logs: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparsable URL>"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{host}:{port}/{parts.get('dbname', '')}"


# -- SQL ------------------------------------------------------------------------------------

_UPSERT_ITEMS = """
    INSERT INTO items (item_id, title, text, category, published_at, expires_at, attributes, updated_at)
    SELECT u.item_id, u.title, u.text, u.category, u.published_at, u.expires_at, u.attributes::jsonb, %(now)s
    FROM unnest(%(ids)s::text[], %(titles)s::text[], %(texts)s::text[], %(categories)s::text[],
                %(published)s::float8[], %(expires)s::float8[], %(attributes)s::text[])
         AS u (item_id, title, text, category, published_at, expires_at, attributes)
    ON CONFLICT (item_id) DO UPDATE SET
        title = excluded.title, text = excluded.text, category = excluded.category,
        published_at = excluded.published_at, expires_at = excluded.expires_at,
        attributes = excluded.attributes, updated_at = excluded.updated_at, deleted_at = NULL
"""
_LOG_UPSERTS = """
    INSERT INTO item_changes (seq, item_id, kind, title, text, category, published_at, expires_at,
                              attributes, changed_at)
    SELECT u.seq, u.item_id, 'upsert', u.title, u.text, u.category, u.published_at, u.expires_at,
           u.attributes::jsonb, %(now)s
    FROM unnest(%(seqs)s::bigint[], %(ids)s::text[], %(titles)s::text[], %(texts)s::text[],
                %(categories)s::text[], %(published)s::float8[], %(expires)s::float8[], %(attributes)s::text[])
         AS u (seq, item_id, title, text, category, published_at, expires_at, attributes)
"""
_DELETE_ITEMS = """
    UPDATE items SET deleted_at = %(now)s, updated_at = %(now)s
    FROM unnest(%(ids)s::text[]) AS k (id) WHERE items.item_id = k.id
"""
_LOG_DELETES = """
    INSERT INTO item_changes (seq, item_id, kind, changed_at)
    SELECT u.seq, u.item_id, 'delete', %(now)s FROM unnest(%(seqs)s::bigint[], %(ids)s::text[]) AS u (seq, item_id)
"""
_INSERT_EVENTS = """
    INSERT INTO events (seq, event_id, user_id, item_id, action, timestamp, value, received_at)
    SELECT u.seq, u.event_id, u.user_id, u.item_id, u.action, u.timestamp, u.value, %(received_at)s
    FROM unnest(%(seqs)s::bigint[], %(ids)s::text[], %(users)s::text[], %(items)s::text[],
                %(actions)s::text[], %(times)s::float8[], %(values)s::float8[])
         AS u (seq, event_id, user_id, item_id, action, timestamp, value)
"""


# Look-ups by a list of ids join an unnest rather than test "= ANY(%s)": psycopg prepares a
# statement after five runs, and PostgreSQL may then keep a generic plan made while the table was
# small, a sequential scan testing every row against the whole list (measured: 1000-event batches
# slowing from 60 ms to 500 ms as the log grew). The join stays one index probe per id.
_ITEM_STATES = ("SELECT i.item_id, i.deleted_at FROM unnest(%s::text[]) AS k (id) "
                "JOIN items i ON i.item_id = k.id")
_STORED_EVENT_IDS = ("SELECT e.event_id FROM unnest(%s::text[]) AS k (id) "
                     "JOIN events e ON e.event_id = k.id")
_ERASED_USERS = ("SELECT d.user_id, d.deleted_at FROM unnest(%s::text[]) AS k (id) "
                 "JOIN deleted_users d ON d.user_id = k.id")
_INSERT_IMPRESSIONS = """
    INSERT INTO impressions (event_id, user_id, item_id, recommendation_id, position, timestamp, received_at)
    SELECT u.event_id, u.user_id, u.item_id, u.recommendation_id, u.position, u.timestamp, %(received_at)s
    FROM unnest(%(ids)s::text[], %(users)s::text[], %(items)s::text[], %(recommendations)s::text[],
                %(positions)s::int4[], %(times)s::float8[])
         AS u (event_id, user_id, item_id, recommendation_id, position, timestamp)
    LEFT JOIN deleted_users d ON d.user_id = u.user_id
    WHERE d.deleted_at IS NULL OR u.timestamp > d.deleted_at
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
"""
_LIVE_ITEMS = ("SELECT i.item_id, i.title, i.text, i.category, i.published_at, i.expires_at, i.attributes "
               "FROM unnest(%s::text[]) AS k (id) JOIN items i ON i.item_id = k.id WHERE i.deleted_at IS NULL")


def _query_by_ids(conn: psycopg.Connection, sql: str, ids: Sequence[str]) -> list[psycopg.Cursor]:
    """Run `sql` (one ANY(%s) parameter) over `ids` in chunks; in pipeline mode the queries are
    only queued, and their rows arrive when _fetch first reads them."""
    return [conn.execute(sql, (list(chunk),)) for chunk in _chunks(list(ids), _ANY_CHUNK)]


def _fetch(cursors: list[psycopg.Cursor]) -> Iterator[tuple]:
    for cursor in cursors:
        yield from cursor.fetchall()


def _item_columns(items: Sequence[Item]) -> dict[str, list]:
    return {
        "ids": [it.item_id for it in items],
        "titles": [it.title for it in items],
        "texts": [it.text for it in items],
        "categories": [it.category for it in items],
        "published": [_float_or_none(it.published_at) for it in items],
        "expires": [_float_or_none(it.expires_at) for it in items],
        "attributes": [json.dumps(it.attributes, sort_keys=True, ensure_ascii=False) for it in items],
    }


def _check_idle_connection(conn: psycopg.Connection) -> None:
    """The pool's checkout check, without a round trip in the usual case: an idle connection has
    nothing to read unless the server closed it or said something (a termination notice, a
    parameter change), and only then is it tested with an empty query, which raises if it is dead.
    A server that vanished without closing the socket is caught by the call itself and TCP keepalives."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    # poll rather than select: a busy server process may hold descriptors past select's 1024.
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


class _Sequencer:
    """Hands out change sequence numbers inside one write transaction that holds the counter row.

    It reads the locked counter only when the first number is taken, so in pipeline mode the
    look-ups queued after the lock travel in the same round trip as the lock itself."""

    def __init__(self, counter: psycopg.Cursor):
        self._counter = counter
        self.start: int | None = None
        self.last_seq: int | None = None

    def take(self, n: int) -> list[int]:
        if self.last_seq is None:
            self.start = self.last_seq = self._counter.fetchone()[0]
        first = self.last_seq + 1
        self.last_seq += n
        return list(range(first, first + n))

    @property
    def changed(self) -> bool:
        return self.last_seq != self.start


# -- the store --------------------------------------------------------------------------------


class PostgresEventStore:
    """The catalog (items) and the event log (events) in one PostgreSQL database, shared by any
    number of processes.

    Semantics are those of the SQLite ``EventStore``: events are stored at most once per event_id,
    each write call is one transaction (all or nothing), and a write returns only after its
    commit is durable: every connection runs with ``synchronous_commit = on``, so the commit
    record is flushed to the server's WAL before the call returns, whatever the server default.

    Change log: every stored event and every item upsert or delete gets the next number of one
    sequence, without gaps. A write transaction first locks the single ``change_counter`` row and
    holds it to commit, so writers (in any process) take turns and commit in sequence order, and
    a rolled-back write gives its numbers back. A follower that read up to n can therefore ask
    for ``changes_since(n)`` and never miss a change committed later with a smaller number. Each
    commit also NOTIFYs ``CHANGES_CHANNEL``. The price is one writer at a time, as with SQLite.

    Failures: a lost connection, a restarted or unreachable server and a full disk raise
    ``errors.Unavailable`` (the cause is logged); a broken connection is dropped from the pool,
    which connects again, so the next call after recovery succeeds without reopening the store.
    A lock wait past ``busy_timeout_ms`` raises ``errors.Unavailable`` too.

    Migrations are versioned in ``schema_migrations`` and applied once, by whichever process
    takes the migration advisory lock first. ``read_only=True`` (the trainer) runs no migration,
    refuses writes with ``errors.FailedPrecondition`` and requires the current schema version.
    """

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000, read_only: bool = False,
                 pool_size: int = 8, connect_timeout_s: float = 5.0):
        self.url = describe_target(url)
        self.read_only = read_only
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._closed = False
        self._failure_log: dict[str, tuple[float, int]] = {}
        self._failure_log_lock = threading.Lock()
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # libpq's message may quote the URL, password included.
            raise errors.InvalidArgument("the event store URL cannot be parsed; expected "
                                         "postgresql://user[:password]@host[:port]/dbname[?option=value]") from None
        # libpq's connect_timeout is whole seconds, at least 2.
        params.setdefault("connect_timeout", str(max(2, math.ceil(connect_timeout_s))))
        params.setdefault("application_name", "chronorec")
        # Notice a server that vanished without closing the socket within about half a minute.
        for key, value in (("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"),
                           ("keepalives_count", "3")):
            params.setdefault(key, value)
        self._params = params
        self._check_or_migrate()
        self._pool = ConnectionPool(
            kwargs={**params, "autocommit": True},
            min_size=1,
            max_size=max(1, pool_size),
            timeout=connect_timeout_s,
            configure=self._configure,
            # Checked on every checkout: a connection the server dropped while idle (a restart)
            # is replaced instead of failing the call that drew it.
            check=_check_idle_connection,
            name="chronorec-store",
            open=False,
        )
        self._pool.open(wait=False)

    # -- connections ----------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT set_config('synchronous_commit', 'on', false), "
                     "set_config('lock_timeout', %s, false), "
                     "set_config('default_transaction_read_only', %s, false)",
                     (f"{self._busy_timeout_ms}ms", "on" if self.read_only else "off"))

    def _connect_direct(self) -> psycopg.Connection:
        conn = None
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
            self._configure(conn)
        except psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
            raise errors.Unavailable(f"event store {self.url} cannot be reached: {str(exc).strip()}") from exc
        return conn

    def _check_or_migrate(self) -> None:
        with self._connect_direct() as conn, self._pg_errors():
            if self.read_only:
                version = self._schema_version(conn)
                if version != SCHEMA_VERSION:
                    raise errors.Unavailable(
                        f"event store schema version is {version}, this build reads version {SCHEMA_VERSION}; "
                        "open it once read-write (start the server) to migrate"
                    )
                return
            with conn.transaction():
                # Migrations may take longer than a write's lock wait; a second process waits them out.
                conn.execute("SET LOCAL lock_timeout = '120s'")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                             "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                version = self._schema_version(conn)
                if version > SCHEMA_VERSION:
                    raise errors.Unavailable(
                        f"event store schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
                    )
                for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                    conn.execute(migration)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (target,))
                    log.info("event store %s: migrated the schema to version %d", self.url, target)

    @staticmethod
    def _schema_version(conn: psycopg.Connection) -> int:
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
            return 0
        return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]

    @contextlib.contextmanager
    def _pg_errors(self) -> Iterator[None]:
        """Failures of the server or the connection become errors.Unavailable with their cause
        logged; anything else (a constraint, bad SQL) is a bug and passes unchanged."""
        try:
            yield
        except errors.ChronorecError:
            raise
        except pgerrors.LockNotAvailable as exc:
            raise errors.Unavailable(BUSY_MESSAGE) from exc
        except pgerrors.ReadOnlySqlTransaction as exc:
            self._log_failure("read-only", exc, "the server is a standby or default_transaction_read_only is set")
            raise errors.Unavailable("event store is read-only right now; retry later") from exc
        except pgerrors.InsufficientResources as exc:
            self._log_failure("resources", exc, "free disk space or raise max_connections on the server")
            raise errors.Unavailable("event store (PostgreSQL) is out of disk space or connections; "
                                     "retry later") from exc
        except pgerrors.QueryCanceled as exc:
            self._log_failure("cancelled", exc, "a statement_timeout or an operator cancelled the query")
            raise errors.Unavailable("event store query was cancelled; retry in a moment") from exc
        except PoolTimeout as exc:
            if self._closed:
                raise errors.Unavailable("event store is closed") from exc
            self._log_failure("no-connection", exc, "the pool could not connect (see psycopg.pool's warnings) "
                                                    "or all its connections stayed busy")
            raise errors.Unavailable(NO_CONNECTION_MESSAGE) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if self._closed:
                raise errors.Unavailable("event store is closed") from exc
            self._log_failure("unreachable", exc, "the server is down, restarting or unreachable; "
                                                  "the pool reconnects by itself")
            raise errors.Unavailable(UNREACHABLE_MESSAGE) from exc

    def _log_failure(self, kind: str, exc: Exception, hint: str) -> None:
        now = time.monotonic()
        with self._failure_log_lock:
            last, suppressed = self._failure_log.get(kind, (-math.inf, 0))
            if now - last < _LOG_EVERY_S:
                self._failure_log[kind] = (last, suppressed + 1)
                return
            self._failure_log[kind] = (now, 0)
        log.error("event store %s: %s: %s; %s%s", self.url, type(exc).__name__, str(exc).strip() or "(no detail)",
                  hint, f" [{suppressed} more since the last report]" if suppressed else "")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if self._closed:
            raise errors.Unavailable("event store is closed")
        with self._pg_errors(), self._pool.connection() as conn:
            yield conn

    def _read(self, sql: str, params: Sequence | dict = ()) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[psycopg.Connection, _Sequencer]]:
        """One write transaction holding the change counter row (see the class docstring); the
        numbers taken from the sequencer are recorded and announced just before the commit.

        It runs in pipeline mode, where statements whose results are not read yet travel
        together: a write takes two round trips (BEGIN, the lock and the look-ups; then the
        inserts, the counter, NOTIFY and COMMIT) instead of nine. Look-ups queued behind the lock
        still see every commit made before it was granted: under READ COMMITTED each statement
        takes its snapshot when it starts, and the server starts it after the lock statement ends."""
        if self.read_only:
            raise errors.FailedPrecondition("event store is open read-only")
        with self._connection() as conn:
            try:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    sequencer = _Sequencer(conn.execute("SELECT last_seq FROM change_counter FOR UPDATE"))
                    yield conn, sequencer
                    if sequencer.changed:
                        conn.execute("UPDATE change_counter SET last_seq = %s", (sequencer.last_seq,))
                        conn.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, str(sequencer.last_seq)))
                    conn.execute("COMMIT")
                # Leaving the pipeline waits for the results: COMMIT's among them.
            except BaseException:
                # After a failed statement the server skips the rest of the pipeline (COMMIT
                # included) and holds the transaction aborted. A broken connection has no
                # transaction to end: the pool drops it.
                if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        with self._connection() as conn:
            return self._schema_version(conn)

    @property
    def location(self) -> str:
        """Where the store lives, for logs and reports: the URL without user or password."""
        return self.url

    def close(self) -> None:
        """Close every connection; later calls raise errors.Unavailable."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()

    def __enter__(self) -> PostgresEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog ----------------------------------------------------------------------------

    def upsert_items(self, items: Sequence[Item]) -> int:
        """Insert or replace items (all or none); an upsert revives a deleted item.
        Within one batch the last copy of an item_id wins. Returns len(items)."""
        items = list(items)
        self.upsert_items_logged(items)
        return len(items)

    def upsert_items_logged(self, items: Sequence[Item]) -> dict[str, int]:
        """upsert_items, answering the change seq each item_id got (one per id: the batch's last
        copy). A replica that applies its own write at once compares these with what its log
        follower applies, so neither applies an older change over a newer one."""
        items = list(items)
        _validate_items(items)
        if not items:
            return {}
        with self._write() as (conn, sequencer):
            return self._upsert(conn, sequencer, items, time.time())

    @staticmethod
    def _upsert(conn: psycopg.Connection, sequencer: _Sequencer, items: Sequence[Item], now: float) -> dict[str, int]:
        unique = _last_copy_per_id(items)
        columns = _item_columns(unique)
        seqs = sequencer.take(len(unique))
        conn.execute(_UPSERT_ITEMS, {**columns, "now": now})
        conn.execute(_LOG_UPSERTS, {**columns, "seqs": seqs, "now": now})
        return dict(zip(columns["ids"], seqs))

    def delete_items(self, item_ids: Sequence[str]) -> int:
        """Soft-delete items (all or none). Unknown ids raise errors.NotFound; ids already
        deleted are accepted, so a retried request succeeds. Returns how many were live."""
        return len(self.delete_items_logged(item_ids))

    def delete_items_logged(self, item_ids: Sequence[str]) -> dict[str, int]:
        """delete_items, answering the change seq of each item it deleted (ids that were already
        deleted get none: their delete is an older change of the log)."""
        item_ids = list(dict.fromkeys(item_ids))
        for i, item_id in enumerate(item_ids):
            problem = rules.id_problem(item_id)
            if problem:
                raise errors.InvalidArgument(f"item {i} (id {item_id!r}): item_id {problem}")
        if not item_ids:
            return {}
        with self._write() as (conn, sequencer):
            known = self._deleted_at_of(conn, item_ids)
            unknown = [item_id for item_id in item_ids if item_id not in known]
            if unknown:
                raise errors.NotFound(f"unknown item ids: {', '.join(map(repr, unknown[:20]))}"
                                      + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
            live = [item_id for item_id in item_ids if known[item_id] is None]
            seqs: list[int] = []
            if live:
                now = time.time()
                seqs = sequencer.take(len(live))
                conn.execute(_DELETE_ITEMS, {"ids": live, "now": now})
                conn.execute(_LOG_DELETES, {"seqs": seqs, "ids": live, "now": now})
        return dict(zip(live, seqs))

    @staticmethod
    def _deleted_at_of(conn: psycopg.Connection, item_ids: Sequence[str]) -> dict[str, float | None]:
        """deleted_at of each known item among `item_ids` (None for live ones)."""
        return dict(_fetch(_query_by_ids(conn, _ITEM_STATES, item_ids)))

    def get_item(self, item_id: str) -> Item | None:
        """The live item with this id, or None (unknown or deleted)."""
        rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = %s AND deleted_at IS NULL", (item_id,))
        return _item_from_row(rows[0]) if rows else None

    def get_items(self, item_ids: Iterable[str]) -> dict[str, Item]:
        """Live items by id; unknown and deleted ids are left out."""
        found: dict[str, Item] = {}
        for chunk in _chunks(list(dict.fromkeys(item_ids)), _ANY_CHUNK):
            for row in self._read(_LIVE_ITEMS, (list(chunk),)):
                found[row[0]] = _item_from_row(row)
        return found

    def iter_items(self) -> Iterator[Item]:
        """Live items ordered by item_id (byte order, as SQLite), read page by page with no
        transaction held between pages."""
        after = None
        while True:
            if after is None:
                rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted_at IS NULL "
                                  f"ORDER BY item_id LIMIT {_PAGE}")
            else:
                rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted_at IS NULL AND item_id > %s "
                                  f"ORDER BY item_id LIMIT {_PAGE}", (after,))
            for row in rows:
                yield _item_from_row(row)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def count_items(self) -> int:
        """Number of live items."""
        return self._read("SELECT count(*) FROM items WHERE deleted_at IS NULL")[0][0]

    # -- event log ----------------------------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> tuple[list[Event], int]:
        """Store a batch of events in one transaction, at most once per event_id.

        Every event is validated before anything is written (errors name the first bad event by
        its index in the batch). An event whose event_id is already stored, or repeats an earlier
        one of the same batch, is a duplicate: not stored again (the first copy wins). Returns
        (newly stored events in batch order, as stored: times and values as floats; duplicate
        count) only after the commit is durable.
        """
        events = list(events)
        _validate_events(events)
        if not events:
            return [], 0
        with self._write() as (conn, sequencer):
            # The look-ups are queued before any is read: one round trip in pipeline mode.
            item_states = _query_by_ids(conn, _ITEM_STATES, list({e.item_id: None for e in events}))
            stored_ids = _query_by_ids(conn, _STORED_EVENT_IDS, list({e.event_id: None for e in events}))
            erased = _query_by_ids(conn, _ERASED_USERS, list({e.user_id: None for e in events}))
            known = dict(_fetch(item_states))
            for i, event in enumerate(events):
                if event.item_id not in known:
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): unknown item {event.item_id!r}")
                if known[event.item_id] is not None:
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): item {event.item_id!r} is deleted")
            stored = self._insert_new_events(conn, sequencer, events, time.time(), stored_ids, erased)
        return stored, len(events) - len(stored)

    @staticmethod
    def _insert_new_events(conn: psycopg.Connection, sequencer: _Sequencer, events: Sequence[Event],
                           received_at: float, stored_ids_query: list[psycopg.Cursor] | None = None,
                           erased_query: list[psycopg.Cursor] | None = None) -> list[Event]:
        """Insert the events whose id is not stored yet (first copy of each id), numbered in batch
        order. Safe without ON CONFLICT: the caller holds the counter row, which every writer takes.
        `stored_ids_query` is the look-up of the batch's ids when the caller already queued it."""
        if stored_ids_query is None:
            stored_ids_query = _query_by_ids(conn, _STORED_EVENT_IDS, list({e.event_id: None for e in events}))
        if erased_query is None:
            erased_query = _query_by_ids(conn, _ERASED_USERS, list({e.user_id: None for e in events}))
        stored_ids = {row[0] for row in _fetch(stored_ids_query)}
        # An erased user's events dated at or before the erasure are never stored again.
        erased = dict(_fetch(erased_query))
        fresh: list[Event] = []
        for event in events:
            if event.timestamp <= erased.get(event.user_id, -math.inf):
                continue
            if event.event_id not in stored_ids:
                stored_ids.add(event.event_id)
                fresh.append(Event(event.event_id, event.user_id, event.item_id, event.action,
                                   float(event.timestamp), _float_or_none(event.value)))
        if fresh:
            conn.execute(_INSERT_EVENTS, {
                "seqs": sequencer.take(len(fresh)),
                "ids": [e.event_id for e in fresh],
                "users": [e.user_id for e in fresh],
                "items": [e.item_id for e in fresh],
                "actions": [e.action for e in fresh],
                "times": [e.timestamp for e in fresh],
                "values": [e.value for e in fresh],
                "received_at": received_at,
            })
        return fresh

    def add_impressions(self, impressions: Sequence[Impression]) -> tuple[list[Impression], int]:
        """Store impressions in one transaction, at most once per event_id (the first copy wins);
        one of an erased user dated at or before the erasure is not stored. It holds the change
        counter row, as every write does, so an erasure never runs beside it; impressions take no
        seq (they are not in the change log). Returns (newly stored, in batch order; duplicates)."""
        impressions = list(impressions)
        for i, impression in enumerate(impressions):
            problem = impression_problem(impression)
            if problem:
                raise errors.InvalidArgument(f"impression {i} (id {getattr(impression, 'event_id', None)!r}): {problem}")
        if not impressions:
            return [], 0
        unique: list[Impression] = []
        seen: set[str] = set()
        for impression in impressions:
            if impression.event_id not in seen:
                seen.add(impression.event_id)
                unique.append(impression)
        with self._write() as (conn, _sequencer):
            inserted = conn.execute(_INSERT_IMPRESSIONS, {
                "ids": [i.event_id for i in unique],
                "users": [i.user_id for i in unique],
                "items": [i.item_id for i in unique],
                "recommendations": [i.recommendation_id for i in unique],
                "positions": [int(i.position) for i in unique],
                "times": [float(i.timestamp) for i in unique],
                "received_at": time.time(),
            })
        new_ids = {row[0] for row in inserted.fetchall()}
        stored = [Impression(i.event_id, i.user_id, i.item_id, i.recommendation_id, int(i.position), float(i.timestamp))
                  for i in unique if i.event_id in new_ids]
        return stored, len(impressions) - len(stored)

    def count_impressions(self, user_id: str | None = None) -> int:
        """Impressions stored (of one user, or of all)."""
        if user_id is None:
            return self._read("SELECT count(*) FROM impressions")[0][0]
        return self._read("SELECT count(*) FROM impressions WHERE user_id = %s", (user_id,))[0][0]

    def delete_user(self, user_id: str) -> tuple[int, int]:
        """Erase a user: delete their events and impressions and record the erasure as a change of
        the log (kind "delete_user"), in one transaction; idempotent (a second call deletes nothing
        and records the erasure again). Returns (events, impressions) deleted. PostgreSQL keeps dead
        row versions until VACUUM reclaims them; run VACUUM to have them gone from the files too."""
        problem = rules.id_problem(user_id)
        if problem:
            raise errors.InvalidArgument(f"user_id {problem}")
        with self._write() as (conn, sequencer):
            events = conn.execute("DELETE FROM events WHERE user_id = %s", (user_id,))
            impressions = conn.execute("DELETE FROM impressions WHERE user_id = %s", (user_id,))
            conn.execute("INSERT INTO deleted_users (user_id, deleted_at, seq) VALUES (%s, %s, %s) "
                         "ON CONFLICT (user_id) DO UPDATE SET deleted_at = excluded.deleted_at, seq = excluded.seq",
                         (user_id, time.time(), sequencer.take(1)[0]))
        return events.rowcount, impressions.rowcount

    def deleted_users(self) -> dict[str, float]:
        """Erased users and when each was erased (unix seconds)."""
        return dict(self._read("SELECT user_id, deleted_at FROM deleted_users"))

    def events_for_user(self, user_id: str, until: float | None = None, limit: int | None = None) -> list[Event]:
        """The user's events with timestamp <= until (all when None), oldest first (ties in
        arrival order). With `limit`, only the most recent `limit` of them, still oldest first."""
        if limit is not None and limit <= 0:
            return []
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = %s"
        params: list = [user_id]
        if until is not None:
            sql += " AND timestamp <= %s"
            params.append(float(until))
        sql += " ORDER BY timestamp DESC, seq DESC"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(int(limit))
        return [_event_from_row(row) for row in reversed(self._read(sql, params))]

    def iter_events(self, since_seq: int = 0) -> Iterator[tuple[int, Event]]:
        """(seq, event) for every event with seq > since_seq, in arrival order (an import keeps its
        file order). Seqs are change seqs, so catalog changes leave holes between events; a cursor
        read from max_seq() stays valid because changes commit in seq order."""
        after = since_seq
        while True:
            rows = self._read(f"SELECT seq, {_EVENT_COLUMNS} FROM events WHERE seq > %s ORDER BY seq LIMIT {_PAGE}",
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

    # -- change log ---------------------------------------------------------------------------

    def max_change_seq(self) -> int:
        """The seq of the newest committed change (event or catalog), 0 when there is none."""
        return self._read("SELECT last_seq FROM change_counter")[0][0]

    def changes_since(self, seq: int, limit: int = _PAGE) -> list[Change]:
        """Up to `limit` changes with a seq above `seq`, in seq order. Seqs have no gaps and commit
        in order, so a follower that passes the last seq it applied never misses one."""
        rows = self._read("SELECT seq, kind, item_id, event_id, user_id, action, timestamp, value, "
                          "title, text, category, published_at, expires_at, attributes "
                          "FROM changes WHERE seq > %s ORDER BY seq LIMIT %s", (int(seq), int(limit)))
        return [_change_from_row(row) for row in rows]

    def iter_changes(self, since_seq: int = 0) -> Iterator[Change]:
        """Every change after `since_seq`, page by page (changes_since in a loop)."""
        after = since_seq
        while True:
            page = self.changes_since(after)
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].seq

    def open_listener(self) -> psycopg.Connection:
        """A connection of its own (outside the pool) LISTENing on CHANGES_CHANNEL: read its
        notifications with `notifies()`, close it when done. LISTEN takes effect before this
        returns, so a catch-up read after it misses no change made before a later notification."""
        if self._closed:
            raise errors.Unavailable("event store is closed")
        conn = self._connect_direct()
        try:
            with self._pg_errors():
                conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- run-once work and replicas -----------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, name: str, wait_s: float = 600.0) -> Iterator[None]:
        """Hold the advisory lock `name` (one holder across every process on this database) for
        the block: work that must happen once, such as loading the demo catalog, checks whether
        it is done and does it inside. The lock lives on a connection of its own, so a holder
        that dies releases it with its connection."""
        key = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
        conn = self._connect_direct()
        try:
            with self._pg_errors():
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(wait_s * 1000)}ms",))
                conn.execute("SELECT pg_advisory_lock(%s, %s)", (RUN_ONCE_LOCK_CLASS, key))
            yield
        finally:
            conn.close()

    def heartbeat(self, name: str, serving_version: str, applied_seq: int, started_at: float) -> None:
        """Record that replica `name` (started at Unix time `started_at`) is alive, serves
        `serving_version` and has applied the log up to `applied_seq`; replicas silent for
        FORGET_REPLICA_AFTER_S are dropped on the way."""
        if self.read_only:
            raise errors.FailedPrecondition("event store is open read-only")
        with self._connection() as conn, conn.transaction():
            conn.execute("INSERT INTO replicas (name, serving_version, applied_seq, started_at) "
                         "VALUES (%s, %s, %s, to_timestamp(%s)) "
                         "ON CONFLICT (name) DO UPDATE SET serving_version = excluded.serving_version, "
                         "applied_seq = excluded.applied_seq, started_at = excluded.started_at, heartbeat_at = now()",
                         (name, serving_version, int(applied_seq), float(started_at)))
            conn.execute("DELETE FROM replicas WHERE heartbeat_at < now() - make_interval(secs => %s)",
                         (FORGET_REPLICA_AFTER_S,))

    def forget_replica(self, name: str) -> None:
        """Remove replica `name` (it is stopping cleanly)."""
        with self._connection() as conn:
            conn.execute("DELETE FROM replicas WHERE name = %s", (name,))

    def replicas(self, max_age_s: float | None = None) -> list[ReplicaRecord]:
        """Replicas by name whose last heartbeat is at most `max_age_s` old (all when None)."""
        sql = ("SELECT name, serving_version, applied_seq, extract(epoch FROM now() - heartbeat_at)::float8, "
               "extract(epoch FROM started_at)::float8 FROM replicas")
        params: tuple = ()
        if max_age_s is not None:
            sql += " WHERE heartbeat_at >= now() - make_interval(secs => %s)"
            params = (float(max_age_s),)
        return [ReplicaRecord(*row) for row in self._read(sql + " ORDER BY name", params)]

    # -- import -------------------------------------------------------------------------------

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
            with self._connection() as conn:
                known = self._deleted_at_of(conn, outside)
            for i, event in enumerate(events):
                if event.item_id not in importing and known.get(event.item_id, 0.0) is not None:
                    state = "deleted" if event.item_id in known else "unknown"
                    raise errors.NotFound(f"event {i} (id {event.event_id!r}): {state} item {event.item_id!r}")
        now = time.time()
        if items:
            with self._write() as (conn, sequencer):
                self._upsert(conn, sequencer, items, now)
        added = 0
        for batch in _chunks(events, batch_size):
            with self._write() as (conn, sequencer):
                added += len(self._insert_new_events(conn, sequencer, batch, now))
        return ImportStats(items=len(items), events_added=added, events_duplicate=len(events) - added)

