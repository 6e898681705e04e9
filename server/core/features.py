"""Point-in-time features of Recommend's candidates for the learned ranker: one code for serving and training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Sequence

import numpy as np

from chronorec.client.rules import SECONDS_PER_DAY as _DAY
from chronorec.server.core.cooccurrence import SESSION_GAP_S, CooccurrenceModel, session_starts
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.timetext import HistoryEntry, action_strength

_HOUR = 3600.0
# Co-occurrence with the history weighted by each event's age at these half-lives: a minute
# (the items just rated in this session) to two months (the user's taste).
COOCCURRENCE_HALF_LIVES_S = {"1m": 60.0, "1h": _HOUR, "1d": _DAY, "7d": 7 * _DAY, "60d": 60 * _DAY}
# Popularity over these windows before `at`, as a share of all events in the window.
TREND_WINDOWS_S = {"1h": _HOUR, "1d": _DAY, "7d": 7 * _DAY, "30d": 30 * _DAY}
# Category profile of the history at these half-lives (None: every event alike).
CATEGORY_HALF_LIVES_S = {"1h": _HOUR, "all": None}
# Transitions read the newest few events; each older one counts half as much as the next.
TRANSITION_EVENTS = 5
# The newest history items the pairwise features read: a long history costs O(items × candidates).
MAX_HISTORY_ITEMS = 200
# Semantic similarity to the newest few history items, the largest of them.
RECENT_ITEMS = 5
# The newest events the category profile reads (a per-event loop in Python: 0.5 ms per 500).
MAX_CATEGORY_EVENTS = 500

# Features also given as their rank among the candidates (see FEATURE_NAMES).
RANKED_FEATURES: tuple[str, ...] = (
    "trend_1d", "trend_7d", "trend_30d", "popularity_share", "cooccurrence_1h", "cooccurrence_7d",
    "cooccurrence_all", "semantic_history_text", "semantic_mean_all",
)

FEATURE_NAMES: tuple[str, ...] = (
    # The first stage: the blend's score, its rank among the candidates, and its components.
    "blend_score", "blend_rank", "blend_semantic", "blend_cooccurrence", "blend_trend", "blend_freshness",
    # The two semantic parts, kept apart, and the newest items.
    "semantic_history_text", "semantic_decayed_mean", "semantic_last_item", "semantic_recent_max",
    # Co-occurrence with the history at several half-lives (weighted mean similarity).
    *(f"cooccurrence_{name}" for name in COOCCURRENCE_HALF_LIVES_S),
    # What followed the newest item, and the newest few, in other users' histories.
    "transition_last", "transition_recent",
    # Popularity now and over all time.
    *(f"trend_{name}" for name in TREND_WINDOWS_S), "popularity_share", "popularity_log_count",
    # The item's age and whether anyone has seen it yet.
    "item_age_days", "item_first_seen_days", "cold_item",
    # The user's state.
    "user_gap_log_s", "user_session_events", "user_history_length", "user_events_last_day",
    # The user and the item: categories.
    *(f"category_match_{name}" for name in CATEGORY_HALF_LIVES_S), "category_recency_log_s",
    # The whole history alike, however old: the user's standing taste, which is what is left to go
    # on after a long absence (the decayed parts above have faded for such a user).
    "cooccurrence_all", "semantic_mean_all",
    # The co-occurrence model's session embedding: the candidate's cosine with the items of the
    # user's current session (none after a break of SESSION_GAP_S) and with the whole history.
    # Sessions keep to a topic more than a user's whole history does, so this reaches the items of
    # the session's topic that never shared a history with its items.
    "topic_session", "topic_all",
    # The same signals as ranks among the candidates (0: the candidate's best): a share of the
    # month's events or a similarity means something else at each time and for each user, its
    # place among the candidates does not, so a few splits on the time since the user's previous
    # event can hand one signal the ranking (e.g. what is popular this month, for a user back
    # after weeks away).
    *(f"{name}_rank" for name in RANKED_FEATURES),
)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


@lru_cache(maxsize=65536)
def categories_of(category: str) -> frozenset[str]:
    """The categories in an item's category field ("Action, Comedy", "Action|Comedy" or one name)."""
    if not category:
        return frozenset()
    parts = category.replace("|", ",").split(",")
    return frozenset(p.strip().lower() for p in parts if p.strip())


