"""In-memory, as-of-time view of the event log: user histories and item popularity at any time."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from chronorec.server.core.catalog import Event
from chronorec.server.core.rwlock import ReadWriteLock
from chronorec.server.core.timetext import HistoryEntry


# Window lengths whose counts are kept at once (the blend's trend window, the learned ranker's
# trend windows, all time); past it the kept counts start over.
_KEPT_WINDOWS = 8


class _Stretch:
    """Events per item over positions [lo, hi) of the sorted event arrays of one layout."""

    __slots__ = ("layout", "lo", "hi", "counts")

    def __init__(self, layout: int, lo: int, hi: int, counts: np.ndarray):
        self.layout, self.lo, self.hi, self.counts = layout, lo, hi, counts


class _UserLog:
    """One user's events sorted by time; equal times keep arrival order."""

    __slots__ = ("timestamps", "entries", "event_ids")

    def __init__(self) -> None:
        self.timestamps: list[float] = []
        self.entries: list[HistoryEntry] = []
        self.event_ids: list[str] = []  # in arrival order; erasure forgets them with the user

    def insert(self, entry: HistoryEntry) -> None:
        if not self.timestamps or entry.timestamp >= self.timestamps[-1]:
            self.timestamps.append(entry.timestamp)
            self.entries.append(entry)
        else:
            # Late arrival: after every event of the same time, so arrival order breaks ties.
            at = bisect_right(self.timestamps, entry.timestamp)
            self.timestamps.insert(at, entry.timestamp)
            self.entries.insert(at, entry)

    def visible_count(self, at: float) -> int:
        return bisect_right(self.timestamps, at)


