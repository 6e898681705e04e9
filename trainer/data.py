"""Point-in-time training examples from the event log, in training, validation and test windows split by time."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.server.core.stores import Store, open_store, store_target
from chronorec.server.core.timetext import HistoryEntry, action_strength, history_text
from chronorec.trainer.protocols import SECONDS_PER_DAY, Dataset, TemporalSplit, temporal_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventLog:
    """A consistent snapshot of the catalog and the event log, events in the global order (time, then arrival)."""

    items: dict[str, Item]
    events: list[Event]
    max_seq: int
    source: str = ""

    @property
    def item_text_of(self) -> Callable[[str], str]:
        """The server's item text (an item deleted since falls back to its id, as in the server's history text)."""
        return item_text_lookup(self.items)

    @property
    def last_time(self) -> float | None:
        return self.events[-1].timestamp if self.events else None


def order_events(events: Sequence[Event]) -> list[Event]:
    """Events in the protocols' global order: by timestamp, ties in their given (arrival) order."""
    return sorted(events, key=lambda e: e.timestamp)


def latest_seq(db: str | os.PathLike) -> int:
    """The newest event seq of the store `db` names (a snapshot bound for read_event_log)."""
    with open_store(store_target(db), read_only=True) as store:
        return store.max_seq()


def read_event_log(db: str | os.PathLike | Store, up_to_seq: int | None = None) -> EventLog:
    """Read the catalog and every committed event, read-only, while servers may keep writing.

    `db` is an open store, an SQLite path or a postgresql:// URL. The newest seq is read first
    and events are read up to it: writers commit in seq order (under SQLite's write lock, or
    PostgreSQL's change counter row), so every event up to that seq is committed and none is
    missed, and events committed later wait for the next run. Every process reading the same
    `max_seq` (each rank of a distributed run) therefore reads the same events. Items are read
    after the events so every item an event names is there unless it was deleted.

    Erased users (DeleteUser) are read last and their events dated up to the erasure are left
    out: the store deleted them, and this also drops the ones read before an erasure that
    happened while the events were being read, or restored from a copy of the database.

    `up_to_seq` bounds the snapshot instead (a distributed run's ranks pass the seq rank 0 read).
    """
    store = open_store(store_target(db), read_only=True) if isinstance(db, (str, os.PathLike)) else db
    try:
        max_seq = store.max_seq() if up_to_seq is None else int(up_to_seq)
        events = []
        for seq, event in store.iter_events():
            if seq > max_seq:
                break
            events.append(event)
        items = {item.item_id: item for item in store.iter_items()}
        erased = store.deleted_users()
    finally:
        if store is not db:
            store.close()
    if erased:
        kept = [e for e in events if e.timestamp > erased.get(e.user_id, -math.inf)]
        if len(kept) < len(events):
            log.info("left out %d events of erased users", len(events) - len(kept))
        events = kept
    return EventLog(items=items, events=order_events(events), max_seq=max_seq, source=store.location)


def event_log_from(items: Sequence[Item], events: Sequence[Event], source: str = "memory") -> EventLog:
    """An EventLog from in-memory items and events (tests, generated data, imported files)."""
    return EventLog(items={i.item_id: i for i in items}, events=order_events(events), max_seq=len(events),
                    source=source)


@dataclass(frozen=True)
class TimeWindows:
    """Global time split, as global positions of the event order and as times.

    Training targets are positions [train_begin, valid_begin), validation [valid_begin, test_begin),
    test [test_begin, n). Histories reach back before their window: the past is never the future.
    """

    train_begin: int
    valid_begin: int
    test_begin: int
    n_events: int
    train_start: float
    valid_start: float
    test_start: float
    end: float

    def window_of(self, position: int) -> str | None:
        if position < self.train_begin:
            return None
        if position < self.valid_begin:
            return "train"
        if position < self.test_begin:
            return "valid"
        return "test"

    @property
    def read_until(self) -> int:
        """Examples never read an event from the test window on."""
        return self.test_begin

    def to_dict(self) -> dict[str, float | int]:
        """For the manifest: `start`/`end` are the training targets' window; the rest says what was held out."""
        return {"start": self.train_start, "end": self.valid_start, "valid_start": self.valid_start,
                "test_start": self.test_start, "data_end": self.end, "events": self.n_events,
                "train_events": self.valid_begin - self.train_begin}


