"""Evaluation protocols (temporal cutoff, leave-one-out), tie-aware full-ranking metrics and bootstrap intervals."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.sparse as sp

from chronorec.client.rules import SECONDS_PER_DAY
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.timetext import HistoryEntry

SECONDS_PER_HOUR = 3600.0
CUTOFFS = (10, 20)
METRIC_NAMES = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")
BOOTSTRAP_SEED = 20240607
BOOTSTRAP_RESAMPLES = 1000
# Time since the user's previous event: <1h, 1h-1d, 1-7d, 7-30d, >30d.
GAP_EDGES_S = (SECONDS_PER_HOUR, SECONDS_PER_DAY, 7 * SECONDS_PER_DAY, 30 * SECONDS_PER_DAY)
GAP_LABELS = ("<1h", "1h-1d", "1-7d", "7-30d", ">30d")
# Targets by what reaches them: cold ones (no training event: first seen after the cutoff, or in loo
# never before the test phase) only their text, freshness and trend; repeats (any other target the
# user already had an event on) none: the protocol excludes the history's items (exclusion_mask);
# warm ones the rest.
TARGET_LABELS = ("warm", "cold", "repeat")


# -- data -------------------------------------------------------------------------------


class Dataset:
    """Items and events with integer codes, arranged in the one global order of events.

    The global order is a stable sort by (timestamp, position in the file). Arrays `user`,
    `item`, `ts`, `value` are indexed by global position; `file_pos[p]` is the position in
    `events` (file order) of the event at global position p. Every catalogue item is
    rankable, including items first seen late; items named only by events are appended to
    the catalogue in order of first appearance.
    """

    def __init__(self, items: Sequence[Item], events: Sequence[Event]):
        self.items = list(items)
        self.events = list(events)
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        for it in self.items:
            if it.item_id not in self.item_index:
                self.item_index[it.item_id] = len(self.item_ids)
                self.item_ids.append(it.item_id)
        self.n_catalogue_items = len(self.item_ids)
        self.user_ids: list[str] = []
        self.user_index: dict[str, int] = {}
        n = len(self.events)
        file_user = np.empty(n, dtype=np.int64)
        file_item = np.empty(n, dtype=np.int64)
        file_ts = np.empty(n, dtype=np.float64)
        file_value = np.empty(n, dtype=np.float64)
        for k, ev in enumerate(self.events):
            u = self.user_index.get(ev.user_id)
            if u is None:
                u = self.user_index[ev.user_id] = len(self.user_ids)
                self.user_ids.append(ev.user_id)
            i = self.item_index.get(ev.item_id)
            if i is None:
                i = self.item_index[ev.item_id] = len(self.item_ids)
                self.item_ids.append(ev.item_id)
            file_user[k], file_item[k], file_ts[k] = u, i, ev.timestamp
            file_value[k] = np.nan if ev.value is None else ev.value
        # lexsort sorts by the last key first: timestamp, then file position.
        self.file_pos = np.lexsort((np.arange(n), file_ts))
        self.user = file_user[self.file_pos]
        self.item = file_item[self.file_pos]
        self.ts = file_ts[self.file_pos]
        self.value = file_value[self.file_pos]
        self.global_pos = np.empty(n, dtype=np.int64)
        self.global_pos[self.file_pos] = np.arange(n)
        # Per-user event lists (CSR over global positions) so any history is a slice.
        self.user_positions = np.argsort(self.user, kind="stable")
        counts = np.bincount(self.user, minlength=self.n_users)
        self.user_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        # rank_in_user[p]: how many of that user's events precede global position p.
        self.rank_in_user = np.empty(n, dtype=np.int64)
        self.rank_in_user[self.user_positions] = np.arange(n) - self.user_ptr[self.user[self.user_positions]]

    @property
    def n_events(self) -> int:
        return len(self.events)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def event_at(self, pos: int) -> Event:
        """The Event at global position `pos`."""
        return self.events[int(self.file_pos[pos])]

    @functools.cached_property
    def history_entries(self) -> list[HistoryEntry]:
        """Each event's HistoryEntry (as the interaction state holds it) by global position, built
        once and shared, being frozen, by every replay of this data and every history they build."""
        return [HistoryEntry(self.item_ids[item], e.action, float(e.timestamp), e.value)
                for item, e in zip(self.item.tolist(), (self.event_at(p) for p in range(self.n_events)))]

    def user_events(self, user: int) -> np.ndarray:
        """Global positions of a user's events, in global order."""
        return self.user_positions[self.user_ptr[user]:self.user_ptr[user + 1]]

    def interaction_matrix(self, positions: np.ndarray, binary: bool = True, dtype=np.float64) -> np.ndarray:
        """Dense users × items matrix of the events at `positions` (1/0 when binary, else counts)."""
        m = np.bincount(self.user[positions] * self.n_items + self.item[positions],
                        minlength=self.n_users * self.n_items).reshape(self.n_users, self.n_items).astype(dtype)
        if binary:
            np.minimum(m, 1, out=m)
        return m


