"""Item-item co-occurrence similarity (ItemKNN: cosine on the binary user×item matrix)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Sequence, Union

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from chronorec.server.core.catalog import Event

Interactions = Union[Mapping[str, Iterable[str]], Iterable[Event]]

# Above this many items the similarity is kept sparse (top-N per row) instead of n×n dense.
DENSE_MAX_ITEMS = 3000
# _sparse_block places values through a catalogue-sized map up to this many items per value read.
COLUMN_MAP_RATIO = 8
# Bound on the user×user-chunk work (and memory) of one step of the fit.
_CHUNK_CELLS = 8_000_000
# Transitions count an item followed by one of the user's next TRANSITION_SPAN items, the d-th
# next weighted TRANSITION_DECAY**(d-1): the next item says most, the one after still something.
TRANSITION_SPAN = 3
TRANSITION_DECAY = 0.5
# Events of one user less than this apart belong to one session (the common web-analytics rule).
SESSION_GAP_S = 30 * 60.0
# Dimensions of the session embedding, and what each side's count is smoothed by (see
# _session_embedding). With at most _SVD_DENSE_BELOW seen items, their Gram matrix is decomposed whole.
SESSION_DIMENSIONS = 24
SESSION_SMOOTHING = 1.0
# The embedding is fitted only where sessions say which items go together: at least this many
# sessions of two or more distinct items, holding at least this share of the sessions' items. A
# log whose events are days apart (a ratings log of single visits) has almost none, and an
# embedding fitted on a handful of chance pairs is noise the ranker would learn from.
SESSION_MIN_SESSIONS = 10 * SESSION_DIMENSIONS
SESSION_MIN_SHARE = 0.1
_SVD_DENSE_BELOW = 4 * SESSION_DIMENSIONS
_SVD_SEED = 0
# Rows whose top neighbours a model remembers (the items users recently had events on);
# past it the memory starts over.
_NEIGHBOUR_CACHE_ROWS = 65536


def _user_item_pairs(interactions: Interactions) -> list[tuple[str, str]]:
    if isinstance(interactions, Mapping):
        return [(str(user), str(item)) for user, items in interactions.items() for item in items]
    return [(event.user_id, event.item_id) for event in interactions]


def session_starts(times: np.ndarray) -> np.ndarray:
    """Per event of one user's history (times oldest first), whether it starts a session: the first
    event, and each one more than SESSION_GAP_S after the event before it."""
    times = np.asarray(times, dtype=np.float64)
    starts = np.zeros(len(times), dtype=bool)
    starts[:1] = True
    starts[1:] = np.diff(times) > SESSION_GAP_S
    return starts


def _session_numbers(interactions: Mapping[str, Iterable[str]], times: Mapping[str, Sequence[float]]) -> list[int]:
    """Per (user, item) pair in _user_item_pairs order, its session's number: a user's events
    (oldest first) start a new session after a gap of more than SESSION_GAP_S."""
    numbers: list[int] = []
    session = -1
    for user, items in interactions.items():
        stamps = times[user]
        items = list(items)
        if len(stamps) != len(items):
            raise ValueError(f"user {user!r}: {len(items)} items but {len(stamps)} times")
        if not len(items):
            continue
        starts = session_starts(stamps)
        numbers.extend((session + np.cumsum(starts)).tolist())
        session += int(starts.sum())
    return numbers


def _session_embedding(sessions: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray | None:
    """(n_items, SESSION_DIMENSIONS) float32 unit item vectors: the top right singular vectors of the
    binary session × item matrix, scaled by their singular values; zero rows for items in no session.
    None when the sessions are too few to fit it (SESSION_MIN_SESSIONS, SESSION_MIN_SHARE).

    Each side is divided by the square root of its count plus SESSION_SMOOTHING (regularised
    spectral embedding): with the plain counts, every small part of the log that shares no item
    with the rest (a one-event session, two items only ever seen together) is a singular value of
    exactly 1, and on a log of short sessions those fill every dimension before the first topic."""
    if not len(sessions) or not n_items:
        return None
    _, sessions = np.unique(sessions, return_inverse=True)
    matrix = sp.csr_matrix((np.ones(len(sessions)), (sessions, items)), shape=(int(sessions.max()) + 1, n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    per_item = np.asarray(matrix.sum(axis=0)).ravel()
    per_session = np.asarray(matrix.sum(axis=1)).ravel()
    several = per_session >= 2
    if several.sum() < SESSION_MIN_SESSIONS or per_session[several].sum() < SESSION_MIN_SHARE * per_session.sum():
        return None
    out = np.zeros((n_items, SESSION_DIMENSIONS), dtype=np.float32)
    matrix = (sp.diags(1.0 / np.sqrt(per_session + SESSION_SMOOTHING)) @ matrix
              @ sp.diags(1.0 / np.sqrt(per_item + SESSION_SMOOTHING))).tocsr()
    seen = np.flatnonzero(per_item > 0)
    matrix = matrix[:, seen]
    rank = min(SESSION_DIMENSIONS, *matrix.shape)
    if matrix.shape[1] <= _SVD_DENSE_BELOW:
        # Few items: the eigenvectors of their Gram matrix.
        eigenvalues, eigenvectors = np.linalg.eigh((matrix.T @ matrix).toarray())
        order = np.argsort(-eigenvalues, kind="stable")[:rank]
        values = np.sqrt(np.maximum(eigenvalues[order], 0.0))
        right = eigenvectors[:, order].T
    else:
        # ARPACK from a fixed start: the same events give the same vectors.
        start = np.random.default_rng(_SVD_SEED).uniform(-1.0, 1.0, min(matrix.shape))
        _, values, right = svds(matrix, k=rank, v0=start, solver="arpack")
        order = np.argsort(-values, kind="stable")
        values, right = values[order], right[order]
    vectors = right[:rank].T * values[:rank]
    norms = np.linalg.norm(vectors, axis=1)
    kept = norms > 1e-12
    out[seen[kept], :rank] = vectors[kept] / norms[kept, None]
    return out


def _at_positions(full: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """full[positions] as float32, 0 where the position is -1 (an item the model does not know)."""
    if not len(full):
        return np.zeros(len(positions), dtype=np.float32)
    return np.where(positions >= 0, full[np.maximum(positions, 0)], 0.0).astype(np.float32)


class CooccurrenceModel:
    """sim(i, j) = |users(i) ∩ users(j)| / sqrt(|users(i)|·|users(j)|), zero diagonal.

    Each item keeps its top `max_neighbors` neighbours (all when None). Small catalogs
    hold a dense n×n matrix; large ones a sparse one built in row chunks, so a catalog of
    100k items with few events never allocates n² memory.

    Fitted from ordered histories, it also holds directional transitions: P(next = j | i),
    how often j came among the next few items after i (see TRANSITION_SPAN), which the
    learned ranker reads; the blend reads only the symmetric similarity.

    Fitted with each event's time as well, it holds a session embedding: unit item vectors from a
    rank-SESSION_DIMENSIONS SVD of the normalised session × item matrix (sessions: a user's events
    less than SESSION_GAP_S apart), so items that share sessions' topics are close even when no
    one history held both. The learned ranker reads their cosine with the user's current session.
    """

    def __init__(self, item_ids: Sequence[str], similarity: np.ndarray | sp.csr_matrix, num_users: int,
                 transitions: sp.csr_matrix | None = None, session_vectors: np.ndarray | None = None):
        self._item_ids = list(item_ids)
        self._index = {item_id: i for i, item_id in enumerate(self._item_ids)}
        self._dense = similarity if isinstance(similarity, np.ndarray) else None
        self._sparse = None if self._dense is not None else sp.csr_matrix(similarity, dtype=np.float32)
        # Sorted and without duplicates (as fitted): each stored value is a cell of its own.
        self._canonical = self._sparse is not None and bool(self._sparse.has_canonical_format)
        self.num_users = num_users
        n = len(self._item_ids)
        self._transitions = (sp.csr_matrix((n, n), dtype=np.float32) if transitions is None
                             else sp.csr_matrix(transitions, dtype=np.float32))
        # Each row's top neighbour columns for one n (the ranker asks the same n every call).
        self._neighbour_cache: dict = {}
        # (items, SESSION_DIMENSIONS) float32 unit rows, zero for an item in no session; None: not fitted.
        self.session_vectors = None if session_vectors is None else np.asarray(session_vectors, dtype=np.float32)
        # Per item, whether it has a vector (a zero row: in no session of the fit).
        self._session_present = None if self.session_vectors is None else np.abs(self.session_vectors).sum(axis=1) > 0

    # -------------------------------------------------------------------- fit

    @classmethod
    def fit(
        cls,
        interactions: Interactions,
        item_ids: Sequence[str] | None = None,
        max_neighbors: int | None = 200,
        *,
        dense_max_items: int = DENSE_MAX_ITEMS,
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> "CooccurrenceModel":
        """Fit from `{user: [item, ...]}` or from events; only items in `item_ids` count.

        Items outside `item_ids` are dropped, which leaves the cosine between the kept
        items unchanged (a column's norm depends only on its own users).

        `times`: `{user: [timestamp, ...]}` aligned with a mapping's items (oldest first); with
        it the session embedding is fitted too.
        """
        session_of = None
        if times is not None:
            if not isinstance(interactions, Mapping):
                raise TypeError("times go with interactions given as {user: [item, ...]}")
            session_of = _session_numbers(interactions, times)
        pairs = _user_item_pairs(interactions)
        if item_ids is None:
            item_ids = sorted({item for _, item in pairs})
        item_ids = list(dict.fromkeys(str(i) for i in item_ids))
        item_index = {item_id: i for i, item_id in enumerate(item_ids)}
        user_index: dict[str, int] = {}
        rows, cols, sessions = [], [], []
        for k, (user, item) in enumerate(pairs):
            col = item_index.get(item)
            if col is None:
                continue
            rows.append(user_index.setdefault(user, len(user_index)))
            cols.append(col)
            if session_of is not None:
                sessions.append(session_of[k])
        n_items, n_users = len(item_ids), len(user_index)
        rows_array, cols_array = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        transitions = cls._fit_transitions(rows_array, cols_array, n_items)
        binary = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows_array, cols_array)),
            shape=(n_users, n_items),
        )
        binary.sum_duplicates()
        binary.data[:] = 1.0  # repeated events on an item count once
        users_per_item = np.asarray(binary.sum(axis=0)).ravel()
        inverse_norm = np.zeros(n_items, dtype=np.float32)
        np.divide(1.0, np.sqrt(users_per_item), out=inverse_norm, where=users_per_item > 0)
        normalised = (binary @ sp.diags(inverse_norm)).tocsr().astype(np.float32)

        keep = None if max_neighbors is None or max_neighbors >= n_items - 1 else max(1, int(max_neighbors))
        if n_items <= dense_max_items:
            similarity = cls._fit_dense(normalised, keep)
        else:
            similarity = cls._fit_sparse(normalised, keep)
        session_vectors = None
        if session_of is not None:
            session_vectors = _session_embedding(np.asarray(sessions, dtype=np.int64), cols_array, n_items)
        return cls(item_ids, similarity, n_users, transitions, session_vectors)

    @staticmethod
    def _fit_transitions(users: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
        """Row-normalised counts of (item, a later item of the same user within TRANSITION_SPAN).

        `users` and `items` are the events in each user's own order (interleaved across users).
        """
        order = np.argsort(users, kind="stable")  # each user's events together, their order kept
        users, items = users[order], items[order]
        sources, targets, weights = [], [], []
        for distance in range(1, TRANSITION_SPAN + 1):
            if len(users) <= distance:
                break
            same = (users[distance:] == users[:-distance]) & (items[distance:] != items[:-distance])
            sources.append(items[:-distance][same])
            targets.append(items[distance:][same])
            weights.append(np.full(int(same.sum()), TRANSITION_DECAY ** (distance - 1), dtype=np.float32))
        if not sources:
            return sp.csr_matrix((n_items, n_items), dtype=np.float32)
        counts = sp.csr_matrix((np.concatenate(weights), (np.concatenate(sources), np.concatenate(targets))),
                               shape=(n_items, n_items), dtype=np.float32)
        counts.sum_duplicates()
        out = np.asarray(counts.sum(axis=1)).ravel()
        inverse = np.zeros(n_items, dtype=np.float32)
        np.divide(1.0, out, out=inverse, where=out > 0)
        return (sp.diags(inverse) @ counts).tocsr().astype(np.float32)

    @staticmethod
    def _fit_dense(normalised: sp.csr_matrix, keep: int | None) -> np.ndarray:
        n_users, n_items = normalised.shape
        similarity = np.zeros((n_items, n_items), dtype=np.float32)
        step = max(1, _CHUNK_CELLS // max(1, n_items))
        for start in range(0, n_users, step):
            block = normalised[start : start + step].toarray()
            similarity += block.T @ block
        np.fill_diagonal(similarity, 0.0)
        if keep is not None and n_items:
            top = np.argpartition(-similarity, keep - 1, axis=1)[:, :keep]
            mask = np.zeros(similarity.shape, dtype=bool)
            np.put_along_axis(mask, top, True, axis=1)
            similarity[~mask] = 0.0
        return similarity

    @staticmethod
    def _fit_sparse(normalised: sp.csr_matrix, keep: int | None) -> sp.csr_matrix:
        n_users, n_items = normalised.shape
        by_item = normalised.T.tocsr()
        # Work for item i is Σ over its users of their item counts; chunk rows by that.
        items_per_user = np.diff(normalised.indptr).astype(np.float64)
        work = (by_item != 0).astype(np.float64) @ items_per_user
        bounds = [0]
        cumulative = np.cumsum(work)
        while bounds[-1] < n_items:
            done = cumulative[bounds[-1] - 1] if bounds[-1] else 0.0
            end = int(np.searchsorted(cumulative, done + _CHUNK_CELLS, side="right"))
            bounds.append(min(n_items, max(end, bounds[-1] + 1)))
        blocks = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            block = (by_item[start:end] @ normalised).tocsr()
            block.sort_indices()
            n_rows = end - start
            row = np.repeat(np.arange(n_rows), np.diff(block.indptr))
            off_diagonal = (block.indices != row + start) & (block.data > 0)
            row, col, value = row[off_diagonal], block.indices[off_diagonal], block.data[off_diagonal]
            counts = np.bincount(row, minlength=n_rows)
            if keep is not None:
                # Each row's `keep` largest values, ties to the lower column (the columns are
                # sorted and the sort is stable); only rows with more than `keep` are sorted.
                bounds_of_row = np.concatenate(([0], np.cumsum(counts)))
                chosen = np.ones(len(value), dtype=bool)
                for r in np.flatnonzero(counts > keep).tolist():
                    a, b = int(bounds_of_row[r]), int(bounds_of_row[r + 1])
                    chosen[a:b] = False
                    chosen[a + np.argsort(-value[a:b], kind="stable")[:keep]] = True
                col, value = col[chosen], value[chosen]
                counts = np.minimum(counts, keep)
            indptr = np.concatenate(([0], np.cumsum(counts)))
            blocks.append(sp.csr_matrix((value, col, indptr), shape=(n_rows, n_items), dtype=np.float32))
        if not blocks:
            return sp.csr_matrix((n_items, n_items), dtype=np.float32)
        return sp.vstack(blocks, format="csr")

    # ----------------------------------------------------------------- query

    @property
    def item_ids(self) -> list[str]:
        return self._item_ids

    def __len__(self) -> int:
        return len(self._item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def indices_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Positions of `item_ids` in `item_ids` order; -1 for unknown items."""
        index = self._index
        return np.fromiter((index.get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def _history_rows(self, weights: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        rows, row_weights = [], []
        for item_id, weight in weights.items():
            row = self._index.get(item_id)
            if row is not None and weight != 0.0:
                rows.append(row)
                row_weights.append(weight)
        return np.asarray(rows, dtype=np.int64), np.asarray(row_weights, dtype=np.float32)

    def scores(self, weights: Mapping[str, float], candidates: Sequence[str] | None = None) -> np.ndarray:
        """Σ_h weights[h]·sim(h, c) per candidate (aligned to `candidates`, or to `item_ids`)."""
        rows, row_weights = self._history_rows(weights)
        n_items = len(self._item_ids)
        if not len(rows):
            full = np.zeros(n_items, dtype=np.float32)
        elif self._dense is not None:
            full = row_weights @ self._dense[rows]
        else:
            # What self._sparse[rows].T @ row_weights computes (each stored value times its row's
            # weight, added into its column row by row, in float32), without scipy's indexing
            # and transpose, which cost ~0.2 ms per call at 100k items.
            entries, entry_rows = self._row_entries(rows)
            full = np.zeros(n_items, dtype=np.float32)
            np.add.at(full, self._sparse.indices[entries], self._sparse.data[entries] * row_weights[entry_rows])
        if candidates is None:
            return full
        return _at_positions(full, self.indices_of(candidates))

    def scores_at(self, weights: Mapping[str, float], positions: np.ndarray) -> np.ndarray:
        """scores(weights) at item `positions` (0 where -1), as float32, the same values bit for bit.

        A sparse model adds up only the stored values that land on `positions`, in the order
        `scores` adds them, instead of a score for every item: at 1M items that array alone
        was 4 MB to allocate and clear per call, for the few hundred candidates read from it."""
        positions = np.asarray(positions, dtype=np.int64)
        rows, row_weights = self._history_rows(weights)
        if self._dense is not None or not len(rows) or not len(positions):
            return _at_positions(self.scores(weights), positions)
        wanted, inverse = np.unique(positions, return_inverse=True)
        entries, entry_rows = self._row_entries(rows)
        columns = self._sparse.indices[entries]
        where = np.minimum(np.searchsorted(wanted, columns), len(wanted) - 1)
        hit = wanted[where] == columns
        values = self._sparse.data[entries] * row_weights[entry_rows]
        sums = np.zeros(len(wanted), dtype=np.float32)
        np.add.at(sums, where[hit], values[hit])
        sums[wanted < 0] = 0.0
        return sums[inverse.reshape(-1)]

    def session_vectors_for(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(vectors, present): the session embedding's rows of `item_ids` (zero where absent) and
        whether each item has one (seen in a session of the fit); None when not fitted."""
        if self.session_vectors is None:
            return None
        positions = self.indices_of(item_ids)
        vectors = np.zeros((len(positions), self.session_vectors.shape[1]), dtype=np.float32)
        known = positions >= 0
        vectors[known] = self.session_vectors[positions[known]]
        present = known.copy()
        present[known] = self._session_present[positions[known]]
        return vectors, present

    def pair_similarities(self, row_ids: Sequence[str], col_ids: Sequence[str]) -> np.ndarray:
        """sim(r, c) as a len(row_ids)×len(col_ids) matrix; 0 for unknown items."""
        rows, cols = self.indices_of(row_ids), self.indices_of(col_ids)
        result = np.zeros((len(rows), len(cols)), dtype=np.float32)
        known_rows, known_cols = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        if not len(known_rows) or not len(known_cols):
            return result
        if self._dense is not None:
            block = self._dense[np.ix_(rows[known_rows], cols[known_cols])]
        else:
            block = self._sparse_block(rows[known_rows], cols[known_cols])
        if len(known_rows) == len(rows) and len(known_cols) == len(cols):
            # Every item known (the usual case): the block is the result, with no copy into it.
            return block.astype(np.float32, copy=False)
        result[np.ix_(known_rows, known_cols)] = block
        return result

    def _row_entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the sparse arrays of every stored value of `rows`, row after row in storage
        order, and the index in `rows` each belongs to."""
        indptr = self._sparse.indptr
        starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
        entry_rows = np.repeat(np.arange(len(rows)), lengths)
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + offsets, entry_rows

    def _sparse_block(self, rows: np.ndarray, cols: np.ndarray, *, column_map: bool | None = None) -> np.ndarray:
        """self._sparse[rows][:, cols].toarray() (values added up per cell in storage order, as
        toarray does), read from the CSR arrays: a few history rows against a few candidates
        cost scipy ~0.3 ms of indexing overhead per call.

        Each stored value of the rows is placed among the wanted columns through a map over the
        catalogue (one read per value) when the catalogue is at most COLUMN_MAP_RATIO times the
        values read, else by binary search (the map's allocation would cost more): 100 history
        items hold ~20k values on ml-latest-small, whose binary search over 200 candidates was
        a third of the learned ranker's co-occurrence features. `column_map` forces either way."""
        wanted, inverse = np.unique(cols, return_inverse=True)
        entries, entry_rows = self._row_entries(rows)
        columns = self._sparse.indices[entries]
        n_items = self._sparse.shape[1]
        if column_map is None:
            column_map = n_items <= COLUMN_MAP_RATIO * len(columns)
        if column_map:
            place = np.full(n_items, -1, dtype=np.int64)
            place[wanted] = np.arange(len(wanted))
            where = place[columns]
            hit = where >= 0
        else:
            where = np.minimum(np.searchsorted(wanted, columns), len(wanted) - 1)
            hit = wanted[where] == columns
        block = np.zeros((len(rows), len(wanted)), dtype=np.float32)
        if self._canonical:
            # One stored value per cell: placed, not added (0 + v is v; the fit stores no negative zero).
            block[entry_rows[hit], where[hit]] = self._sparse.data[entries[hit]]
        else:
            np.add.at(block, (entry_rows[hit], where[hit]), self._sparse.data[entries[hit]])
        return block[:, inverse.reshape(-1)]

    def transition_block(self, row_ids: Sequence[str], col_ids: Sequence[str]) -> np.ndarray:
        """P(next = c | r) as a len(row_ids)×len(col_ids) matrix; 0 for unknown items."""
        rows, cols = self.indices_of(row_ids), self.indices_of(col_ids)
        result = np.zeros((len(rows), len(cols)), dtype=np.float32)
        known_rows, known_cols = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        if len(known_rows) and len(known_cols):
            # Whole rows, then the columns: few rows are asked for, and a sparse column cut is slow.
            block = self._transitions[rows[known_rows]].toarray()[:, cols[known_cols]]
            result[np.ix_(known_rows, known_cols)] = block
        return result

    def top_contributors(
        self, weights: Mapping[str, float], candidates: Sequence[str], top: int = 3
    ) -> list[list[tuple[str, float]]]:
        """Per candidate, the history items with the largest weights[h]·sim(h, c) (> 0)."""
        history = [h for h, w in weights.items() if w != 0.0]
        contributions = self.pair_similarities(history, candidates) * np.asarray(
            [weights[h] for h in history], dtype=np.float32
        )[:, None]
        result = []
        for column in range(len(candidates)):
            values = contributions[:, column] if history else np.zeros(0)
            best = sorted(
                ((history[i], float(values[i])) for i in np.flatnonzero(values > 0)),
                key=lambda pair: (-pair[1], pair[0]),
            )
            result.append(best[:top])
        return result

    def neighbours(self, item_ids: Iterable[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """The `n` most similar items of each known item (similarity > 0), best first."""
        result: dict[str, list[tuple[str, float]]] = {}
        if n <= 0:
            return result
        for item_id in item_ids:
            row = self._index.get(item_id)
            if row is None:
                continue
            columns, values = self._positive_row(row)
            if len(values) > n:
                cut = np.argpartition(-values, n - 1)[:n]
                columns, values = columns[cut], values[cut]
            order = np.lexsort((columns, -values))
            result[item_id] = [(self._item_ids[columns[i]], float(values[i])) for i in order]
        return result

    def neighbour_ids(self, item_ids: Iterable[str], n: int) -> set[str]:
        """Union of the `n` nearest neighbours of each item."""
        ids = self._item_ids
        return {ids[i] for i in self.neighbour_positions(item_ids, n).tolist()}

    def neighbour_positions(self, item_ids: Iterable[str], n: int) -> np.ndarray:
        """Positions (in `item_ids` order) of the union of the `n` nearest neighbours of each item:
        the items of `neighbour_ids`, without building a scored list per item."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        cache = self._neighbour_cache
        if cache.get("n") != n or len(cache) > _NEIGHBOUR_CACHE_ROWS:
            # Replaced, not cleared: a concurrent caller keeps filling the dict it holds.
            cache = self._neighbour_cache = {"n": n}
        parts = []
        for item_id in item_ids:
            row = self._index.get(item_id)
            if row is None:
                continue
            columns = cache.get(row)
            if columns is None:
                columns = cache[row] = self._top_columns(row, n)
            parts.append(columns)
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(parts))

    def _positive_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Columns and similarities of one item's row where the similarity is above zero."""
        if self._dense is not None:
            values = self._dense[row]
            columns = np.flatnonzero(values > 0)
            return columns, values[columns]
        start, end = self._sparse.indptr[row], self._sparse.indptr[row + 1]
        return self._sparse.indices[start:end], self._sparse.data[start:end]

    def _top_columns(self, row: int, n: int) -> np.ndarray:
        # The same choice as `neighbours` (similarity > 0, argpartition's cut past n).
        columns, values = self._positive_row(row)
        if len(values) > n:
            columns = columns[np.argpartition(-values, n - 1)[:n]]
        return columns.astype(np.int64)
