"""The live catalog in memory: a thread-safe item mapping with a change counter."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping

from chronorec.server.core.catalog import Item


class CatalogState(Mapping):
    """Items by id, and a sequence number that moves on every change.

    The ranking keys its column snapshot of the whole catalog by `version`, and a hot swap
    catches up on the items changed since it took its own snapshot (`changed_since`).
    Writers that must keep the store, this state and an index in step hold `lock` (it is
    re-entrant) across all three.
    """

    def __init__(self, items: Iterable[Item] = ()):
        self._items: dict[str, Item] = {item.item_id: item for item in items}
        self.lock = threading.RLock()
        self._sequence = 0
        self._last_change: dict[str, int] = {}

    @property
    def version(self) -> int:
        """Moves on every change; equal versions mean equal contents."""
        return self._sequence

    def upsert(self, items: Iterable[Item]) -> None:
        """Apply committed inserts or replacements."""
        with self.lock:
            # The counter moves after the change: a reader that sees the new number (the
            # ranking, without this lock) also sees the change.
            for item in items:
                self._items[item.item_id] = item
                self._last_change[item.item_id] = self._sequence + 1
                self._sequence += 1

    def delete(self, item_ids: Iterable[str]) -> int:
        """Apply committed deletions; returns how many ids were present."""
        removed = 0
        with self.lock:
            for item_id in item_ids:
                removed += self._items.pop(item_id, None) is not None
                self._last_change[item_id] = self._sequence + 1
                self._sequence += 1
        return removed

    def changed_since(self, version: int) -> list[str]:
        """Ids upserted or deleted after `version` (call with `lock` held for a consistent answer)."""
        with self.lock:
            return [item_id for item_id, seq in self._last_change.items() if seq > version]

    def snapshot(self) -> list[Item]:
        """Every item now, at least as new as `version` read before the call.

        Lock-free, so a Recommend never waits on a writer encoding its items: dict.copy() runs
        under the GIL in one step, where iterating the live dict could see it change size.
        """
        return list(self._items.copy().values())

    def __getitem__(self, item_id: str) -> Item:
        return self._items[item_id]

    def get(self, item_id: str, default=None):
        return self._items.get(item_id, default)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items.copy()))

    def __len__(self) -> int:
        return len(self._items)