def prefix_item_counts(dataset: Dataset, boundaries: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """(len(boundaries), n_items): per boundary b, item counts of the (visible) events at
    global positions < b. One pass: bucket events by the first boundary above them, cumulate."""
    bounds, inverse = np.unique(np.asarray(boundaries, dtype=np.int64), return_inverse=True)
    positions = np.arange(dataset.n_events) if visible is None else visible
    positions = positions[positions < bounds[-1]]
    n_items = dataset.n_items
    segment = np.searchsorted(bounds, positions, side="right")
    increments = np.bincount(segment * n_items + dataset.item[positions], minlength=bounds.size * n_items)
    return np.cumsum(increments.reshape(bounds.size, n_items), axis=0)[inverse]


def window_item_counts(dataset: Dataset, start: np.ndarray, end: np.ndarray,
                       visible: np.ndarray | None = None) -> np.ndarray:
    """(len(start), n_items): per row r, item counts of the (visible: sorted global positions)
    events at global positions in [start[r], end[r]); start <= end. The same as
    prefix_item_counts at `end` minus at `start`: where the windows hold fewer events in all than
    the rows × items of the result, counted from those events alone, not from two prefix sums of
    the whole catalogue per row (a month of ml-latest-small holds a few hundred events against
    9,742 items)."""
    start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
    lo, hi = (start, end) if visible is None else (np.searchsorted(visible, start), np.searchsorted(visible, end))
    lengths = hi - lo
    n, n_items = len(start), dataset.n_items
    total = int(lengths.sum())
    if (lengths < 0).any() or total > n * n_items:
        counts = prefix_item_counts(dataset, np.concatenate((end, start)), visible)
        return counts[:n] - counts[n:]
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    index = np.arange(total, dtype=np.int64) + np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
    positions = index if visible is None else np.asarray(visible, dtype=np.int64)[index]
    return np.bincount(row * n_items + dataset.item[positions], minlength=n * n_items).reshape(n, n_items)


@dataclass
class Instances:
    """Test instances: a target event at global position `pos`, to be predicted from its
    history = all of that user's events earlier in the global order (the first `hist_len`
    entries of the user's event list)."""

    dataset: Dataset
    pos: np.ndarray

    def __post_init__(self):
        self.pos = np.asarray(self.pos, dtype=np.int64)
        d = self.dataset
        self.user = d.user[self.pos]
        self.target = d.item[self.pos]
        self.time = d.ts[self.pos]
        self.hist_len = d.rank_in_user[self.pos]
        self.hist_start = d.user_ptr[self.user]

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, index) -> "Instances":
        return Instances(self.dataset, self.pos[index])

    def history(self, i: int) -> np.ndarray:
        """Global positions of instance i's history, oldest first."""
        s = self.hist_start[i]
        return self.dataset.user_positions[s:s + self.hist_len[i]]

    def history_flat(self) -> tuple[np.ndarray, np.ndarray]:
        """All histories at once: (row = instance index, global position), one entry per history event."""
        n_total = int(self.hist_len.sum())
        rows = np.repeat(np.arange(len(self)), self.hist_len)
        row_offsets = np.concatenate(([0], np.cumsum(self.hist_len)[:-1]))
        within = np.arange(n_total) - np.repeat(row_offsets, self.hist_len)
        return rows, self.dataset.user_positions[np.repeat(self.hist_start, self.hist_len) + within]

    def history_matrix(self, weights: np.ndarray | None = None, binary: bool = False, dtype=np.float64) -> np.ndarray:
        """(n_instances, n_items) sum of per-event `weights` (aligned with history_flat; 1 when None)."""
        rows, positions = self.history_flat()
        n_items = self.dataset.n_items
        m = np.bincount(rows * n_items + self.dataset.item[positions], weights=weights,
                        minlength=len(self) * n_items).reshape(len(self), n_items).astype(dtype, copy=False)
        if binary:
            np.minimum(m, 1, out=m)
        return m

    def history_sparse(self, weights: np.ndarray | None = None, binary: bool = False, dtype=np.float64) -> sp.csr_matrix:
        """history_matrix as a sparse (n_instances, n_items) matrix (per-event `weights`, 1 when None,
        summed per item; 1/0 when binary)."""
        rows, positions = self.history_flat()
        values = np.ones(len(rows), dtype=dtype) if weights is None else np.asarray(weights, dtype=dtype)
        m = sp.csr_matrix((values, (rows, self.dataset.item[positions])), shape=(len(self), self.dataset.n_items))
        m.sum_duplicates()
        if binary:
            m.data[:] = 1
        return m

    def history_density(self) -> float:
        """Share of the (instances × items) history matrix's cells an event sets (at most)."""
        return float(self.hist_len.sum()) / max(1, len(self) * self.dataset.n_items)

    def time_since_previous(self) -> np.ndarray:
        """Seconds from the user's previous event to the target (nan without history)."""
        gap = np.full(len(self), np.nan)
        has = self.hist_len > 0
        prev = self.dataset.user_positions[self.hist_start[has] + self.hist_len[has] - 1]
        gap[has] = self.time[has] - self.dataset.ts[prev]
        return gap


