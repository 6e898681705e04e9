"""Time-aware Recommend: blend of semantic, co-occurrence, freshness and trend, as of any time, optionally reranked by a learned model."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from chronorec.client.rules import SECONDS_PER_DAY as _DAY
from chronorec.server.core.catalog import Item
from chronorec.server.core.catalog_columns import CatalogColumns, CatalogSnapshot
from chronorec.server.core.compute_gate import RECOMMEND_GATE
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.features import FeatureInputs, FirstStage, HistoryArrays, candidate_features
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.server.core.learned_ranker import DEFAULT_CANDIDATES, DEFAULT_SECOND_LOOK, FeatureReason, LearnedRanker
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.scoring import combine, personal_scale, score_weights
from chronorec.server.core.short_term_cache import DEFAULT_MAX_BYTES, ShortTermCache, encoder_char_budget, text_key
from chronorec.server.core.timetext import HistoryEntry, history_text

REASONS_PER_ITEM = 3


# ------------------------------------------------------------------ requests


@dataclass(frozen=True, eq=False)
class RecommendQuery:
    """One Recommend call, transport-free, from the servicer to the ranker.

    `at` is unix seconds (None: now); only events ≤ `at` count. `params` is the time model
    (None: the serving version's), with `overrides` applied on top (see `resolved`).
    """

    user_id: str | None
    k: int
    at: float | None = None
    inline_history: Sequence[HistoryEntry] = ()
    exclude: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    allow_repeats: bool = False
    params: TimeModelParams | None = None
    # Per-request time-model values by name; out-of-bounds ones raise InvalidArgument.
    overrides: Mapping[str, float] = field(default_factory=dict)
    # Score every catalog item instead of index/co-occurrence/trend candidates (evaluation).
    exhaustive: bool = False
    # A precomputed short-term vector (e.g. batch-encoded by the evaluation) skips the encoder.
    short_term_vector: np.ndarray | None = None
    # Seconds the short-term text may wait for the encoder (the caller's deadline); None: no limit.
    encode_timeout: float | None = None

    def resolved(self, params: TimeModelParams | None = None, now: float | None = None) -> "RecommendQuery":
        """A copy with `at` set (default `now`, else the clock) and `params` set: the query's own,
        else `params`, else the defaults, with `overrides` applied (and then emptied)."""
        if self.at is not None and self.params is not None and not self.overrides:
            return self
        at = self.at if self.at is not None else (time.time() if now is None else float(now))
        base = self.params or params or TimeModelParams()
        return replace(self, at=at, params=base.with_overrides(dict(self.overrides)), overrides={})


@dataclass(frozen=True)
class HistoryReason:
    """A history item that contributed to a recommendation, and how much."""

    item_id: str
    title: str
    contribution: float


@dataclass(frozen=True)
class Recommendation:
    """One ranked item with what a caller shows of it. Components are the values the score weights multiply."""

    item_id: str
    title: str
    category: str
    score: float
    semantic: float
    cooccurrence: float
    freshness: float
    trend: float
    top_history: list[HistoryReason]
    # With a learned ranker: the features that moved this item's score most (none with the blend).
    feature_reasons: list[FeatureReason] = field(default_factory=list)


@dataclass(frozen=True)
class RecommendResult:
    items: list[Recommendation]
    history_length: int
    used_cache: bool


@dataclass(frozen=True)
class ScoredCandidates:
    """Every candidate that passed the filters, with its score and score components."""

    item_ids: np.ndarray  # str
    score: np.ndarray
    semantic: np.ndarray
    cooccurrence: np.ndarray
    freshness: np.ndarray
    trend: np.ndarray


@dataclass(frozen=True)
class CandidateFeatures:
    """What the learned ranker reads for one query: candidates, their features (features.FEATURE_NAMES
    columns) and the blend's score of each; `in_candidates` is False for rows added on request."""

    item_ids: np.ndarray  # str
    features: np.ndarray
    blend_score: np.ndarray
    in_candidates: np.ndarray  # bool
    # Candidates that are there through the second look only (not among the blend's best).
    second_look: np.ndarray | None = None  # bool


# ------------------------------------------------------------------- catalog


def _gather(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """values[positions] with 0 where the position is -1 (item unknown to that component)."""
    if not len(values):
        return np.zeros(len(positions), dtype=values.dtype)
    return np.where(positions >= 0, values[np.maximum(positions, 0)], 0)


# ------------------------------------------------------------------- ranker


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of `values` (1 <= k < len).

    numpy's partition slows down ~20x when most values tie (17 ms for 100k scores that are
    90% zero, a cold-start user's trend-only ranking); the floor tie is set aside first.
    """
    floor = values.min()
    above = values[values > floor]
    if len(above) < k:
        return float(floor)
    return float(np.partition(above, len(above) - k)[len(above) - k])


def _half_life_decay(age_seconds: np.ndarray, half_life_days: float) -> np.ndarray:
    return np.exp2(-np.maximum(age_seconds, 0.0) / (half_life_days * _DAY))


def _freshness(published: np.ndarray, at: float, half_life_days: float) -> np.ndarray:
    """_half_life_decay of each item's age as float32, 0 where it has no publication time (NaN).

    The same operations in place (a NaN age stays NaN through them and becomes 0 at the end)
    instead of nan_to_num, isnan and where over the whole catalog: same values, half the passes.
    """
    decay = at - published
    np.maximum(decay, 0.0, out=decay)
    np.negative(decay, out=decay)
    np.divide(decay, half_life_days * _DAY, out=decay)
    np.exp2(decay, out=decay)
    freshness = decay.astype(np.float32)
    freshness[np.isnan(freshness)] = 0.0
    return freshness


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 and math.isfinite(norm) else None


class CooccurrenceSource:
    """The co-occurrence model rankers read at each request.

    The server's rankers share one source, so a background refit reaches whichever ranker
    serves (and one being built for a swap) by one reference swap.
    """

    def __init__(self, model: CooccurrenceModel | None = None):
        self.model = model


class TimeAwareRanker:
    """Recommend as of a time `t`, the same code for live traffic and for replaying the past.

    One ranker serves one encoder version; on a hot swap the server builds a new one
    (new index, empty short-term cache) and swaps it in.
    """

    def __init__(
        self,
        catalog: Mapping[str, Item],
        index: ItemIndex,
        state: InteractionState,
        cooccurrence: CooccurrenceModel | CooccurrenceSource | None,
        encode: Callable[[list[str]], np.ndarray],
        item_text_of: Callable[[str], str] | None = None,
        short_term_cache_bytes: int = DEFAULT_MAX_BYTES,
        *,
        encoder_max_length: int | None = None,
        oversample: int = 4,
        recent_items_for_neighbours: int = 20,
        neighbours_per_item: int = 50,
        exhaustive_below: int = 20000,
        catalog_version: Callable[[], object] | None = None,
        learned_ranker: LearnedRanker | None = None,
    ):
        self.catalog = catalog
        self.index = index
        self.state = state
        shared = isinstance(cooccurrence, CooccurrenceSource)
        self._cooccurrence = cooccurrence if shared else CooccurrenceSource(cooccurrence)
        self.encode = encode
        self.item_text_of = item_text_of or item_text_lookup(catalog)
        self.oversample = max(1, int(oversample))
        self.recent_items_for_neighbours = recent_items_for_neighbours
        self.neighbours_per_item = neighbours_per_item
        # Up to this many catalog items, scoring all of them costs about what gathering
        # candidates does (measured ~2 ms on ML-100K), and it is exact.
        self.exhaustive_below = exhaustive_below
        # What tells the cached catalog columns are stale: this callable, else the
        # mapping's own `version`, else its length (see invalidate_catalog).
        self.catalog_version = catalog_version
        self._short_term_cache = ShortTermCache(short_term_cache_bytes)
        # The encoder reads only max_length tokens: longer history texts are cut to what it
        # can read (unbounded otherwise, for callers that encode texts their own way).
        self.history_text_chars = encoder_char_budget(encoder_max_length) if encoder_max_length else None
        self._catalog_columns: tuple[object, CatalogSnapshot] | None = None
        # The version's learned ranker: it reorders the blend's best candidates (None: the blend alone).
        self.learned_ranker = learned_ranker

    # ---------------------------------------------------------------- public

    @property
    def cooccurrence(self) -> CooccurrenceModel | None:
        return self._cooccurrence.model

    def set_cooccurrence(self, model: CooccurrenceModel | None) -> None:
        """Swap in a refitted co-occurrence model (a plain reference swap, safe mid-traffic)."""
        self._cooccurrence.model = model

    def clear_cache(self) -> None:
        self._short_term_cache.clear()

    @property
    def short_term_cache_bytes(self) -> int:
        """Bytes the short-term vector cache holds now (bounded by its size in bytes)."""
        return self._short_term_cache.nbytes

    def warm_short_term(self, queries: Sequence[RecommendQuery], timeout: float | None = None) -> int:
        """Encode the history texts of `queries` that the short-term cache lacks, all in one encoder
        call, into the cache: recommending each query then finds its vector there, so a batch of
        users costs one micro-batch instead of one encoder pass per user. Returns how many texts ran."""
        texts: dict[bytes, str] = {}
        for query in queries:
            query = query.resolved()
            params = query.params
            wanted = getattr(self, "learned_ranker", None) is not None or (params.w_semantic != 0 and params.alpha > 0)
            if query.short_term_vector is not None or not wanted:
                continue
            history = self.history_for(query)
            if not history:
                continue
            text = self.short_term_text(history, query.at, params)
            key = text_key(text)
            if key not in texts and self._short_term_cache.get(key) is None:
                texts[key] = text
        if not texts:
            return 0
        batch = list(texts.values())
        with RECOMMEND_GATE.stepped_out():
            encoded = self.encode(batch) if timeout is None else self.encode(batch, timeout=timeout)
        for key, row in zip(texts, np.asarray(encoded, dtype=np.float32)):
            vector = _unit(row.reshape(-1))
            if vector is not None:
                self._short_term_cache.put(key, vector)
        return len(texts)

    def invalidate_catalog(self) -> None:
        """Forget the cached catalog columns (needed only for a plain dict changed in place)."""
        self._catalog_columns = None

    def history_for(self, query: RecommendQuery) -> list[HistoryEntry]:
        """The user's stored events and the inline ones, timestamp ≤ at, oldest first."""
        stored = self.state.history(query.user_id, query.at) if query.user_id else []
        inline = [e for e in query.inline_history if e.timestamp <= query.at]
        if not inline:
            return stored
        if not stored:
            return sorted(inline, key=lambda e: e.timestamp)
        # A client may resend events the server already has; count each once.
        known = {(e.item_id, e.action, e.timestamp, e.value) for e in stored}
        merged = stored + [e for e in inline if (e.item_id, e.action, e.timestamp, e.value) not in known]
        merged.sort(key=lambda e: e.timestamp)  # stable: stored events first on equal times
        return merged

    def short_term_text(self, history: Sequence[HistoryEntry], at: float, params: TimeModelParams) -> str:
        """Exactly the text the encoder sees for this history as of `at`."""
        # `history` is time-ordered, so its tail is exactly what history_text would keep;
        # passing only the tail avoids sorting a long history on every request.
        recent = history[-params.history_max_events :] if params.history_max_events > 0 else []
        # Newest events come first, so the cut drops the oldest. 200 events of 20k-character
        # items made a 4 MB text whose tokenizing alone took seconds; the cut keeps it at ~13k.
        return history_text(recent, at, self.item_text_of, params.history_max_events, self.history_text_chars)

    def recommend(self, query: RecommendQuery) -> RecommendResult:
        # Calls take turns through the Python-bound ranking (see ComputeGate); an encoder wait
        # inside steps out of the gate.
        with RECOMMEND_GATE.inside():
            return self._recommend(query)

    def _recommend(self, query: RecommendQuery) -> RecommendResult:
        query = query.resolved()
        history, scored, context = self._score(query)
        top = [int(i) for i in self._top_k(scored, query.k)]
        if not self._still_valid(scored.item_ids[top], query):
            # The catalog changed under the cached columns without a version bump: rebuild once.
            self.invalidate_catalog()
            history, scored, context = self._score(query)
            top = [int(i) for i in self._top_k(scored, query.k)]
        reasons = self._reasons(scored.item_ids[top], context) if history else [[] for _ in top]
        feature_reasons = self._feature_reasons(top, context)
        recommendations = [
            Recommendation(
                item_id=str(scored.item_ids[i]),
                title=self._title(scored.item_ids[i]),
                category=self._category(scored.item_ids[i]),
                score=float(scored.score[i]),
                semantic=float(scored.semantic[i]),
                cooccurrence=float(scored.cooccurrence[i]),
                freshness=float(scored.freshness[i]),
                trend=float(scored.trend[i]),
                top_history=reasons[n],
                feature_reasons=feature_reasons[n],
            )
            for n, i in enumerate(top)
        ]
        return RecommendResult(recommendations, len(history), context.used_cache)

    def _title(self, item_id: str) -> str:
        item = self.catalog.get(item_id)  # deleted since it was scored: nothing to show
        return item.title if item is not None else ""

    def _category(self, item_id: str) -> str:
        item = self.catalog.get(item_id)
        return item.category if item is not None else ""

    def _still_valid(self, item_ids: np.ndarray, query: RecommendQuery) -> bool:
        """The hard filters, re-checked on the live catalog for the few items being returned."""
        for item_id in item_ids:
            item = self.catalog.get(item_id)
            if item is None or not item.available_at(query.at):
                return False
            if query.categories and item.category not in query.categories:
                return False
        return True

    def score_candidates(self, query: RecommendQuery) -> ScoredCandidates:
        """Scores of every candidate that passes the filters (the evaluation ranks these)."""
        return self._score(query.resolved())[1]

    def candidate_features(self, query: RecommendQuery, extra_item_ids: Sequence[str] = (),
                           candidates: int | None = None) -> CandidateFeatures:
        """What the learned ranker reads for `query`: the blend's best `candidates` (default: as many
        as the ranker rescores, DEFAULT_CANDIDATES without one) and those of `extra_item_ids` that
        pass the filters, with their features. The trainer logs exactly these, as of each past event."""
        query = query.resolved()
        history, scored, context = self._score(query, rerank=False, second_look=True)
        return self.features_of_scored(query, history, scored, context.columns, context.cooccurrence_model,
                                       extra_item_ids, candidates, arrays=context.history_arrays)

    def second_look(self, history: Sequence[HistoryEntry], cooccurrence: CooccurrenceModel | None,
                    per_source: int | None = None, arrays: HistoryArrays | None = None) -> list[str]:
        """Items of the user's whole history, however old, that the learned ranker rescores besides
        the blend's best (`per_source` from each source; default: the serving ranker's spec, else
        DEFAULT_SECOND_LOOK; history items may be among them, the filters drop those): the best by
        co-occurrence with every positive history event alike, then the nearest to the
        strength-weighted mean of the history items' vectors. `arrays`: `history` as arrays, when
        the caller has them."""
        if per_source is None:
            learned = self.learned_ranker
            per_source = learned.spec.second_look if learned is not None else DEFAULT_SECOND_LOOK
        if not history or per_source <= 0:
            return []
        arrays = arrays if arrays is not None else HistoryArrays.of(history)
        newest_first, kept = arrays.newest_first, arrays.kept
        positive = arrays.positive_counts()
        found: dict[str, None] = {}
        if cooccurrence is not None and positive:
            scores = cooccurrence.scores(positive)
            if len(scores):
                take = min(per_source, len(scores))
                best = np.argpartition(-scores, take - 1)[:take]
                best = best[scores[best] > 0]
                ids = cooccurrence.item_ids
                for position in best[np.lexsort((best, -scores[best]))].tolist():
                    found[ids[position]] = None
        vectors, present = self.index.vectors_matrix_for(newest_first)
        if present.any():
            # Per item, its events' strengths added oldest first.
            weights = np.bincount(arrays.event_rows[kept], weights=arrays.strengths[kept], minlength=len(newest_first))
            mean = _unit((weights * present) @ vectors)
            if mean is not None:
                for item_id, _ in self.index.search(mean.astype(np.float32), per_source):
                    found[item_id] = None
        return list(found)

    def _ranker_rows(self, scored: ScoredCandidates, columns: CatalogColumns, wanted: int,
                     second_look: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, blend ranks) the learned ranker scores: the blend's best `wanted` (the rows whose
        rank is below `wanted`; the `_rank` features rank against them), then the rows of
        `second_look` among the candidates that are not already there, each at its blend rank."""
        n = len(scored.score)
        top = self._top_k(scored, min(wanted, n))
        extra: list[int] = []
        if len(second_look) and len(top) < n:
            chosen = set(top.tolist())
            extra = [p for p in dict.fromkeys(self._positions_of(second_look, scored, columns))
                     if p >= 0 and p not in chosen]
        rows = np.concatenate([top, np.asarray(extra, dtype=np.int64)]).astype(np.int64)
        return rows, np.concatenate([np.arange(len(top), dtype=np.float64), self._blend_ranks(scored, extra)])

    @staticmethod
    def _blend_ranks(scored: ScoredCandidates, rows: Sequence[int]) -> np.ndarray:
        """Per row, the number of candidates the blend scores strictly above it."""
        if not len(rows):
            return np.zeros(0, dtype=np.float64)
        ordered = np.sort(scored.score)
        values = scored.score[np.asarray(rows, dtype=np.int64)]
        return (len(ordered) - np.searchsorted(ordered, values, side="right")).astype(np.float64)

    def features_of_scored(self, query: RecommendQuery, history: list[HistoryEntry], scored: ScoredCandidates,
                           columns: CatalogColumns, cooccurrence: CooccurrenceModel | None,
                           extra_item_ids: Sequence[str] = (), candidates: int | None = None,
                           second_look: int | None = None, arrays: HistoryArrays | None = None) -> CandidateFeatures:
        """candidate_features of candidates already scored (`columns` aligned with `scored`): the
        trainer's batch replay scores many logged events at once, then reads each one's features here
        (`arrays`: `history` as arrays, when it has them)."""
        wanted = candidates or (self.learned_ranker.candidates if self.learned_ranker is not None else DEFAULT_CANDIDATES)
        if history and arrays is None:
            arrays = HistoryArrays.of(history)
        pool, pool_ranks = self._ranker_rows(scored, columns, wanted,
                                             self.second_look(history, cooccurrence, second_look, arrays))
        chosen = set(pool.tolist())
        extra: list[int] = []
        if len(extra_item_ids):
            position = self._positions_of(extra_item_ids, scored, columns)
            extra = [p for p in dict.fromkeys(position) if p >= 0 and p not in chosen]
        rows = np.concatenate([pool, np.asarray(extra, dtype=np.int64)]).astype(np.int64)
        # An added row's rank is where the blend put it among all candidates.
        ranks = np.concatenate([pool_ranks, self._blend_ranks(scored, extra)])
        position = np.arange(len(rows))
        in_candidates = position < len(pool)
        best = min(wanted, len(scored.score))  # the blend's best come first in the pool
        features = candidate_features(self._feature_inputs(history, query, cooccurrence, arrays),
                                      self._first_stage(scored, columns, rows, ranks, position < best))
        return CandidateFeatures(scored.item_ids[rows], features, scored.score[rows], in_candidates,
                                 in_candidates & (position >= best))

    @staticmethod
    def _positions_of(item_ids: Sequence[str], scored: ScoredCandidates, columns: CatalogColumns) -> list[int]:
        """Where each of a few `item_ids` is among the scored candidates (-1: not a candidate)."""
        source, rows = columns.source, columns.rows
        if source is None or rows is None:
            position = {item_id: row for row, item_id in enumerate(scored.item_ids)}
            return [position.get(i, -1) for i in item_ids]
        # Columns cut from the catalog snapshot: its rows name the candidates, no dict of them all.
        where = np.full(len(source), -1, dtype=np.int64)
        where[rows] = np.arange(len(rows))
        return [int(where[source.row_of[i]]) if i in source.row_of else -1 for i in item_ids]

    # -------------------------------------------------------- learned ranker

    def _feature_inputs(self, history: list[HistoryEntry], query: RecommendQuery,
                        cooccurrence: CooccurrenceModel | None, arrays: HistoryArrays | None = None) -> FeatureInputs:
        short_term = None
        if history:
            # The history text is read whatever the blend's α: the ranker weighs it on its own.
            short_term, _ = self._short_term_vector(history, query)
        return FeatureInputs(at=query.at, history=history, params=query.params, index=self.index, state=self.state,
                             cooccurrence=cooccurrence, short_term=short_term, category_of=self._category,
                             arrays=arrays)

    @staticmethod
    def _first_stage(scored: ScoredCandidates, columns: CatalogColumns, rows: np.ndarray, ranks: np.ndarray,
                     reference: np.ndarray | None = None) -> FirstStage:
        return FirstStage(
            item_ids=scored.item_ids[rows], category=columns.category[rows], published_at=columns.published_at[rows],
            score=scored.score[rows], rank=ranks, semantic=scored.semantic[rows],
            cooccurrence=scored.cooccurrence[rows], trend=scored.trend[rows], freshness=scored.freshness[rows],
            reference=reference,
        )

    def rerank(self, history: list[HistoryEntry], scored: ScoredCandidates, query: RecommendQuery,
               columns: CatalogColumns, cooccurrence: CooccurrenceModel | None,
               second_look: Sequence[str] | None = None, arrays: HistoryArrays | None = None,
               ) -> tuple[ScoredCandidates, np.ndarray, np.ndarray]:
        """The blend's best `candidates` and the second look's candidates (`second_look`; None: worked
        out here) reordered by the learned ranker, all above the rest, which keep the blend's order;
        with the rows rescored and their features. The trainer's batch replay calls it on
        candidates it scored itself (`columns` aligned with `scored`; `arrays`: `history` as arrays)."""
        learned = self.learned_ranker
        n = len(scored.score)
        if history and arrays is None:
            arrays = HistoryArrays.of(history)
        if second_look is None:
            second_look = self.second_look(history, cooccurrence, arrays=arrays)
        top, ranks = self._ranker_rows(scored, columns, learned.candidates, second_look)
        best = np.arange(len(top)) < min(learned.candidates, n)
        features = candidate_features(self._feature_inputs(history, query, cooccurrence, arrays),
                                      self._first_stage(scored, columns, top, ranks, best))
        learned_scores = learned.predict(features)
        score = np.asarray(scored.score, dtype=np.float64).copy()
        rest = np.ones(n, dtype=bool)
        rest[top] = False
        if rest.any():
            # Below the lowest learned score, in the blend's order.
            score[rest] = learned_scores.min() - 1.0 - (score[rest].max() - score[rest])
        score[top] = learned_scores
        return replace(scored, score=score), top, features

    def _feature_reasons(self, top: Sequence[int], context: "_UserContext") -> list[list[FeatureReason]]:
        if context.learned_features is None or self.learned_ranker is None:
            return [[] for _ in top]
        where = {int(row): k for k, row in enumerate(context.learned_rows)}
        picked = [where.get(int(i)) for i in top]
        known = [k for k in picked if k is not None]
        explained = iter(self.learned_ranker.reasons(context.learned_features[known]) if known else [])
        return [next(explained) if k is not None else [] for k in picked]

    # --------------------------------------------------------------- scoring

    def _score(self, query: RecommendQuery, rerank: bool = True, second_look: bool = False,
               ) -> tuple[list[HistoryEntry], ScoredCandidates, "_UserContext"]:
        """The history, the scored candidates (reranked by the learned ranker when there is one and
        `rerank`) and the user context; the second look's items join the candidates when the
        learned ranker reranks or `second_look` asks for them."""
        if query.k <= 0:
            raise InvalidArgument("k must be positive")
        if not math.isfinite(query.at):
            raise InvalidArgument("at must be a finite time")
        history = self.history_for(query)
        context = _UserContext.build(self, history, query)
        if ((rerank and self.learned_ranker is not None) or second_look) and history:
            context.second_look = self.second_look(history, context.cooccurrence_model,
                                                   arrays=context.history_arrays)
        banned = set(query.exclude)
        if not query.allow_repeats:
            banned.update(e.item_id for e in history)

        if query.exhaustive or not history or len(self.catalog) <= self.exhaustive_below:
            # Cold start scores trend and freshness over the whole catalog: cheap and exact.
            columns = self._filter(self._all_columns(), query, banned)
        else:
            columns = self._filter(self._candidate_columns(query, context, banned), query, banned)
            if len(columns) < query.k:
                # Filters ate the candidate pool (narrow categories, big exclude): go exhaustive.
                columns = self._filter(self._all_columns(), query, banned)
        context.columns = columns
        scored = self._components(columns, query, context)
        if rerank and self.learned_ranker is not None and len(scored.score):
            scored, context.learned_rows, context.learned_features = self.rerank(
                history, scored, query, context.columns, context.cooccurrence_model, context.second_look,
                context.history_arrays)
        return history, scored, context

    def _components(self, columns: CatalogColumns, query: RecommendQuery, context: "_UserContext") -> ScoredCandidates:
        params, at = query.params, query.at
        ids = columns.item_ids
        n = len(ids)
        zeros = np.zeros(n, dtype=np.float32)

        source, rows = columns.source, columns.rows
        # Candidates cut from the snapshot use its alignments when current (see may_refresh).
        partial = source is not None and len(rows) < len(source)

        semantic = zeros
        if context.user_vector is not None and n:
            scores = None
            aligned = source.index_labels(self.index, source.may_refresh("index", partial)) if source is not None else None
            if aligned is not None:
                labels, generation = aligned
                scores = self.index.similarities_by_label(context.user_vector, labels[rows], generation)
            if scores is None:  # not from the snapshot, or the index changed meanwhile
                scores, _ = self.index.similarities(context.user_vector, ids)
            semantic = scores

        cooccurrence = zeros
        model = context.cooccurrence_model
        if context.cooccurrence_weights and model is not None and n:
            aligned = source.cooccurrence_positions(model, source.may_refresh("cooccurrence", partial)) if source is not None else None
            positions = model.indices_of(ids) if aligned is None else aligned[rows]
            raw = model.scores_at(context.cooccurrence_weights, positions)
            peak = float(raw.max())
            context.cooccurrence_peak = peak
            if peak > 0:
                cooccurrence = (raw / peak).astype(np.float32)

        freshness = _freshness(columns.published_at, at, params.freshness_half_life_days)

        # Positions first: counts taken afterwards cover every item they can name.
        aligned = source.state_positions(self.state, source.may_refresh("state", partial)) if source is not None else None
        positions = self.state.indices_of(ids) if aligned is None else aligned[rows]
        all_counts = self.state.trend_counts(at, params.trend_window_days * _DAY)
        peak_count = int(all_counts.max(initial=0))
        trend = zeros
        if peak_count > 0 and n:
            trend = (np.log1p(_gather(all_counts, positions)) / math.log1p(peak_count)).astype(np.float32)

        # The personal terms fade with the time since the user's newest event (personal_half_life_days).
        weights = score_weights(params, history_length=context.history_length, scale=context.personal_scale)
        # Semantic as float64 makes the score float64, the precision the evaluation's figures were computed in.
        score = combine(weights, semantic.astype(np.float64), cooccurrence, freshness, trend)
        return ScoredCandidates(ids, score, semantic, cooccurrence, freshness, trend)

    @staticmethod
    def _top_k(scored: ScoredCandidates, k: int) -> np.ndarray:
        """Indices of the k best, by score then item id (deterministic under ties)."""
        n = len(scored.score)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = min(k, n)
        if k < n:
            # Everything tied with the k-th score must compete on the id tie-break.
            kth = _kth_largest(scored.score, k)
            pool = np.flatnonzero(scored.score >= kth)
        else:
            pool = np.arange(n)
        order = np.lexsort((scored.item_ids[pool].astype(str), -scored.score[pool]))
        return pool[order[:k]]

    # ------------------------------------------------------------ candidates

    def _all_columns(self) -> CatalogColumns:
        return self._catalog_snapshot().columns

    def _catalog_key(self) -> tuple[tuple, bool]:
        """(key of the catalog's current contents, whether it is a real version number)."""
        catalog = self.catalog
        if self.catalog_version is not None:
            version = self.catalog_version()
        else:
            version = getattr(catalog, "version", None)
        if version is not None:
            return (id(catalog), version), True
        return (id(catalog), len(catalog)), False

    def _catalog_snapshot(self) -> CatalogSnapshot:
        key, _ = self._catalog_key()
        cached = self._catalog_columns
        if cached is None or cached[0] != key:
            catalog = self.catalog
            items = catalog.snapshot() if hasattr(catalog, "snapshot") else list(catalog.values())
            cached = (key, CatalogSnapshot(items))
            self._catalog_columns = cached
        return cached[1]

    def _candidate_snapshot(self) -> CatalogSnapshot | None:
        """The catalog snapshot when it is current (rebuilt at most every ALIGNMENT_REFRESH_S),
        else None. A length-keyed catalog (no version) can look current while it is not, so
        candidates from it are always looked up in the live catalog."""
        key, versioned = self._catalog_key()
        if not versioned:
            return None
        cached = self._catalog_columns
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and cached[1].recently_built():
            return None
        return self._catalog_snapshot()

    def _candidate_columns(self, query: RecommendQuery, context: "_UserContext", banned: set[str]) -> CatalogColumns:
        params = query.params
        fetch = query.k * self.oversample + len(banned)
        if self.learned_ranker is not None:
            fetch = max(fetch, self.learned_ranker.candidates + len(banned))  # the ranker rescores this many
        if query.categories:
            fetch *= 4  # most hits may be in other categories
        trend_window = params.trend_window_days * _DAY
        snapshot = self._candidate_snapshot()
        if snapshot is not None:
            rows = self._candidate_rows(snapshot, query, context, fetch, trend_window)
            return snapshot.columns.take(rows)
        candidate_ids: dict[str, None] = {}
        if context.user_vector is not None:
            for item_id, _ in self.index.search(context.user_vector, fetch):
                candidate_ids[item_id] = None
        if context.cooccurrence_model is not None and context.recent_items:
            for item_id in context.cooccurrence_model.neighbour_ids(context.recent_items, self.neighbours_per_item):
                candidate_ids[item_id] = None
        for item_id, _ in self.state.trending(query.at, trend_window, query.k * self.oversample):
            candidate_ids[item_id] = None
        for item_id in context.second_look:
            candidate_ids[item_id] = None
        items = [item for item in map(self.catalog.get, candidate_ids) if item is not None]
        return CatalogColumns.of(items)

    def _candidate_rows(self, snapshot: CatalogSnapshot, query: RecommendQuery, context: "_UserContext", fetch: int,
                        trend_window: float) -> np.ndarray:
        """The snapshot rows of the index, co-occurrence and trend candidates, in row order.

        Each source gives positions (HNSW labels, co-occurrence or state positions) that the
        snapshot's cached alignments turn into rows, instead of an id per hit looked up in a
        dict (~20% of a 100k-item Recommend's CPU, py-spy); a source whose alignment is not
        current is looked up by id. Scores do not depend on the candidates' order, and ties
        are broken by id, so the ranking is the same in any order.
        """
        row_of = snapshot.row_of
        parts: list[np.ndarray] = []
        by_id: list[str] = []
        if context.user_vector is not None:
            found = self.index.search_labels(context.user_vector, fetch)
            rows = snapshot.rows_of_labels(*found) if found is not None else None
            if rows is not None:
                parts.append(rows)
            else:
                by_id.extend(item_id for item_id, _ in self.index.search(context.user_vector, fetch))
        model = context.cooccurrence_model
        if model is not None and context.recent_items:
            positions = model.neighbour_positions(context.recent_items, self.neighbours_per_item)
            rows = snapshot.rows_of_cooccurrence(model, positions)
            if rows is not None:
                parts.append(rows)
            else:
                ids = model.item_ids
                by_id.extend(ids[i] for i in positions.tolist())
        positions = self.state.trending_positions(query.at, trend_window, query.k * self.oversample)
        rows = snapshot.rows_of_state(positions)
        if rows is not None:
            parts.append(rows)
        else:
            by_id.extend(item_id for item_id, _ in self.state.trending(query.at, trend_window, query.k * self.oversample))
        by_id.extend(context.second_look)
        if by_id:
            parts.append(np.fromiter((row_of.get(i, -1) for i in by_id), dtype=np.int64, count=len(by_id)))
        rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        return rows[rows >= 0]

    @staticmethod
    def _filter(columns: CatalogColumns, query: RecommendQuery, banned: set[str]) -> CatalogColumns:
        at = query.at
        published, expires = columns.published_at, columns.expires_at
        # NaN comparisons are False, so "no published_at" / "no expires_at" pass.
        keep = ~(published > at) & ~(expires <= at)
        if query.categories:
            keep &= np.fromiter((c in query.categories for c in columns.category), dtype=bool, count=len(columns))
        if banned and len(columns):
            if columns.source is not None:
                row_of = columns.source.row_of
                banned_rows = [row_of[i] for i in banned if i in row_of]
                if columns is columns.source.columns:
                    keep[banned_rows] = False  # the whole snapshot: its rows are the positions
                elif banned_rows:
                    # Sorted banned rows searched per candidate: a mask over the whole snapshot
                    # cost O(catalog) per call (1 MB to fill at 1M items) for a few hundred rows.
                    banned_sorted = np.sort(np.asarray(banned_rows, dtype=np.int64))
                    where = np.minimum(np.searchsorted(banned_sorted, columns.rows), len(banned_sorted) - 1)
                    keep &= banned_sorted[where] != columns.rows
            else:
                keep &= np.fromiter((i not in banned for i in columns.item_ids), dtype=bool, count=len(columns))
        return columns.take(keep)

    # --------------------------------------------------------------- reasons

    def _reasons(self, item_ids: np.ndarray, context: "_UserContext") -> list[list[HistoryReason]]:
        """Per item, the top history items by semantic (long-term part) + co-occurrence contribution."""
        history_ids = context.unique_items
        if not len(item_ids) or not history_ids:
            return [[] for _ in item_ids]
        contribution = np.zeros((len(history_ids), len(item_ids)), dtype=np.float64)
        if context.long_term_scale > 0:
            # The rows the user context already gathered (an item's row is the same at each of its events).
            history_vectors = context.history_vectors[context.unique_rows]
            candidate_vectors, _ = self.index.vectors_matrix_for(list(item_ids))
            weights = np.array([context.long_term_weights.get(h, 0.0) for h in history_ids])
            contribution += context.long_term_scale * weights[:, None] * (history_vectors @ candidate_vectors.T)
        if context.cooccurrence_model is not None and context.cooccurrence_peak > 0:
            weights = np.array([context.cooccurrence_weights.get(h, 0.0) for h in history_ids])
            similarity = context.cooccurrence_model.pair_similarities(history_ids, list(item_ids))
            contribution += (context.w_cooccurrence / context.cooccurrence_peak) * weights[:, None] * similarity
        # Every column sorted at once by (contribution descending, history id); the positive
        # ones lead, so each item's reasons are its first REASONS_PER_ITEM positive rows.
        id_rank = np.empty(len(history_ids), dtype=np.int64)
        id_rank[sorted(range(len(history_ids)), key=history_ids.__getitem__)] = np.arange(len(history_ids))
        order = np.lexsort((np.broadcast_to(id_rank[:, None], contribution.shape), -contribution), axis=0)[:REASONS_PER_ITEM]
        best = np.take_along_axis(contribution, order, axis=0)
        titles: dict[str, str] = {}
        reasons = []
        for rows, values in zip(order.T.tolist(), best.T.tolist()):
            chosen = []
            for row, share in zip(rows, values):
                if not share > 0:
                    break
                h = history_ids[row]
                title = titles.get(h)
                if title is None:
                    title = titles[h] = self._title(h)
                chosen.append(HistoryReason(h, title, share))
            reasons.append(chosen)
        return reasons

    # ----------------------------------------------------------- short term

    def _short_term_vector(self, history: Sequence[HistoryEntry], query: RecommendQuery) -> tuple[np.ndarray | None, bool]:
        if query.short_term_vector is not None:
            return _unit(np.asarray(query.short_term_vector, dtype=np.float32).reshape(-1)), False
        # Keyed by (a digest of) the exact text: it changes exactly when a new event or a coarser
        # relative-time phrase would change what the encoder sees, so hits are never stale.
        text = self.short_term_text(history, query.at, query.params)
        key = text_key(text)
        cached = self._short_term_cache.get(key)
        if cached is not None:
            return cached, True
        with RECOMMEND_GATE.stepped_out():  # the encoder runs elsewhere: other calls go on meanwhile
            encoded = self.encode([text]) if query.encode_timeout is None else self.encode([text], timeout=query.encode_timeout)
        vector = _unit(np.asarray(encoded, dtype=np.float32).reshape(-1))
        if vector is not None:
            self._short_term_cache.put(key, vector)
        return vector, False


class _UserContext:
    """Everything about the user as of `at` that scoring and reasons need."""

    def __init__(self) -> None:
        self.history_length = 0
        self.user_vector: np.ndarray | None = None
        self.used_cache = False
        self.unique_items: list[str] = []
        self.recent_items: list[str] = []
        self.long_term_weights: dict[str, float] = {}
        self.long_term_scale = 0.0  # d(semantic)/d(weight·v_h·v_c) of the long-term part
        # Item vectors of the history, one row per event, and the row of each of `unique_items`.
        self.history_vectors: np.ndarray | None = None
        self.unique_rows: list[int] = []
        # One model for the whole request, though a background refit may swap it meanwhile.
        self.cooccurrence_model: CooccurrenceModel | None = None
        self.cooccurrence_weights: dict[str, float] = {}
        self.cooccurrence_peak = 0.0
        self.w_cooccurrence = 0.0
        # Weight left to the personal terms after the time since the user's newest event.
        self.personal_scale = 1.0
        # The candidates scored (after the filters), and what the learned ranker read of them.
        self.columns: CatalogColumns | None = None
        self.learned_rows: np.ndarray | None = None
        self.learned_features: np.ndarray | None = None
        # The learned ranker's second look at the whole history (TimeAwareRanker.second_look).
        self.second_look: list[str] = []
        # The history as arrays (features.HistoryArrays; None without history): the blend's
        # decays read its times and strengths, the learned ranker the rest.
        self.history_arrays: HistoryArrays | None = None

    @classmethod
    def build(cls, ranker: TimeAwareRanker, history: list[HistoryEntry], query: RecommendQuery) -> "_UserContext":
        context = cls()
        context.cooccurrence_model = ranker.cooccurrence
        context.history_length = len(history)
        if not history:
            return context
        params, at = query.params, query.at
        context.history_arrays = HistoryArrays.of(history)
        ages = at - context.history_arrays.times
        context.personal_scale = personal_scale(float(ages.min()), params.personal_half_life_days)
        context.w_cooccurrence = params.w_cooccurrence * context.personal_scale
        # Both decayed sums are used only up to scale (co-occurrence is normalised by its peak,
        # the long-term mean to unit length), so ages are taken relative to the newest event:
        # same result, and no underflow to all-zero weights when `at` is years after the history.
        ages = ages - ages.min()
        strengths = context.history_arrays.strengths
        item_ids = [e.item_id for e in history]
        context.unique_items = list(dict.fromkeys(reversed(item_ids)))  # newest first
        context.recent_items = context.unique_items[: ranker.recent_items_for_neighbours]

        # Co-occurrence counts positive feedback only (a skip is not a vote for its neighbours).
        cooccurrence_decay = _half_life_decay(ages, params.cooccurrence_half_life_days) * (strengths > 0)
        for item_id, weight in zip(item_ids, cooccurrence_decay):
            if weight > 0:
                context.cooccurrence_weights[item_id] = context.cooccurrence_weights.get(item_id, 0.0) + float(weight)

        if params.w_semantic == 0:
            return context  # the user vector would be multiplied by zero: skip the encoder

        long_term_weight = _half_life_decay(ages, params.long_term_half_life_days) * strengths
        vectors, present = ranker.index.vectors_matrix_for(item_ids)
        last_row = {item_id: row for row, item_id in enumerate(item_ids)}
        context.history_vectors, context.unique_rows = vectors, [last_row[i] for i in context.unique_items]
        long_raw = (long_term_weight * present)[None, :] @ vectors
        long_norm = float(np.linalg.norm(long_raw))
        long_term = long_raw[0] / long_norm if long_norm > 1e-12 else None

        alpha = params.alpha
        short_term = None
        if alpha > 0 or long_term is None:
            short_term, context.used_cache = ranker._short_term_vector(history, query)
        # Both parts are unit vectors before blending so α means the same for every user.
        if short_term is not None and long_term is not None:
            blend = alpha * short_term + (1.0 - alpha) * long_term
        else:
            blend = short_term if short_term is not None else long_term
        if blend is None:
            return context
        blend_norm = float(np.linalg.norm(blend))
        if blend_norm <= 1e-12:
            return context
        context.user_vector = (blend / blend_norm).astype(np.float32)
        if long_term is not None and (short_term is None or alpha < 1):
            share = (1.0 - alpha) if short_term is not None else 1.0
            context.long_term_scale = params.w_semantic * context.personal_scale * share / (long_norm * blend_norm)
            for item_id, weight, is_present in zip(item_ids, long_term_weight, present):
                if is_present:
                    context.long_term_weights[item_id] = context.long_term_weights.get(item_id, 0.0) + float(weight)
        return context
