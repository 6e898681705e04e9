"""TimeAwareRanker's exhaustive scores for many replayed events at once, equal bit for bit to one ranker call per event."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from chronorec.client.rules import SECONDS_PER_DAY
from chronorec.server.core.catalog_columns import CatalogColumns, CatalogSnapshot
from chronorec.server.core.features import HistoryArrays
from chronorec.server.core.manifest import TimeModelParams
# The ranker's own helpers: the replay must compute with the very expressions the ranker uses.
from chronorec.server.core.ranking import RecommendQuery, ScoredCandidates, _gather, _half_life_decay, _unit
from chronorec.server.core.scoring import combine, personal_scale, score_weights
from chronorec.server.core.timetext import HistoryEntry, action_strength
from chronorec.trainer.protocols import Instances, window_item_counts

if TYPE_CHECKING:
    from chronorec.trainer.tune import RankerReplay

# Instances whose time-dependent arrays (filters, freshness, trend) are held at once: 256 × 10k
# items is ~10 MB per float32 array.
CHUNK_INSTANCES = 256


def chunk_split(n: int) -> int | None:
    """The chunk boundary (a multiple of CHUNK_INSTANCES, read when called) that shares `n`
    instances most evenly between two parts; None when they fill fewer than two chunks."""
    boundaries = range(CHUNK_INSTANCES, n, CHUNK_INSTANCES)
    return min(boundaries, key=lambda s: max(s, n - s)) if len(boundaries) else None


def first_occurrences(event_ids: list[str]) -> np.ndarray:
    """Per event (in the given order), whether the interaction state keeps it: the first event
    of each id (a later duplicate is ignored as the store ignores it); events without an id always."""
    seen: set[str] = set()
    keep = np.ones(len(event_ids), dtype=bool)
    for k, event_id in enumerate(event_ids):
        if event_id:
            if event_id in seen:
                keep[k] = False
            else:
                seen.add(event_id)
    return keep


def within_reach(scored: ScoredCandidates, is_target: np.ndarray, candidates: int,
                 second_look: "Callable[[], Sequence[str]] | None" = None) -> bool:
    """Whether the learned ranker rescores the target (`is_target` marks it among `scored`): it has
    fewer than `candidates` items scored strictly above it, or it is among the second look's items
    (`second_look()`, TimeAwareRanker.second_look, asked only when needed); otherwise the rerank
    cannot change its rank."""
    where = np.flatnonzero(is_target)
    if not len(where):
        return False
    if int((scored.score > scored.score[where[0]]).sum()) < candidates:
        return True
    return second_look is not None and str(scored.item_ids[where[0]]) in set(second_look())


class ReplayScorer:
    """The replay's ranker, exhaustive, for many instances at once.

    `TimeAwareRanker.score_candidates(exhaustive=True)` per event replays the log into an
    interaction state, rebuilds the history as Python objects, filters and aligns the whole
    catalogue and looks every candidate up by id: ~20 ms per event at 10k items, most of it
    Python. Here what every instance shares (the catalogue snapshot and its alignments, each
    event's strength and visibility) is computed once; what depends on the instance's time
    (filters, freshness, trend counts, history decays) is computed for a chunk of instances as
    arrays; the per-instance products (the user vector against the catalogue, the history's
    co-occurrence) stay one call each, with the inputs and calls the ranker makes, so every
    score is the ranker's to the last bit (tests/test_eval_ci.py checks it).
    """

    # Chunks whose candidates are worked out and texts' encoding started before the events of the
    # chunk before them are handed on (walk_candidates with `wanted`); 0: one chunk at a time.
    chunks_ahead = 1

    def __init__(self, replay: "RankerReplay"):
        d = replay.dataset
        self.replay = replay
        self.dataset = d
        # The ranker's candidate columns: the catalogue sorted by item id (CatalogSnapshot).
        snapshot = CatalogSnapshot(list(replay.items.values()))
        columns = self.columns = snapshot.columns
        self.row_ids = columns.item_ids
        missing = [i for i in self.row_ids if i not in d.item_index]
        if missing:
            raise ValueError(f"{len(missing)} catalogue item(s) are not in the dataset, e.g. {missing[0]!r}")
        self.column_of_row = np.fromiter((d.item_index[i] for i in self.row_ids), dtype=np.int64,
                                         count=len(self.row_ids))
        self.published = columns.published_at
        self.expires = columns.expires_at
        self.labels, self.generation = snapshot.index_labels(replay.index)
        model = replay.cooccurrence
        self.cooccurrence_positions = None if model is None else snapshot.cooccurrence_positions(model)
        self.row_of_column = np.full(d.n_items, -1, dtype=np.int64)
        self.row_of_column[self.column_of_row] = np.arange(len(self.row_ids))
        # Item vectors by dataset column, zero where the index lacks the item (vectors_matrix_for).
        self.item_vectors, self.item_present = replay.index.vectors_matrix_for(d.item_ids)
        events = [d.event_at(p) for p in range(d.n_events)]
        self.visible = first_occurrences([e.event_id for e in events])
        self.strength = np.fromiter((action_strength(e.action, e.value) for e in events), dtype=np.float64,
                                    count=len(events))
        # Each event's history entry, built once per data set (histories are rebuilt per replayed
        # event, ~1,000 entries for a long one).
        self._entries = d.history_entries

    def chunks(self, instances: Instances, texts: "HistoryTexts | None" = None,
               size: int | None = None) -> Iterator[tuple[slice, "ReplayChunk"]]:
        """(slice of `instances`, its chunk of `size` (None: CHUNK_INSTANCES) instances), in order;
        `texts` (from `prime`) are handed to the chunks."""
        size = CHUNK_INSTANCES if size is None else size
        for start in range(0, len(instances), size):
            part = slice(start, min(start + size, len(instances)))
            yield part, ReplayChunk(self, instances[part], None if texts is None else texts.part(part))

    def texts(self, instances: Instances, params: TimeModelParams) -> list[str | None]:
        """Each instance's history text as the ranker writes it (None without history)."""
        replay, d = self.replay, self.dataset
        keep = max(0, params.history_max_events)
        out: list[str | None] = []
        for position in instances.pos:
            position = int(position)
            user_events = d.user_events(d.user[position])[:d.rank_in_user[position]]
            earlier = user_events[self.visible[user_events]]
            if not len(earlier):
                out.append(None)
                continue
            # The ranker writes only the newest history_max_events events: only those are built.
            tail = earlier[max(0, len(earlier) - keep):] if keep else earlier[:0]
            out.append(replay.ranker.short_term_text(self.history_entries(tail), float(d.ts[position]), params))
        return out

    def prime(self, instances: Instances, params: TimeModelParams) -> "HistoryTexts":
        """The instances' history texts, those not cached encoded in one call (RankerReplay.prime's call)."""
        texts = self.texts(instances, params)
        self.replay.cache_vectors([t for t in texts if t is not None])
        return HistoryTexts(params.history_max_events, texts)

    def score_rows(self, instances: Instances, params: TimeModelParams, *, prime: bool = True) -> np.ndarray:
        """(len(instances), n_items) scores, -inf where the ranker returns nothing (the
        ReplayRanker.score_batch contract). `prime`: encode the history texts first in one call;
        otherwise a text the ranker needs is encoded when it is reached, as the ranker would."""
        texts = self.prime(instances, params) if prime else None
        out = np.full((len(instances), self.dataset.n_items), -np.inf)
        for part, chunk in self.chunks(instances, texts):
            rows = out[part]
            chunk.prefetch_semantic(params)
            for i in range(len(chunk)):
                scored = chunk.candidates(i, params, components=False)
                rows[i, chunk.columns_kept(i)] = scored.score
        return out

    def walk_candidates(self, instances: Instances, params: TimeModelParams,
                        wanted: "Callable[[int, ScoredCandidates, np.ndarray, LazyHistory], bool] | None" = None,
                        primed: "HistoryTexts | None" = None) -> Iterator["ReplayedEvent"]:
        """Per instance, in the global order, what `TimeAwareRanker._score` hands the learned ranker
        (its query, the candidates with every component, their catalogue columns, the history), with
        the replay's interaction state advanced to the instance; without the per-event scoring. The
        learned ranker's features (which read the state) are then computed by the ranker's own code
        (`features_of_scored`, `rerank`).

        `wanted(row, candidates, columns, history)`: whether an instance's features will be read
        (default: all; `columns`: the candidates' dataset columns; `history`: the instance's history,
        built when read, then handed on with the event). The
        features read the history text whatever the blend's α, so without `wanted` every text is
        encoded in one call first; with it, only the texts of the instances wanted are, one call
        per chunk (on ml-latest-small four in five validation events are not wanted: encoding is
        most of the cost of logging an event). `primed`: what `prime` gave for the instances in
        global order (their texts already encoded), so they are not written again. With `wanted`,
        a chunk's call runs in a thread while the previous chunk's events are handed on
        (_walk_wanted)."""
        order = np.argsort(instances.pos, kind="stable")
        ordered = instances[order]
        if primed is not None:
            texts = primed
        elif wanted is None or (params.alpha > 0 and params.w_semantic > 0):
            # Every text, in one call (also when the blend itself reads them all).
            texts = self.prime(ordered, params)
        else:
            texts = HistoryTexts(params.history_max_events, self.texts(ordered, params))
        if wanted is not None:
            yield from self._walk_wanted(ordered, order, texts, params, wanted)
            return
        for part, chunk in self.chunks(ordered, texts):
            rows = [int(order[part.start + i]) for i in range(len(chunk))]
            chunk.prefetch_semantic(params)
            yield from self._replayed(chunk, ((i, row, chunk.candidates(i, params, components=True), chunk.history(i))
                                              for i, row in enumerate(rows)), params)

    def _walk_wanted(self, ordered: Instances, order: np.ndarray, texts: "HistoryTexts", params: TimeModelParams,
                     wanted: "Callable[[int, ScoredCandidates, np.ndarray, LazyHistory], bool]"
                     ) -> Iterator["ReplayedEvent"]:
        """walk_candidates with `wanted`, one chunk ahead: a chunk's candidates are worked out and
        its wanted texts' encoding started in a thread (the encoder runs outside the interpreter's
        lock, on calls the same as one after the other) before the previous chunk's events are
        handed on, so the encoder works while the caller computes those events' features."""
        replay = self.replay
        ahead: deque[tuple[ReplayChunk, list, Future | None]] = deque()
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-ahead") as encoding:
                for part, chunk in self.chunks(ordered, texts):
                    rows = [int(order[part.start + i]) for i in range(len(chunk))]
                    chunk.prefetch_semantic(params)
                    # The chunk's candidates first (they read no state), then its wanted texts in one
                    # call. `wanted` reads the scores, which need only the components with a weight:
                    # the others are worked out for the events wanted alone (on ml-latest-small
                    # temporal the blend weighs co-occurrence 0, and most validation and test events
                    # are not wanted).
                    events = [(i, row, chunk.completed(i, params, scored), lazy) for i, row, scored, lazy in
                              ((i, row, chunk.candidates(i, params, components=False), chunk.history(i))
                               for i, row in enumerate(rows))
                              if wanted(row, scored, chunk.columns_kept(i), lazy)]
                    encoded = replay.encode_later(
                        [t for t in (chunk.text(i, params) for i, _, _, _ in events) if t is not None], encoding)
                    ahead.append((chunk, events, encoded))
                    while len(ahead) > self.chunks_ahead:
                        chunk, events, encoded = ahead.popleft()
                        yield from self._replayed(chunk, events, params, encoded)
                while ahead:
                    chunk, events, encoded = ahead.popleft()
                    yield from self._replayed(chunk, events, params, encoded)
        finally:
            replay.drop_in_flight()

    def _replayed(self, chunk: "ReplayChunk", events, params: TimeModelParams,
                  encoded: Future | None = None) -> Iterator["ReplayedEvent"]:
        """`events` (chunk index, row, candidates, history) handed on, the replay's state advanced to
        each; `encoded`: the call encoding their texts, cached first (RankerReplay.settle)."""
        replay, d = self.replay, self.dataset
        if encoded is not None:
            replay.settle(encoded)
        for i, row, scored, lazy in events:
            position = int(chunk.instances.pos[i])
            replay.advance(position)
            query = RecommendQuery(user_id=d.user_ids[d.user[position]], k=10, at=float(d.ts[position]),
                                   params=params, exhaustive=True).resolved()
            yield ReplayedEvent(row, query, scored, self.columns.take(chunk.rows_kept(i)), lazy)

    def history_entries(self, positions: np.ndarray) -> list[HistoryEntry]:
        """HistoryEntry of the events at global `positions` (as the interaction state holds them)."""
        entries = self._entries
        return [entries[p] for p in np.asarray(positions, dtype=np.int64).tolist()]

    def history_arrays(self, positions: np.ndarray) -> HistoryArrays:
        """`HistoryArrays.of(self.history_entries(positions))`, read from the data set's columns."""
        positions = np.asarray(positions, dtype=np.int64)
        d = self.dataset
        return HistoryArrays(d.ts[positions], self.strength[positions], d.item[positions], d.item_ids)


class LazyHistory:
    """A replayed instance's history, built when first read: its HistoryEntry list (~1,000 objects
    for a long history, not needed for an event skipped on its candidates alone) and its arrays."""

    def __init__(self, scorer: "ReplayScorer", positions: np.ndarray):
        self._scorer = scorer
        self._positions = positions
        self._entries: list[HistoryEntry] | None = None
        self._arrays: HistoryArrays | None = None

    @property
    def entries(self) -> list[HistoryEntry]:
        """The user's events before the instance, oldest first."""
        if self._entries is None:
            self._entries = self._scorer.history_entries(self._positions)
        return self._entries

    @property
    def arrays(self) -> HistoryArrays:
        """`entries` as the learned ranker's features read them (features.HistoryArrays)."""
        if self._arrays is None:
            self._arrays = self._scorer.history_arrays(self._positions)
        return self._arrays


class ReplayedEvent:
    """One replayed instance as the learned ranker sees it (ReplayScorer.walk_candidates)."""

    def __init__(self, row: int, query: RecommendQuery, scored: ScoredCandidates, columns: CatalogColumns,
                 history: LazyHistory):
        self.row = row  # in the instances walked
        self.query = query
        self.scored = scored
        self.columns = columns  # aligned with `scored`
        self._history = history

    @property
    def history(self) -> list[HistoryEntry]:
        """The user's events before the instance, oldest first (built when first read)."""
        return self._history.entries

    @property
    def arrays(self) -> HistoryArrays:
        """The history as the learned ranker's features read it (built when first read)."""
        return self._history.arrays


@dataclass
class HistoryTexts:
    """Instances' history texts (None without history), written with `history_max_events` events."""

    history_max_events: int
    texts: list[str | None]

    def part(self, part: slice) -> "HistoryTexts":
        return HistoryTexts(self.history_max_events, self.texts[part])

    def reordered(self, order: np.ndarray) -> "HistoryTexts":
        return HistoryTexts(self.history_max_events, [self.texts[k] for k in order])


def _vector_key(params: TimeModelParams) -> tuple:
    """What a user vector depends on among the time model's parameters (its memo key)."""
    return params.alpha, params.long_term_half_life_days, params.history_max_events


@dataclass
class _Memo:
    """What one instance's settings share (user vectors by α and half-life, co-occurrence by half-life)."""

    row: int = -1
    user_vectors: dict | None = None
    cooccurrence: dict | None = None
    rows: np.ndarray | None = None
    semantic: dict | None = None  # similarities to the candidates, by user vector
    long_terms: dict | None = None  # the decayed mean of the history's vectors, by half-life


class ReplayChunk:
    """A few hundred instances with their visible histories and time-dependent arrays."""

    def __init__(self, scorer: ReplayScorer, instances: Instances, texts: "HistoryTexts | None" = None):
        d = scorer.dataset
        self.scorer = scorer
        self.instances = instances
        self.at = d.ts[instances.pos]
        hist_row, hist_pos = instances.history_flat()
        visible = scorer.visible[hist_pos]
        hist_row, hist_pos = hist_row[visible], hist_pos[visible]
        n = len(instances)
        self.n_hist = np.bincount(hist_row, minlength=n)
        self.hist_ptr = np.concatenate(([0], np.cumsum(self.n_hist))).astype(np.int64)
        self.hist_pos = hist_pos
        self.hist_items = d.item[hist_pos]
        ages = self.at[hist_row] - d.ts[hist_pos]
        has = self.n_hist > 0
        self.min_age = np.zeros(n)
        if len(ages):
            self.min_age[has] = np.minimum.reduceat(ages, self.hist_ptr[:-1][has])
        # Ages relative to the newest event, as the ranker takes them (ages - ages.min()).
        self.ages = ages - self.min_age[hist_row]
        self.strength = scorer.strength[hist_pos]
        keep = ~(scorer.published[None, :] > self.at[:, None]) & ~(scorer.expires[None, :] <= self.at[:, None])
        banned_rows = scorer.row_of_column[self.hist_items]
        known = banned_rows >= 0
        keep[hist_row[known], banned_rows[known]] = False
        self.keep = keep
        self._freshness: dict[float, np.ndarray] = {}
        self._trend: dict[float, np.ndarray] = {}
        self._texts: dict[int, list[str | None]] = {} if texts is None else {texts.history_max_events: texts.texts}
        self._memo = _Memo()
        self._memos: dict[int, _Memo] = {}  # instances' memos filled ahead (prefetch_semantic)
        self._vectors_of, self._vectors = -1, np.zeros((0, 0))  # _history_vectors' one instance

    def __len__(self) -> int:
        return len(self.instances)

    def history(self, i: int) -> "LazyHistory":
        """Instance i's visible history, built when read."""
        return LazyHistory(self.scorer, self.hist_pos[self.hist_ptr[i]:self.hist_ptr[i + 1]])

    # -- per-chunk arrays

    def _freshness_matrix(self, half_life_days: float) -> np.ndarray:
        """(n, catalogue rows) float32 freshness at each instance's time."""
        if half_life_days not in self._freshness:
            published = self.scorer.published
            self._freshness[half_life_days] = np.where(
                np.isnan(published)[None, :], 0.0,
                _half_life_decay(self.at[:, None] - np.nan_to_num(published)[None, :], half_life_days),
            ).astype(np.float32)
        return self._freshness[half_life_days]

    def _trend_matrix(self, window_days: float) -> np.ndarray:
        """(n, catalogue rows) float32 trend: log1p(events in [t - window, t]) over log1p of the peak."""
        if window_days not in self._trend:
            d, scorer = self.scorer.dataset, self.scorer
            window_start = np.searchsorted(d.ts, self.at - window_days * SECONDS_PER_DAY, side="left")
            n = len(self)
            counts = window_item_counts(d, window_start, self.instances.pos, np.flatnonzero(scorer.visible))
            peak = counts.max(axis=1, initial=0)
            trend = np.zeros((n, len(scorer.row_ids)), dtype=np.float32)
            live = np.flatnonzero(peak > 0)
            if len(live):
                denominator = np.array([math.log1p(int(p)) for p in peak[live]])
                trend[live] = (np.log1p(counts[live][:, scorer.column_of_row]) / denominator[:, None]).astype(np.float32)
            self._trend[window_days] = trend
        return self._trend[window_days]

    def rows_kept(self, i: int) -> np.ndarray:
        """Catalogue rows (sorted by item id) the ranker's filters keep for instance i: its candidates, in its order."""
        memo = self._memo_for(i)
        if memo.rows is None:
            memo.rows = np.flatnonzero(self.keep[i])
        return memo.rows

    def columns_kept(self, i: int) -> np.ndarray:
        """Dataset columns of instance i's candidates, aligned with `candidates(i, ...)`."""
        return self.scorer.column_of_row[self.rows_kept(i)]

    # -- short-term texts

    def text(self, i: int, params: TimeModelParams) -> str:
        """Instance i's history text (it has a history)."""
        key = params.history_max_events
        if key not in self._texts:
            self._texts[key] = self.scorer.texts(self.instances, params)
        return self._texts[key][i]

    # -- one instance

    def _memo_for(self, i: int) -> _Memo:
        if self._memo.row != i:
            self._memo = self._memos.pop(i, None) or _Memo(i, {}, {}, None, {}, {})
        return self._memo

    def prefetch_semantic(self, params: TimeModelParams) -> None:
        """Every instance's semantic component for `params`, kept in the instances' memos for
        `candidates`: the user vectors one after the other (any history text encoded in the order
        `semantic` would), then their similarities in one index call
        (ItemIndex.similarities_by_label_many), the values `semantic` computes. Each instance's is a
        pass over the catalogue's vectors (15 MB at 10k items); the index makes it a block of rows
        at a time for every instance, so each block is read from memory once per chunk."""
        if params.w_semantic == 0:
            return
        key = _vector_key(params)
        wanted: list[tuple[_Memo, np.ndarray, np.ndarray]] = []
        for i in range(len(self)):
            if not self.n_hist[i]:
                continue
            rows = self.rows_kept(i)
            vector = self._user_vector(i, params) if len(rows) else None
            memo = self._memo_for(i)
            if vector is not None and key not in memo.semantic:
                wanted.append((memo, vector, rows))
            self._memos[i] = memo
        self._memo = _Memo()
        self._store_similarities(key, wanted)

    def _store_similarities(self, key: tuple, wanted: list[tuple[_Memo, np.ndarray, np.ndarray]]) -> None:
        """Each (memo, user vector, catalogue rows)'s similarities to its rows in one index call, kept
        read-only in the memo under the user vector's `key` (shared by the settings' candidates)."""
        if not wanted:
            return
        scorer = self.scorer
        found = scorer.replay.index.similarities_by_label_many(
            [vector for _, vector, _ in wanted], [scorer.labels[rows] for _, _, rows in wanted], scorer.generation)
        if found is None:
            raise RuntimeError("the replay's index changed while scoring")
        for (memo, _, _), semantic in zip(wanted, found):
            semantic.flags.writeable = False
            memo.semantic[key] = semantic

    def _user_vector(self, i: int, params: TimeModelParams) -> np.ndarray | None:
        """_UserContext.build's user vector (history non-empty, w_semantic non-zero)."""
        memo = self._memo_for(i)
        key = _vector_key(params)
        if key in memo.user_vectors:
            return memo.user_vectors[key]
        long_term = self._long_term(i, params.long_term_half_life_days)
        alpha = params.alpha
        short_term = None
        if alpha > 0 or long_term is None:
            encoded = self.scorer.replay.encoded([self.text(i, params)])
            short_term = _unit(np.asarray(encoded, dtype=np.float32).reshape(-1))
        if short_term is not None and long_term is not None:
            blend = alpha * short_term + (1.0 - alpha) * long_term
        else:
            blend = short_term if short_term is not None else long_term
        vector = None
        if blend is not None:
            blend_norm = float(np.linalg.norm(blend))
            if blend_norm > 1e-12:
                vector = (blend / blend_norm).astype(np.float32)
        memo.user_vectors[key] = vector
        return vector

    def _long_term(self, i: int, half_life_days: float) -> np.ndarray | None:
        """The unit decayed mean of instance i's history vectors (None: no history item has one), as
        _UserContext.build computes it: the same for every α, so computed once per half-life."""
        memo = self._memo_for(i)
        if half_life_days in memo.long_terms:
            return memo.long_terms[half_life_days]
        a, b = self.hist_ptr[i], self.hist_ptr[i + 1]
        long_term_weight = _half_life_decay(self.ages[a:b], half_life_days) * self.strength[a:b]
        long_raw = (long_term_weight * self.scorer.item_present[self.hist_items[a:b]])[None, :] @ self._history_vectors(i)
        long_norm = float(np.linalg.norm(long_raw))
        long_term = memo.long_terms[half_life_days] = long_raw[0] / long_norm if long_norm > 1e-12 else None
        return long_term

    def _history_vectors(self, i: int) -> np.ndarray:
        """Instance i's history item vectors in float64, kept for the instance's next half-life. The
        product with float64 weights casts float32 vectors to this very array first, so the sums are
        the same; cast once, a half-life costs a fifth (a history of 700 items: 0.07 ms, not 0.34)."""
        if self._vectors_of != i:
            a, b = self.hist_ptr[i], self.hist_ptr[i + 1]
            self._vectors = self.scorer.item_vectors[self.hist_items[a:b]].astype(np.float64)
            self._vectors_of = i
        return self._vectors

    def _cooccurrence_raw(self, i: int, half_life_days: float) -> np.ndarray | None:
        """The co-occurrence model's Σ weight·similarity over its items, None without a positive weight."""
        memo = self._memo_for(i)
        if half_life_days in memo.cooccurrence:
            return memo.cooccurrence[half_life_days]
        a, b = self.hist_ptr[i], self.hist_ptr[i + 1]
        decay = _half_life_decay(self.ages[a:b], half_life_days) * (self.strength[a:b] > 0)
        positive = decay > 0
        raw = None
        if positive.any():
            # The ranker sums each item's weights oldest first into a dict ordered by first occurrence.
            items = self.hist_items[a:b][positive]
            unique, first, inverse = np.unique(items, return_index=True, return_inverse=True)
            sums = np.bincount(inverse, weights=decay[positive], minlength=len(unique))
            order = np.argsort(first, kind="stable")
            item_ids = self.scorer.dataset.item_ids
            weights = {item_ids[unique[k]]: float(sums[k]) for k in order}
            raw = self.scorer.replay.cooccurrence.scores(weights)
        memo.cooccurrence[half_life_days] = raw
        return raw

    def semantic(self, i: int, params: TimeModelParams) -> np.ndarray:
        """Instance i's semantic component over its candidates (float32)."""
        rows = self.rows_kept(i)
        if not self.n_hist[i] or params.w_semantic == 0 or not len(rows):
            return np.zeros(len(rows), dtype=np.float32)
        vector = self._user_vector(i, params)
        if vector is None:
            return np.zeros(len(rows), dtype=np.float32)
        # Settings that share the user vector (the sweeps' co-occurrence and personal half-lives,
        # the tuning's other passes) share its similarities: computed once per instance.
        memo = self._memo_for(i)
        key = _vector_key(params)
        if key not in memo.semantic:
            self._store_similarities(key, [(memo, vector, rows)])
        return memo.semantic[key]

    def cooccurrence(self, i: int, params: TimeModelParams) -> np.ndarray:
        """Instance i's co-occurrence component over its candidates (float32, peak 1)."""
        rows = self.rows_kept(i)
        scorer = self.scorer
        if self.n_hist[i] and scorer.replay.cooccurrence is not None and len(rows):
            full = self._cooccurrence_raw(i, params.cooccurrence_half_life_days)
            if full is not None:
                raw = _gather(full, scorer.cooccurrence_positions[rows])
                peak = float(raw.max())
                if peak > 0:
                    return (raw / peak).astype(np.float32)
        return np.zeros(len(rows), dtype=np.float32)

    def freshness(self, i: int, params: TimeModelParams) -> np.ndarray:
        """Instance i's freshness component over its candidates (float32)."""
        return self._freshness_matrix(params.freshness_half_life_days)[i, self.rows_kept(i)]

    def trend(self, i: int, params: TimeModelParams) -> np.ndarray:
        """Instance i's trend component over its candidates (float32)."""
        return self._trend_matrix(params.trend_window_days)[i, self.rows_kept(i)]

    def _score_weights(self, i: int, params: TimeModelParams) -> np.ndarray:
        history_length = int(self.n_hist[i])
        scale = personal_scale(float(self.min_age[i]), params.personal_half_life_days) if history_length else 1.0
        return score_weights(params, history_length=history_length, scale=scale)

    def candidates(self, i: int, params: TimeModelParams, *, components: bool = True) -> ScoredCandidates:
        """Instance i's candidates as `TimeAwareRanker.score_candidates` returns them (in
        `rows_kept(i)` order). With components=False a component whose weight is zero is left
        at zero (adding 0·x changes no score) instead of being computed (`completed` works it
        out later)."""
        rows = self.rows_kept(i)
        weights = self._score_weights(i, params)
        needed = weights != 0 if not components else np.ones(4, dtype=bool)
        zeros = np.zeros(len(rows), dtype=np.float32)
        semantic = self.semantic(i, params) if needed[0] else zeros
        cooccurrence = self.cooccurrence(i, params) if needed[1] else zeros
        freshness = self.freshness(i, params) if needed[2] else zeros
        trend = self.trend(i, params) if needed[3] else zeros
        score = combine(weights, semantic.astype(np.float64), cooccurrence, freshness, trend)
        return ScoredCandidates(self.scorer.row_ids[rows], score, semantic, cooccurrence, freshness, trend)

    def completed(self, i: int, params: TimeModelParams, scored: ScoredCandidates) -> ScoredCandidates:
        """`scored` (candidates(i, params, components=False)) with the components its zero weights
        left out worked out: what candidates(i, params) gives, score included (the score did not
        read them)."""
        skipped = self._score_weights(i, params) == 0
        if not skipped.any():
            return scored
        return replace(
            scored,
            semantic=self.semantic(i, params) if skipped[0] else scored.semantic,
            cooccurrence=self.cooccurrence(i, params) if skipped[1] else scored.cooccurrence,
            freshness=self.freshness(i, params) if skipped[2] else scored.freshness,
            trend=self.trend(i, params) if skipped[3] else scored.trend,
        )


__all__ = ["CHUNK_INSTANCES", "HistoryTexts", "chunk_split", "ReplayChunk", "ReplayScorer", "ReplayedEvent", "first_occurrences", "within_reach"]