@dataclass
class EvalTask:
    """One fit-then-score problem: fit on `train` (global positions), rank for `instances`."""

    name: str
    dataset: Dataset
    train: np.ndarray
    instances: Instances


@dataclass
class TemporalSplit:
    """One global cutoff: train = events with ts < cutoff; test = later events of users seen before it.

    `upto` limits the split to the first `upto` events of the global order (the inner split
    applies the same rule to the training prefix)."""

    dataset: Dataset
    quantile: float
    cutoff: float
    n_train: int
    upto: int
    instances: Instances
    protocol: str = "temporal"

    @property
    def train(self) -> np.ndarray:
        # The global order is sorted by time, so training is a prefix of it.
        return np.arange(self.n_train)

    @property
    def n_unseen_targets(self) -> int:
        """Test instances whose target item has no training event."""
        seen = np.zeros(self.dataset.n_items, dtype=bool)
        seen[self.dataset.item[:self.n_train]] = True
        return int((~seen[self.instances.target]).sum())

    def test_task(self) -> EvalTask:
        return EvalTask("test", self.dataset, self.train, self.instances)

    def tuning_task(self) -> EvalTask:
        inner = inner_validation_split(self)
        return EvalTask("inner-validation", self.dataset, inner.train, inner.instances)

    def details(self) -> dict:
        d = self.dataset
        return {
            "protocol": self.protocol,
            "rule": "global cutoff = timestamp of the event at 0-based index floor(q*N) of the global "
                    "order (timestamp, file position); train ts < cutoff; test = every event with "
                    "ts >= cutoff of a user with an event before it; history = all the user's earlier events",
            "quantile": self.quantile,
            "cutoff": self.cutoff,
            "cutoff_utc": datetime.fromtimestamp(self.cutoff, timezone.utc).isoformat(),
            "n_events": self.upto,
            "n_train_events": self.n_train,
            "n_test_instances": len(self.instances),
            "n_test_users": int(np.unique(self.instances.user).size),
            "n_unseen_targets": self.n_unseen_targets,
            "n_unseen_target_items": int(np.unique(self.instances.target[
                ~np.isin(self.instances.target, d.item[:self.n_train])]).size),
            "n_repeat_targets": repeat_target_count(self.instances),
        }