@dataclass(frozen=True)
class TargetPositions:
    """Training and validation targets named by global position rather than by time (leave-one-out:
    each user's second-to-last event validates, the events before it train)."""

    train: frozenset[int]
    valid: frozenset[int]

    @classmethod
    def of(cls, train: Iterable[int], valid: Iterable[int]) -> "TargetPositions":
        return cls(frozenset(int(p) for p in train), frozenset(int(p) for p in valid))

    def window_of(self, position: int) -> str | None:
        if position in self.train:
            return "train"
        return "valid" if position in self.valid else None

    @property
    def read_until(self) -> int:
        """Nothing after the last target is read (each user's test event comes after it)."""
        return max(self.train | self.valid, default=-1) + 1


class ExampleWindows(Protocol):
    """Which window ("train", "valid" or None) the event at a global position is a target of."""

    def window_of(self, position: int) -> str | None: ...

    @property
    def read_until(self) -> int: ...


@dataclass(frozen=True)
class TrainingExample:
    """One point-in-time pair: the user's history text just before the event, and the event's item text."""

    user_id: str
    item_id: str
    timestamp: float
    query: str
    positive: str
    history_items: tuple[str, ...]
    position: int  # global position of the event


@dataclass
class TrainingData:
    """The snapshot, its protocol dataset and splits, and the examples of each window."""

    event_log: EventLog
    dataset: Dataset
    split: TemporalSplit  # the test window: the temporal protocol over the whole log
    inner: TemporalSplit  # the validation window: the same rule on the events before the test window
    windows: TimeWindows
    train: list[TrainingExample] = field(default_factory=list)
    valid: list[TrainingExample] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"events": len(self.event_log.events), "items": len(self.event_log.items),
                "train_examples": len(self.train), "valid_examples": len(self.valid),
                "valid_instances": len(self.inner.instances), "test_instances": len(self.split.instances)}


def split_windows(
    dataset: Dataset,
    *,
    test_quantile: float = 0.8,
    valid_quantile: float = 0.8,
    train_days: float | None = None,
) -> tuple[TemporalSplit, TemporalSplit, TimeWindows]:
    """The temporal protocol's split for the test window, the same rule again on the part before it
    for the validation window, and training targets before that (only the last `train_days` if given)."""
    if dataset.n_events < 4:
        raise InvalidArgument(f"the event log has {dataset.n_events} events; at least 4 are needed to split it")
    split = temporal_split(dataset, test_quantile)
    inner = temporal_split(dataset, valid_quantile, upto=split.n_train)
    train_start = float(dataset.ts[0])
    train_begin = 0
    if train_days is not None:
        if train_days <= 0:
            raise InvalidArgument("train_days must be positive")
        train_start = inner.cutoff - train_days * SECONDS_PER_DAY
        train_begin = int(np.searchsorted(dataset.ts, train_start, side="left"))
    if not train_begin < inner.n_train:
        raise InvalidArgument("the training window holds no event: the log is too short or train_days too small")
    windows = TimeWindows(
        train_begin=train_begin, valid_begin=inner.n_train, test_begin=split.n_train, n_events=dataset.n_events,
        train_start=train_start, valid_start=inner.cutoff, test_start=split.cutoff, end=float(dataset.ts[-1]),
    )
    return split, inner, windows


def is_positive(event: Event) -> bool:
    """Feedback that says the user wanted the item (skip and dislike carry no interest)."""
    return action_strength(event.action, event.value) > 0.0