@dataclass(frozen=True)
class FirstStage:
    """The blend's view of the candidates the learned ranker scores (arrays aligned to `item_ids`)."""

    item_ids: np.ndarray  # str
    category: np.ndarray  # str
    published_at: np.ndarray  # NaN: no publication time
    score: np.ndarray
    rank: np.ndarray  # 0 = the blend's best
    semantic: np.ndarray
    cooccurrence: np.ndarray
    trend: np.ndarray
    freshness: np.ndarray
    # The rows the `_rank` features rank against (the blend's best candidates: not the second
    # look's, nor the sampled negatives a training group adds); None: every row.
    reference: np.ndarray | None = None


class HistoryArrays:
    """A history as the features and the second look read it, worked out once per request: each
    event's time and strength (oldest first), and the distinct items newest first (at most
    MAX_HISTORY_ITEMS) with each event's place among them.

    `codes`: one integer per distinct item (any coding), `ids[code]` its id. `of(history)` codes
    the items of a list of HistoryEntry; the trainer's replay hands in its data set's columns."""

    def __init__(self, times: np.ndarray, strengths: np.ndarray, codes: np.ndarray, ids: Sequence[str]):
        self.times = np.asarray(times, dtype=np.float64)
        self.strengths = np.asarray(strengths, dtype=np.float64)
        self.codes = np.asarray(codes, dtype=np.int64)
        self.ids = ids

    @cached_property
    def _distinct(self) -> tuple[list[str], np.ndarray]:
        """(newest_first, event_rows), worked out when first read: a blend without a learned ranker
        reads only the times and strengths."""
        if not len(self.codes):
            return [], np.zeros(0, dtype=np.int64)
        # Each item at its newest event: its first place in the reversed history.
        distinct, first = np.unique(self.codes[::-1], return_index=True)
        newest = np.argsort(first, kind="stable")[:MAX_HISTORY_ITEMS]
        row_of_distinct = np.full(len(distinct), -1, dtype=np.int64)
        row_of_distinct[newest] = np.arange(len(newest))
        return ([self.ids[c] for c in distinct[newest].tolist()],
                row_of_distinct[np.searchsorted(distinct, self.codes)])

    @property
    def newest_first(self) -> list[str]:
        """The distinct items, newest first, at most MAX_HISTORY_ITEMS."""
        return self._distinct[0]

    @property
    def event_rows(self) -> np.ndarray:
        """Per event: its item's place in `newest_first`, -1 when not among them."""
        return self._distinct[1]

    @classmethod
    def of(cls, history: Sequence[HistoryEntry]) -> "HistoryArrays":
        code: dict[str, int] = {}
        codes = np.fromiter((code.setdefault(e.item_id, len(code)) for e in history), dtype=np.int64,
                            count=len(history))
        times = np.fromiter((e.timestamp for e in history), dtype=np.float64, count=len(history))
        strengths = np.fromiter((action_strength(e.action, e.value) for e in history), dtype=np.float64,
                                count=len(history))
        return cls(times, strengths, codes, list(code))

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def kept(self) -> np.ndarray:
        """Per event: its item is among `newest_first`."""
        return self.event_rows >= 0

    def positive_counts(self) -> dict[str, float]:
        """Per item of `newest_first` with positive events, their number, in the order of each item's
        first positive event (oldest first)."""
        events = np.flatnonzero(self.kept & (self.strengths > 0))
        if not len(events):
            return {}
        rows = self.event_rows[events]
        distinct, first, counts = np.unique(rows, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        return {self.newest_first[r]: float(n) for r, n in zip(distinct[order].tolist(), counts[order].tolist())}

    def newest_positive(self, n: int) -> list[str]:
        """The items of the newest `n` positive events, newest first (an item once per event)."""
        events = np.flatnonzero(self.strengths > 0)[::-1][:n]
        return [self.ids[c] for c in self.codes[events].tolist()]


@dataclass(frozen=True)
class FeatureInputs:
    """Everything the features read about the user and the world as of `at`."""

    at: float
    history: Sequence[HistoryEntry]  # the user's events at or before `at`, oldest first
    params: TimeModelParams
    index: ItemIndex
    state: InteractionState
    cooccurrence: CooccurrenceModel | None
    short_term: np.ndarray | None  # the encoded history text (unit vector), None without history
    category_of: Callable[[str], str]  # an item's category field ("" for an unknown item)
    arrays: HistoryArrays | None = None  # `history` as arrays (None: worked out from it)


def _decay(age_seconds: np.ndarray, half_life_seconds: float) -> np.ndarray:
    return np.exp2(-np.maximum(age_seconds, 0.0) / half_life_seconds)


def _log_seconds(seconds: np.ndarray | float) -> np.ndarray | float:
    return np.log1p(np.maximum(seconds, 0.0))


def _per_item(event_rows: np.ndarray, kept: np.ndarray, event_weights: np.ndarray, n_items: int) -> np.ndarray:
    """Per history item, the sum of its events' weights."""
    return np.bincount(event_rows[kept], weights=event_weights[kept], minlength=n_items)


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 and math.isfinite(norm) else None


def _cosine_with_mean(out: np.ndarray, name: str, item_weights: np.ndarray, history_vectors: np.ndarray,
                      history_present: np.ndarray, vectors: np.ndarray, present: np.ndarray) -> None:
    """Feature `name` of the candidates with a vector (`present`): their cosine with the unit mean of
    the history items' vectors weighted by `item_weights` (items without a vector count nothing);
    left missing where that mean is zero."""
    mean = _unit((item_weights * history_present) @ history_vectors)
    if mean is not None:
        out[present, FEATURE_INDEX[name]] = vectors[present] @ mean


def candidate_features(inputs: FeatureInputs, first: FirstStage) -> np.ndarray:
    """(len(candidates), len(FEATURE_NAMES)) float32, NaN where a feature has no value."""
    n = len(first.item_ids)
    out = np.full((n, len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    if n == 0:
        return out
    column = FEATURE_INDEX
    at, history = inputs.at, inputs.history
    ids = [str(i) for i in first.item_ids]

    out[:, column["blend_score"]] = first.score
    out[:, column["blend_rank"]] = first.rank
    out[:, column["blend_semantic"]] = first.semantic
    out[:, column["blend_cooccurrence"]] = first.cooccurrence
    out[:, column["blend_trend"]] = first.trend
    out[:, column["blend_freshness"]] = first.freshness

    _item_features(inputs, first, ids, out)
    if history:
        _history_features(inputs, first, ids, out)
    else:
        out[:, column["user_history_length"]] = 0.0
        out[:, column["user_session_events"]] = 0.0
        out[:, column["user_events_last_day"]] = 0.0
    _rank_features(first.reference, out)
    return out


def _rank_features(reference: np.ndarray | None, out: np.ndarray) -> None:
    """Per RANKED_FEATURES, each row's rank among the reference rows: how many of them have a
    strictly larger value (0: the best); a row without a value ranks after every valued one."""
    for name in RANKED_FEATURES:
        values = out[:, FEATURE_INDEX[name]]
        pool = values if reference is None else values[reference]
        ordered = np.sort(pool[~np.isnan(pool)])
        ranks = len(ordered) - np.searchsorted(ordered, values, side="right")
        ranks[np.isnan(values)] = len(ordered)
        out[:, FEATURE_INDEX[f"{name}_rank"]] = ranks


def _item_features(inputs: FeatureInputs, first: FirstStage, ids: list[str], out: np.ndarray) -> None:
    column, at, state = FEATURE_INDEX, inputs.at, inputs.state
    # Positions first: counts taken afterwards cover every item they can name.
    positions = state.indices_of(ids)
    known = positions >= 0

    def aligned(counts: np.ndarray) -> np.ndarray:
        values = np.zeros(len(ids), dtype=np.float64)
        if len(counts):
            values[known] = counts[positions[known]]
        return values

    for name, window in TREND_WINDOWS_S.items():
        counts = state.trend_counts(at, window)
        total = float(counts.sum())
        out[:, column[f"trend_{name}"]] = aligned(counts) / total if total > 0 else 0.0
    all_time = state.all_time_counts(at)
    mine = aligned(all_time)
    total = float(all_time.sum())
    out[:, column["popularity_share"]] = mine / total if total > 0 else 0.0
    out[:, column["popularity_log_count"]] = np.log1p(mine)
    out[:, column["cold_item"]] = mine == 0
    out[:, column["item_age_days"]] = (at - first.published_at) / _DAY
    out[:, column["item_first_seen_days"]] = (at - state.first_event_times(at, positions)) / _DAY


def _topic_features(model: CooccurrenceModel, newest_first: list[str], event_rows: np.ndarray, kept: np.ndarray,
                    positive: np.ndarray, session_start: int | None, ids: list[str], out: np.ndarray) -> None:
    """topic_session and topic_all: each candidate's cosine, in the session embedding, with the
    positive events' items of the current session (from event `session_start` on; None: the
    user is not in a session) and of the whole history, each item weighted by its events."""
    candidates = model.session_vectors_for(ids)
    if candidates is None:
        return
    vectors, present = candidates
    history_vectors, history_present = model.session_vectors_for(newest_first)

    def cosine_with(events: np.ndarray, name: str) -> None:
        """The candidates' cosine with the unit mean of `events`' items (none: left missing)."""
        _cosine_with_mean(out, name, _per_item(event_rows, kept, events.astype(np.float64), len(newest_first)),
                          history_vectors, history_present, vectors, present)

    cosine_with(positive, "topic_all")
    if session_start is not None:
        current = positive.copy()
        current[:session_start] = False
        cosine_with(current, "topic_session")


def _history_features(inputs: FeatureInputs, first: FirstStage, ids: list[str], out: np.ndarray) -> None:
    column, at, history = FEATURE_INDEX, inputs.at, inputs.history
    arrays = inputs.arrays if inputs.arrays is not None else HistoryArrays.of(history)
    times, strengths = arrays.times, arrays.strengths
    ages = at - times

    # The user's state.
    session_start = int(np.flatnonzero(session_starts(times))[-1])
    in_session = ages[-1] <= SESSION_GAP_S
    out[:, column["user_gap_log_s"]] = _log_seconds(ages[-1])
    out[:, column["user_session_events"]] = (len(history) - session_start) if in_session else 0
    out[:, column["user_history_length"]] = len(history)
    out[:, column["user_events_last_day"]] = int((ages <= _DAY).sum())

    # History items, newest first, each once (at its newest event), at most MAX_HISTORY_ITEMS.
    newest_first, event_rows, kept = arrays.newest_first, arrays.event_rows, arrays.kept

    # Semantic parts, kept apart: the history text, the decayed mean, the newest items.
    candidates, present = inputs.index.vectors_matrix_for(ids)
    history_vectors, history_present = inputs.index.vectors_matrix_for(newest_first)
    if inputs.short_term is not None:
        out[present, column["semantic_history_text"]] = candidates[present] @ inputs.short_term
    decayed = _decay(ages, inputs.params.long_term_half_life_days * _DAY) * strengths
    for name, event_weights in (("semantic_decayed_mean", decayed), ("semantic_mean_all", strengths)):
        _cosine_with_mean(out, name, _per_item(event_rows, kept, event_weights, len(newest_first)),
                          history_vectors, history_present, candidates, present)
    if history_present.any():
        recent = np.flatnonzero(history_present)[:RECENT_ITEMS]
        similarity = candidates[present] @ history_vectors[recent].T
        if history_present[0]:
            out[present, column["semantic_last_item"]] = similarity[:, 0]
        out[present, column["semantic_recent_max"]] = similarity.max(axis=1)

    # Co-occurrence and transitions (positive feedback only, as in the blend).
    model = inputs.cooccurrence
    positive = strengths > 0
    if model is not None:
        similarity = model.pair_similarities(newest_first, ids)  # (history items, candidates)
        for name, half_life in COOCCURRENCE_HALF_LIVES_S.items():
            weights = _per_item(event_rows, kept, _decay(ages, half_life) * positive, len(newest_first))
            total = weights.sum()
            out[:, column[f"cooccurrence_{name}"]] = (weights @ similarity) / total if total > 0 else 0.0
        weights = _per_item(event_rows, kept, positive.astype(np.float64), len(newest_first))
        total = weights.sum()
        out[:, column["cooccurrence_all"]] = (weights @ similarity) / total if total > 0 else 0.0
        recent_events = arrays.newest_positive(TRANSITION_EVENTS)
        if recent_events:
            transitions = model.transition_block(recent_events, ids)
            out[:, column["transition_last"]] = transitions[0]
            weights = 0.5 ** np.arange(len(recent_events))
            out[:, column["transition_recent"]] = (weights @ transitions) / weights.sum()
        _topic_features(model, newest_first, event_rows, kept, positive, session_start if in_session else None,
                        ids, out)

    # Categories: the decayed share of the history in the item's categories, and how long ago
    # the user last met one of them. Candidates share few distinct category fields (genre
    # combinations): each is worked out once.
    tail = history[-MAX_CATEGORY_EVENTS:]
    history_categories = [categories_of(inputs.category_of(e.item_id)) for e in tail]
    if not any(history_categories):
        return
    tail_ages, tail_times = ages[-len(tail):], times[-len(tail):]
    profiles = []
    for half_life in CATEGORY_HALF_LIVES_S.values():
        weights = np.ones(len(tail)) if half_life is None else _decay(tail_ages, half_life)
        profile: dict[str, float] = {}
        for weight, cats in zip(weights.tolist(), history_categories):
            if cats:
                share = weight / len(cats)
                for category in cats:
                    profile[category] = profile.get(category, 0.0) + share
        total = sum(profile.values())
        profiles.append({c: v / total for c, v in profile.items()} if total > 0 else {})
    last_seen: dict[str, float] = {}
    for timestamp, cats in zip(tail_times.tolist(), history_categories):
        for category in cats:
            last_seen[category] = timestamp  # oldest first: the newest time wins
    distinct = {field: categories_of(field) for field in dict.fromkeys(first.category.tolist())}
    values = {}
    for field, cats in distinct.items():
        matches = [sum(profile.get(c, 0.0) for c in cats) if cats else np.nan for profile in profiles]
        seen = max((last_seen[c] for c in cats if c in last_seen), default=np.nan)
        values[field] = matches + [seen]
    table = np.array([values[field] for field in first.category.tolist()], dtype=np.float64)
    for k, name in enumerate(CATEGORY_HALF_LIVES_S):
        out[:, column[f"category_match_{name}"]] = table[:, k]
    out[:, column["category_recency_log_s"]] = _log_seconds(at - table[:, -1])


__all__ = [
    "CATEGORY_HALF_LIVES_S",
    "COOCCURRENCE_HALF_LIVES_S",
    "FEATURE_INDEX",
    "FEATURE_NAMES",
    "FeatureInputs",
    "FirstStage",
    "HistoryArrays",
    "RANKED_FEATURES",
    "TREND_WINDOWS_S",
    "candidate_features",
    "categories_of",
]