def temporal_split(dataset: Dataset, quantile: float = 0.8, *, upto: int | None = None) -> TemporalSplit:
    """Split at the timestamp of the event at index floor(quantile·N) of the global order."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n = dataset.n_events if upto is None else int(upto)
    if n < 2:
        raise ValueError("a temporal split needs at least two events")
    ts = dataset.ts[:n]
    cutoff = float(ts[int(math.floor(quantile * n))])
    n_train = int(np.searchsorted(ts, cutoff, side="left"))
    seen_user = np.zeros(dataset.n_users, dtype=bool)
    seen_user[dataset.user[:n_train]] = True
    test_pos = np.arange(n_train, n)
    test_pos = test_pos[seen_user[dataset.user[test_pos]]]
    return TemporalSplit(dataset, quantile, cutoff, n_train, n, Instances(dataset, test_pos))


def inner_validation_split(split: TemporalSplit) -> TemporalSplit:
    """The temporal rule applied again to the training part only (for tuning without test data)."""
    return temporal_split(split.dataset, split.quantile, upto=split.n_train)


@dataclass
class LooSplit:
    """Leave-one-out: per user (≥ 3 events) the last event is test, the one before validation."""

    dataset: Dataset
    train: np.ndarray
    validation: Instances
    test: Instances
    n_dropped_users: int
    protocol: str = "loo"

    def tuning_task(self) -> EvalTask:
        """Validation phase: fit on train, rank the validation targets."""
        return EvalTask("validation", self.dataset, self.train, self.validation)

    def test_task(self) -> EvalTask:
        """Test phase: refit on train + validation, rank the test targets."""
        fit = np.sort(np.concatenate((self.train, self.validation.pos)))
        return EvalTask("test", self.dataset, fit, self.test)

    @property
    def instances(self) -> Instances:
        return self.test

    def details(self) -> dict:
        return {
            "protocol": self.protocol,
            "rule": "users with < 3 events dropped; per user (order: timestamp, file position) the last "
                    "event is the test target, the one before validation; the validation phase fits on "
                    "train, the test phase refits on train + validation",
            "n_events": self.dataset.n_events,
            "n_train_events": int(self.train.size),
            "n_test_instances": len(self.test),
            "n_test_users": len(self.test),
            "n_dropped_users": self.n_dropped_users,
            "n_unseen_targets": int((~np.isin(self.test.target, self.dataset.item[
                np.concatenate((self.train, self.validation.pos))])).sum()),
            "n_repeat_targets": repeat_target_count(self.test),
        }


def loo_split(dataset: Dataset, min_events: int = 3) -> LooSplit:
    """Leave-one-out split; users with fewer than `min_events` events are dropped."""
    d = dataset
    counts = np.diff(d.user_ptr)
    kept = np.flatnonzero(counts >= min_events)
    last = d.user_positions[d.user_ptr[kept + 1] - 1]
    before_last = d.user_positions[d.user_ptr[kept + 1] - 2]
    in_train = np.isin(d.user, kept)
    in_train[last] = False
    in_train[before_last] = False
    return LooSplit(d, np.flatnonzero(in_train), Instances(d, before_last), Instances(d, last),
                    int(d.n_users - kept.size))


def repeat_targets(instances: Instances) -> np.ndarray:
    """Per instance, whether its target item already occurs in its history (then no method can hit
    it: exclusion_mask)."""
    rows, positions = instances.history_flat()
    hit = instances.dataset.item[positions] == instances.target[rows]
    return np.bincount(rows[hit], minlength=len(instances)) > 0


def repeat_target_count(instances: Instances) -> int:
    """Instances whose target item already occurs in the history (repeat_targets)."""
    return int(repeat_targets(instances).sum())


# -- rankers ----------------------------------------------------------------------------


@runtime_checkable
class Ranker(Protocol):
    """A recommender under evaluation. Scores are higher-is-better over all catalogue items;
    the evaluator excludes history items and ranks with ties counted at their expectation."""

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        """Learn from the events at global positions `train` (sorted) of `dataset`."""

    def score_batch(self, instances: Instances) -> np.ndarray:
        """(len(instances), dataset.n_items) scores; may use each instance's history and time.

        A ranker may also give `rank_counts_all(instances, batch_size, progress) -> (better, tied)`:
        what `rank_counts(score_batch(batch), batch.target, exclusion_mask(batch))` gives over
        every batch of `batch_size` (`batched_rank_counts`), which the evaluation then reads
        instead (e.g. a variant that repeats an earlier one reads back that one's counts rather
        than scoring again)."""


Split = TemporalSplit | LooSplit
# A method factory gets the split (dataset, protocol, tuning_task(), test_task()) and returns an
# unfitted Ranker, tuning on split.tuning_task() if it wants to; the run loop fits it on test_task().
MethodFactory = Callable[[Split], Ranker]


# -- metrics ----------------------------------------------------------------------------


# rank_counts' count of items above a target that is not ranked at all (a repeat: exclusion_mask).
UNRANKED = -1


def exclusion_mask(instances: Instances) -> np.ndarray:
    """(n, n_items) True for the items in each history, a repeated target among them: the design's
    protocol excludes every item already in the history, as the server does by default, so a
    target the user already had cannot be hit by any method (rank_counts). Keeping that one item
    rankable while the rest of the history is excluded would make the mask depend on the target: a
    scorer that put the user's own items first would then hit every repeat at rank 1, told by the
    mask which of them is the target."""
    rows, positions = instances.history_flat()
    mask = np.zeros((len(instances), instances.dataset.n_items), dtype=bool)
    mask[rows, instances.dataset.item[positions]] = True
    return mask


def rank_counts(scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (#candidates scored strictly above the target, #other candidates tied with it).
    A target that `excluded` holds is not ranked at all: (UNRANKED, 0), which expected_metrics
    scores 0 on every metric."""
    scores = np.asarray(scores)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = np.arange(scores.shape[0])
    target_score = scores[rows, targets][:, None]
    above = scores > target_score
    tied = scores == target_score
    if excluded is None:
        return above.sum(axis=1), tied.sum(axis=1) - 1
    above &= ~excluded
    tied &= ~excluded
    better, same = above.sum(axis=1), tied.sum(axis=1) - 1
    unranked = excluded[rows, targets]
    better[unranked], same[unranked] = UNRANKED, 0
    return better, same


