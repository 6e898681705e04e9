"""The server's ranking replayed over the event log: evaluation of a model version and tuning of its time model."""

from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.server.core.learned_ranker import LearnedRanker
from chronorec.server.core.manifest import PARAM_BOUNDS, TimeModelParams
from chronorec.server.core.ranking import (
    RecommendQuery, ScoredCandidates, TimeAwareRanker,
)
from chronorec.server.core.scoring import COMPONENTS, WEIGHT_NAMES, personal_scale, scaled_weights, weights_of
from chronorec.server.core.timetext import HistoryEntry
from chronorec.trainer.batch_replay import ReplayScorer, chunk_split, first_occurrences, within_reach
from chronorec.trainer.forked import beside, refusing_encoder, workers_for
from chronorec.trainer.protocols import Dataset, Instances, bootstrap_ci, expected_metrics, score_instances
from chronorec.trainer.resources import release_free_heap

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]
TUNING_METRIC = "NDCG@10"


def torch_encoder(module, tokenizer, *, max_length: int, batch_size: int = 64) -> Encode:
    """`texts -> unit vectors` with a PyTorch SentenceEncoderModule, batched by length (little padding)."""

    def encode(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = module.encode_texts(tokenizer, [texts[i] for i in order], batch_size, max_length).numpy()
        out = np.empty_like(vectors)
        out[order] = vectors
        return out

    return encode


class CachedEncoder:
    """An encoder that remembers vectors by text, so the replays of one model never encode a text twice."""

    def __init__(self, encode: Encode):
        self._encode = encode
        self._vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._encode(missing)))
        return np.stack([self._vectors[t] for t in texts]) if texts else self._encode([])


class RankerReplay:
    """The server's TimeAwareRanker (exhaustive mode) over a dataset replayed in its global order.

    Each instance is scored with exactly the events before it visible — its own history and
    every other user's events, as the live server would have ingested them — and with
    co-occurrence fitted on the training events. Short-term vectors are encoded in batches
    ahead of the replay; the ranker reads them back by the exact text it writes itself.
    """

    def __init__(self, dataset: Dataset, items: Mapping[str, Item], train: np.ndarray, encode: Encode,
                 *, item_vectors: np.ndarray | None = None, cooccurrence: CooccurrenceModel | None = None,
                 learned_ranker: LearnedRanker | None = None, index: ItemIndex | None = None):
        self.dataset = dataset
        self.learned_ranker = learned_ranker
        self.items = dict(items)
        self.encode = encode
        self.item_ids = [i for i in dataset.item_ids if i in self.items]
        self.item_text_of = item_text_lookup(self.items)
        if index is not None:
            # Shared by the replays of one encoder (building the HNSW graph of 10k items takes seconds);
            # the replay only reads it.
            self.index = index
        else:
            if item_vectors is None:
                item_vectors = encode([self.item_text_of(i) for i in self.item_ids])
            self.index = build_index(self.item_ids, item_vectors)
        self.cooccurrence = cooccurrence if cooccurrence is not None else fit_cooccurrence(dataset, train, self.item_ids)
        self._vectors: dict[str, np.ndarray] = {}
        # Calls encode_later started and settle has not cached yet: (texts, their vectors' future).
        self._in_flight: list[tuple[list[str], Future]] = []
        self._column = {item_id: i for i, item_id in enumerate(dataset.item_ids)}
        self._scorer: ReplayScorer | None = None
        self._kept: np.ndarray | None = None  # per global position: does the state keep the event
        self.reset()

    def reset(self) -> None:
        self.state = InteractionState()
        self.replayed = 0
        self.ranker = TimeAwareRanker(self.items, self.index, self.state, self.cooccurrence, self._encode_known,
                                    self.item_text_of, learned_ranker=self.learned_ranker)

    def _encode_known(self, texts: list[str]) -> np.ndarray:
        self.cache_vectors(texts)
        return np.stack([self._vectors[t] for t in texts])

    def encoded(self, texts: list[str]) -> np.ndarray:
        """The vectors the ranker reads for `texts`: cached by text, the missing ones encoded in one call."""
        return self._encode_known(texts)

    def history(self, position: int, newest: int | None = None) -> list[HistoryEntry]:
        """The user's events before `position` in the global order, oldest first (what the state holds
        then: a repeated event id only once); only the `newest` of them when given."""
        d = self.dataset
        if self._kept is None:
            self._kept = first_occurrences([d.event_at(p).event_id for p in range(d.n_events)])
        earlier = d.user_events(d.user[position])[:int(d.rank_in_user[position])]
        earlier = earlier[self._kept[earlier]]
        if newest is not None:
            earlier = earlier[max(0, len(earlier) - newest):]
        return [HistoryEntry(d.item_ids[d.item[p]], e.action, e.timestamp, e.value)
                for p, e in ((int(p), d.event_at(int(p))) for p in earlier)]

    def prime(self, instances: Instances, params: TimeModelParams) -> None:
        """Encode the short-term texts of `instances` in one batch (instead of one by one in the replay)."""
        texts = []
        for position in instances.pos:
            position = int(position)
            # The ranker writes only the newest history_max_events events, so only those are built
            # (a 2,000-event history cost 2,000 objects per instance).
            history = self.history(position, newest=max(1, params.history_max_events))
            if history:
                texts.append(self.ranker.short_term_text(history, float(self.dataset.ts[position]), params))
        self.cache_vectors(texts)

    def cache_vectors(self, texts: list[str]) -> None:
        """Encode those of `texts` not cached yet, in one call (first occurrences, in order), once
        the calls in flight (encode_later) are cached."""
        missing = self.uncached(texts)
        if missing and self._in_flight:
            self.settle()
            missing = self.uncached(texts)
        if missing:
            log.debug("encoding %d texts", len(missing))
            self.store_vectors(missing, self.encode(missing))

    def encode_later(self, texts: list[str], executor: Executor) -> Future | None:
        """cache_vectors(texts) started on `executor`: the call (those of `texts` neither cached nor
        in an earlier call still in flight) is the one cache_vectors would make once those are
        cached, so every vector is the one it would give. `settle` caches them; a text the ranker
        needs before then settles first (_encode_known). Returns the call's future (None: no call)."""
        pending = {t for batch, _ in self._in_flight for t in batch}
        missing = self.uncached(texts, pending)
        if not missing:
            return None
        future = executor.submit(self.encode, missing)
        self._in_flight.append((missing, future))
        return future

    def settle(self, through: Future | None = None) -> None:
        """Wait for the calls encode_later started and cache their vectors, oldest first: all of
        them, or those up to the one of `through` (none if it is settled already)."""
        if through is not None and all(future is not through for _, future in self._in_flight):
            return
        while self._in_flight:
            texts, future = self._in_flight.pop(0)
            self.store_vectors(texts, future.result())
            if future is through:
                return

    def drop_in_flight(self) -> None:
        """Forget the calls encode_later started and nobody settled (a walk left before reaching
        them): their texts are encoded again when needed, as if never asked for."""
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()

    def uncached(self, texts: list[str], pending: "set[str] | frozenset[str]" = frozenset()) -> list[str]:
        """Those of `texts` neither cached nor in `pending` (texts already being encoded), first
        occurrences, in order: the list cache_vectors encodes in one call."""
        return [t for t in dict.fromkeys(texts) if t not in self._vectors and t not in pending]

    def store_vectors(self, texts: list[str], vectors: np.ndarray) -> None:
        """Cache `vectors`, the encoder's answer for `texts` (one call)."""
        self._vectors.update(zip(texts, vectors))

    def scorer(self) -> "ReplayScorer | None":
        """The batch form of this replay's ranker (same scores, many instances at once); None when the
        ranker reorders with a learned model, which only the per-event path runs."""
        if self.learned_ranker is not None:
            return None
        return self.first_stage()

    def first_stage(self) -> "ReplayScorer":
        """The batch form of the blend whatever the ranker: a learned ranker's first stage, which the
        learned ranker's own code then reorders (ReplayScorer.walk_candidates)."""
        if self._scorer is None:
            self._scorer = ReplayScorer(self)
        return self._scorer

    def advance(self, position: int) -> None:
        """Make the state hold exactly the events before global `position`."""
        if position < self.replayed:
            self.reset()
        d = self.dataset
        self.state.add(d.event_at(p) for p in range(self.replayed, position))
        self.replayed = position

    def gap_seconds(self, position: int) -> float:
        """Time from the user's newest earlier event to the event at `position` (inf without one)."""
        d = self.dataset
        rank = int(d.rank_in_user[position])
        if rank == 0:
            return float("inf")
        previous = int(d.user_events(d.user[position])[rank - 1])
        return float(d.ts[position] - d.ts[previous])

    def walk(self, instances: Instances) -> Iterator[tuple[int, str, float]]:
        """(row, user id, time) per instance, with the state advanced to it."""
        order = np.argsort(instances.pos, kind="stable")
        for row in order:
            position = int(instances.pos[row])
            self.advance(position)
            yield int(row), self.dataset.user_ids[self.dataset.user[position]], float(self.dataset.ts[position])

    def score(self, user_id: str, at: float, params: TimeModelParams) -> ScoredCandidates:
        query = RecommendQuery(user_id=user_id, k=10, at=at, params=params, exhaustive=True)
        return self.ranker.score_candidates(query)

    def columns_of(self, item_ids: np.ndarray) -> np.ndarray:
        column = self._column
        return np.fromiter((column[i] for i in item_ids), dtype=np.int64, count=len(item_ids))