def build_examples(event_log: EventLog, windows: ExampleWindows, *, max_events: int = 20,
                   pick: Callable[[int, int], tuple[Iterable[int], Iterable[int]]] | None = None,
                   ) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Point-in-time (query, positive) pairs for the positive events of the training and validation windows
    (by time, `TimeWindows`; or by position, `TargetPositions`), in the global event order.

    For an event of user u at time t the query is `history_text` of u's events before it in the
    global order, as of t — the call the ranking makes — so the model is trained on the text it
    will be served. Skipped: negative feedback (not a positive), items no longer in the catalog
    (nothing to encode), and events with no earlier history: the server never encodes an empty
    history (a cold start is ranked by trend and freshness), so such pairs would teach a mapping
    that is never used.

    `pick(n_train, n_valid)`: which of the examples to write, as indices into the full lists (the
    others are never written: a caller that samples a few thousand of a window's examples skips
    the texts of the rest, most of the cost on a long log); the picked examples come back in index
    order, each the very example the full lists hold at that index.
    """
    item_text_of = event_log.item_text_of
    found: dict[str, list[tuple[int, Event, int]]] = {"train": [], "valid": []}
    histories: dict[str, list[HistoryEntry]] = {}
    for position, event in enumerate(event_log.events[: windows.read_until]):
        history = histories.setdefault(event.user_id, [])
        window = windows.window_of(position)
        if window in ("train", "valid") and history and is_positive(event) and event.item_id in event_log.items:
            # The history as of the event is the first len(history) entries of the user's list.
            found[window].append((position, event, len(history)))
        history.append(HistoryEntry(event.item_id, event.action, event.timestamp, event.value))

    def example(position: int, event: Event, length: int) -> TrainingExample:
        history = histories[event.user_id]
        # Only the newest `max_events` are written; passing just those gives the same text.
        return TrainingExample(
            user_id=event.user_id,
            item_id=event.item_id,
            timestamp=event.timestamp,
            query=history_text(history[max(0, length - max_events):length], event.timestamp, item_text_of,
                               max_events),
            positive=item_text_of(event.item_id),
            history_items=tuple(dict.fromkeys(e.item_id for e in history[:length])),
            position=position,
        )

    chosen = (range(len(found["train"])), range(len(found["valid"]))) if pick is None else \
        pick(len(found["train"]), len(found["valid"]))
    train, valid = ([example(*found[window][int(k)]) for k in sorted(set(int(k) for k in indices))]
                    for window, indices in zip(("train", "valid"), chosen))
    return train, valid


def newest_examples(examples: Sequence[TrainingExample], n: int) -> list[TrainingExample]:
    """The `n` examples latest in the global event order (all of them when there are fewer): interests
    drift, so with a budget of n examples the newest are the closest to what comes next."""
    return sorted(examples, key=lambda e: e.position)[-n:] if n > 0 else []


def load_training_data(
    source: str | os.PathLike | Store | EventLog,
    *,
    max_events: int = 20,
    test_quantile: float = 0.8,
    valid_quantile: float = 0.8,
    train_days: float | None = None,
) -> TrainingData:
    """Read the log (unless given), split it by time and build the examples."""
    event_log = source if isinstance(source, EventLog) else read_event_log(source)
    # The events are already in global order, so the dataset's global positions are list indices.
    dataset = Dataset(list(event_log.items.values()), event_log.events)
    split, inner, windows = split_windows(dataset, test_quantile=test_quantile, valid_quantile=valid_quantile,
                                          train_days=train_days)
    train, valid = build_examples(event_log, windows, max_events=max_events)
    data = TrainingData(event_log, dataset, split, inner, windows, train, valid)
    log.info("training data from %s: %s", event_log.source or "memory", data.summary())
    return data


__all__ = [
    "EventLog",
    "ExampleWindows",
    "TargetPositions",
    "TimeWindows",
    "TrainingData",
    "TrainingExample",
    "build_examples",
    "event_log_from",
    "is_positive",
    "load_training_data",
    "newest_examples",
    "order_events",
    "read_event_log",
    "split_windows",
]