def _prefix_sums(n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(1, n + 1, dtype=np.float64)
    dcg = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(r + 1.0))))
    harmonic = np.concatenate(([0.0], np.cumsum(1.0 / r)))
    return dcg, harmonic


def expected_metrics(better: np.ndarray, tied: np.ndarray, cutoffs: Iterable[int] = CUTOFFS) -> dict[str, np.ndarray]:
    """Exact expectations under random tie-breaking. With b items strictly better and e tied,
    the rank is uniform on b+1 .. b+e+1, so

        HR@K   = clip(K - b, 0, e+1) / (e+1)
        NDCG@K = (D(min(b+e+1, K)) - D(min(b, K))) / (e+1),  D(r) = sum_{j<=r} 1/log2(j+1)
        MRR    = (H(b+e+1) - H(b)) / (e+1),                H(r) = sum_{j<=r} 1/j

    and b = UNRANKED (a target that is not ranked at all) scores 0 on each.
    """
    b = np.asarray(better, dtype=np.int64)
    e1 = np.asarray(tied, dtype=np.int64) + 1
    ranked = b != UNRANKED
    if not ranked.all():
        b, e1 = np.where(ranked, b, 0), np.where(ranked, e1, 1)
    last = b + e1
    dcg, harmonic = _prefix_sums(int(last.max(initial=1)))
    out: dict[str, np.ndarray] = {}
    for k in cutoffs:
        out[f"HR@{k}"] = np.clip(k - b, 0, e1) / e1
        out[f"NDCG@{k}"] = (dcg[np.minimum(last, k)] - dcg[np.minimum(b, k)]) / e1
    out["MRR"] = (harmonic[last] - harmonic[b]) / e1
    if not ranked.all():
        for values in out.values():
            values[~ranked] = 0.0
    return out