def build_index(item_ids: Sequence[str], item_vectors: np.ndarray) -> ItemIndex:
    """The item index a replay ranks with, as the server builds it, but inserted on one thread:
    hnswlib's parallel insert gives another graph on each build (its order follows the threads), so
    approximate neighbours (the learned ranker's second look) and every model trained on them would
    change from run to run (ml-latest-small loo: the ranker's NDCG@10 0.0829-0.0888 over four runs
    of the same code); one thread gives the same graph for the same vectors (a few seconds at 10k items)."""
    index = ItemIndex(item_vectors.shape[1], initial_capacity=max(16, len(item_ids)))
    index.build(list(item_ids), item_vectors, num_threads=1)
    return index


def fit_cooccurrence(dataset: Dataset, train: np.ndarray, item_ids: Sequence[str]) -> CooccurrenceModel:
    """The server's co-occurrence model fitted on the events at global positions `train` only."""
    by_user: dict[str, list[str]] = {}
    times: dict[str, list[float]] = {}
    for position in np.asarray(train, dtype=np.int64).tolist():
        user = dataset.user_ids[dataset.user[position]]
        by_user.setdefault(user, []).append(dataset.item_ids[dataset.item[position]])
        times.setdefault(user, []).append(float(dataset.ts[position]))
    return CooccurrenceModel.fit(by_user, list(item_ids), times=times)


class ReplayRanker:
    """A `protocols.Ranker` that is the server's ranking with one encoder and one time model.

    Items the server would never return at that time (not yet published, expired, already
    seen) score -inf, so they rank last, as they are absent from a live response.
    """

    def __init__(self, encode: Encode, items: Mapping[str, Item], params: TimeModelParams,
                 *, item_vectors: np.ndarray | None = None, per_event: bool = False,
                 learned_ranker: LearnedRanker | None = None):
        self.encode = encode
        self.items = items
        self.params = params
        self.item_vectors = item_vectors
        # A version's learned ranker reorders the blend's best candidates, as the server does.
        self.learned_ranker = learned_ranker
        # True: one ranker call per event (the reference the batch form is checked against).
        self.per_event = per_event
        # Evaluation only (it reads the instances' targets): see _score_learned.
        self.rerank_reachable_only = False
        self.replay: RankerReplay | None = None

    def fit(self, train: np.ndarray, dataset: Dataset, *, index: ItemIndex | None = None,
            cooccurrence: CooccurrenceModel | None = None) -> None:
        """Build the replay over `train`; `index` and `cooccurrence` (fitted on the same events) may be shared."""
        self.replay = RankerReplay(dataset, self.items, train, self.encode, item_vectors=self.item_vectors,
                                   index=index, cooccurrence=cooccurrence, learned_ranker=self.learned_ranker)

    def score_batch(self, instances: Instances) -> np.ndarray:
        replay = self.replay
        if self.learned_ranker is not None and not self.per_event:
            return self._score_learned(instances)
        scorer = None if self.per_event else replay.scorer()
        if scorer is not None:
            return scorer.score_rows(instances, self.params, prime=True)
        replay.prime(instances, self.params)
        scores = np.full((len(instances), replay.dataset.n_items), -np.inf)
        for row, user_id, at in replay.walk(instances):
            scored = replay.score(user_id, at, self.params)
            scores[row, replay.columns_of(scored.item_ids)] = scored.score
        return scores

    def _score_learned(self, instances: Instances) -> np.ndarray:
        """score_batch with the learned ranker: the blend's candidates from the batch replay, then the
        ranker's own rerank per instance (the scores one ranker call per event gives).

        With `rerank_reachable_only`, an instance whose target the ranker does not rescore (at least
        as many candidates scored strictly above it as the ranker takes of the blend's best, and not
        in the second look) keeps the blend's scores with the second look's items lifted above
        every other: the rerank would reorder the blend's best (all above the target already) and
        the second look's items and lift them above the rest, which keep the blend's order, so the
        target's rank (the items above it and tied with it) is the same either way, and so is
        every metric computed from it. Only such rows differ from what one ranker call per event
        gives; the rerank (its features, its history text) is skipped for them (about three in
        four test events on ml-latest-small)."""
        replay = self.replay
        scorer = replay.first_stage()
        scores = np.full((len(instances), replay.dataset.n_items), -np.inf)
        wanted = None
        if self.rerank_reachable_only:
            cut = self.learned_ranker.candidates

            def wanted(row: int, scored: ScoredCandidates, columns: np.ndarray, history) -> bool:
                ranker = replay.ranker
                second: list[str] = []

                def second_look() -> list[str]:
                    second.extend(ranker.second_look(history.entries, ranker.cooccurrence, arrays=history.arrays))
                    return second

                if within_reach(scored, columns == instances.target[row], cut, second_look):
                    return True
                kept = np.asarray(scored.score, dtype=np.float64)
                if second and len(kept):
                    kept = kept.copy()
                    # The second look's items among the candidates, by data set column (np.isin
                    # over the candidates' id strings sorts ~10k Python objects per event: 13 ms).
                    index = replay.dataset.item_index
                    looked = np.fromiter((index.get(i, -1) for i in second), dtype=np.int64, count=len(second))
                    kept[np.isin(columns, looked)] = kept.max() + 1.0
                scores[row, columns] = kept
                return False

        for event in scorer.walk_candidates(instances, self.params, wanted):
            scored = event.scored
            if len(scored.score):
                # The replay's ranker as of now: walking back in time resets it (a new state and ranker).
                ranker = replay.ranker
                scored, _, _ = ranker.rerank(event.history, scored, event.query, event.columns, ranker.cooccurrence,
                                             arrays=event.arrays)
            scores[event.row, scorer.column_of_row[event.columns.rows]] = scored.score
        return scores

