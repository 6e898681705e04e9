"""Training the learned ranker: point-in-time features of logged events, LambdaRank, validation on a later window."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.features import FEATURE_INDEX, FEATURE_NAMES
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.learned_ranker import (
    DEFAULT_CANDIDATES, DEFAULT_SECOND_LOOK, GapRoute, LearnedRanker, RankerSpec,
)
from chronorec.server.core.manifest import TimeModelParams
from chronorec.trainer.batch_replay import HistoryTexts, within_reach
from chronorec.trainer.protocols import (
    GAP_EDGES_S, GAP_LABELS, Dataset, Instances, LooSplit, Split, TemporalSplit, bootstrap_ci, expected_metrics,
    temporal_split,
)
from chronorec.trainer.forked import Forked, refuse_to_encode, workers_for
from chronorec.trainer.tune import Encode, RankerReplay, fit_cooccurrence

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ slices


@dataclass(frozen=True)
class FeatureSlice:
    """Events to learn from, and the events the co-occurrence model of their features is fitted on.

    Every target is later than (temporal) or held out of (loo) the fit events, so no feature of a
    target was computed from the target itself: the co-occurrence the server serves is fitted on
    the past only, and so is the one a training group sees.
    """

    name: str
    fit: np.ndarray  # global positions the co-occurrence (and transitions) are fitted on
    targets: np.ndarray  # global positions of the events to rank


def temporal_slices(split: TemporalSplit, training_slices: int = 2, share: float = 0.2,
                    inner: TemporalSplit | None = None, returning_slices: int = 0,
                    ) -> tuple[list[FeatureSlice], FeatureSlice]:
    """(training slices, validation slice) of a temporal split.

    Validation: the inner split's window (the one the blend is tuned on; by default the split's
    rule applied to its training events). Training: the same rule applied `training_slices` times
    further back, each `share` of the events before the previous slice's start, its co-occurrence
    fitted on what precedes it; then `returning_slices` more windows further back that keep only
    their returning users' events (an hour or more after the user's previous one): 1-2 % of a
    window's events come after weeks away, too few for the trees to learn from in two windows.
    """
    inner = inner or temporal_split(split.dataset, split.quantile, upto=split.n_train)
    validation = FeatureSlice("validation", inner.train, inner.instances.pos)
    slices = []
    upto = inner.n_train
    for k in range(training_slices + returning_slices):
        if upto < 10:
            break
        part = temporal_split(split.dataset, 1.0 - share, upto=upto)
        if not len(part.instances):
            break
        targets = part.instances.pos
        if k >= training_slices:
            gaps = part.instances.time_since_previous()
            targets = targets[np.nan_to_num(gaps, nan=0.0) >= GAP_EDGES_S[0]]
        if len(targets):
            name = f"train-{k + 1}" if k < training_slices else f"returning-{k + 1 - training_slices}"
            slices.append(FeatureSlice(name, part.train, targets))
        upto = part.n_train
    return slices[::-1], validation


def loo_slices(split: LooSplit, per_user: int = 6) -> tuple[list[FeatureSlice], FeatureSlice]:
    """(training slices, validation slice) of a leave-one-out split.

    Validation: the validation targets with co-occurrence fitted on the training events (as the
    blend's tuning). Training: each user's last `per_user` training events, fitted on the others.
    """
    d = split.dataset
    train = np.sort(split.train)
    validation = FeatureSlice("validation", train, split.validation.pos)
    users = d.user[train]
    # Rank of each training event from the end of its user's training events.
    order = np.lexsort((train, users))
    sorted_users = users[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_users)) + 1, len(sorted_users)]
    starts = np.r_[0, ends[:-1]]
    from_end = np.empty(len(train), dtype=np.int64)
    for start, end in zip(starts, ends):
        from_end[order[start:end]] = np.arange(end - start)[::-1]
    held = from_end < per_user
    # A user needs history left before a held-out target.
    held &= from_end < (np.bincount(users, minlength=d.n_users)[users] - 1)
    targets, fit = train[held], train[~held]
    return [FeatureSlice("train-1", fit, targets)], validation


def slices_of(split: Split, **options: Any) -> tuple[list[FeatureSlice], FeatureSlice]:
    if isinstance(split, TemporalSplit):
        return temporal_slices(split, **options)
    if isinstance(split, LooSplit):
        return loo_slices(split, **options)
    raise TypeError(f"unknown split {type(split).__name__}")


# ------------------------------------------------------------------------------ groups

# The single signals a range of time since the user's previous event may be handed to instead of the
# trees (GapRoute): each is, alone, what a plain baseline ranks by (popularity over a window, item
# co-occurrence with the history at a half-life, the history's mean vector, the blend). The blend's
# own score competes only on the events its time model was not tuned on (choose_routes).
BLEND_SCORE = "blend_score"
ROUTE_FEATURES: tuple[str, ...] = (
    BLEND_SCORE, "trend_1d", "trend_7d", "trend_30d", "popularity_share", "cooccurrence_1h", "cooccurrence_1d",
    "cooccurrence_7d", "cooccurrence_60d", "cooccurrence_all", "semantic_mean_all",
)


@dataclass(frozen=True)
class RankerTrainingConfig:
    """How the ranker's training groups are built and how LambdaRank is fitted (defaults: any data set)."""

    candidates: int = DEFAULT_CANDIDATES  # the blend's best, rescored (served the same way)
    second_look: int = DEFAULT_SECOND_LOOK  # ... and this many of each whole-history source (TimeAwareRanker.second_look)
    negatives: int = 10  # sampled items added to each training group (half by popularity)
    max_groups_per_slice: int = 4000  # sampled targets per training slice
    max_valid_groups: int = 3000
    # ... and at most this many logged events × catalogue items per training window: logging an event
    # scores the whole catalogue and reads the user's history (~25 ms at 10k items on a busy core),
    # so large catalogues log fewer (ML-100K's 1,682 items: no cap below 5,900; 9,742: ~1,000).
    max_item_scores_per_slice: int | None = 10_000_000
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 10.0
    truncation_level: int = 30
    max_rounds: int = 600
    early_stopping_rounds: int = 60
    # Refit on the training and validation groups with the rounds early stopping chose: the
    # validation window is the closest to what comes next (ML-100K temporal: NDCG@10 0.1099 -> 0.1104,
    # and 0.143 -> 0.171 on events 7 to 30 days after the previous one). The validation figures
    # reported are those of the model before the refit.
    refit_on_validation: bool = True
    # Gap routes (learned_ranker.GapRoute), chosen on the validation window: a range of time since the
    # previous event (GAP_EDGES_S) is handed to one of `route_features` when, on that range's
    # validation events, the feature alone beats the trees by a one-sided bootstrap bound at
    # `route_level` divided among the features tried (so trying more does not make a chance win
    # likelier); ranges with fewer than `route_min_events` events are never routed. The validation
    # sample holds few returning users (1-2 % of events come after weeks away), so up to
    # `max_valid_returning_groups` more of the window's events an hour or more after the user's
    # previous one are logged for this choice alone. No features: no routes.
    route_features: tuple[str, ...] = ROUTE_FEATURES
    route_level: float = 0.05
    route_min_events: int = 30
    # Except after a long absence: ranges starting at least this long after the previous event are
    # handed to the best of the trend windows among `route_features` (best over the range's events in
    # the validation and training groups together; still on `route_min_events` or more validation
    # events) unless the trees rank the range's validation events better by a one-sided bootstrap
    # bound (at `route_level` divided among the trend windows). There the burden is the trees': that
    # family is named in advance by the design (someone back after weeks away needs what is popular
    # now), not picked from the data, while the trees learned those users from 1-2 % of their
    # events, and the features they read most (the history's co-occurrence, its decayed parts) have
    # gone stale for them. A validation window holds a few dozen to a couple of thousand such events,
    # and on the short-lived items log (README) a near tie decided by the sign of the mean went
    # either way from one training of the trees to the next. None: the other signals' bound everywhere.
    route_trend_after_s: float | None = 7 * 86400.0
    max_valid_returning_groups: int = 1500
    threads: int | None = None
    # Processes logging the training windows' features (walks in Python, one core each): None, up to
    # two by the CPUs; 1, all in this process. The groups are the same either way.
    collect_workers: int | None = None
    seed: int = 0


@dataclass
class Groups:
    """Ranking groups as LightGBM reads them, with what the report needs of each group."""

    features: np.ndarray  # (rows, len(FEATURE_NAMES)) float32
    labels: np.ndarray  # 1 for the event's item
    sizes: np.ndarray  # rows per group
    blend: np.ndarray  # the blend's score of each row
    in_candidates: np.ndarray  # row is one of the candidates (not an added target or negative)
    gap_seconds: np.ndarray  # per group: since the user's previous event
    reachable: np.ndarray  # per group: the target is among the candidates
    positions: np.ndarray  # per group: the event's global position
    instances: int  # events asked for (groups + those whose target could not be ranked at all)
    weights: np.ndarray | None = None  # per group, in the training loss (None: all 1)
    second_look: np.ndarray | None = None  # per row: a candidate through the second look only (None: none)

    def group_weights(self) -> np.ndarray:
        return np.ones(len(self.sizes)) if self.weights is None else self.weights

    def save(self, path) -> None:
        """Every field as stored (uncompressed .npz; an absent optional array is left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        np.savez(path, **{name: value for name, value in values.items() if value is not None})

    @classmethod
    def load(cls, path) -> "Groups":
        with np.load(path) as stored:
            values = {f.name: stored[f.name] if f.name in stored.files else None for f in fields(cls)}
        values["instances"] = int(values["instances"])
        return cls(**values)

    def second_look_rows(self) -> np.ndarray:
        return np.zeros(len(self.labels), dtype=bool) if self.second_look is None else self.second_look

    @classmethod
    def empty(cls) -> "Groups":
        return cls(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0), np.zeros(0, np.int64), np.zeros(0),
                   np.zeros(0, bool), np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64), 0)

    @classmethod
    def concatenate(cls, parts: Sequence["Groups"]) -> "Groups":
        parts = [p for p in parts if len(p.sizes)] or [cls.empty()]
        weighted = any(p.weights is not None for p in parts)
        return cls(np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.sizes for p in parts]), np.concatenate([p.blend for p in parts]),
                   np.concatenate([p.in_candidates for p in parts]), np.concatenate([p.gap_seconds for p in parts]),
                   np.concatenate([p.reachable for p in parts]), np.concatenate([p.positions for p in parts]),
                   sum(p.instances for p in parts),
                   np.concatenate([p.group_weights() for p in parts]) if weighted else None,
                   np.concatenate([p.second_look_rows() for p in parts]))

    def _rows(self, rows: np.ndarray, keep_group: np.ndarray, in_candidates: np.ndarray,
              reachable: np.ndarray) -> "Groups":
        group_of_row = np.repeat(np.arange(len(self.sizes)), self.sizes)
        rows = rows & keep_group[group_of_row]
        sizes = np.bincount(group_of_row[rows], minlength=len(self.sizes))[keep_group]
        return Groups(self.features[rows], self.labels[rows], sizes, self.blend[rows], in_candidates[rows],
                      self.gap_seconds[keep_group], reachable[keep_group], self.positions[keep_group],
                      self.instances, None if self.weights is None else self.weights[keep_group],
                      self.second_look_rows()[rows])

    def candidates_only(self) -> "Groups":
        """The groups as the server ranks them: candidate rows only, groups whose target is one."""
        return self._rows(self.in_candidates, self.reachable, self.in_candidates, self.reachable)

    def served_view(self, second_look: bool) -> "Groups":
        """The same rows and features, not copied, with the candidates as a ranker serving with or
        without the second look ranks them (group_ndcg reads only candidates): the sampled negatives
        and added targets are never candidates, nor, without the second look, its rows."""
        if second_look or not self.second_look_rows().any():
            return self
        in_candidates, hits = self._candidates_without_second_look()
        return replace(self, in_candidates=in_candidates, reachable=self.reachable & hits)

    def _candidates_without_second_look(self) -> tuple[np.ndarray, np.ndarray]:
        """(per row: a candidate not through the second look alone, per group: its target is one)."""
        in_candidates = self.in_candidates & ~self.second_look_rows()
        group_of_row = np.repeat(np.arange(len(self.sizes)), self.sizes)
        hits = np.bincount(group_of_row, weights=((self.labels > 0) & in_candidates).astype(float),
                           minlength=len(self.sizes)) > 0
        return in_candidates, hits

    def without_second_look(self) -> "Groups":
        """The groups as a ranker serving without the second look sees them: its rows are dropped
        (a target among them stays, as a row added outside the candidates, and its group no longer
        counts as reachable). Every other row's features are the same: the `_rank` features rank
        against the blend's best only."""
        second = self.second_look_rows()
        in_candidates, hits = self._candidates_without_second_look()
        return self._rows(~second | (self.labels > 0), np.ones(len(self.sizes), dtype=bool), in_candidates, hits)


def sample_by_gap(dataset: Dataset, targets: np.ndarray, k: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(k of `targets` in global order, each one's weight): the same number from each bucket of time
    since the user's previous event (GAP_EDGES_S), a bucket with fewer events giving its share to the
    others, each weighted by its bucket's share of `targets` over its share of the sample.

    A uniform sample of a window on ml-latest-small has ~75 % of its events within the hour and
    ~4 % after a month away: the trees then see a few dozen returning users. Equal shares give
    every bucket as many groups as the window allows; the weights keep the training loss an
    unbiased estimate of the window's, so the events within the hour keep their say."""
    gaps = Instances(dataset, targets).time_since_previous()
    buckets = np.searchsorted(np.asarray(GAP_EDGES_S), np.nan_to_num(gaps, nan=0.0), side="right")
    counts = np.bincount(buckets, minlength=len(GAP_EDGES_S) + 1)
    quota = np.zeros_like(counts)
    left, open_ = k, counts > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        for b in np.flatnonzero(open_):
            take = min(share, int(counts[b] - quota[b]), left)
            quota[b] += take
            left -= take
        open_ &= quota < counts
    picked, weights = [], []
    for b in np.flatnonzero(quota):
        members = np.flatnonzero(buckets == b)
        picked.append(rng.choice(members, int(quota[b]), replace=False))
        weights.append(np.full(int(quota[b]), (counts[b] / len(targets)) / (quota[b] / k)))
    picked_rows, weights = np.concatenate(picked), np.concatenate(weights)
    order = np.argsort(targets[picked_rows], kind="stable")
    return targets[picked_rows][order], weights[order]


def collect_groups(
    dataset: Dataset,
    items: Mapping[str, Item],
    encode: Encode,
    item_vectors: np.ndarray | None,
    params: TimeModelParams,
    feature_slice: FeatureSlice,
    config: RankerTrainingConfig,
    *,
    max_groups: int | None,
    negatives: int,
    seed: int,
    say: Callable[[str], None] = lambda _m: None,
    index: ItemIndex | None = None,
    cooccurrence: CooccurrenceModel | None = None,
    gap_sampling: bool = True,
) -> Groups:
    """Replay the log and, as of each target event, log the features the server computes then.

    Each group holds the blend's top `config.candidates` and, when `negatives` > 0, the target
    (even where the blend ranks it lower) and sampled items: the server's candidate set plus
    sampled negatives. Targets the server could never return (a repeat, or an item unavailable
    at the time) form no group. `index`: the item index of `item_vectors`, when already built;
    `cooccurrence`: the model fitted on exactly `feature_slice.fit`, when already fitted. A training
    window with more events than `max_groups` (`negatives` > 0) is sampled by gap (`sample_by_gap`,
    its groups weighted) unless `gap_sampling` is off; a validation window uniformly.
    """
    return _Collection(dataset, items, encode, item_vectors, params, feature_slice, config, max_groups=max_groups,
                       negatives=negatives, seed=seed, say=say, index=index, cooccurrence=cooccurrence,
                       gap_sampling=gap_sampling).groups()


class _Collection:
    """One slice's logging (collect_groups), set up first and walked later: the set-up (targets drawn,
    replay built, history texts encoded) can run in one process and the walk in a forked one, with
    the same generator state and the same vectors, so the groups are the same to the last bit."""

    def __init__(self, dataset: Dataset, items: Mapping[str, Item], encode: Encode, item_vectors: np.ndarray | None,
                 params: TimeModelParams, feature_slice: FeatureSlice, config: RankerTrainingConfig, *,
                 max_groups: int | None, negatives: int, seed: int, say: Callable[[str], None],
                 index: ItemIndex | None, cooccurrence: CooccurrenceModel | None, gap_sampling: bool):
        self.started = time.perf_counter()
        self.dataset, self.params, self.config, self.say = dataset, params, config, say
        self.name, self.negatives = feature_slice.name, negatives
        self.rng = rng = np.random.default_rng(seed)
        targets = np.asarray(feature_slice.targets, dtype=np.int64)
        # Only events with history are ranked from it; a cold start has nothing personal to learn.
        targets = targets[dataset.rank_in_user[targets] > 0]
        target_weights = None
        if max_groups is not None and len(targets) > max_groups:
            if negatives > 0 and gap_sampling:
                targets, target_weights = sample_by_gap(dataset, targets, max_groups, rng)
            else:
                targets = _uniform_draw(targets, max_groups, rng)
        self.targets = targets
        self.replay: RankerReplay | None = None
        self.primed: HistoryTexts | None = None  # the walk's history texts, when encode_texts wrote them
        if not len(targets):
            return
        self.weight_of = None if target_weights is None else dict(zip(targets.tolist(), target_weights.tolist()))
        item_ids = [i for i in dataset.item_ids if i in items]
        if cooccurrence is None:
            cooccurrence = fit_cooccurrence(dataset, feature_slice.fit, item_ids)
        self.replay = RankerReplay(dataset, items, feature_slice.fit, encode, item_vectors=item_vectors,
                                   cooccurrence=cooccurrence, index=index)
        self.instances = Instances(dataset, targets)
        # Negatives: half uniform over the catalogue, half by popularity in the fit events.
        popularity = np.bincount(dataset.item[feature_slice.fit], minlength=dataset.n_items).astype(np.float64) + 1.0
        self.popularity = popularity / popularity.sum()

    @property
    def forkable(self) -> bool:
        """Whether the walk reads only history texts `encode_texts` encodes: a training slice's
        (every text is read); a validation slice encodes only its reachable events' texts, found
        during the walk."""
        return self.negatives > 0

    def encode_texts(self) -> None:
        """Encode every history text the walk reads, in the one call the walk would make; the walk
        then reads these texts rather than writing them again."""
        if self.replay is not None and self.forkable:
            order = np.argsort(self.instances.pos, kind="stable")
            self.primed = self.replay.first_stage().prime(self.instances[order], self.params)

    def groups(self) -> Groups:
        if self.replay is None:
            return Groups.empty()
        dataset, instances, config, replay, rng = self.dataset, self.instances, self.config, self.replay, self.rng
        negatives, popularity, weight_of = self.negatives, self.popularity, self.weight_of
        features, labels, sizes, blend, in_candidates, gaps, reachable, positions = [], [], [], [], [], [], [], []
        second_look: list[np.ndarray] = []
        weights: list[float] = []
        # The blend's candidates of many events at once (the batch replay), then each event's features
        # from the ranker's own code, as of the event (walk_candidates advances the state to it).
        def target_reachable(row: int, scored, columns, history) -> bool:
            """Without added rows a group exists only when the target is among the candidates: an event
            with `candidates` or more items scored strictly above its target, and not in the second
            look, forms none, and its features (its history text above all) are not worth computing
            (most validation events on a large catalogue)."""
            ranker = replay.ranker
            # By data set column (the candidates' id strings compared one by one cost ~0.3 ms per event).
            return within_reach(scored, columns == int(instances.target[row]), config.candidates,
                                lambda: ranker.second_look(history.entries, ranker.cooccurrence, config.second_look,
                                                           history.arrays))

        for event in replay.first_stage().walk_candidates(instances, self.params,
                                                          None if negatives > 0 else target_reachable, self.primed):
            row, scored = event.row, event.scored
            target = dataset.item_ids[int(instances.target[row])]
            extra: list[str] = []
            if negatives > 0:
                uniform = rng.integers(0, dataset.n_items, negatives - negatives // 2)
                popular = rng.choice(dataset.n_items, negatives // 2, p=popularity)
                extra = [target] + [dataset.item_ids[int(i)] for i in np.concatenate([uniform, popular])]
            ranker = replay.ranker  # the replay's current one (a walk back in time would replace it)
            found = ranker.features_of_scored(event.query, event.history, scored, event.columns, ranker.cooccurrence,
                                              extra, candidates=config.candidates, second_look=config.second_look,
                                              arrays=event.arrays)
            is_target = found.item_ids == target
            hit = bool((is_target & found.in_candidates).any())
            if not is_target.any():
                continue  # the server would not return it: nothing to learn about ranking it
            features.append(found.features)
            labels.append(is_target.astype(np.float64))
            sizes.append(len(found.item_ids))
            blend.append(found.blend_score)
            in_candidates.append(found.in_candidates)
            second_look.append(found.second_look)
            gaps.append(replay.gap_seconds(int(instances.pos[row])))
            reachable.append(hit)
            positions.append(int(instances.pos[row]))
            if weight_of is not None:
                weights.append(weight_of[int(instances.pos[row])])
        groups = Groups(
            np.concatenate(features) if features else np.zeros((0, len(FEATURE_NAMES)), np.float32),
            np.concatenate(labels) if labels else np.zeros(0), np.asarray(sizes, dtype=np.int64),
            np.concatenate(blend) if blend else np.zeros(0),
            np.concatenate(in_candidates) if in_candidates else np.zeros(0, bool),
            np.asarray(gaps, dtype=np.float64), np.asarray(reachable, dtype=bool), np.asarray(positions, dtype=np.int64),
            len(self.targets), None if weight_of is None else np.asarray(weights, dtype=np.float64),
            np.concatenate(second_look) if second_look else np.zeros(0, bool),
        )
        self.say(f"{self.name}: {len(groups.sizes)} groups of {len(self.targets)} events "
                 f"({int(groups.reachable.sum())} with the target among the blend's top {config.candidates}), "
                 f"{len(groups.labels)} rows in {time.perf_counter() - self.started:.0f} s")
        return groups


# ------------------------------------------------------------------------------ fitting


def group_ndcg(scores: np.ndarray, groups: Groups, instances: int | None = None, cutoff: int = 10) -> np.ndarray:
    """NDCG@cutoff of each group's target under `scores` (ties at their expected rank); groups whose
    target is not among the candidates count 0, and `instances` pads with 0 for events that formed
    no group, so the mean is over every event asked for."""
    out = []
    start = 0
    for size, reachable in zip(groups.sizes, groups.reachable):
        s, y = scores[start:start + size], groups.labels[start:start + size]
        c = groups.in_candidates[start:start + size]
        start += size
        if not reachable:
            out.append(0.0)
            continue
        target = int(np.flatnonzero(y > 0)[0])
        others = c.copy()
        others[target] = False
        better = int((s[others] > s[target]).sum())
        tied = int((s[others] == s[target]).sum())
        out.append(float(expected_metrics(np.array([better]), np.array([tied]))[f"NDCG@{cutoff}"][0]))
    values = np.asarray(out)
    if instances is not None and instances > len(values):
        values = np.concatenate([values, np.zeros(instances - len(values))])
    return values


def _dataset(groups: Groups | Sequence[Groups], reference=None):
    """The LightGBM dataset of `groups`, or of several in order: their feature matrices are handed
    over as a list (LightGBM bins them as the one matrix they stack into, the same trees, without
    the copy that stacking them would take: ~200 MB at 1.2M rows)."""
    import lightgbm

    parts = [groups] if isinstance(groups, Groups) else [g for g in groups if len(g.sizes)]
    sizes = np.concatenate([g.sizes for g in parts])
    # LambdaRank scales each row's gradient by its weight: a group's weight on every one of its rows.
    weight = (None if all(g.weights is None for g in parts)
              else np.repeat(np.concatenate([g.group_weights() for g in parts]), sizes))
    features = parts[0].features if len(parts) == 1 else [g.features for g in parts]
    return lightgbm.Dataset(features, label=np.concatenate([g.labels for g in parts]), group=sizes,
                            feature_name=list(FEATURE_NAMES), weight=weight, reference=reference,
                            free_raw_data=False)


def lightgbm_params(config: RankerTrainingConfig) -> dict[str, Any]:
    params = {
        "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves, "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction, "bagging_fraction": config.bagging_fraction,
        "bagging_freq": 1, "lambda_l2": config.lambda_l2, "lambdarank_truncation_level": config.truncation_level,
        "seed": config.seed, "deterministic": True, "force_row_wise": True, "verbosity": -1,
    }
    if config.threads:
        params["num_threads"] = config.threads
    return params


@dataclass
class RankerFit:
    """A trained ranker and what its validation said."""

    ranker: LearnedRanker | None
    best_iteration: int
    valid_ndcg_ranker: float
    valid_ndcg_blend: float
    valid_instances: int
    train_groups: int
    valid_groups: int
    seconds: float
    importances: dict[str, float] = field(default_factory=dict)
    # The SHAP shares by gap (importances_by_gap), or their computation still running beside whatever
    # comes next (a Future, read when first asked for).
    gap_importances: "dict[str, dict[str, float]] | Future" = field(default_factory=dict, repr=False)
    curve: list[float] = field(default_factory=list)
    # Validation NDCG@10 with and without the second look (None: not compared).
    second_look_valid: tuple[float, float] | None = None
    # Per range of time since the previous event: what the route choice compared (choose_routes).
    route_choice: list[dict[str, Any]] = field(default_factory=list)
    # (ranker, blend, events) on the validation events the blend's time model was not tuned on, the
    # events where the two compare fairly (None: the blend was tuned on every one of them, or the
    # caller did not say which it was tuned on).
    held_out: tuple[float, float, int] | None = None

    @property
    def importances_by_gap(self) -> dict[str, dict[str, float]]:
        """Per bucket of time since the previous event, each feature's share of the SHAP mass."""
        if isinstance(self.gap_importances, Future):
            self.gap_importances = self.gap_importances.result()
        return self.gap_importances

    @property
    def deciding(self) -> tuple[float, float, int | None]:
        """(ranker, blend, held-out events or None) on validation as `helps` compares them: on the
        events the blend was not tuned on when there are any (on those it was tuned on, the blend's
        figure is its own fit's), else on the whole window."""
        if self.held_out is not None:
            return self.held_out
        return self.valid_ndcg_ranker, self.valid_ndcg_blend, None

    @property
    def helps(self) -> bool:
        """Whether the ranker beats the blend on validation (the figures of `deciding`)."""
        ranker, blend, _ = self.deciding
        return self.ranker is not None and ranker > blend

    def summary(self) -> dict[str, Any]:
        return {
            "best_iteration": self.best_iteration, "valid_NDCG@10_ranker": round(self.valid_ndcg_ranker, 5),
            "valid_NDCG@10_blend": round(self.valid_ndcg_blend, 5), "valid_instances": self.valid_instances,
            "valid_held_out": (None if self.held_out is None else
                               {"NDCG@10_ranker": round(self.held_out[0], 5), "NDCG@10_blend": round(self.held_out[1], 5),
                                "events": self.held_out[2]}),
            "train_groups": self.train_groups, "valid_groups": self.valid_groups, "seconds": round(self.seconds, 1),
            "second_look": self.ranker.spec.second_look if self.ranker is not None else 0,
            "routes": [r.to_dict() for r in self.ranker.spec.routes] if self.ranker is not None else [],
            "route_choice": self.route_choice,
            "valid_NDCG@10_with_without_second_look": (None if self.second_look_valid is None
                                                       else [round(v, 5) for v in self.second_look_valid]),
            "importances": {k: round(v, 4) for k, v in sorted(self.importances.items(), key=lambda kv: -kv[1])},
            "importances_by_gap": {bucket: {k: round(v, 4) for k, v in values.items()}
                                   for bucket, values in self.importances_by_gap.items()},
        }


def fit_ranker(train: Groups, valid: Groups, config: RankerTrainingConfig,
               say: Callable[[str], None] = lambda _m: None, returning: Groups | None = None,
               held_out: np.ndarray | None = None, tuned: np.ndarray | None = None) -> RankerFit:
    """LambdaRank on the training groups, early-stopped on the validation groups as the server ranks
    them (candidates only); gap routes chosen on the validation groups and `returning` (more of the
    validation window's returning users, logged like it); optionally refitted on both training and
    validation with the chosen number of rounds. `held_out`: the global positions of the validation
    events (groups or not) that the blend's time model was not tuned on; the ranker and the blend
    are also compared on those alone, and RankerFit.helps decides on them when there are any.
    `tuned`: the positions it was tuned on, which the blend's score does not compete on for a route
    (choose_routes)."""
    import lightgbm

    started = time.perf_counter()
    served_valid = valid.candidates_only()
    if not len(train.sizes) or not train.labels.any():
        raise ValueError("no training group to fit the ranker on")
    params = lightgbm_params(config)
    train_set = _dataset(train)
    curve: list[float] = []
    callbacks = [lightgbm.record_evaluation(evaluations := {})]
    valid_sets = []
    if len(served_valid.sizes):
        valid_sets = [_dataset(served_valid, reference=train_set)]
        callbacks.append(lightgbm.early_stopping(config.early_stopping_rounds, verbose=False))
    booster = lightgbm.train(params, train_set, num_boost_round=config.max_rounds, valid_sets=valid_sets,
                             valid_names=["validation"] if valid_sets else None, callbacks=callbacks)
    best = int(booster.best_iteration or booster.current_iteration())
    if valid_sets:
        curve = [float(v) for v in evaluations["validation"]["ndcg@10"]]
    booster = booster if best == booster.current_iteration() else _truncated(booster, best)
    spec = RankerSpec(features=FEATURE_NAMES, candidates=config.candidates, second_look=config.second_look)
    ranker = LearnedRanker(booster, spec, threads=1)
    ranker_valid = group_ndcg(ranker.predict(valid.features), valid, valid.instances)
    blend_valid = group_ndcg(valid.blend, valid, valid.instances)
    second_look_valid = None
    without = None  # the validation groups without the second look's rows, once computed
    if config.second_look > 0 and valid.second_look_rows().any():
        # Whether the second look earns its place on this data set: the same model served without
        # it (its candidates dropped) on the same validation events; kept only when it does better.
        without = valid.without_second_look()
        without_valid = group_ndcg(ranker.predict(without.features), without, valid.instances)
        second_look_valid = (float(ranker_valid.mean()), float(without_valid.mean()))
        if not second_look_valid[0] > second_look_valid[1]:
            spec = RankerSpec(features=FEATURE_NAMES, candidates=config.candidates, second_look=0)
            ranker = LearnedRanker(booster, spec, threads=1)
            ranker_valid = without_valid
        say(f"ranker: validation NDCG@10 {second_look_valid[0]:.4f} with the second look, {second_look_valid[1]:.4f} "
            f"without: {'kept' if spec.second_look else 'not used'}")
    as_served = valid if spec.second_look else (without if without is not None else valid.without_second_look())
    routing = as_served
    if returning is not None and len(returning.sizes):
        routing = Groups.concatenate([as_served, returning if spec.second_look else returning.without_second_look()])
    in_sample = None if tuned is None else np.isin(routing.positions, np.asarray(tuned, dtype=np.int64))
    routes, route_choice = choose_routes(ranker, routing, config, say, in_sample=in_sample,
                                         earlier=train.served_view(bool(spec.second_look)))
    if routes:
        spec = replace(spec, routes=routes)
        ranker = LearnedRanker(booster, spec, threads=1)
        ranker_valid = group_ndcg(ranker.predict(as_served.features), as_served, valid.instances)
    if config.refit_on_validation and len(valid.sizes):
        # The early-stopped fit's binned datasets are done with: not held through the refit.
        booster.free_dataset()
        del train_set, valid_sets
        refit = lightgbm.train(params, _dataset([train, valid]), num_boost_round=max(1, int(best * 1.1)))
        ranker = LearnedRanker(refit, spec, threads=1)
    ranker.check()
    fit = RankerFit(ranker, best, float(ranker_valid.mean()) if len(ranker_valid) else 0.0,
                    float(blend_valid.mean()) if len(blend_valid) else 0.0, valid.instances,
                    len(train.sizes), len(valid.sizes), time.perf_counter() - started,
                    ranker.importances(), importances_beside(ranker, as_served), curve,
                    second_look_valid, route_choice, held_out_figures(ranker_valid, blend_valid, valid, held_out))
    say(f"ranker: {best} rounds on {len(train.sizes)} groups ({len(train.labels)} rows) in {fit.seconds:.0f} s; "
        f"validation NDCG@10 {fit.valid_ndcg_ranker:.4f} against the blend's {fit.valid_ndcg_blend:.4f} "
        f"({valid.instances} events)" + ("" if fit.held_out is None else
        f"; on the {fit.held_out[2]} events the blend was not tuned on {fit.held_out[0]:.4f} against {fit.held_out[1]:.4f}"))
    return fit


def held_out_figures(ranker_valid: np.ndarray, blend_valid: np.ndarray, valid: Groups,
                     held_out: np.ndarray | None) -> tuple[float, float, int] | None:
    """(ranker, blend, events): mean NDCG@10 over the `held_out` validation events, from the
    per-event figures group_ndcg gives (the groups first, in `valid`'s order, then 0 for each event
    that formed no group: it counts in the denominator, as on the whole window). None without such
    events."""
    if held_out is None or not len(held_out):
        return None
    groups = len(valid.sizes)
    keep = np.isin(valid.positions, held_out)
    events = len(held_out)
    return (float(ranker_valid[:groups][keep].sum() / events), float(blend_valid[:groups][keep].sum() / events), events)


def gap_ranges(edges: Sequence[float] = GAP_EDGES_S) -> list[tuple[float, float]]:
    """[low, high) seconds since the previous event of each GAP_LABELS bucket."""
    bounds = [0.0, *map(float, edges), math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def choose_routes(ranker: LearnedRanker, groups: Groups, config: RankerTrainingConfig,
                  say: Callable[[str], None] = lambda _m: None,
                  in_sample: np.ndarray | None = None, earlier: Groups | None = None,
                  ) -> tuple[tuple[GapRoute, ...], list[dict[str, Any]]]:
    """(routes, what was compared per gap range): a range is routed to the feature that ranks its
    validation events best alone, when that beats the trees (`ranker`, without routes) by a paired
    bootstrap bound above zero (RankerTrainingConfig.route_level, shared among the features); a range
    after a long absence (`route_trend_after_s`) otherwise to its best trend window, unless the trees
    rank its events better than that by such a bound (shared among the trend windows).
    `in_sample`: per group, whether the blend's time model was tuned on its event; the blend's score
    competes on the other events only (on those, its figure is its own fit's).
    `earlier`: groups from earlier windows, as served (the training groups: Groups.served_view). The
    trend window a range after a long absence would go to is the one that ranks that range's events
    best over these and the validation events together, each event counted once: a validation window
    holds a few hundred such events, and on one draw of the short-lived items log (README) it put the
    month's trend ahead where the week's led in each earlier third of the training windows and again
    on test. Whether the trees keep the range is still decided on the validation events alone (the
    trees were fitted on the earlier ones)."""
    features = [f for f in config.route_features if f in FEATURE_INDEX]
    if not features or not len(groups.sizes):
        return (), []
    if ranker.spec.routes:
        ranker = LearnedRanker(ranker.booster, replace(ranker.spec, routes=()), threads=1)
    trees = group_ndcg(ranker.predict(groups.features), groups)
    def alone_figures(of: Groups, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Per feature, each group's NDCG@10 with the candidates ranked by that feature alone (no value: last)."""
        return {f: group_ndcg(np.where(np.isfinite(col := of.features[:, FEATURE_INDEX[f]].astype(np.float64)),
                                       col, -np.inf), of) for f in names}

    alone = alone_figures(groups, features)
    routes, report = [], []
    # One-sided bounds: the lower end of a two-sided interval, the level shared among the signals compared.
    level = 1.0 - 2.0 * config.route_level / len(features)
    trends = [f for f in features if f.startswith("trend_")]
    trend_level = 1.0 - 2.0 * config.route_level / max(1, len(trends))
    before: dict[str, np.ndarray] = {}
    if trends and earlier is not None and len(earlier.sizes) and config.route_trend_after_s is not None:
        before = alone_figures(earlier, trends)

    def interval(difference: np.ndarray, at_level: float) -> tuple[float, list[float]]:
        """(the bound, the interval as reported)."""
        lo, hi = bootstrap_ci(difference, level=at_level, seed=config.seed)
        return float(lo), [round(float(lo), 5), round(float(hi), 5)]

    def compared(feature: str, members: np.ndarray) -> np.ndarray:
        """The events `feature` alone competes on: the blend's score not on those it was tuned on."""
        return members & ~in_sample if feature == BLEND_SCORE and in_sample is not None else members

    def alone_mean(feature: str, members: np.ndarray) -> float:
        rows = compared(feature, members)
        return float(alone[feature][rows].mean()) if rows.any() else -math.inf

    for label, (low, high) in zip(GAP_LABELS, gap_ranges()):
        members = (groups.gap_seconds >= low) & (groups.gap_seconds < high)
        n = int(members.sum())
        if not n:
            continue
        best = max(features, key=lambda f: alone_mean(f, members))
        on = compared(best, members)
        entry: dict[str, Any] = {"gap": label, "events": n, "trees": round(float(trees[members].mean()), 5),
                                 "best_feature": best, "feature_alone": round(alone_mean(best, members), 5)}
        if int(on.sum()) != n:
            entry.update(feature_events=int(on.sum()), trees_on_those=round(float(trees[on].mean()), 5))
        routed = False
        if int(on.sum()) >= config.route_min_events and alone[best][on].mean() > trees[on].mean():
            lo, entry["difference_ci"] = interval(alone[best][on] - trees[on], level)
            routed = lo > 0
        if routed:
            entry["rule"] = "bootstrap bound"
        elif trends and config.route_trend_after_s is not None and low >= config.route_trend_after_s:
            pooled = {f: alone[f][members] for f in trends}
            if before:
                earlier_members = (earlier.gap_seconds >= low) & (earlier.gap_seconds < high)
                pooled = {f: np.concatenate([pooled[f], before[f][earlier_members]]) for f in trends}
                entry.update(earlier_events=int(earlier_members.sum()),
                             trend_pooled={f: round(float(v.mean()), 5) for f, v in pooled.items()})
            trend = max(trends, key=lambda f: float(pooled[f].mean()))
            entry.update(best_trend=trend, trend_alone=round(float(alone[trend][members].mean()), 5))
            if n >= config.route_min_events:
                lo, entry["trees_lead_ci"] = interval(trees[members] - alone[trend][members], trend_level)
                if not lo > 0:
                    best, routed, on = trend, True, members
                    entry["rule"] = "trend after a long absence"
        entry["routed"] = routed
        if routed:
            entry["route"] = best
            routes.append(GapRoute(low, high, best))
            say(f"ranker: users {label} since their previous event are ranked by {best} "
                f"(validation NDCG@10 {float(alone[best][on].mean()):.4f} vs the trees' {float(trees[on].mean()):.4f}, "
                f"{int(on.sum())} events; {entry['rule']})")
        report.append(entry)
    return tuple(routes), report


def _truncated(booster, rounds: int):
    """The booster with only its first `rounds` trees (what early stopping chose)."""
    import lightgbm

    return lightgbm.Booster(model_str=booster.model_to_string(num_iteration=rounds))


def importances_beside(ranker: LearnedRanker, groups: Groups) -> Future:
    """importances_by_gap(ranker, groups) computed in a thread, on one core and a copy of the model,
    while this one goes on: LightGBM leaves the interpreter free while it computes, and what
    usually comes next (the evaluation's test rerank) is Python on one core. The values are the
    same: each row's SHAP values do not depend on the threads."""
    copy = LearnedRanker.from_model_text(ranker.model_text(), ranker.spec, threads=1)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker-importances")
    try:
        return executor.submit(importances_by_gap, copy, groups, threads=1)
    finally:
        executor.shutdown(wait=False)  # the thread ends with its one task


def importances_by_gap(ranker: LearnedRanker, groups: Groups, per_bucket: int = 50,
                       seed: int = 0, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Per bucket of time since the user's previous event: each feature's share of the mean
    |contribution| to the scores of the candidates (SHAP values on up to `per_bucket` validation
    groups of each bucket: SHAP costs ~trees × leaves × depth per row, ~40 s for 270 groups of 200
    candidates and 170 trees on one core; `threads`: LightGBM's, default every core)."""
    if not len(groups.sizes):
        return {}
    served = groups.candidates_only() if groups.reachable.any() else groups
    if not len(served.sizes):
        return {}
    all_buckets = np.searchsorted(np.asarray(GAP_EDGES_S), served.gap_seconds, side="right")
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(served.sizes), dtype=bool)
    for b in np.unique(all_buckets):
        members = np.flatnonzero(all_buckets == b)
        picked[rng.choice(members, min(per_bucket, len(members)), replace=False)] = True
    group_of_row = np.repeat(np.arange(len(served.sizes)), served.sizes)
    rows = picked[group_of_row]
    contributions = np.abs(ranker.contributions(served.features[rows], threads=threads or os.cpu_count() or 1))
    counts = np.bincount(all_buckets, minlength=len(GAP_LABELS))
    group_of_row = group_of_row[rows]
    bucket = all_buckets
    out: dict[str, dict[str, float]] = {}
    for b, label in enumerate(GAP_LABELS):
        rows = bucket[group_of_row] == b
        if not rows.any():
            continue
        mean = contributions[rows].mean(axis=0)
        total = float(mean.sum())
        top = np.argsort(-mean)[:8]
        out[f"{label} ({int(counts[b])} events)"] = {
            ranker.feature_names[i]: float(mean[i] / total) if total > 0 else 0.0 for i in top}
    return out


def train_ranker(
    dataset: Dataset,
    items: Mapping[str, Item],
    encode: Encode,
    item_vectors: np.ndarray | None,
    params: TimeModelParams,
    training: Sequence[FeatureSlice],
    validation: FeatureSlice,
    config: RankerTrainingConfig | None = None,
    say: Callable[[str], None] = lambda _m: None,
    index: ItemIndex | None = None,
    fitted: Callable[[FeatureSlice], CooccurrenceModel | None] = lambda _s: None,
    tuned: np.ndarray | None = None,
) -> RankerFit:
    """Log the features of the training and validation slices and fit the ranker on them (`index`:
    the item index of `item_vectors`, shared by the slices' replays when given; `fitted(slice)`: a
    co-occurrence model already fitted on exactly the slice's fit events, else None; `tuned`: the
    global positions of the events the blend's time model `params` was tuned on, which the choice
    between the ranker and the blend leaves out of the validation sample: fit_ranker's held_out)."""
    config = config or RankerTrainingConfig()
    per_slice = config.max_groups_per_slice
    if config.max_item_scores_per_slice is not None:
        # The validation window is left at max_valid_groups: it computes features only for the events
        # whose target is among the candidates (a fifth of them on ml-latest-small), and early
        # stopping needs its groups.
        per_slice = min(per_slice, max(1, config.max_item_scores_per_slice // max(1, dataset.n_items)))
    def collection(feature_slice: FeatureSlice, **options: Any) -> _Collection:
        return _Collection(dataset, items, encode, item_vectors, params, feature_slice, config, say=say, index=index,
                           cooccurrence=fitted(feature_slice), gap_sampling=True, **options)

    planned = [_Planned(functools.partial(collection, s, max_groups=per_slice, negatives=config.negatives,
                                          seed=config.seed + 1 + k), forkable=config.negatives > 0,
                        events=min(len(s.targets), per_slice))
               for k, s in enumerate(training)]
    planned.append(_Planned(functools.partial(collection, validation, max_groups=config.max_valid_groups,
                                              negatives=0, seed=config.seed),
                            forkable=False, events=min(len(validation.targets), config.max_valid_groups)))
    *parts, valid = _walk_all(planned, config.collect_workers, say)
    returning = None
    if config.route_features and config.max_valid_returning_groups > 0:
        targets = np.asarray(validation.targets, dtype=np.int64)
        gaps = np.nan_to_num(Instances(dataset, targets).time_since_previous(), nan=0.0)
        # The window's returning users' events not already in the validation sample (whose own
        # targets were drawn from all of them; a repeat of the draw gives the same sample).
        sampled = _sampled_targets(dataset, targets, config.max_valid_groups, config.seed)
        more = targets[(gaps >= GAP_EDGES_S[0]) & ~np.isin(targets, sampled)]
        if len(more):
            cap = config.max_valid_returning_groups
            if config.max_item_scores_per_slice is not None:
                cap = min(cap, max(1, config.max_item_scores_per_slice // max(1, dataset.n_items)))
            returning = collection(FeatureSlice("validation-returning", validation.fit, more), max_groups=cap,
                                   negatives=0, seed=config.seed).groups()
    train = Groups.concatenate(parts)
    parts.clear()  # the windows' own rows: a second copy of every training row during the fit
    held_out = None
    if tuned is not None:
        sample = _sampled_targets(dataset, np.asarray(validation.targets, dtype=np.int64), config.max_valid_groups,
                                  config.seed)
        held_out = sample[~np.isin(sample, np.asarray(tuned, dtype=np.int64))]
    return fit_ranker(train, valid, config, say, returning=returning, held_out=held_out, tuned=tuned)


@dataclass(frozen=True)
class _Planned:
    """A slice's logging to come: `make()` sets it up (targets drawn, replay built)."""

    make: Callable[[], "_Collection"]
    forkable: bool  # a training slice (_Collection.forkable)
    events: int  # about how many events it logs (the work shared between processes)


def _walk_all(planned: Sequence[_Planned], workers: int | None,
              say: Callable[[str], None] = lambda _m: None) -> list[Groups]:
    """Each planned slice's groups, in order. With two or more `workers` (None: up to two, by the
    CPUs) and fork available, some training slices' walks (pure Python, one core each) run in a
    forked process while this one walks the others: their history texts are encoded here first, by
    the encoder this process holds (an encoder's threads do not survive a fork), so the child only
    reads vectors. The child sends its groups back; should it fail (a text it would have to encode,
    a crash), its slices are set up and walked again here: the groups are the same either way.
    Slices are set up when walked, so only those handed to the child are held at once."""
    forkable = [k for k, p in enumerate(planned) if p.forkable and p.events > 0]
    if workers_for(workers) < 2 or not forkable:
        return [p.make().groups() for p in planned]
    # Share the work: the child takes training slices, largest first, while its load is at most this
    # process's (a validation event costs about half a training one: most are out of reach and log
    # nothing; encoding a training event's text here, a quarter).
    load = {True: 0.0, False: sum(0.5 * p.events for p in planned if not p.forkable)}
    in_child: list[int] = []
    for k in sorted(forkable, key=lambda k: -planned[k].events):
        to_child = load[True] <= load[False]
        load[to_child] += planned[k].events
        if to_child:
            in_child.append(k)
            load[False] += 0.25 * planned[k].events  # its texts, encoded here
    in_child.sort()  # walked in the planned order
    started = time.perf_counter()
    handed = [_encoded(planned[k].make()) for k in in_child]
    say(f"{', '.join(c.name for c in handed)}: logged in a second process (set up and their texts encoded here "
        f"in {time.perf_counter() - started:.0f} s)")
    out: dict[int, Groups] = {}
    with Forked(functools.partial(_walk_in_child, handed), name="ranker-features") as child:
        handed.clear()  # the child holds its own copy: this process lets the set-up slices go
        for k, p in enumerate(planned):
            if k not in in_child:
                out[k] = p.make().groups()
        failure = child.wait()
        if failure is None:
            out.update((k, Groups.load(child.folder / f"{n}.npz")) for n, k in enumerate(in_child))
    if failure is not None:
        log.warning("logging %s in a second process failed (%s): logging them here",
                    ", ".join(f"slice {k}" for k in in_child), failure)
        for k in in_child:
            out[k] = planned[k].make().groups()
    return [out[k] for k in range(len(planned))]


def _encoded(collection: _Collection) -> _Collection:
    collection.encode_texts()
    return collection


def _walk_in_child(collections: list[_Collection], folder: Path) -> None:
    """The forked process's work: walk `collections` without an encoder, each one's groups saved to
    `folder` as soon as logged (not held, nor pickled through a pipe)."""
    for n in range(len(collections)):
        collection = collections.pop(0)
        if collection.replay is not None:
            collection.replay.encode = refuse_to_encode
        groups = collection.groups()
        del collection
        groups.save(folder / f"{n}.npz")
        del groups


def _sampled_targets(dataset: Dataset, targets: np.ndarray, max_groups: int | None, seed: int) -> np.ndarray:
    """The targets collect_groups draws for a validation window (negatives 0): the same rule and seed."""
    targets = targets[dataset.rank_in_user[targets] > 0]
    if max_groups is not None and len(targets) > max_groups:
        targets = _uniform_draw(targets, max_groups, np.random.default_rng(seed))
    return targets


def _uniform_draw(targets: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of `targets` drawn uniformly, in global order (a validation window's sample: the first draw
    of collect_groups' generator, so _sampled_targets repeats it from the seed)."""
    return np.sort(rng.choice(targets, k, replace=False))


__all__ = [
    "FeatureSlice",
    "Groups",
    "RankerFit",
    "ROUTE_FEATURES",
    "RankerTrainingConfig",
    "choose_routes",
    "collect_groups",
    "fit_ranker",
    "gap_ranges",
    "group_ndcg",
    "held_out_figures",
    "importances_beside",
    "importances_by_gap",
    "lightgbm_params",
    "loo_slices",
    "sample_by_gap",
    "slices_of",
    "temporal_slices",
    "train_ranker",
]
