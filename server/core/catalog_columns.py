"""The catalog as column arrays, with cached alignments to the index, the interaction state and co-occurrence."""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState

# How often the candidate path may rebuild a stale catalog snapshot (~0.2 s at 100k items)
# or re-align it after writes; in between it looks candidates up one by one (see
# CatalogSnapshot.may_refresh).
ALIGNMENT_REFRESH_S = 10.0


class CatalogColumns:
    """Candidate attributes as arrays (missing times are NaN).

    Columns cut from the catalog snapshot remember it (`source`) and their `rows` in it,
    so per-item lookups (index labels, popularity and co-occurrence positions) come from
    the snapshot's cached alignments instead of one dict lookup per item per query. Their
    `category` is cut from the snapshot only when read (a category filter, the learned
    ranker's features): an object column costs a reference count per item to cut and to
    free, ~0.1 ms per Recommend that scores a 10k-item catalog.
    """

    __slots__ = ("item_ids", "published_at", "expires_at", "_category", "source", "rows")

    def __init__(self, item_ids: np.ndarray, published_at: np.ndarray, expires_at: np.ndarray,
                 category: np.ndarray | None, source: "CatalogSnapshot | None" = None, rows: np.ndarray | None = None):
        if category is None and (source is None or rows is None):
            raise ValueError("category may be left out only for columns cut from a snapshot")
        self.item_ids = item_ids
        self.published_at = published_at
        self.expires_at = expires_at
        self._category = category
        self.source = source
        self.rows = rows

    @property
    def category(self) -> np.ndarray:
        if self._category is None:
            self._category = self.source.columns.category[self.rows]
        return self._category

    @classmethod
    def of(cls, items: Sequence[Item]) -> "CatalogColumns":
        nan = float("nan")
        return cls(
            item_ids=np.array([i.item_id for i in items], dtype=object),
            published_at=np.array([nan if i.published_at is None else i.published_at for i in items], dtype=np.float64),
            expires_at=np.array([nan if i.expires_at is None else i.expires_at for i in items], dtype=np.float64),
            category=np.array([i.category for i in items], dtype=object),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def take(self, mask: np.ndarray) -> "CatalogColumns":
        cut_from_snapshot = self.source is not None and self.rows is not None
        return CatalogColumns(
            self.item_ids[mask],
            self.published_at[mask],
            self.expires_at[mask],
            None if cut_from_snapshot else self._category[mask],
            self.source,
            None if self.rows is None else self.rows[mask],
        )


class CatalogSnapshot:
    """The whole catalog as `CatalogColumns` sorted by item id, with cached alignments to the
    index, the interaction state and the co-occurrence model."""

    def __init__(self, items: Sequence[Item]):
        items = sorted(items, key=lambda i: i.item_id)
        self.row_of = {item.item_id: row for row, item in enumerate(items)}
        base = CatalogColumns.of(items)
        self.columns = CatalogColumns(
            base.item_ids, base.published_at, base.expires_at, base.category, self, np.arange(len(items))
        )
        # Each cache is one tuple, replaced whole, so concurrent readers never see it torn.
        self._index_labels: tuple[int, np.ndarray] | None = None
        self._state_positions: tuple[int, np.ndarray] | None = None
        self._cooccurrence_positions: tuple[CooccurrenceModel, np.ndarray] | None = None
        self._refreshed_at: dict[str, float] = {}
        # The alignments turned around (position -> snapshot row), by name: (what the
        # alignment was computed for, inverse array), each replaced whole.
        self._inverses: dict[str, tuple[object, np.ndarray]] = {}
        self.built_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.row_of)

    def recently_built(self) -> bool:
        """Built less than ALIGNMENT_REFRESH_S ago (a stale one is then not rebuilt yet)."""
        return time.monotonic() - self.built_at < ALIGNMENT_REFRESH_S

    def may_refresh(self, name: str, partial: bool) -> bool:
        """Whether a stale alignment may be recomputed over the whole catalog now.

        Full-catalog scoring always may. A few hundred candidates may only once per
        ALIGNMENT_REFRESH_S: writes (a first event on an item, a catalog edit) would
        otherwise make every request pay O(catalog) lookups to use O(candidates) of them;
        in between, the caller looks its candidates up one by one.
        """
        if not partial:
            return True
        now = time.monotonic()
        if now - self._refreshed_at.get(name, -math.inf) < ALIGNMENT_REFRESH_S:
            return False
        self._refreshed_at[name] = now
        return True

    def index_labels(self, index: ItemIndex, refresh: bool = True) -> tuple[np.ndarray, int] | None:
        cached = self._index_labels
        if cached is None or cached[0] != index.generation:
            if not refresh:
                return None
            labels, generation = index.labels_of(self.columns.item_ids)
            cached = self._index_labels = (generation, labels)
        return cached[1], cached[0]

    def state_positions(self, state: InteractionState, refresh: bool = True) -> np.ndarray | None:
        # State positions never change meaning; only items getting their first event do.
        cached = self._state_positions
        if cached is None or cached[0] != state.num_items:
            if not refresh:
                return None
            count = state.num_items
            cached = self._state_positions = (count, state.indices_of(self.columns.item_ids))
        return cached[1]

    def cooccurrence_positions(self, model: CooccurrenceModel, refresh: bool = True) -> np.ndarray | None:
        cached = self._cooccurrence_positions
        if cached is None or cached[0] is not model:
            if not refresh:
                return None
            cached = self._cooccurrence_positions = (model, model.indices_of(self.columns.item_ids))
        return cached[1]

    # ---- candidates found by position (HNSW labels, co-occurrence or state positions) ----------
    def _rows_via(self, name: str, key: object, forward: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cached = self._inverses.get(name)
        if cached is None or cached[0] is not key and cached[0] != key:
            valid = np.flatnonzero(forward >= 0)
            inverse = np.full(int(forward[valid].max()) + 1 if len(valid) else 0, -1, dtype=np.int64)
            inverse[forward[valid]] = valid
            cached = (key, inverse)
            self._inverses[name] = cached
        inverse = cached[1]
        rows = np.full(len(positions), -1, dtype=np.int64)
        inside = positions < len(inverse)
        rows[inside] = inverse[positions[inside]]
        return rows

    def rows_of_labels(self, labels: np.ndarray, generation: int) -> np.ndarray | None:
        """Snapshot rows of the index `labels` of `generation` (-1: not in the snapshot); None
        when the cached alignment is of another generation (look the items up by id then)."""
        cached = self._index_labels
        if cached is None or cached[0] != generation:
            return None
        return self._rows_via("index", generation, cached[1], labels)

    def rows_of_cooccurrence(self, model: CooccurrenceModel, positions: np.ndarray) -> np.ndarray | None:
        """Snapshot rows of `model`'s item `positions` (-1: not in the snapshot); None when the
        cached alignment is of another model."""
        cached = self._cooccurrence_positions
        if cached is None or cached[0] is not model:
            return None
        return self._rows_via("cooccurrence", model, cached[1], positions)

    def rows_of_state(self, positions: np.ndarray) -> np.ndarray | None:
        """Snapshot rows of interaction-state item `positions`; None when an item had its first
        event after the cached alignment was made (or there is none)."""
        cached = self._state_positions
        if cached is None or (len(positions) and int(positions.max()) >= cached[0]):
            return None
        return self._rows_via("state", cached[0], cached[1], positions)