# ------------------------------------------------------------------------------ tuning


@dataclass(frozen=True)
class TuningGrid:
    """Values tried for each time-model parameter (days) and score weight.

    The score is scale-free, so co-occurrence is 1 or off and the other weights are relative to
    it. Co-occurrence half-lives reach down to about ten seconds: within a rating or browsing
    session the last few items predict the next one best (ML-100K's validation picks ~30 s).
    Each list also holds the value that takes time out of its term (3650 days: no decay over a
    log of years; a 365-day trend window: popularity), so the timeless blend is one of the grid's
    points and a log whose taste does not drift can be fitted as such (`tune_time_model` starts
    its search there when that corner beats the starting parameters).
    """

    alpha: tuple[float, ...] = (0.0, 0.5, 1.0)
    long_term_half_life_days: tuple[float, ...] = (1.0, 10.0, 100.0, 3650.0)
    cooccurrence_half_life_days: tuple[float, ...] = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.1, 1.0, 10.0, 3650.0)
    freshness_half_life_days: tuple[float, ...] = (3.0, 14.0, 60.0)
    trend_window_days: tuple[float, ...] = (1.0, 3.0, 7.0, 30.0, 365.0)
    w_semantic: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
    w_cooccurrence: tuple[float, ...] = (0.0, 1.0)
    w_freshness: tuple[float, ...] = (0.0, 0.05, 0.2)
    w_trend: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
    # 0: the personal terms keep their weight however long the user was away.
    personal_half_life_days: tuple[float, ...] = (0.0, 0.1, 1.0, 3.0, 7.0, 30.0)

    def weights(self) -> np.ndarray:
        """(G, 4) weight rows (semantic, co-occurrence, freshness, trend), all-zero rows dropped."""
        grid = np.array(np.meshgrid(self.w_semantic, self.w_cooccurrence, self.w_freshness, self.w_trend,
                                    indexing="ij")).reshape(4, -1).T
        return grid[grid.sum(axis=1) > 0]


@dataclass
class TuningResult:
    params: TimeModelParams
    metric: str
    value: float  # mean of `metric` with `params` over the tuning instances
    default_value: float  # the same with the starting parameters
    instances: int
    seconds: float
    trace: list[dict] = field(default_factory=list)
    # Where the coordinate ascent started: "given" (the starting parameters) or "timeless" (the
    # grid's corner without time, which scored better).
    start: str = "given"
    # `metric` of `params` on each tuning instance (0 where the target is out of reach), and each
    # one's global position: two tunings on the same instances pair up by position.
    per_instance: np.ndarray | None = None
    positions: np.ndarray | None = None

    def summary(self) -> dict:
        return {"metric": self.metric, "tuned": self.value, "untuned": self.default_value,
                "instances": self.instances, "seconds": round(self.seconds, 2), "search_start": self.start}


