"""Opens the event store a --db target names: an SQLite file path or a postgresql:// URL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable
from urllib.parse import urlsplit

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.store import EventStore, ImportStats

if TYPE_CHECKING:
    from chronorec.server.core.pg_store import Change, PostgresEventStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Store(Protocol):
    """What both backends offer: the catalog, the event log and the importer's fast path."""

    read_only: bool

    @property
    def location(self) -> str:
        """Where the store lives, for logs and reports (an SQLite path, a URL without password)."""

    def upsert_items(self, items: Sequence[Item]) -> int: ...
    def delete_items(self, item_ids: Sequence[str]) -> int: ...
    def get_item(self, item_id: str) -> Item | None: ...
    def get_items(self, item_ids: Iterable[str]) -> dict[str, Item]: ...
    def iter_items(self) -> Iterator[Item]: ...
    def count_items(self) -> int: ...
    def add_events(self, events: Sequence[Event]) -> tuple[list[Event], int]: ...
    def events_for_user(self, user_id: str, until: float | None = None,
                        limit: int | None = None) -> list[Event]: ...
    def iter_events(self, since_seq: int = 0) -> Iterator[tuple[int, Event]]: ...
    def count_events(self) -> int: ...
    def count_users(self) -> int: ...
    def max_seq(self) -> int: ...
    def schema_version(self) -> int: ...
    def bulk_import(self, items: Sequence[Item], events: Sequence[Event], batch_size: int = 5000) -> ImportStats: ...
    def add_impressions(self, impressions: Sequence[Impression]) -> tuple[list[Impression], int]: ...
    def count_impressions(self, user_id: str | None = None) -> int: ...
    def delete_user(self, user_id: str) -> tuple[int, int]: ...
    def deleted_users(self) -> dict[str, float]: ...
    def close(self) -> None: ...


@runtime_checkable
class SharedLog(Protocol):
    """A store several servers share, with one change sequence they follow (PostgreSQL): each
    write answers the seqs it took, and every committed change can be read back in seq order."""

    def max_change_seq(self) -> int: ...
    def changes_since(self, seq: int, limit: int = ...) -> list[Change]: ...
    def upsert_items_logged(self, items: Sequence[Item]) -> dict[str, int]: ...
    def delete_items_logged(self, item_ids: Sequence[str]) -> dict[str, int]: ...
    def open_listener(self): ...
    def heartbeat(self, name: str, serving_version: str, applied_seq: int, started_at: float) -> None: ...
    def forget_replica(self, name: str) -> None: ...
    def replicas(self, max_age_s: float | None = None) -> list: ...
    def exclusive(self, name: str, wait_s: float = ...) -> contextlib.AbstractContextManager[None]: ...


AnyStore = Union[EventStore, "PostgresEventStore"]


def run_once(store: Store, name: str) -> contextlib.AbstractContextManager[None]:
    """A block that one process at a time runs for `name`: under an advisory lock on a shared
    store. One SQLite file has one server, so there it is only the block."""
    if isinstance(store, SharedLog):
        return store.exclusive(name)
    return contextlib.nullcontext()


def describe_store_target(target: str | os.PathLike) -> str:
    """A --db value fit for logs: an SQLite path as is, a URL as scheme://host:port/dbname, its
    user, password and options (which may hold a password too) left out."""
    if not is_postgres_url(str(target)):
        return str(target)
    try:
        parts = urlsplit(str(target))
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "postgresql://<unparsable URL>"
    return f"{parts.scheme}://{host}:{port}{parts.path}"


def store_target(text: str | os.PathLike) -> str | Path:
    """A --db value as open_store takes it: a postgresql:// URL stays a string (a Path would fold
    its "//"), anything else is a file path."""
    return str(text) if is_postgres_url(str(text)) else Path(text)


def is_postgres_url(target: str | os.PathLike) -> bool:
    return isinstance(target, str) and target.lower().startswith(POSTGRES_SCHEMES)


def open_store(target: str | os.PathLike, *, read_only: bool = False, busy_timeout_ms: int = 5000) -> AnyStore:
    """PostgresEventStore for a postgresql:// (or postgres://) URL, EventStore for anything else
    (a path to an SQLite file). Other URL schemes are refused rather than taken for file names."""
    if is_postgres_url(target):
        try:
            from chronorec.server.core.pg_store import PostgresEventStore
        except ImportError as exc:
            raise errors.FailedPrecondition(
                f"a PostgreSQL event store needs psycopg and psycopg-pool ({exc.name} is missing): "
                "install chronorec with the `postgres` extra"
            ) from exc
        return PostgresEventStore(str(target), read_only=read_only, busy_timeout_ms=busy_timeout_ms)
    if isinstance(target, str) and "://" in target:
        scheme = target.split("://", 1)[0]
        raise errors.InvalidArgument(f"unsupported event store URL scheme {scheme!r}: give an SQLite file path "
                                     "or a postgresql:// URL")
    return EventStore(Path(target), read_only=read_only, busy_timeout_ms=busy_timeout_ms)
