"""Opens the event store a --db target names: an SQLite file path or a postgresql:// URL."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import EventStore, ImportStats

if TYPE_CHECKING:
    from chronorec.server.core.pg_store import PostgresEventStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Store(Protocol):
    """What both backends offer: the catalog, the event log and the importer's fast path."""

    read_only: bool

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
    def close(self) -> None: ...


AnyStore = Union[EventStore, "PostgresEventStore"]


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