@dataclass
class _Components:
    """One instance's score components for every tried value, over the candidates that can matter."""

    blocks: list[np.ndarray]  # semantic, co-occurrence, freshness, trend: (values, kept candidates) each
    flat: list[np.ndarray]  # per block and value: constant over the candidates (adds the same to every score)
    target: int  # column of the target among the kept candidates; -1 when the server would not return it
    always_above: int  # pruned candidates above the target under every weighting that is not degenerate
    candidates: int  # all candidates, pruned ones included
    gap_seconds: float = float("inf")  # since the user's newest earlier event (personal_half_life_days)
    signs: list[np.ndarray] = field(default_factory=list)  # per block, _signs of each value's row
    # Candidates whose signs decide them under every tried value, kept as distinct sign columns
    # (per block, values × kinds) and how many candidates each stands for (see fold).
    folded_signs: list[np.ndarray] = field(default_factory=list)
    folded_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def fold(self) -> None:
        """Drop the components of the candidates below the target (or above it) in every component
        and value that is not zero for both: their signs alone place them under any weighting,
        and few distinct sign columns stand for thousands of them (most of a 10k-item catalogue)."""
        stacked = np.concatenate(self.signs, axis=0)
        below = ((stacked == _LOWER) | (stacked == _BOTH_ZERO)).all(axis=0)
        above = ((stacked == _HIGHER) | (stacked == _BOTH_ZERO)).all(axis=0)
        fixed = below | above
        fixed[self.target] = False
        if not fixed.any():
            return
        kinds, counts = _distinct_columns(stacked[:, fixed])
        bounds = np.cumsum([0] + [len(s) for s in self.signs])
        self.folded_signs = [kinds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.folded_counts = counts.astype(np.int64)
        keep = ~fixed
        self.target = int(np.count_nonzero(keep[:self.target]))
        self.blocks = [b[:, keep] for b in self.blocks]
        self.signs = [s[:, keep] for s in self.signs]


def _distinct_columns(signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct columns, how many columns each stands for) of a (rows, n) array of 3-bit values.

    What np.unique(signs, axis=1, return_counts=True) gives, up to the columns' order (the counts
    are summed as integers, in any order): np.unique over columns sorts them as opaque byte
    strings, ~30 ms for a 10k-item catalogue; here each column is packed into 64-bit words (21
    values each) and the words are numbered with 1-d sorts, ~1 ms."""
    rows, n = signs.shape
    key = np.zeros(n, dtype=np.int64)
    for start in range(0, rows, 21):
        word = np.zeros(n, dtype=np.uint64)
        for k, row in enumerate(signs[start:start + 21]):
            word |= row.astype(np.uint64) << np.uint64(3 * k)
        values, inverse = np.unique(word, return_inverse=True)
        # Number the (columns so far, this word) pairs densely: the key stays below n².
        key = np.unique(key * len(values) + inverse.reshape(-1), return_inverse=True)[1].reshape(-1)
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    return signs[:, first], counts


def _metric_cutoff(metric: str) -> int | None:
    """K of "HR@K" or "NDCG@K" (a metric that is 0 once K candidates are above the target), else None."""
    name, _, k = metric.partition("@")
    return int(k) if name in ("HR", "NDCG") and k.isdigit() else None


_UINT16_MAX = int(np.iinfo(np.uint16).max)
# Candidates scored per numpy pass of _WeightProduct.rank_counts_many (× 252 rows × 4 bytes per array).
_MANY_MAX_SCORED = 16_384
# ... and an instance with at least this many is counted on its own.
_MANY_ALONE = 1_024
# Instances per rank_counts_many call of the tuning's search.
_SEARCH_SLICE = 256


# Float32's unit roundoff, and margins against it: a candidate whose component differs from the
# target's by more than _MARGIN·u·(|x| + |x_target|) is on that side of it in every weighted sum the
# tuning computes (4 roundings each, so at most ~4u·Σ w·|x| of error per score; twice that per
# difference, with room to spare). Differences below _FLOOR are left to the exact computation, and
# weights below _MIN_WEIGHT (a personal weight times a tiny personal scale) too: then w·|difference|
# stays far above float32's subnormal range, where rounding errors stop being relative.
_UNIT_ROUNDOFF = 2.0 ** -24
_MARGIN = 16.0
_FLOOR = 2.0 ** -60
_MIN_WEIGHT = 2.0 ** -80
_BITS = np.array([1, 2, 4, 8])
# _HITS[R, S]: does a row with nonzero weights R (4-bit mask) weigh a component in S?
_HITS = (np.arange(16)[:, None] & np.arange(16)[None, :]) != 0


class _WeightProduct:
    """Weight rows seen as a product of each column's distinct values.

    combine() adds w_s·s + w_c·c + w_f·f + w_t·t left to right in float32, so w_s·s + w_c·c is the
    same for every row sharing (w_s, w_c), and so on: computed once per distinct prefix and
    broadcast, the grid's 250 rows cost ~330 row operations instead of ~1,750, with exactly the
    same float32 operations, hence the same scores, as combine() row by row.

    Most candidates need no score at all: one below the target in every component that is not
    zero for both (by more than rounding can undo) is below it under every row that weighs such a
    component, and tied with it (both sums exactly 0 there) under every other row; likewise
    above. Those are counted by which components they differ in; only the rest are scored
    (on ml-latest-small ~12% of the candidates, on ML-100K ~half).
    """

    def __init__(self, rows: np.ndarray):
        uniques = [np.unique(rows[:, k], return_inverse=True) for k in range(4)]
        self.values = [u for u, _ in uniques]
        self.shape = tuple(len(u) for u in self.values)
        self.row_index = np.ravel_multi_index(tuple(inverse for _, inverse in uniques), self.shape)
        self.hits = self._hits(self.values)
        self.min_weight = _min_positive(rows)

    def _hits(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """_HITS of each product row: which components it weighs."""
        support = sum(_BITS[k] * (v != 0).reshape([-1 if j == k else 1 for j in range(4)])
                      for k, v in enumerate(values)).reshape(-1)
        return _HITS[support]

    def scale_key(self, scale: float) -> tuple:
        """What rank_counts_many does differently at `scale` besides the arithmetic: whether the
        sign argument holds, and which scaled weight values are zero. Instances with the same key can
        share a rank_counts_many call."""
        factor = np.array(scale, dtype=np.float32)
        zero = tuple(bool(x) for k in range(2) for x in (self.values[k] * factor == 0)) if scale != 1.0 else ()
        return _prunable(scale, self.min_weight), zero

    def rank_counts_many(self, instances: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray], int,
                                                         tuple[Sequence[np.ndarray], np.ndarray] | None]],
                         scales: Sequence[float], max_scored: int = _MANY_MAX_SCORED) -> tuple[np.ndarray, np.ndarray]:
        """(rows × instances) better and tied counts. Instance j is (blocks, signs, target,
        folded): its kept candidates' four components (one value row each, float32), their _signs
        rows, the target's column among them, and the (signs, counts) of the candidates
        `_Components.fold` took out, or None. Column j counts, per weight row scaled by scales[j]
        (the personal weights times float32(scales[j])), the candidates scored strictly above the
        target by combine()'s float32 sum and those tied with it, folded candidates included. The
        instances' scales must share one `scale_key`.

        Candidates the sign argument decides (see the class) are counted by sign pattern; the rest
        are scored. The instances' candidates are handled as one concatenation, so each numpy call
        covers many instances (one instance's ~20 calls on a few hundred candidates cost more than
        their arithmetic), with the same float32 operations on each candidate as combine()."""
        m = len(instances)
        rows = len(self.row_index)
        if not m:
            return np.zeros((rows, 0), dtype=np.int64), np.zeros((rows, 0), dtype=np.int64)
        keys = {self.scale_key(float(x)) for x in scales}
        if len(keys) != 1:
            raise ValueError("rank_counts_many takes instances whose scales share one scale_key")
        prunable = next(iter(keys))[0]
        lengths = np.array([len(inst[1][0]) for inst in instances], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        targets = starts + np.array([inst[2] for inst in instances], dtype=np.int64)
        blocks = [np.concatenate([inst[0][k] for inst in instances]) for k in range(4)]
        scale_of = np.array(scales, dtype=np.float64)
        factors = np.repeat(scale_of.astype(np.float32), lengths)  # per candidate, float32(scale)
        scaled = bool((scale_of != 1.0).any())
        first_factor = np.array(scale_of[0], dtype=np.float32)
        values = [v * first_factor if k < 2 and scale_of[0] != 1.0 else v for k, v in enumerate(self.values)]
        product = len(values[0]) * len(values[1]) * len(values[2]) * len(values[3])
        extra_above = np.zeros((product, m), dtype=np.int64)
        extra_tied = np.zeros((product, m), dtype=np.int64)
        if prunable:
            pattern = _pattern([np.concatenate([inst[1][k] for inst in instances]) for k in range(4)])
            segment = np.repeat(np.arange(m), lengths)
            counts = np.bincount(segment * _PATTERNS + pattern, minlength=m * _PATTERNS).reshape(m, _PATTERNS)
            counts[np.arange(m), pattern[targets]] -= 1
            folded = [(j, inst[3]) for j, inst in enumerate(instances) if inst[3] is not None and len(inst[3][1])]
            if folded:
                kinds = [_pattern(f[0]).astype(np.int64) for _, f in folded]
                where = np.concatenate([j * _PATTERNS + k for (j, _), k in zip(folded, kinds)])
                weight = np.concatenate([f[1] for _, f in folded])
                counts += np.bincount(where, weights=weight, minlength=m * _PATTERNS).astype(np.int64).reshape(
                    m, _PATTERNS)
            below = counts[:, _BELOW_PATTERNS] @ _BELOW_MASKS
            above = counts[:, _ABOVE_PATTERNS] @ _ABOVE_MASKS
            same = all(((v != 0) == (u != 0)).all() for v, u in zip(values, self.values))
            hits = (self.hits if same else self._hits(values)).astype(np.int64)
            extra_above = hits @ above.T
            extra_tied = (1 - hits) @ (above + below).T
            scored = _UNDECIDED[pattern]
            scored[targets] = True
            kept = np.flatnonzero(scored)
            blocks = [b[kept] for b in blocks]
            factors = factors[kept]
            targets = np.searchsorted(kept, targets)
            lengths = np.add.reduceat(scored, starts, dtype=np.int64)
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        elif any(inst[3] is not None for inst in instances):
            raise AssertionError("candidates were folded for a scale the sign argument does not cover")
        better = np.zeros((product, m), dtype=np.int64)
        tied = np.zeros((product, m), dtype=np.int64)
        # Instances in slices of at most `max_scored` candidates (the (rows, candidates) arrays stay
        # small); one with `_MANY_ALONE` or more is a slice of its own, compared with its target's
        # column directly (its arithmetic outweighs a numpy call's overhead; the per-slice form
        # writes every target's column out and sums by segment, ~2x the work per candidate).
        first = 0
        while first < m:
            last = first + 1
            total = int(lengths[first])
            if total < _MANY_ALONE:
                while last < m and lengths[last] < _MANY_ALONE and total + int(lengths[last]) <= max_scored:
                    total += int(lengths[last])
                    last += 1
            a, b = int(starts[first]), int(starts[first]) + total
            if scaled:
                # (value × float32(scale)) × component, per candidate: scaled_weights' product, then
                # combine()'s (a scale of 1 multiplies by 1.0, which changes nothing).
                products = [((v[:, None] * factors[None, a:b]) if k < 2 else v[:, None]) * block[a:b]
                            for k, (v, block) in enumerate(zip(self.values, blocks))]
            else:
                products = [v[:, None] * block[a:b] for v, block in zip(values, blocks)]
            n = b - a
            partial = products[0][:, None, :] + products[1][None, :, :]
            partial = partial[:, :, None, :] + products[2][None, None, :, :]
            scores = (partial[:, :, :, None, :] + products[3][None, None, None, :, :]).reshape(-1, n)
            count_type = np.uint16 if n < _UINT16_MAX else np.int64
            if last == first + 1:
                reference = scores[:, targets[first] - a:targets[first] - a + 1]
                better[:, first] = np.add.reduce(scores > reference, axis=1, dtype=count_type)
                tied[:, first] = np.add.reduce(scores == reference, axis=1, dtype=count_type).astype(np.int64) - 1
            else:
                local = starts[first:last] - a
                reference = np.repeat(scores[:, targets[first:last] - a], lengths[first:last], axis=1)
                better[:, first:last] = np.add.reduceat((scores > reference).view(np.uint8), local, axis=1,
                                                        dtype=count_type)
                tied[:, first:last] = np.add.reduceat((scores == reference).view(np.uint8), local, axis=1,
                                                      dtype=count_type).astype(np.int64) - 1
            first = last
        better += extra_above
        tied += extra_tied
        return better[self.row_index], tied[self.row_index]


def _min_positive(rows: np.ndarray) -> float:
    positive = rows[rows > 0]
    return float(positive.min()) if len(positive) else 1.0


def _prunable(scale: float, min_weight: float) -> bool:
    """Whether the sign argument holds at this personal scale: every nonzero weight stays at or
    above _MIN_WEIGHT (a scale that rounds to 0 in float32 zeroes the personal weights exactly)."""
    return scale == 1.0 or float(np.float32(scale)) == 0.0 or min_weight * min(scale, 1.0) >= _MIN_WEIGHT


_LOWER, _HIGHER, _BOTH_ZERO = 1, 2, 4


def _signs(block: np.ndarray, target: int) -> np.ndarray:
    """Per value row and candidate of one component: _LOWER or _HIGHER than the target's by more
    than rounding can undo, _BOTH_ZERO, or 0 (close: only an exact sum can tell)."""
    x = block.astype(np.float64)
    reference = x[:, target:target + 1]
    difference = x - reference  # exact: float32 values differ exactly in float64
    margin = np.maximum(_MARGIN * _UNIT_ROUNDOFF * (np.abs(x) + np.abs(reference)), _FLOOR)
    out = np.where(difference < -margin, _LOWER, 0).astype(np.uint8)
    out |= np.where(difference > margin, _HIGHER, 0).astype(np.uint8)
    out |= np.where((x == 0) & (reference == 0), _BOTH_ZERO, 0).astype(np.uint8)
    return out


def _pattern(signs: Sequence[np.ndarray]) -> np.ndarray:
    """The four components' signs of each candidate as one 12-bit pattern."""
    return (signs[0].astype(np.uint16) | (signs[1].astype(np.uint16) << 3) | (signs[2].astype(np.uint16) << 6)
            | (signs[3].astype(np.uint16) << 9))