class InteractionState:
    """Events fed in arrival order, queried as of any time `at` (only timestamps ≤ `at` count).

    Popularity is answered from one global event array sorted by time (ties in arrival
    order) so a window count is a `searchsorted` plus a `bincount`. New events wait in a
    small pending list and are merged into that array at the next popularity query, so a
    replay that alternates "add one event, ask one question" stays linear-ish.

    Counts are kept per window length for the stretch of that array they last covered, and
    moved to the next query's stretch by adding and subtracting only the events in between
    (none when neither the window's edges nor the log moved): a bincount over the window
    per call was ~10 % of a cached Recommend's CPU at 100k items. The trending order is
    kept for the stretch it was computed on.
    """

    def __init__(self) -> None:
        self._lock = ReadWriteLock()
        self._users: dict[str, _UserLog] = {}
        self._item_index: dict[str, int] = {}
        self._item_ids: list[str] = []
        self._first_times: list[float] = []  # earliest event time per item, in `_item_ids` order
        self._first_times_array: np.ndarray | None = None  # the same as an array, rebuilt after a change
        self._event_ids: set[str] = set()
        self._times = np.zeros(0, dtype=np.float64)
        self._items = np.zeros(0, dtype=np.int32)
        self._pending_times: list[float] = []
        self._pending_items: list[int] = []
        self._id_rank: np.ndarray | None = None  # rank of each item id in sorted order
        # Bumped whenever an event already in the sorted arrays moves or goes (a late event
        # merged before it, an erasure): stretches [lo, hi) of an older layout mean other events.
        self._layout = 0
        # Window length (None: all time) -> _Stretch of the counts last asked for.
        self._stretches: dict[float | None, _Stretch] = {}
        # (layout, window stretch, all-time end, n, items) -> trending positions and window counts.
        self._trending_cache: tuple[tuple, np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------------- writes

    def add(self, events: Iterable[Event]) -> int:
        """Ingest events (duplicates by event id are ignored); returns how many were new."""
        added = 0
        with self._lock.write():
            for event in events:
                if event.event_id:
                    if event.event_id in self._event_ids:
                        continue
                    self._event_ids.add(event.event_id)
                timestamp = float(event.timestamp)
                log = self._users.get(event.user_id)
                if log is None:
                    log = self._users[event.user_id] = _UserLog()
                log.insert(HistoryEntry(event.item_id, event.action, timestamp, event.value))
                if event.event_id:
                    log.event_ids.append(event.event_id)
                item = self._item_index.get(event.item_id)
                if item is None:
                    item = self._item_index[event.item_id] = len(self._item_ids)
                    self._item_ids.append(event.item_id)
                    self._first_times.append(timestamp)
                    self._first_times_array = None
                    self._id_rank = None
                elif timestamp < self._first_times[item]:
                    self._first_times[item] = timestamp
                    self._first_times_array = None
                self._pending_times.append(timestamp)
                self._pending_items.append(item)
                added += 1
        return added

    def _merge_pending(self) -> None:
        times = np.asarray(self._pending_times, dtype=np.float64)
        items = np.asarray(self._pending_items, dtype=np.int32)
        self._pending_times = []
        self._pending_items = []
        order = np.argsort(times, kind="stable")
        times, items = times[order], items[order]
        if not len(self._times) or times[0] >= self._times[-1]:
            # Appended after every held event: their positions, and every cached stretch, stay valid.
            self._times = np.concatenate([self._times, times])
            self._items = np.concatenate([self._items, items])
        else:
            # side="right" puts late events after existing ones of the same time (arrival order).
            at = np.searchsorted(self._times, times, side="right")
            self._times = np.insert(self._times, at, times)
            self._items = np.insert(self._items, at, items)
            self._layout += 1

    def _ensure_merged(self) -> None:
        if self._pending_times:
            with self._lock.write():
                if self._pending_times:
                    self._merge_pending()

    def remove_user(self, user_id: str) -> int:
        """Forget every event of `user_id` (erasure): the history, its share of every popularity
        count, and its event ids (a later event may reuse one). Returns how many events went."""
        with self._lock.write():
            log = self._users.pop(user_id, None)
            if log is None:
                return 0
            if self._pending_times:
                self._merge_pending()
            self._event_ids.difference_update(log.event_ids)
            # The global arrays do not say whose an event is, but events of one time and one item
            # are interchangeable in every count: dropping any that many of them is exact.
            wanted = Counter((entry.timestamp, self._item_index[entry.item_id]) for entry in log.entries)
            drop = np.zeros(len(self._times), dtype=bool)
            for (timestamp, item), count in wanted.items():
                lo = int(np.searchsorted(self._times, timestamp, side="left"))
                hi = int(np.searchsorted(self._times, timestamp, side="right"))
                matches = lo + np.flatnonzero((self._items[lo:hi] == item) & ~drop[lo:hi])
                drop[matches[:count]] = True
            self._times = self._times[~drop]
            self._items = self._items[~drop]
            self._layout += 1
            # An item's first event (the learned ranker's item age) may have been theirs.
            for item in {item for _, item in wanted}:
                remaining = self._times[self._items == item]
                self._first_times[item] = float(remaining[0]) if len(remaining) else math.inf
            self._first_times_array = None
            return len(log.entries)

    # ------------------------------------------------------------ histories

    def history(self, user_id: str, at: float, limit: int | None = None) -> list[HistoryEntry]:
        """The user's events with timestamp ≤ `at`, oldest to newest (the last `limit`)."""
        with self._lock.read():
            log = self._users.get(user_id)
            if log is None:
                return []
            end = log.visible_count(at)
            start = 0 if limit is None else max(0, end - int(limit))
            return log.entries[start:end]

    def seen_items(self, user_id: str, at: float) -> set[str]:
        """Items the user had any event on at or before `at`."""
        with self._lock.read():
            log = self._users.get(user_id)
            if log is None:
                return set()
            return {e.item_id for e in log.entries[: log.visible_count(at)]}

    def user_event_count(self, user_id: str, at: float | None = None) -> int:
        """How many events of the user are visible at `at` (all when `at` is None)."""
        with self._lock.read():
            log = self._users.get(user_id)
            if log is None:
                return 0
            return len(log.timestamps) if at is None else log.visible_count(at)

    @property
    def event_count(self) -> int:
        """Number of events held (all times)."""
        return len(self._times) + len(self._pending_times)

    def user_items(self, at: float | None = None) -> dict[str, list[str]]:
        """Per user, the items of their events up to `at` (input for co-occurrence fitting)."""
        return self.user_items_and_times(at)[0]

    user_sequences = user_items

    def user_items_and_times(self, at: float | None = None) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
        """user_items(at) and, aligned with it, each event's time (co-occurrence with its sessions)."""
        with self._lock.read():
            items, times = {}, {}
            for user_id, log in self._users.items():
                end = len(log.entries) if at is None else log.visible_count(at)
                if end:
                    items[user_id] = [e.item_id for e in log.entries[:end]]
                    times[user_id] = log.timestamps[:end]
            return items, times

    def users(self) -> list[str]:
        with self._lock.read():
            return list(self._users)

    def __len__(self) -> int:
        return self.event_count

    # ----------------------------------------------------------- popularity

    @property
    def num_items(self) -> int:
        """Items with at least one event; positions below this never change meaning."""
        return len(self._item_ids)

    def item_ids(self) -> list[str]:
        """Items in the order that unaligned count arrays use (first-seen order)."""
        with self._lock.read():
            return list(self._item_ids)

    def indices_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Positions of `item_ids` in `item_ids()` order; -1 for items with no event."""
        with self._lock.read():
            index = self._item_index
            return np.fromiter((index.get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def _stretch(self, start: float | None, end: float) -> tuple[int, int]:
        # Caller holds the read lock. Window is [start, end], both ends included.
        lo = 0 if start is None else int(np.searchsorted(self._times, start, side="left"))
        return lo, int(np.searchsorted(self._times, end, side="right"))

    def _counts_between(self, end: float, window_seconds: float | None) -> np.ndarray:
        """Events per item in [end - window_seconds, end] (None: all up to `end`); read-only, the
        array is shared by later calls. Caller holds the read lock."""
        lo, hi = self._stretch(None if window_seconds is None else end - window_seconds, end)
        return self._counts_of(window_seconds, lo, hi)

    def _counts_of(self, key: float | None, lo: int, hi: int) -> np.ndarray:
        """Events per item over positions [lo, hi), from the counts kept for window `key`.

        Counts are exact integers, so moving a kept stretch's counts by the events between its
        edges and the new ones gives what a bincount over the new stretch gives, in whatever
        order the queries come."""
        n_items, layout, items = len(self._item_ids), self._layout, self._items
        kept = self._stretches.get(key)
        if kept is not None and kept.layout == layout and kept.lo == lo and kept.hi == hi and len(kept.counts) == n_items:
            return kept.counts
        moved = abs(lo - kept.lo) + abs(hi - kept.hi) if kept is not None and kept.layout == layout else None
        if moved is None or moved >= hi - lo:
            counts = np.bincount(items[lo:hi], minlength=n_items)
        else:
            # counts[lo, hi) = counts[kept.lo, kept.hi) + counts[kept.hi, hi) - counts[kept.lo, lo),
            # a stretch whose ends are swapped counting negatively.
            counts = np.zeros(n_items, dtype=np.int64)
            counts[: len(kept.counts)] = kept.counts
            for a, b, sign in ((kept.hi, hi, 1), (kept.lo, lo, -1)):
                if a < b:
                    np.add.at(counts, items[a:b], sign)
                elif b < a:
                    np.add.at(counts, items[b:a], -sign)
        counts.flags.writeable = False
        if len(self._stretches) >= _KEPT_WINDOWS and key not in self._stretches:
            self._stretches = {}  # replaced, not cleared: a concurrent reader keeps the one it holds
        self._stretches[key] = _Stretch(layout, lo, hi, counts)
        return counts

    @staticmethod
    def _aligned(counts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if not len(counts):
            return np.zeros(len(positions), dtype=np.int64)
        return np.where(positions >= 0, counts[np.maximum(positions, 0)], 0)

    def trend_counts(
        self, at: float, window_seconds: float, item_ids: Sequence[str] | None = None
    ) -> np.ndarray:
        """Events per item in [at - window, at]; aligned to `item_ids` or to `item_ids()`."""
        positions = None if item_ids is None else self.indices_of(item_ids)
        self._ensure_merged()
        with self._lock.read():
            counts = self._counts_between(at, window_seconds)
        return counts if positions is None else self._aligned(counts, positions)

    def all_time_counts(self, at: float, item_ids: Sequence[str] | None = None) -> np.ndarray:
        """Events per item up to `at`; aligned to `item_ids` or to `item_ids()`."""
        positions = None if item_ids is None else self.indices_of(item_ids)
        self._ensure_merged()
        with self._lock.read():
            counts = self._counts_between(at, None)
        return counts if positions is None else self._aligned(counts, positions)

    def first_event_times(self, at: float, positions: np.ndarray) -> np.ndarray:
        """When each item (by its position, `indices_of`) had its first event; NaN for -1 and for
        items with none at or before `at`."""
        with self._lock.read():
            first = self._first_times_array
            if first is None or len(first) != len(self._first_times):
                first = self._first_times_array = np.asarray(self._first_times, dtype=np.float64)
        positions = np.asarray(positions, dtype=np.int64)
        times = np.full(len(positions), np.nan)
        known = (positions >= 0) & (positions < len(first))
        times[known] = first[positions[known]]
        times[times > at] = np.nan
        return times

    def trending(self, at: float, window_seconds: float, n: int) -> list[tuple[str, int]]:
        """Top-n items by events in [at - window, at]; ties by all-time count up to `at`, then id.

        Items with no window event but earlier events follow, by all-time count, so a
        quiet period still yields a popularity ranking.
        """
        positions, window, ids = self._trending(at, window_seconds, n)
        return [(ids[i], int(window[i])) for i in positions.tolist()]

    def trending_positions(self, at: float, window_seconds: float, n: int) -> np.ndarray:
        """The items of `trending(at, window_seconds, n)` as positions in `item_ids()` order."""
        return self._trending(at, window_seconds, n)[0]

    def _trending(self, at: float, window_seconds: float, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        self._ensure_merged()
        with self._lock.read():
            lo, hi = self._stretch(at - window_seconds, at)
            ids = self._item_ids
            # The order depends only on the events in the two stretches (and the items' ids).
            key = (self._layout, lo, hi, n, len(ids), window_seconds)
            cached = self._trending_cache
            if cached is not None and cached[0] == key:
                return cached[1], cached[2], ids
            window = self._counts_of(window_seconds, lo, hi)
            total = self._counts_of(None, 0, hi)
            rank = self._sorted_id_rank()
        eligible = np.flatnonzero(total > 0)
        if n <= 0 or not len(eligible):
            positions = np.zeros(0, dtype=np.int64)
        else:
            if len(eligible) > n:
                # Only items at least as popular in the window as the n-th can make the cut.
                # np.sort, not np.partition: partition degrades badly on the many tied zero counts.
                cut = np.sort(window[eligible])[len(eligible) - n]
                eligible = eligible[window[eligible] >= cut]
            order = np.lexsort((rank[eligible], -total[eligible], -window[eligible]))[:n]
            positions = eligible[order]
        positions.flags.writeable = False
        self._trending_cache = (key, positions, window)
        return positions, window, ids

    def _sorted_id_rank(self) -> np.ndarray:
        # Caller holds the read lock; a stale cache is only replaced, never mutated.
        rank = self._id_rank
        if rank is None or len(rank) != len(self._item_ids):
            order = sorted(range(len(self._item_ids)), key=self._item_ids.__getitem__)
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            self._id_rank = rank
        return rank