def batch_rank_counts(scores: np.ndarray, instances: Instances) -> tuple[np.ndarray, np.ndarray]:
    """rank_counts of score_batch's rows for `instances` (their targets, their histories excluded)."""
    expected = (len(instances), instances.dataset.n_items)
    if scores.shape != expected:
        raise ValueError(f"score_batch returned shape {scores.shape}, expected {expected}")
    return rank_counts(scores, instances.target, exclusion_mask(instances))


def batched_rank_counts(counts_of: Callable[[Instances], tuple[np.ndarray, np.ndarray]], instances: Instances,
                        batch_size: int, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(better, tied) of every instance, `counts_of` called on consecutive batches of `batch_size`."""
    n = len(instances)
    better = np.empty(n, dtype=np.int64)
    tied = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        batch = instances[start:start + batch_size]
        better[start:start + len(batch)], tied[start:start + len(batch)] = counts_of(batch)
        if progress is not None:
            progress(len(batch))
    return better, tied


def score_instances(ranker: Ranker, instances: Instances, batch_size: int = 1024,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per-instance metrics (plus 'better'/'tied' counts) of a fitted ranker, scored in batches."""
    counts_all = getattr(ranker, "rank_counts_all", None)
    if counts_all is not None:
        better, tied = counts_all(instances, batch_size, progress)
    else:
        better, tied = batched_rank_counts(lambda batch: batch_rank_counts(np.asarray(ranker.score_batch(batch)), batch),
                                           instances, batch_size, progress)
    metrics = expected_metrics(better, tied)
    metrics["better"], metrics["tied"] = better, tied
    return metrics


@dataclass
class RunResult:
    """Per-instance metrics of one method on one task, with wall-clock timings (seconds)."""

    metrics: dict[str, np.ndarray]
    fit_s: float
    score_s: float


def fit_and_score(ranker: Ranker, task: EvalTask, batch_size: int = 1024,
                  progress: Callable[[int], None] | None = None) -> RunResult:
    """Fit `ranker` on the task's training events and score its instances."""
    t0 = time.perf_counter()
    ranker.fit(task.train, task.dataset)
    t1 = time.perf_counter()
    metrics = score_instances(ranker, task.instances, batch_size, progress)
    return RunResult(metrics, t1 - t0, time.perf_counter() - t1)


# -- summaries --------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray, clusters: np.ndarray | None = None, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of each column of `values` (n,) or (n, m).

    With `clusters` (one label per row) whole clusters are resampled and the mean is the
    ratio of resampled sums, the honest interval when rows of a user are correlated."""
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v.reshape(len(v), -1)
    if clusters is not None:
        _, codes = np.unique(clusters, return_inverse=True)
        sums = np.zeros((codes.max() + 1, v.shape[1]))
        np.add.at(sums, codes, v)
        counts = np.bincount(codes).astype(np.float64)
    else:
        sums, counts = v, np.ones(len(v))
    rng = np.random.default_rng(seed)
    n = len(sums)
    means = np.empty((n_resamples, v.shape[1]))
    # Chunked so that memory stays bounded; the draws depend only on (seed, n, n_resamples).
    chunk = max(1, min(n_resamples, 4_000_000 // max(n, 1)))
    for start in range(0, n_resamples, chunk):
        c = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(c, n))
        flat = (np.arange(c)[:, None] * n + idx).ravel()
        weights = np.bincount(flat, minlength=c * n).reshape(c, n).astype(np.float64)
        means[start:start + c] = (weights @ sums) / (weights @ counts)[:, None]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return (lo[0], hi[0]) if squeeze else (lo, hi)


def per_user_means(values: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Mean of `values` per user (users in sorted order)."""
    _, codes = np.unique(users, return_inverse=True)
    return np.bincount(codes, weights=values) / np.bincount(codes)


def summarize(metrics: dict[str, np.ndarray], users: np.ndarray, names: Sequence[str] = METRIC_NAMES,
              n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, dict]:
    """Per metric: mean per instance with its bootstrap interval (instances resampled) and the
    user-clustered interval, and the mean per user with its interval (users resampled)."""
    values = np.column_stack([metrics[m] for m in names])
    lo, hi = bootstrap_ci(values, None, n_resamples, seed)
    clo, chi = bootstrap_ci(values, users, n_resamples, seed)
    user_values = np.column_stack([per_user_means(metrics[m], users) for m in names])
    ulo, uhi = bootstrap_ci(user_values, None, n_resamples, seed)
    out = {}
    for j, m in enumerate(names):
        out[m] = {
            "mean": float(values[:, j].mean()), "ci95": [float(lo[j]), float(hi[j])],
            "ci95_user_clustered": [float(clo[j]), float(chi[j])],
            "per_user_mean": float(user_values[:, j].mean()), "per_user_ci95": [float(ulo[j]), float(uhi[j])],
        }
    return out


def gap_buckets(instances: Instances, edges: Sequence[float] = GAP_EDGES_S) -> np.ndarray:
    """Bucket index (0..len(edges)) of each instance's time since the user's previous event; -1 without one."""
    gap = instances.time_since_previous()
    out = np.searchsorted(np.asarray(edges), np.nan_to_num(gap, nan=0.0), side="right")
    out[np.isnan(gap)] = -1
    return out


def cold_targets(task: EvalTask) -> np.ndarray:
    """Per instance of `task`, whether its target item has no event among the task's training events."""
    d = task.dataset
    seen = np.zeros(d.n_items, dtype=bool)
    seen[d.item[task.train]] = True
    return ~seen[task.instances.target]


def target_buckets(task: EvalTask) -> np.ndarray:
    """Bucket index of each instance in TARGET_LABELS: 1 cold (cold_targets), else 2 repeat
    (repeat_targets), else 0 warm."""
    cold = cold_targets(task)
    buckets = cold.astype(np.int64)
    buckets[repeat_targets(task.instances) & ~cold] = 2
    return buckets


def metric_by_bucket(values: np.ndarray, buckets: np.ndarray, labels: Sequence[str] = GAP_LABELS,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Mean of `values` per bucket with its bootstrap interval (empty buckets have mean None)."""
    out = []
    for b, label in enumerate(labels):
        sel = values[buckets == b]
        if sel.size == 0:
            out.append({"bucket": label, "n": 0, "mean": None, "ci95": [None, None]})
            continue
        lo, hi = bootstrap_ci(sel, None, n_resamples, seed)
        out.append({"bucket": label, "n": int(sel.size), "mean": float(sel.mean()), "ci95": [float(lo), float(hi)]})
    return out