def _pattern_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of the 8⁴ patterns of four components' signs (3 bits each): whether the candidate
    needs its exact score, and else the mask of components it is below in, or above in."""
    codes = (np.arange(8 ** 4)[:, None] >> (3 * np.arange(4))[None, :]) & 7
    lower = ((codes == _LOWER) * _BITS).sum(axis=1)
    higher = ((codes == _HIGHER) * _BITS).sum(axis=1)
    undecided = ~np.isin(codes, (_LOWER, _HIGHER, _BOTH_ZERO)).all(axis=1) | ((lower != 0) & (higher != 0))
    return undecided, lower, higher


_UNDECIDED, _LOWER_IN, _HIGHER_IN = _pattern_tables()
_PATTERNS = 8 ** 4
# The sign argument's sums as matrices: (patterns decided below in some components and above in
# none) × (the 16 masks of components), 1 where the pattern is below in exactly that mask; the same
# for above. Counts of patterns times them give each instance's per-mask counts, as integers.
_BELOW_PATTERNS = np.flatnonzero(~_UNDECIDED & (_HIGHER_IN == 0))
_BELOW_MASKS = (_LOWER_IN[_BELOW_PATTERNS][:, None] == np.arange(16)[None, :]).astype(np.int64)
_ABOVE_PATTERNS = np.flatnonzero(~_UNDECIDED & (_HIGHER_IN != 0))
_ABOVE_MASKS = (_HIGHER_IN[_ABOVE_PATTERNS][:, None] == np.arange(16)[None, :]).astype(np.int64)


def _with_values(base: TimeModelParams, **values: float) -> TimeModelParams:
    return base.with_overrides(values)


def _collect(blocks: list[np.ndarray], target: int) -> _Components:
    """Keep only the candidates whose rank against the target depends on the weights.

    Rows constant over the candidates add the same to every score and are left out of the test.
    A candidate below the target in every other row of every tried value stays below under any
    non-negative weights that touch such a row; one above in all of them stays above. With weight
    only on constant rows every score is equal: `evaluate` counts that case as all tied.
    """
    flat = [np.ptp(b, axis=1) == 0 for b in blocks]
    varying = np.concatenate([b[~f] for b, f in zip(blocks, flat)], axis=0)
    n = blocks[0].shape[1]
    if not len(varying):
        return _Components(blocks, flat, target, 0, n)
    difference = varying - varying[:, target : target + 1]
    below = (difference < 0).all(axis=0)
    above = (difference > 0).all(axis=0)
    keep = ~(below | above)
    keep[target] = True
    return _Components([b[:, keep] for b in blocks], flat, int(np.count_nonzero(keep[:target])), int(above.sum()), n)


def _components_beside(components: Callable[[int, int], list], n: int, replay: "RankerReplay",
                       workers: int | None) -> list:
    """`components(0, n)`, the instances split at a chunk boundary between this process and a forked
    one when `workers` allow: the replay's chunks are independent of each other (each reads the data
    set as of its instances, no state advanced), so each half computes exactly what one pass would.
    The history texts are encoded already (`prime`); a child that needs the encoder fails, and its
    half is then computed here."""
    split = chunk_split(n)  # this process takes the first part
    if workers_for(workers) < 2 or split is None:
        return components(0, n)
    first, later = beside(functools.partial(components, 0, split), functools.partial(components, split, n),
                          name="tuning replay", in_child=refusing_encoder(replay))
    return first + later


def tune_time_model(
    replay: RankerReplay,
    instances: Instances,
    base: TimeModelParams,
    grid: TuningGrid | None = None,
    *,
    metric: str = TUNING_METRIC,
    max_instances: int | None = 1000,
    rounds: int = 2,
    seed: int = 0,
    search_threads: int | None = None,
    replay_workers: int | None = None,
) -> TuningResult:
    """Choose α, the half-lives, the trend window and the score weights that maximise `metric` on `instances`.

    The replay runs once: per instance, the ranker scores every catalog item for a handful of
    parameter settings that together cover every value of the grid (the components of one
    parameter do not depend on the others), and the components are kept. Weights are then
    searched exhaustively with numpy for each value of one parameter at a time (coordinate
    ascent over `rounds` rounds), never calling the ranker again: the instances are counted in
    slices of up to _SEARCH_SLICE (`_WeightProduct.rank_counts_many`), `search_threads` slices at
    once (None: every core; the counts are integers, the same whatever the threads). The replay's
    later chunks run in a forked process when `replay_workers` (None: up to two by the CPUs) allow
    (`_components_beside`): the same components either way.
    """
    grid = grid or TuningGrid()
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    if max_instances is not None and len(instances) > max_instances:
        instances = instances[np.sort(rng.choice(len(instances), max_instances, replace=False))]

    def values(name: str) -> list[float]:
        low, high = PARAM_BOUNDS[name]
        tried = [float(v) for v in getattr(grid, name) if low <= v <= high]
        return list(dict.fromkeys(tried + [float(getattr(base, name))]))

    alphas, long_terms = values("alpha"), values("long_term_half_life_days")
    # With α = 1 the long-term half-life has no effect: one setting covers it.
    semantic_configs = list(dict.fromkeys((a, h if a < 1.0 else long_terms[0]) for a in alphas for h in long_terms))
    cooccurrence_values = values("cooccurrence_half_life_days")
    freshness_values = values("freshness_half_life_days")
    trend_values = values("trend_window_days")
    personal_values = values("personal_half_life_days")
    passes = max(len(semantic_configs), len(cooccurrence_values), len(freshness_values), len(trend_values))
    # Components are computed whatever the weights, except semantic, which needs a non-zero weight.
    collecting = base.with_overrides({"w_semantic": 1.0})
    settings = [
        _with_values(collecting, alpha=semantic_configs[p % len(semantic_configs)][0],
                     long_term_half_life_days=semantic_configs[p % len(semantic_configs)][1],
                     cooccurrence_half_life_days=cooccurrence_values[p % len(cooccurrence_values)],
                     freshness_half_life_days=freshness_values[p % len(freshness_values)],
                     trend_window_days=trend_values[p % len(trend_values)])
        for p in range(passes)
    ]

    # Pass p used value p of every list it is longer than, so value v of a list is in pass v.
    counts = (len(semantic_configs), len(cooccurrence_values), len(freshness_values), len(trend_values))
    # With HR@K or NDCG@K, an instance with K candidates above the target under every weighting
    # scores 0 whatever the weights (only weight on flat rows, which ties everything, can change it):
    # its components are not kept (a third to a half of the instances on a 10k-item catalogue).
    cutoff = _metric_cutoff(metric)
    collected: list[_Components | None] = []

    # The smallest nonzero weight any tried row can have: _prunable's bound.
    min_weight = min(_min_positive(grid.weights()), _min_positive(weights_of(base)))

    def kept(parts: _Components) -> _Components:
        if cutoff is not None and parts.always_above >= cutoff:
            parts.blocks = []
        else:
            parts.signs = [_signs(block, parts.target) for block in parts.blocks]
            if all(_prunable(personal_scale(parts.gap_seconds, h), min_weight) for h in personal_values):
                parts.fold()
        return parts
    scorer = replay.scorer()
    if scorer is None:
        replay.prime(instances, collecting)
        walked_rows: list[int] = []
        for row, user_id, at in replay.walk(instances):
            walked_rows.append(row)
            scored = [replay.score(user_id, at, setting) for setting in settings]
            target_id = replay.dataset.item_ids[instances.target[row]]
            hits = np.flatnonzero(scored[0].item_ids == target_id)
            if not len(hits):
                collected.append(None)  # the server would never return the target: a miss under every setting
                continue
            blocks = [np.stack([getattr(scored[v], name) for v in range(count)]) for name, count in zip(COMPONENTS, counts)]
            parts = _collect([b.astype(np.float32) for b in blocks], int(hits[0]))
            parts.gap_seconds = replay.gap_seconds(int(instances.pos[row]))
            collected.append(kept(parts))
        collected_positions = np.asarray(instances.pos, dtype=np.int64)[np.asarray(walked_rows, dtype=np.int64)]
    else:
        # The same components from the batch form of the ranker, each computed only for the passes
        # that read it, in the walk's order (the search below sums the instances in that order).
        texts = scorer.prime(instances, collecting)
        order = np.argsort(instances.pos, kind="stable")
        walked, walked_texts = instances[order], texts.reordered(order)

        def components(begin: int, end: int) -> list[_Components | None]:
            """The kept components of walked instances [begin, end) (begin: a chunk's first)."""
            out: list[_Components | None] = []
            for _part, chunk in scorer.chunks(walked[begin:end], walked_texts.part(slice(begin, end))):
                for i in range(len(chunk)):
                    rows = chunk.rows_kept(i)
                    target_row = scorer.row_of_column[chunk.instances.target[i]]
                    hit = int(np.searchsorted(rows, target_row))
                    if target_row < 0 or hit >= len(rows) or rows[hit] != target_row:
                        out.append(None)
                        continue
                    blocks = [np.stack([getattr(chunk, name)(i, settings[v]) for v in range(count)])
                              for name, count in zip(COMPONENTS, counts)]
                    parts = _collect(blocks, hit)
                    parts.gap_seconds = replay.gap_seconds(int(chunk.instances.pos[i]))
                    out.append(kept(parts))
            return out

        collected = _components_beside(components, len(walked), replay, replay_workers)
        collected_positions = np.asarray(walked.pos, dtype=np.int64)
    collect_seconds = time.perf_counter() - started

    # A component flat in every instance (freshness on a catalog without publication times) cannot
    # change any ranking: its weight and half-life keep their starting values and are not searched.
    present = [c for c in collected if c is not None]
    inert = [all(c.flat[k].all() for c in present) for k in range(4)]
    weights = grid.weights()
    weights[:, inert] = 0.0
    weights = np.unique(weights[weights.sum(axis=1) > 0], axis=0)
    if not len(weights):
        weights = np.eye(4)[[0]]

    threads = max(1, min(search_threads or os.cpu_count() or 1, os.cpu_count() or 1))

    def evaluate(choice: tuple[int, ...], weight_rows: np.ndarray, per_instance: bool = False) -> np.ndarray:
        """Mean `metric` per weight row for one choice of (semantic, co-occurrence, freshness, trend,
        personal half-life) values (`per_instance`: (rows, instances in reach) values instead)."""
        all_rows = weight_rows.astype(np.float32)
        product = _WeightProduct(all_rows)
        half_life = personal_values[choice[4]]
        better = np.zeros((len(weight_rows), len(present)), dtype=np.int64)
        tied = np.zeros_like(better)

        # Per instance: whether the instance can score at all, its personal scale and which rows are
        # degenerate (weight only on rows constant over the candidates: every score equal, every
        # candidate tied).
        scales = [personal_scale(parts.gap_seconds, half_life) for parts in present]
        by_scale: dict[tuple, list[int]] = {}
        for j, parts in enumerate(present):
            if cutoff is not None and parts.always_above >= cutoff:
                better[:, j] = parts.always_above
            else:
                by_scale.setdefault(product.scale_key(scales[j]), []).append(j)

        def count(members: list[int]) -> None:
            # The server's formula, once per weight row, in float32 (the kept components' dtype);
            # the ranker scales the personal weights by the time since the user's newest event.
            inputs = []
            for j in members:
                parts = present[j]
                folded = ([parts.folded_signs[k][v] for k, v in enumerate(choice[:4])], parts.folded_counts
                          ) if len(parts.folded_counts) else None
                inputs.append(([parts.blocks[k][v] for k, v in enumerate(choice[:4])],
                               [parts.signs[k][v] for k, v in enumerate(choice[:4])], parts.target, folded))
            b, t = product.rank_counts_many(inputs, [scales[j] for j in members])
            better[:, members] = b + np.array([present[j].always_above for j in members])
            tied[:, members] = t

        if not present:
            return np.zeros((len(weight_rows), 0) if per_instance else len(weight_rows))
        groups = [members[a:a + _SEARCH_SLICE] for members in by_scale.values()
                  for a in range(0, len(members), _SEARCH_SLICE)]
        if threads == 1:
            for members in groups:
                count(members)
        else:
            # Each slice writes only its own columns; numpy releases the GIL in the big comparisons.
            with ThreadPoolExecutor(max_workers=threads) as workers:
                list(workers.map(count, groups))
        degenerate_rows: dict[tuple, np.ndarray] = {}
        for j, parts in enumerate(present):
            flat = tuple(bool(parts.flat[k][v]) for k, v in enumerate(choice[:4]))
            key = (scales[j], flat)
            if key not in degenerate_rows:
                degenerate_rows[key] = scaled_weights(all_rows, scales[j])[:, ~np.array(flat)].sum(axis=1) <= 0
            degenerate = degenerate_rows[key]
            if degenerate.any():
                better[degenerate, j] = 0
                tied[degenerate, j] = parts.candidates - 1
        values = expected_metrics(better, tied)[metric]
        if per_instance:
            return values
        # Summed instance after instance (a running sum, as a loop adds them; a pairwise sum would
        # round differently and could change which row wins a near tie).
        total = np.cumsum(values, axis=1)[:, -1]
        return total / max(1, len(collected))

    def index_of(options: list[float], value: float) -> int:
        return options.index(float(value))

    start_choice = (
        semantic_configs.index((base.alpha, base.long_term_half_life_days if base.alpha < 1.0 else long_terms[0])),
        index_of(cooccurrence_values, base.cooccurrence_half_life_days),
        index_of(freshness_values, base.freshness_half_life_days),
        index_of(trend_values, base.trend_window_days),
        index_of(personal_values, base.personal_half_life_days),
    )
    base_weights = weights_of(base)[None, :]
    default_value = float(evaluate(start_choice, base_weights)[0])

    option_counts = (len(semantic_configs), len(cooccurrence_values), len(freshness_values), len(trend_values),
                     len(personal_values))
    fixed = list(inert) + [False]  # the personal half-life acts through the weights, never inert by itself
    # Each slot's sweep passes through the current choice, and the second round retries choices the
    # first one scored: a choice's best row and mean are kept (evaluate is deterministic), so each
    # distinct choice is counted once (about a third of the calls).
    scored: dict[tuple[int, ...], tuple[int, float]] = {}

    def best_of(key: tuple[int, ...]) -> tuple[int, float]:
        if key not in scored:
            means = evaluate(key, weights)
            g = int(np.argmax(means))
            scored[key] = (g, float(means[g]))
        return scored[key]

    # Coordinate ascent from the starting parameters, or from the grid's timeless corner (α 0, the
    # longest half-lives and trend window, no personal fading) when that scores better with its best
    # weights: on a log whose taste does not drift, the decayed terms are weak one at a time and the
    # ascent from decayed settings turns them off (weight 0) rather than reaching the long
    # half-lives they would need together. Either way the result scores at least as well as the
    # timeless blend does on these instances.
    timeless_semantic = (0.0, max(long_terms))
    corner_options = (
        semantic_configs.index(timeless_semantic) if timeless_semantic in semantic_configs else start_choice[0],
        int(np.argmax(cooccurrence_values)),
        start_choice[2],  # freshness: the weight rows searched at the corner include 0, the timeless blend's
        int(np.argmax(trend_values)),
        personal_values.index(0.0) if 0.0 in personal_values else start_choice[4],
    )
    corner = tuple(start_choice[slot] if fixed[slot] else option for slot, option in enumerate(corner_options))
    from_corner = corner != start_choice and best_of(corner)[1] > best_of(start_choice)[1] + 1e-12
    choice = list(corner if from_corner else start_choice)
    best_value, best_weights = -1.0, base_weights[0]
    trace: list[dict] = []
    for round_number in range(max(1, rounds)):
        improved = False
        for slot, count in enumerate(option_counts):
            if fixed[slot] and round_number:
                continue
            for option in range(count if not fixed[slot] else 1):
                trial = list(choice)
                trial[slot] = option if not fixed[slot] else start_choice[slot]
                g, mean = best_of(tuple(trial))
                if mean > best_value + 1e-12:
                    best_value, best_weights, choice, improved = mean, weights[g], trial, True
            trace.append({"round": round_number, "slot": slot, "best": best_value})
        if not improved:
            break
    per_instance = np.zeros(len(collected))
    per_instance[[j for j, parts in enumerate(collected) if parts is not None]] = \
        evaluate(tuple(choice), best_weights[None, :], per_instance=True)[0]
    if threads > 1:
        release_free_heap()  # the worker threads' arenas held the slices' temporaries
    # Inert components keep the starting weight: harmless here, and meaningful once they vary.
    best_weights = np.where(inert, base_weights[0], best_weights)

    alpha, long_term = semantic_configs[choice[0]]
    tuned = base.with_overrides({
        "alpha": alpha, "long_term_half_life_days": long_term,
        "cooccurrence_half_life_days": cooccurrence_values[choice[1]],
        "freshness_half_life_days": freshness_values[choice[2]],
        "trend_window_days": trend_values[choice[3]],
        "personal_half_life_days": personal_values[choice[4]],
        **{name: float(weight) for name, weight in zip(WEIGHT_NAMES, best_weights)},
    })
    seconds = time.perf_counter() - started
    log.info("tuned the time model on %d instances in %.1f s (replay %.1f s): %s %.4f (untuned %.4f)%s",
             len(instances), seconds, collect_seconds, metric, best_value, default_value,
             "; searched from the timeless corner" if from_corner else "")
    return TuningResult(tuned, metric, best_value, default_value, len(instances), seconds, trace,
                        "timeless" if from_corner else "given", per_instance, collected_positions)


def paired_tuning_gain(a: TuningResult, b: TuningResult, user_of: np.ndarray) -> tuple[float, float, float]:
    """(mean of a − b, its 95 % bootstrap interval, users resampled) over the instances two tunings
    scored, each with its own parameters, paired by position: they must have tuned on the same
    instances (`user_of`: the user of each position)."""
    order_a, order_b = np.argsort(a.positions, kind="stable"), np.argsort(b.positions, kind="stable")
    positions = a.positions[order_a]
    if not np.array_equal(positions, b.positions[order_b]):
        raise ValueError("the two tunings scored different instances")
    if not len(positions):
        return 0.0, 0.0, 0.0
    difference = a.per_instance[order_a] - b.per_instance[order_b]
    low, high = bootstrap_ci(difference, clusters=np.asarray(user_of)[positions])
    return float(difference.mean()), float(low), float(high)


@dataclass(frozen=True)
class HeldOutGain:
    """Two tuned blends compared on validation instances neither was tuned on (held_out_gain)."""

    a: float  # mean NDCG@10 of blend a
    b: float
    difference: float  # mean of a − b
    low: float  # its 95 % bootstrap interval, users resampled
    high: float
    instances: int
    held_out: bool = True  # False: compared on the instances both were tuned on (compare_tuned_blends)


def compare_tuned_blends(a: TuningResult, b: TuningResult, user_of: np.ndarray,
                         held: "HeldOutGain | None") -> HeldOutGain:
    """`held` (held_out_gain of the two blends) when there is one, else the two tunings' own paired
    gain on the instances they were both tuned on (paired_tuning_gain), with `held_out` False."""
    if held is not None:
        return held
    gain, low, high = paired_tuning_gain(a, b, user_of)
    return HeldOutGain(a.value, b.value, gain, low, high, a.instances, held_out=False)


def held_out_gain(a, b, instances: Instances, tuned: Sequence[np.ndarray], max_instances: int | None, seed: int,
                  batch_size: int = 1024) -> HeldOutGain | None:
    """Two blends (fitted rankers, protocols.Ranker, each with its tuned time model: a ReplayRanker,
    say) scored on `instances` less those any of them was tuned on (`tuned`: each tuning's
    positions), up to `max_instances` of them (a seeded draw): the paired NDCG@10 difference a − b.
    A blend's figure on the instances its own time model was tuned on is its own fit's, so only
    these compare two tuned blends fairly. None when no instance is left."""
    seen = np.concatenate([np.asarray(t, dtype=np.int64) for t in tuned]) if tuned else np.zeros(0, np.int64)
    rest = np.flatnonzero(~np.isin(instances.pos, seen))
    if not len(rest):
        return None
    if max_instances is not None and len(rest) > max_instances:
        rest = np.sort(np.random.default_rng(seed).choice(rest, max_instances, replace=False))
    held = instances[rest]
    values = [score_instances(ranker, held, batch_size)["NDCG@10"] for ranker in (a, b)]
    difference = values[0] - values[1]
    low, high = bootstrap_ci(difference, clusters=held.user)
    return HeldOutGain(float(values[0].mean()), float(values[1].mean()), float(difference.mean()), float(low),
                       float(high), len(rest))


__all__ = [
    "CachedEncoder",
    "HeldOutGain",
    "ReplayRanker",
    "RankerReplay",
    "TuningGrid",
    "TuningResult",
    "build_index",
    "compare_tuned_blends",
    "fit_cooccurrence",
    "held_out_gain",
    "paired_tuning_gain",
    "torch_encoder",
    "tune_time_model",
]
