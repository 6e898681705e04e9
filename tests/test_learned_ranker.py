"""The learned ranker's features, model file and serving path: one feature code for server and trainer."""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import pytest

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.features import (
    FEATURE_INDEX, FEATURE_NAMES, MAX_HISTORY_ITEMS, FeatureInputs, FirstStage, HistoryArrays, candidate_features,
    categories_of,
)
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.learned_ranker import GapRoute, LearnedRanker, RankerError, RankerSpec, load_version_ranker
from chronorec.server.core.manifest import Manifest, ManifestError, TimeModelParams
from chronorec.server.core.ranking import RecommendQuery, TimeAwareRanker
from chronorec.server.core.timetext import HistoryEntry, action_strength
from chronorec.trainer import ranker_train as rt
from chronorec.trainer.forked import can_fork
from chronorec.trainer.protocols import Dataset, temporal_split
from chronorec.trainer.tune import ReplayRanker, fit_cooccurrence

from conftest import ANCHOR

DIM = 16


def hashed_encoder(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for the ONNX encoder: a unit vector seeded by each text."""
    vectors = np.stack([np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))
                        .standard_normal(DIM) for t in texts]).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def feature(matrix: np.ndarray, row: int, name: str) -> float:
    return float(matrix[row, FEATURE_INDEX[name]])


# ------------------------------------------------------------------------------ features


def small_world():
    items = [Item(f"i{k}", f"title {k}", category=c) for k, c in
             enumerate(["Action, Comedy", "Comedy", "Drama", "Action", "Horror|Drama", "Comedy"])]
    t0 = 1_000_000.0
    events = [
        # Other users: i1 is followed by i2, and i3 by i4.
        Event("a1", "a", "i1", "view", t0), Event("a2", "a", "i2", "view", t0 + 10),
        Event("b1", "b", "i1", "view", t0 + 20), Event("b2", "b", "i2", "view", t0 + 30),
        Event("c1", "c", "i3", "view", t0 + 40), Event("c2", "c", "i4", "view", t0 + 50),
        # The user: i3 yesterday, i1 a minute ago.
        Event("u1", "u", "i3", "view", t0 + 100), Event("u2", "u", "i1", "view", t0 + 100 + 86400),
    ]
    return items, events, t0 + 100 + 86400 + 60


def test_features_by_hand():
    items, events, at = small_world()
    state = InteractionState()
    state.add(events)
    model = CooccurrenceModel.fit(state.user_sequences(), [i.item_id for i in items])
    index = ItemIndex(DIM)
    index.build([i.item_id for i in items], hashed_encoder([i.item_id for i in items]))
    categories = {i.item_id: i.category for i in items}
    history = state.history("u", at)
    short_term = hashed_encoder(["the history text"])[0]
    inputs = FeatureInputs(at=at, history=history, params=TimeModelParams(), index=index, state=state,
                           cooccurrence=model, short_term=short_term, category_of=lambda i: categories.get(i, ""))
    ids = np.array(["i2", "i4", "i5", "i0"], dtype=object)
    n = len(ids)
    first = FirstStage(item_ids=ids, category=np.array([categories[i] for i in ids], dtype=object),
                       published_at=np.array([at - 86400, np.nan, np.nan, np.nan]), score=np.linspace(1, 0, n),
                       rank=np.arange(n, dtype=float), semantic=np.zeros(n), cooccurrence=np.zeros(n),
                       trend=np.zeros(n), freshness=np.zeros(n))
    x = candidate_features(inputs, first)
    assert x.shape == (n, len(FEATURE_NAMES)) and x.dtype == np.float32

    # Transitions: i1 (the user's newest) was followed by i2 in both other histories.
    assert feature(x, 0, "transition_last") == pytest.approx(1.0)
    assert feature(x, 1, "transition_last") == 0.0
    assert feature(x, 1, "transition_recent") > 0  # i3 -> i4, one event further back
    # Popularity: i2 had 2 of the 8 events; i5 none (cold), and it was never seen.
    assert feature(x, 0, "popularity_share") == pytest.approx(2 / 8)
    assert feature(x, 2, "cold_item") == 1.0 and feature(x, 0, "cold_item") == 0.0
    assert math.isnan(feature(x, 2, "item_first_seen_days"))
    assert feature(x, 0, "item_age_days") == pytest.approx(1.0)
    assert math.isnan(feature(x, 1, "item_age_days"))
    # The last hour: only u's own i1 event; trend over a day holds it too.
    assert feature(x, 0, "trend_1h") == 0.0 and feature(x, 0, "trend_1d") == 0.0
    # The user: a minute since the last event, in a session of one, two events.
    assert feature(x, 0, "user_gap_log_s") == pytest.approx(math.log1p(60), rel=1e-6)
    assert feature(x, 0, "user_session_events") == 1.0
    assert feature(x, 0, "user_history_length") == 2.0
    # Categories: the history is Action (i3, yesterday) and Comedy (i1, a minute ago).
    assert feature(x, 3, "category_match_all") == pytest.approx(1.0)  # i0: Action, Comedy
    assert feature(x, 2, "category_match_all") == pytest.approx(0.5)  # i5: Comedy
    assert feature(x, 1, "category_match_all") == 0.0  # i4: Horror|Drama
    assert feature(x, 3, "category_match_1h") > 0.99  # within the hour, only Comedy counts
    assert feature(x, 3, "category_recency_log_s") == pytest.approx(math.log1p(60), rel=1e-6)
    assert math.isnan(feature(x, 1, "category_recency_log_s"))
    # Semantic parts kept apart: the history text and the newest item.
    vectors, _ = index.vectors_matrix_for(list(ids))
    last = index.vector_of(["i1"])[0]
    np.testing.assert_allclose(x[:, FEATURE_INDEX["semantic_history_text"]], vectors @ short_term, rtol=1e-5)
    np.testing.assert_allclose(x[:, FEATURE_INDEX["semantic_last_item"]], vectors @ last, rtol=1e-5)
    # The whole history alike: the equal-weight co-occurrence and the strength-weighted mean, undecayed.
    newest_first = ["i1", "i3"]
    similarity = model.pair_similarities(newest_first, list(ids))
    np.testing.assert_allclose(x[:, FEATURE_INDEX["cooccurrence_all"]], similarity.mean(axis=0), rtol=1e-5)
    strength = {e.item_id: action_strength(e.action, e.value) for e in history}
    whole = sum(strength[i] * index.vector_of([i])[0] for i in newest_first)
    np.testing.assert_allclose(x[:, FEATURE_INDEX["semantic_mean_all"]], vectors @ (whole / np.linalg.norm(whole)),
                               rtol=1e-5)
    # The first stage is copied through.
    np.testing.assert_array_equal(x[:, FEATURE_INDEX["blend_rank"]], np.arange(n))
    # Ranks among the candidates: how many have a strictly larger value; ties share the best place.
    popularity = x[:, FEATURE_INDEX["popularity_share"]]
    expected = [(popularity > v).sum() for v in popularity]
    np.testing.assert_array_equal(x[:, FEATURE_INDEX["popularity_share_rank"]], expected)
    # Against the reference rows only (a training group's sampled negatives rank without moving the others).
    reference = np.array([True, True, False, False])
    y = candidate_features(inputs, replace(first, reference=reference))
    semantic = x[:, FEATURE_INDEX["semantic_history_text"]]
    expected = [(semantic[reference] > v).sum() for v in semantic]
    np.testing.assert_array_equal(y[:, FEATURE_INDEX["semantic_history_text_rank"]], expected)
    # A candidate without a value (no vector, no history text) ranks after every valued one.
    no_text = candidate_features(replace(inputs, short_term=None), first)
    np.testing.assert_array_equal(no_text[:, FEATURE_INDEX["semantic_history_text_rank"]], [0, 0, 0, 0])


def test_history_arrays_read_a_history_as_the_per_event_rules_do():
    # Reference: the rules written over the HistoryEntry list one event at a time. Histories with
    # repeats, negative feedback and more distinct items than the features read; the data set's
    # columns (another item coding) give the same arrays.
    rng = np.random.default_rng(5)
    actions = [("rating", 1.0), ("rating", 4.5), ("view", None), ("dislike", None), ("skip", None), ("like", None)]
    catalogue = [f"item{k}" for k in range(400)]
    for length in (0, 1, 7, 150, 900):
        picks = rng.integers(0, 400 if length > 150 else 12, length)
        history = [HistoryEntry(catalogue[c], *actions[a][:1], 1_000.0 + 60.0 * k, actions[a][1])
                   for k, (c, a) in enumerate(zip(picks.tolist(), rng.integers(0, len(actions), length).tolist()))]
        newest_first = list(dict.fromkeys(e.item_id for e in reversed(history)))[:MAX_HISTORY_ITEMS]
        place = {item_id: k for k, item_id in enumerate(newest_first)}
        positive: dict[str, float] = {}
        for e in history:
            if e.item_id in place and action_strength(e.action, e.value) > 0:
                positive[e.item_id] = positive.get(e.item_id, 0.0) + 1.0
        newest_positive = [e.item_id for e in reversed(history) if action_strength(e.action, e.value) > 0][:5]
        for arrays in (HistoryArrays.of(history),
                       HistoryArrays([e.timestamp for e in history],
                                     [action_strength(e.action, e.value) for e in history],
                                     [catalogue.index(e.item_id) for e in history], catalogue)):
            assert len(arrays) == length
            assert arrays.times.tolist() == [e.timestamp for e in history]
            assert arrays.strengths.tolist() == [action_strength(e.action, e.value) for e in history]
            assert arrays.newest_first == newest_first
            assert arrays.event_rows.tolist() == [place.get(e.item_id, -1) for e in history]
            assert list(arrays.positive_counts().items()) == list(positive.items())
            assert arrays.newest_positive(5) == newest_positive
        assert length < 900 or len(newest_first) == MAX_HISTORY_ITEMS


def test_category_fields():
    assert categories_of("Action, Comedy") == {"action", "comedy"}
    assert categories_of("Adventure|Animation|Children") == {"adventure", "animation", "children"}
    assert categories_of("") == frozenset()


def test_transitions_are_directional():
    model = CooccurrenceModel.fit({"a": ["x", "y"], "b": ["x", "y"], "c": ["y", "z"]}, ["x", "y", "z"])
    block = model.transition_block(["x", "y", "unknown"], ["x", "y", "z"])
    assert block[0, 1] > 0 and block[1, 0] == 0  # x -> y, never y -> x
    assert block[1, 2] > 0
    assert not block[2].any()
    np.testing.assert_allclose(block[0].sum(), 1.0)


# ---------------------------------------------------------------------- trainer and server


@pytest.fixture(scope="module")
def drift():
    data = generate_drift_dataset(seed=5, n_items=120, n_users=30, n_events_per_user=24, anchor=ANCHOR)
    return Dataset(data.items, data.events)


@pytest.fixture(scope="module")
def logged(drift):
    """The trainer's groups of the validation window and a ranker fitted on its training windows."""
    split = temporal_split(drift)
    training, validation = rt.temporal_slices(split, training_slices=1)
    items = {i.item_id: i for i in drift.items}
    config = rt.RankerTrainingConfig(candidates=40, negatives=4, max_groups_per_slice=300, max_valid_groups=60,
                                     min_data_in_leaf=5, max_rounds=30, early_stopping_rounds=10)
    params = TimeModelParams(history_max_events=10)
    fit = rt.train_ranker(drift, items, hashed_encoder, None, params, training, validation, config)
    groups = rt.collect_groups(drift, items, hashed_encoder, None, params, validation, config,
                               max_groups=12, negatives=0, seed=3)
    return split, validation, items, params, config, fit, groups


def served_ranker(drift, items, fit_positions, position, learned=None, **options) -> TimeAwareRanker:
    """A ranker built as the server builds one, holding the events before `position`."""
    item_ids = [i for i in drift.item_ids if i in items]
    index = ItemIndex(DIM)
    index.build(item_ids, hashed_encoder([item_text(items[i]) for i in item_ids]))
    state = InteractionState()
    state.add(drift.event_at(p) for p in range(position))
    model = fit_cooccurrence(drift, fit_positions, item_ids)
    return TimeAwareRanker(items, index, state, model, hashed_encoder, learned_ranker=learned, **options)


def test_server_computes_the_features_the_trainer_logged(drift, logged):
    split, validation, items, params, config, fit, groups = logged
    assert len(groups.sizes) >= 5
    start = 0
    checked = 0
    for position, size in zip(groups.positions, groups.sizes):
        logged_rows = groups.features[start:start + size]
        start += size
        server = served_ranker(drift, items, validation.fit, int(position))
        user = drift.user_ids[drift.user[position]]
        query = RecommendQuery(user_id=user, k=10, at=float(drift.ts[position]), params=params)
        served = server.candidate_features(query, candidates=config.candidates)
        np.testing.assert_array_equal(served.features, logged_rows)
        checked += 1
    assert checked == len(groups.sizes)


def test_a_ranker_reorders_the_served_candidates_and_names_its_features(drift, logged):
    split, validation, items, params, config, fit, groups = logged
    assert fit.ranker is not None and fit.best_iteration >= 1
    position = int(validation.targets[-1])
    user = drift.user_ids[drift.user[position]]
    at = float(drift.ts[position])
    query = RecommendQuery(user_id=user, k=10, at=at, params=params, exhaustive=True)
    blend_only = served_ranker(drift, items, validation.fit, position)
    # With the second look whatever the validation chose for this small data set.
    model = LearnedRanker.from_model_text(fit.ranker.model_text(), replace(fit.ranker.spec, second_look=50))
    learned = served_ranker(drift, items, validation.fit, position, model)

    blend_scores = blend_only.score_candidates(query)
    scored = learned.score_candidates(query)
    assert list(scored.item_ids) == list(blend_scores.item_ids)  # the same candidates, rescored
    order_blend = np.argsort(-blend_scores.score, kind="stable")
    # The model scores the blend's best and the second look's items (the whole history's
    # co-occurrence and mean vector) among the candidates; the rest stay below in the blend's order.
    history = learned.history_for(query.resolved())
    second = set(learned.second_look(history, learned.cooccurrence)) & set(scored.item_ids.tolist())
    pool_ids = set(scored.item_ids[order_blend[:config.candidates]].tolist()) | second
    assert len(pool_ids) > config.candidates  # the second look reaches past the blend's best
    top = np.flatnonzero(np.isin(scored.item_ids, list(pool_ids)))
    rest = order_blend[~np.isin(order_blend, top)]
    logged_features = learned.candidate_features(query, candidates=config.candidates)
    assert set(logged_features.item_ids.tolist()) == pool_ids
    np.testing.assert_allclose(np.sort(scored.score[top]), np.sort(model.predict(logged_features.features)))
    assert scored.score[top].min() > scored.score[rest].max()
    assert (np.diff(scored.score[rest]) <= 0).all()

    result = learned.recommend(RecommendQuery(user_id=user, k=5, at=at, params=params))
    assert len(result.items) == 5
    assert all(r.feature_reasons for r in result.items)
    assert all(reason.name in FEATURE_NAMES for r in result.items for reason in r.feature_reasons)
    assert all(abs(a.contribution) >= abs(b.contribution) for r in result.items
               for a, b in zip(r.feature_reasons, r.feature_reasons[1:]))
    # Without a ranker the blend answers, with no feature reasons.
    plain = blend_only.recommend(RecommendQuery(user_id=user, k=5, at=at, params=params))
    assert all(not r.feature_reasons for r in plain.items)


def test_the_validation_decides_whether_the_second_look_serves(logged):
    split, validation, items, params, config, fit, groups = logged
    assert groups.second_look_rows().any()
    without = groups.without_second_look()
    # Its rows go, the target's row stays (outside the candidates); every other row is unchanged.
    kept = ~groups.second_look_rows() | (groups.labels > 0)
    np.testing.assert_array_equal(without.features, groups.features[kept])
    assert not without.second_look_rows().any() and without.sizes.sum() == kept.sum()
    only_second = [bool((lab > 0)[sl].any()) for lab, sl in zip(np.split(groups.labels, np.cumsum(groups.sizes)[:-1]),
                                                                  np.split(groups.second_look_rows(), np.cumsum(groups.sizes)[:-1]))]
    np.testing.assert_array_equal(without.reachable, groups.reachable & ~np.array(only_second))
    # The fit compared both on its validation window and serves the better.
    with_look, without_look = fit.second_look_valid
    assert fit.ranker.spec.second_look == (config.second_look if with_look > without_look else 0)
    assert fit.summary()["second_look"] == fit.ranker.spec.second_look


def test_held_out_figures_count_every_held_out_event_groups_or_not():
    # Three groups (events at positions 10, 11, 12) and two more events that formed no group.
    groups = rt.Groups(np.zeros((6, len(FEATURE_NAMES)), np.float32), np.array([1, 0, 1, 0, 1, 0]),
                       np.array([2, 2, 2]), np.zeros(6), np.ones(6, bool), np.zeros(3), np.ones(3, bool),
                       np.array([10, 11, 12]), 5)
    ranker = np.array([1.0, 0.5, 0.25, 0.0, 0.0])  # per group, then 0 for each groupless event
    blend = np.array([0.5, 0.5, 0.5, 0.0, 0.0])
    assert rt.held_out_figures(ranker, blend, groups, None) is None
    assert rt.held_out_figures(ranker, blend, groups, np.zeros(0, np.int64)) is None
    # Events 11 and 12 formed groups; 13 and 14 did not and count 0 for both.
    assert rt.held_out_figures(ranker, blend, groups, np.array([11, 12, 13, 14])) == (0.75 / 4, 1.0 / 4, 4)


def test_the_ranker_and_the_blend_are_compared_where_the_blend_was_not_tuned(drift, logged):
    split, validation, items, params, config, fit, groups = logged
    assert fit.held_out is None and fit.summary()["valid_held_out"] is None  # no tuning named
    wide = replace(config, max_valid_groups=10_000, route_features=())
    targets = np.asarray(validation.targets)
    asked = targets[drift.rank_in_user[targets] > 0]  # every validation event with a history
    tuned = asked[::2]
    half = rt.train_ranker(drift, items, hashed_encoder, None, params, rt.temporal_slices(split, training_slices=1)[0],
                           validation, wide, tuned=tuned)
    assert half.valid_instances == len(asked) and half.held_out[2] == len(asked) - len(tuned)
    assert half.summary()["valid_held_out"]["events"] == len(asked) - len(tuned)
    # The blend's figure on the events it was tuned on is its own fit's: the held-out events decide.
    whole_wins = replace(half, valid_ndcg_ranker=0.3, valid_ndcg_blend=0.1)
    assert not replace(whole_wins, held_out=(0.1, 0.2, 5)).helps
    assert replace(whole_wins, held_out=(0.2, 0.1, 5)).helps
    assert replace(whole_wins, held_out=None).helps and not replace(half, held_out=None, valid_ndcg_ranker=0.1,
                                                                    valid_ndcg_blend=0.1).helps
    # Tuned on every event of the window (loo's validation): nothing is held out, the whole window decides.
    every = rt.train_ranker(drift, items, hashed_encoder, None, params, rt.temporal_slices(split, training_slices=1)[0],
                            validation, wide, tuned=targets)
    assert every.held_out is None


def test_the_importances_by_gap_computed_beside_are_those_computed_here(logged):
    split, validation, items, params, config, fit, groups = logged
    pending = rt.importances_beside(fit.ranker, groups)
    here = rt.importances_by_gap(fit.ranker, groups, threads=2)
    assert here and pending.result() == here
    # The fit's own were started beside and are read back when first asked for.
    assert fit.importances_by_gap and fit.summary()["importances_by_gap"] == {
        bucket: {k: round(v, 4) for k, v in values.items()} for bucket, values in fit.importances_by_gap.items()}
    assert not isinstance(fit.gap_importances, Future)


def test_groups_handed_to_lightgbm_apart_train_the_trees_of_their_stack(logged):
    # The refit reads the training and validation groups as two matrices instead of one stacked copy.
    import lightgbm

    split, validation, items, params, config, fit, groups = logged
    weighted = replace(groups, weights=np.linspace(0.5, 2.0, len(groups.sizes)))
    for first in (groups, weighted):
        second = first._rows(np.arange(len(first.labels)) >= 0, np.arange(len(first.sizes)) % 2 == 0,
                             first.in_candidates, first.reachable)
        stacked = rt.Groups.concatenate([first, second])
        apart = rt._dataset([first, second])
        assert isinstance(apart.data, list) and len(apart.data) == 2
        trees = [lightgbm.train(rt.lightgbm_params(replace(config, min_data_in_leaf=2)), d, num_boost_round=5)
                 for d in (rt._dataset(stacked), apart)]
        assert trees[0].model_to_string() == trees[1].model_to_string()


def test_the_second_look_joins_the_candidates_on_a_large_catalogs_path(drift, logged):
    """Above `exhaustive_below` the ranker scores index, co-occurrence and trend candidates only:
    the second look's items must be among them, or the learned ranker could not reach them."""
    split, validation, items, params, config, fit, groups = logged
    position = int(validation.targets[-1])
    user = drift.user_ids[drift.user[position]]
    query = RecommendQuery(user_id=user, k=3, at=float(drift.ts[position]), params=params)
    model = LearnedRanker.from_model_text(fit.ranker.model_text(), replace(fit.ranker.spec, second_look=50))
    ranker = served_ranker(drift, items, validation.fit, position, model, exhaustive_below=1, oversample=1)
    history = ranker.history_for(query.resolved())
    # Those that pass the filters (seen items and items unavailable at the time drop out).
    available = set(ranker.score_candidates(replace(query, exhaustive=True)).item_ids.tolist())
    second = set(ranker.second_look(history, ranker.cooccurrence)) & available
    assert second
    features = ranker.candidate_features(query, candidates=3)
    assert second <= set(features.item_ids.tolist())
    assert len(ranker.recommend(query).items) == 3


def test_learned_replay_in_batches_scores_as_one_ranker_call_per_event(drift, logged):
    split, validation, items, params, config, fit, groups = logged
    task = split.test_task()
    instances = task.instances[::-1][:40]  # not in the global order: the batch form walks in it anyway
    scores = {}
    for per_event in (True, False):
        replay_ranker = ReplayRanker(hashed_encoder, items, params, per_event=per_event, learned_ranker=fit.ranker)
        replay_ranker.fit(task.train, drift)
        scores[per_event] = replay_ranker.score_batch(instances)
    assert np.isfinite(scores[True]).any(axis=1).all()
    np.testing.assert_array_equal(scores[False], scores[True])


def test_the_rerank_encodes_the_next_chunks_texts_while_this_ones_are_reranked(drift, logged, monkeypatch):
    """With the rerank kept to reachable targets, the walk starts the next chunk's history texts'
    encoding in a thread before this chunk's events are reranked. The encoder then gets the very
    calls, in the same order, that one chunk at a time makes, so every vector is the same even from
    an encoder whose vectors depend on the call (as an ONNX session's do, slightly); a walk left
    early leaves nothing in flight and caches nothing it did not hand on."""
    import threading

    from chronorec.trainer import batch_replay

    split, validation, items, params, config, fit, groups = logged
    task = split.test_task()
    params = replace(params, alpha=0.0)  # the blend reads no text: the rerank alone encodes them
    monkeypatch.setattr(batch_replay, "CHUNK_INSTANCES", 8)  # many chunks on the small set
    runs = {}
    for ahead in (0, 1):
        monkeypatch.setattr(batch_replay.ReplayScorer, "chunks_ahead", ahead)
        calls: list[tuple[tuple[str, ...], str]] = []

        def encoder(texts: list[str]) -> np.ndarray:
            calls.append((tuple(texts), threading.current_thread().name))
            return hashed_encoder(texts) * (1.0 + 1e-3 * len(texts))

        replay_ranker = ReplayRanker(encoder, items, params, learned_ranker=fit.ranker)
        replay_ranker.rerank_reachable_only = True
        replay_ranker.fit(task.train, drift)
        del calls[:]  # the catalogue's texts
        runs[ahead] = replay_ranker.score_batch(task.instances), calls, replay_ranker.replay
    (serial, serial_calls, _), (ahead, ahead_calls, replay) = runs[0], runs[1]
    assert len(serial_calls) >= 3
    assert [c for c, _ in ahead_calls] == [c for c, _ in serial_calls]
    assert all(thread.startswith("encode-ahead") for _, thread in ahead_calls)
    np.testing.assert_array_equal(ahead, serial)

    # Left after its first event: the second chunk's call, started, is dropped, not cached.
    monkeypatch.setattr(batch_replay.ReplayScorer, "chunks_ahead", 1)
    replay.reset()
    replay._vectors.clear()
    scorer = replay.first_stage()
    walk = scorer.walk_candidates(task.instances, params, lambda *_: True)
    next(walk)
    walk.close()
    assert not replay._in_flight
    ordered = task.instances[np.argsort(task.instances.pos, kind="stable")]
    first_chunk = {t for t in scorer.texts(ordered[:batch_replay.CHUNK_INSTANCES], params) if t is not None}
    assert first_chunk and set(replay._vectors) == first_chunk


def test_ranker_file_round_trip_and_refusals(tmp_path, logged):
    *_, fit, _ = logged
    spec = fit.ranker.spec
    (tmp_path / spec.file).write_text(fit.ranker.model_text())
    loaded = LearnedRanker.load(tmp_path, spec)
    x = np.random.default_rng(0).random((7, len(FEATURE_NAMES))).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), fit.ranker.predict(x))
    manifest = Manifest(version="v", base_model="b", dimension=4, ranker=spec.to_dict())
    assert load_version_ranker(tmp_path, manifest) is not None
    assert load_version_ranker(tmp_path, Manifest(version="v", base_model="b", dimension=4)) is None

    with pytest.raises(RankerError, match="missing"):
        LearnedRanker.load(tmp_path, RankerSpec(file="absent.txt", features=spec.features))
    (tmp_path / "broken.txt").write_text("tree\nthis is not a model\n")
    with pytest.raises(RankerError, match="not a LightGBM model"):
        LearnedRanker.load(tmp_path, RankerSpec(file="broken.txt", features=spec.features))
    with pytest.raises(RankerError, match="does not compute"):
        LearnedRanker.load(tmp_path, RankerSpec(file=spec.file, features=("no_such_feature",) + spec.features[1:]))
    with pytest.raises(RankerError, match="manifest names"):
        LearnedRanker.load(tmp_path, RankerSpec(file=spec.file, features=spec.features[:-1]))
    outside = tmp_path.parent / "outside-ranker.txt"
    outside.write_text(fit.ranker.model_text())
    (tmp_path / "link.txt").symlink_to(outside)
    with pytest.raises(RankerError, match="outside"):
        LearnedRanker.load(tmp_path, RankerSpec(file="link.txt", features=spec.features))


def test_manifest_ranker_entry_is_checked():
    good = {"file": "ranker.txt", "features": list(FEATURE_NAMES), "candidates": 100}
    base = {"version": "v", "base_model": "b", "dimension": 4}
    assert Manifest.from_dict({**base, "ranker": good}).ranker["kind"] == "lightgbm-lambdarank"
    assert Manifest.from_dict(base).ranker is None
    for bad, message in [({**good, "file": "../x.txt"}, "file name"), ({**good, "features": []}, "features"),
                         ({**good, "candidates": 0}, "candidates"), ({**good, "kind": "xgboost"}, "kind"),
                         ({**good, "second_look": -1}, "second_look"), ({**good, "second_look": 1.5}, "second_look"),
                         ("ranker.txt", "object")]:
        with pytest.raises(ManifestError, match=message):
            Manifest.from_dict({**base, "ranker": bad})
    # A ranker published before the second look existed serves without one; a new one keeps its count.
    assert RankerSpec.from_dict(Manifest.from_dict({**base, "ranker": good}).ranker).second_look == 0
    spec = RankerSpec(second_look=30)
    assert RankerSpec.from_dict(Manifest.from_dict({**base, "ranker": spec.to_dict()}).ranker) == spec
    # Gap routes: absent in an older manifest, kept through the manifest, refused when malformed.
    assert RankerSpec.from_dict(Manifest.from_dict({**base, "ranker": good}).ranker).routes == ()
    routed = RankerSpec(routes=(GapRoute(3600.0, 86400.0, "trend_30d"), GapRoute(30 * 86400.0, math.inf, "trend_7d")))
    assert RankerSpec.from_dict(Manifest.from_dict({**base, "ranker": routed.to_dict()}).ranker) == routed
    route = {"min_gap_s": 3600, "max_gap_s": None, "feature": "trend_30d"}
    for bad, message in [({**good, "routes": {}}, "routes"), ({**good, "routes": [route] * 17}, "routes"),
                         ({**good, "routes": [{**route, "min_gap_s": -1}]}, "min_gap_s"),
                         ({**good, "routes": [{**route, "min_gap_s": True}]}, "min_gap_s"),
                         ({**good, "routes": [{**route, "max_gap_s": 10}]}, "max_gap_s"),
                         ({**good, "routes": [{**route, "feature": ""}]}, "feature"),
                         ({**good, "routes": ["trend_30d"]}, "object")]:
        with pytest.raises(ManifestError, match=message):
            Manifest.from_dict({**base, "ranker": bad})


def test_a_gap_route_ranks_its_users_by_one_feature(tmp_path, logged):
    *_, fit, groups = logged
    spec = replace(fit.ranker.spec, routes=(GapRoute(3600.0, math.inf, "trend_7d"),))
    routed = LearnedRanker.from_model_text(fit.ranker.model_text(), spec)
    with pytest.raises(RankerError, match="does not compute"):
        LearnedRanker.from_model_text(fit.ranker.model_text(), replace(spec, routes=(GapRoute(0.0, 1.0, "nope"),)))
    rng = np.random.default_rng(1)
    rows = rng.random((30, len(FEATURE_NAMES))).astype(np.float32)
    trend = FEATURE_INDEX["trend_7d"]
    rows[:10, trend] = 0.5  # ties on the routed feature: the trees' score breaks them
    rows[3, trend] = np.nan  # missing: last
    for gap_s, covered in [(60.0, False), (3600.0, True), (40 * 86400.0, True)]:
        rows[:, FEATURE_INDEX["user_gap_log_s"]] = math.log1p(gap_s)
        trees = fit.ranker.predict(rows)
        scores = routed.predict(rows)
        if not covered:
            np.testing.assert_array_equal(scores, trees)
            continue
        order = np.argsort(-scores, kind="stable")
        values = np.nan_to_num(rows[order, trend], nan=-np.inf)
        assert (np.diff(values) <= 0).all()  # by the feature, highest first
        assert order[-1] == 3
        tied = order[np.isin(order, np.arange(10)) & (order != 3)]
        assert (np.diff(trees[tied]) <= 0).all()  # ties by the trees
        reasons = routed.reasons(rows)
        assert all(r[0].name == "trend_7d" for r in reasons)
        assert reasons[0][0].contribution == pytest.approx(float(rows[0, trend]))
    routed.check()
    # A version whose manifest carries the route loads it with the ranker and serves it alike.
    (tmp_path / spec.file).write_text(fit.ranker.model_text())
    manifest = Manifest.from_dict({"version": "v", "base_model": "b", "dimension": 4, "ranker": spec.to_dict()})
    loaded = load_version_ranker(tmp_path, manifest)
    assert loaded.spec.routes == spec.routes
    np.testing.assert_array_equal(loaded.predict(rows), routed.predict(rows))


def test_routes_are_chosen_only_where_a_feature_alone_clearly_wins(logged):
    *_, fit, groups = logged
    trees = LearnedRanker(fit.ranker.booster, replace(fit.ranker.spec, routes=()))
    config = rt.RankerTrainingConfig(route_min_events=5, route_features=("trend_7d", "cooccurrence_1h"))
    groups = rt.Groups.concatenate([groups] * 5)
    n = len(groups.sizes)
    # Half the events an hour or more after the previous one, the target made the best by trend_7d there.
    rigged = replace(groups, gap_seconds=np.where(np.arange(n) % 2 == 0, 60.0, 5 * 86400.0),
                     features=groups.features.copy())
    starts = np.r_[0, np.cumsum(groups.sizes)[:-1]]
    for k, (start, size) in enumerate(zip(starts, groups.sizes)):
        column = rigged.features[start:start + size, FEATURE_INDEX["trend_7d"]]
        column[:] = 0.0
        if k % 2:
            column[groups.labels[start:start + size] > 0] = 1.0
    routes, report = rt.choose_routes(trees, rigged, config)
    assert [(r.min_gap_s, r.max_gap_s, r.feature) for r in routes] == [(86400.0, 7 * 86400.0, "trend_7d")]
    by_gap = {e["gap"]: e for e in report}
    assert by_gap["1-7d"]["routed"] and by_gap["1-7d"]["difference_ci"][0] > 0
    assert by_gap["1-7d"]["feature_alone"] == pytest.approx(float(np.mean([1.0 if r else 0.0 for r in groups.reachable[1::2]])))
    assert not by_gap["<1h"]["routed"]
    # Too few events in the range: never routed, whatever the feature did.
    assert rt.choose_routes(trees, rigged, replace(config, route_min_events=n))[0] == ()
    assert rt.choose_routes(trees, rigged, replace(config, route_features=()))[0] == ()

    # The blend's score, as good there, competes only on the events its time model was not tuned on.
    blended = replace(rigged, features=rigged.features.copy())
    blended.features[:, FEATURE_INDEX[rt.BLEND_SCORE]] = rigged.features[:, FEATURE_INDEX["trend_7d"]]
    blend_config = replace(config, route_features=(rt.BLEND_SCORE, "cooccurrence_1h"))
    returning = np.arange(n) % 2 == 1
    assert [r.feature for r in rt.choose_routes(trees, blended, blend_config)[0]] == [rt.BLEND_SCORE]
    # Tuned on every returning event: nothing left to compare on, no route.
    routes, report = rt.choose_routes(trees, blended, blend_config, in_sample=returning)
    assert routes == () and {e["gap"]: e for e in report}["1-7d"]["best_feature"] == "cooccurrence_1h"
    # Tuned on half of them: it competes on the other half, and the route says on how many events.
    half = returning & (np.arange(n) % 4 == 1)
    routes, report = rt.choose_routes(trees, blended, blend_config, in_sample=half)
    entry = {e["gap"]: e for e in report}["1-7d"]
    assert [r.feature for r in routes] == [rt.BLEND_SCORE] and entry["routed"]
    assert entry["feature_events"] == int((returning & ~half).sum()) < entry["events"]
    # The returning users logged for the choice leave out the validation sample's own events: the
    # sample is drawn again from the seed, as collect_groups drew it.
    split, validation = logged[0], logged[1]
    drawn = rt._sampled_targets(split.dataset, np.asarray(validation.targets), 12, 3)
    assert len(drawn) == 12 and set(logged[-1].positions.tolist()) <= set(drawn.tolist())
    # The fit reports what it compared, and serves what it chose.
    assert isinstance(fit.summary()["route_choice"], list)
    assert fit.summary()["routes"] == [r.to_dict() for r in fit.ranker.spec.routes]


def test_after_a_long_absence_the_best_trend_window_serves_unless_the_trees_beat_it_by_a_bound(logged):
    """Ranges a week or more after the previous event go to their best trend window unless the trees
    rank their validation events better by a bootstrap bound: a lead of the trees without one does not
    keep them. Never below a week, never on fewer than route_min_events events, never to another
    signal without the bound."""
    *_, fit, groups = logged
    trees = LearnedRanker(fit.ranker.booster, replace(fit.ranker.spec, routes=()))
    groups = rt.Groups.concatenate([groups] * 2)
    n = len(groups.sizes)
    starts = np.r_[0, np.cumsum(groups.sizes)[:-1]]
    config = rt.RankerTrainingConfig(route_min_events=5, route_features=("trend_7d", "trend_30d", "cooccurrence_1h"))

    def rigged(gap_s: float, feature: str, every: int) -> rt.Groups:
        """Every other event `gap_s` after the previous one; among those, `feature` alone puts the
        target first in all but one of `every` and is flat (no value) elsewhere; the other trend
        windows are flat everywhere."""
        out = replace(groups, gap_seconds=np.where(np.arange(n) % 2 == 0, 60.0, gap_s), features=groups.features.copy())
        for name in config.route_features:
            if name.startswith("trend_") or name == feature:
                out.features[:, FEATURE_INDEX[name]] = 0.0
        for k, (start, size) in enumerate(zip(starts, groups.sizes)):
            column = out.features[start:start + size, FEATURE_INDEX[feature]]
            if k % 2 and (k // 2) % every != 0:
                column[groups.labels[start:start + size] > 0] = 1.0
        return out

    long_gap = 40 * 86400.0
    trend = rigged(long_gap, "trend_30d", 5)
    routes, report = rt.choose_routes(trees, trend, config)
    entry = {e["gap"]: e for e in report}[">30d"]
    assert entry["best_trend"] == "trend_30d" and entry["trend_alone"] > entry["trees"]
    assert entry["difference_ci"][0] <= 0  # no bound: a lead the other signals could not route on
    assert entry["routed"] and entry["rule"] == "trend after a long absence"
    assert [(r.min_gap_s, r.max_gap_s, r.feature) for r in routes] == [(30 * 86400.0, math.inf, "trend_30d")]
    # The same lead five days after the previous event, or switched off, or on too few events: no route.
    assert rt.choose_routes(trees, rigged(5 * 86400.0, "trend_30d", 5), config)[0] == ()
    assert rt.choose_routes(trees, trend, replace(config, route_trend_after_s=None))[0] == ()
    assert rt.choose_routes(trees, trend, replace(config, route_min_events=n))[0] == ()
    # Another signal with the same lead after a long absence still needs the bound, and the trees
    # beat the flat trend windows by one there.
    other, report = rt.choose_routes(trees, rigged(long_gap, "cooccurrence_1h", 5), config)
    entry = {e["gap"]: e for e in report}[">30d"]
    assert other == () and not entry["routed"] and entry["trees_lead_ci"][0] > 0
    # A trend that never puts the target first (flat: far behind the trees) there: no route either.
    assert rt.choose_routes(trees, rigged(long_gap, "trend_30d", 1), config)[0] == ()
    # A trend behind the trees by less than the bound (the target first in half the range's events):
    # it serves all the same.
    routes, report = rt.choose_routes(trees, rigged(long_gap, "trend_30d", 2), config)
    entry = {e["gap"]: e for e in report}[">30d"]
    assert entry["trees"] > entry["trend_alone"] and entry["trees_lead_ci"][0] <= 0
    assert entry["routed"] and entry["rule"] == "trend after a long absence"
    assert [r.feature for r in routes] == ["trend_30d"]
    # Earlier windows' events in the same range weigh in on which trend window that is: where the
    # week's trend puts the target first in nearly all of as many earlier events, it is the window
    # chosen, and the trees then keep the range, which they rank far better than that window (flat
    # on the validation events). Earlier events in another range count for nothing.
    earlier = rigged(long_gap, "trend_7d", n)
    routes, report = rt.choose_routes(trees, trend, config, earlier=earlier)
    entry = {e["gap"]: e for e in report}[">30d"]
    assert entry["earlier_events"] == n // 2
    assert entry["trend_pooled"]["trend_7d"] > entry["trend_pooled"]["trend_30d"]
    assert entry["best_trend"] == "trend_7d" and entry["trees_lead_ci"][0] > 0
    assert routes == () and not entry["routed"]
    routes, report = rt.choose_routes(trees, trend, config, earlier=rigged(5 * 86400.0, "trend_7d", n))
    entry = {e["gap"]: e for e in report}[">30d"]
    assert entry["earlier_events"] == 0 and entry["best_trend"] == "trend_30d"
    assert [r.feature for r in routes] == ["trend_30d"]


def test_the_served_view_of_groups_ranks_as_the_copy_without_the_second_look_does(logged):
    """Groups.served_view drops nothing and copies no feature, and ranks each group's target as the
    groups with the second look's rows taken out do."""
    *_, fit, groups = logged
    second = groups.second_look_rows().copy()
    second[np.flatnonzero(groups.in_candidates & (groups.labels == 0))[::3]] = True
    second[np.flatnonzero(groups.labels > 0)[0]] = True  # a target reached through the second look alone
    marked = replace(groups, second_look=second)
    view = marked.served_view(False)
    assert view.features is marked.features and marked.served_view(True) is marked
    scores = fit.ranker.predict(groups.features)
    without = marked.without_second_look()
    assert not view.reachable[0] and np.array_equal(view.reachable[1:], groups.reachable[1:])
    assert np.allclose(rt.group_ndcg(scores, view), rt.group_ndcg(fit.ranker.predict(without.features), without))


def test_loo_slices_hold_out_targets_from_the_fit(drift):
    from chronorec.trainer.evaluate import build_split

    split = build_split(drift, "loo")
    training, validation = rt.loo_slices(split, per_user=2)
    (train_slice,) = training
    assert not set(train_slice.targets.tolist()) & set(train_slice.fit.tolist())
    assert set(train_slice.targets.tolist()) | set(train_slice.fit.tolist()) == set(split.train.tolist())
    assert not set(validation.targets.tolist()) & set(split.test.pos.tolist())
    # Each held-out target keeps an earlier event of its user.
    assert (drift.rank_in_user[train_slice.targets] > 0).all()


def test_temporal_slices_fit_only_on_the_past(drift):
    split = temporal_split(drift)
    training, validation = rt.temporal_slices(split, training_slices=2)
    assert len(training) == 2
    for s in training + [validation]:
        assert s.fit.max() < s.targets.min()
        assert s.targets.max() < split.n_train  # never the test window
    assert training[-1].targets.max() < validation.targets.min()
    # Windows further back for returning users only: older than the others, every target an hour or
    # more after its user's previous event, fitted on the past as well.
    more, _ = rt.temporal_slices(split, training_slices=2, returning_slices=1)
    assert [s.name for s in more] == ["returning-1", "train-2", "train-1"]  # oldest first
    returning = more[0]
    assert returning.fit.max() < returning.targets.min() and returning.targets.max() < more[1].targets.min()
    from chronorec.trainer.protocols import GAP_EDGES_S, Instances
    assert (Instances(drift, returning.targets).time_since_previous() >= GAP_EDGES_S[0]).all()


def test_training_events_are_sampled_evenly_by_gap_and_weighted_back(drift):
    from chronorec.trainer.protocols import GAP_EDGES_S, Instances

    targets = np.flatnonzero(drift.rank_in_user > 0)
    buckets = np.searchsorted(np.asarray(GAP_EDGES_S), Instances(drift, targets).time_since_previous(), side="right")
    counts = np.bincount(buckets, minlength=len(GAP_EDGES_S) + 1)
    k = 60
    picked, weights = rt.sample_by_gap(drift, targets, k, np.random.default_rng(0))
    assert len(picked) == k and np.all(np.diff(picked) > 0) and np.isin(picked, targets).all()
    got = np.bincount(np.searchsorted(np.asarray(GAP_EDGES_S), Instances(drift, picked).time_since_previous(),
                                      side="right"), minlength=len(counts))
    # Equal shares, a small bucket taking all it has and leaving the rest to the others.
    share = got[counts > got]
    assert share.max() - share.min() <= 1 and (got <= counts).all()
    assert (got[got == counts] <= share.min()).all()
    # Weighted back to the window's mix: each bucket's weight sums to its share of the window.
    np.testing.assert_allclose(weights.mean(), 1.0)
    for b in np.flatnonzero(got):
        in_bucket = np.searchsorted(np.asarray(GAP_EDGES_S), Instances(drift, picked).time_since_previous(),
                                    side="right") == b
        np.testing.assert_allclose(weights[in_bucket].sum() / k, counts[b] / len(targets))


def test_the_replays_item_index_is_the_same_graph_on_every_build():
    """The learned ranker's training reads approximate neighbours (the second look): a graph that
    changed from build to build would change the trained model from run to run."""
    from chronorec.trainer.tune import build_index

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{k}" for k in range(len(vectors))]
    first, second = build_index(ids, vectors), build_index(ids, vectors)
    for query in vectors[:50] + 0.1 * rng.standard_normal((50, 16)).astype(np.float32):
        assert first.search(query, 20, ef=20) == second.search(query, 20, ef=20)


def _same_groups(a: "rt.Groups", b: "rt.Groups") -> None:
    for name in ("features", "labels", "sizes", "blend", "in_candidates", "gap_seconds", "reachable", "positions",
                 "weights", "second_look"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.instances == b.instances


def _planned_slices(drift, encode):
    split = temporal_split(drift)
    training, validation = rt.temporal_slices(split, training_slices=2)
    items = {i.item_id: i for i in drift.items}
    config = rt.RankerTrainingConfig(candidates=40, negatives=4, max_groups_per_slice=120, max_valid_groups=40)
    params = TimeModelParams(history_max_events=10)

    def planned(s, **options):
        make = lambda: rt._Collection(drift, items, encode, None, params, s, config, say=lambda _m: None,  # noqa: E731
                                      index=None, cooccurrence=None, gap_sampling=True, **options)
        return rt._Planned(make, forkable=options["negatives"] > 0, events=len(s.targets))

    return ([planned(s, max_groups=120, negatives=4, seed=k + 1) for k, s in enumerate(training)]
            + [planned(validation, max_groups=40, negatives=0, seed=0)])


@pytest.mark.skipif(not can_fork(), reason="the forked feature logging runs where fork is the platform's way")
def test_training_windows_logged_in_a_forked_process_give_the_same_groups(drift):
    """The training windows' walks run in a second process (their texts encoded here first): every
    array is the one a single process logs."""
    planned = _planned_slices(drift, hashed_encoder)
    alone = rt._walk_all(planned, workers=1)
    forked = rt._walk_all(planned, workers=2)
    assert len(alone) == len(forked) == 3 and all(len(g.sizes) for g in alone)
    for a, b in zip(alone, forked):
        _same_groups(a, b)


@pytest.mark.skipif(not can_fork(), reason="the forked feature logging runs where fork is the platform's way")
def test_a_forked_walk_that_needs_the_encoder_is_done_here(drift, monkeypatch, caplog):
    """A child that meets a text its parent did not encode cannot use the parent's encoder: it says
    so, and the parent logs those windows itself, with the same groups."""
    planned = _planned_slices(drift, hashed_encoder)
    alone = rt._walk_all(planned, workers=1)
    monkeypatch.setattr(rt._Collection, "encode_texts", lambda self: None)
    with caplog.at_level("WARNING", logger=rt.__name__):
        forked = rt._walk_all(planned, workers=2)
    assert "failed (EncoderNeeded" in caplog.text
    for a, b in zip(alone, forked):
        _same_groups(a, b)


WORKER_MB = 150


def _hold_memory(ready, done) -> None:
    """A forked worker's body: WORKER_MB written (its own pages), held until `done`."""
    block = np.ones(WORKER_MB * 2**20 // 8)
    ready.set()
    done.wait(10)
    del block


def _metered_worker(children_interval: float, held_s: float, then=None):
    """A ResourceMeter over a forked worker holding WORKER_MB for `held_s` seconds, then `then()`
    here after the worker has exited."""
    import multiprocessing
    import time

    from chronorec.trainer.resources import ResourceMeter

    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    with ResourceMeter(interval=0.01, children_interval=children_interval) as meter:
        child = context.Process(target=_hold_memory, args=(ready, done))
        child.start()
        assert ready.wait(10)
        time.sleep(held_s)
        done.set()
        child.join(10)
        if then is not None:
            then()
    assert meter.peak_mb is not None and meter.rss_before_mb is not None
    return meter


@pytest.mark.skipif(not can_fork(), reason="reads /proc")
def test_the_resource_meter_counts_a_forked_workers_own_memory():
    """A forked worker's pages are memory the work holds: the meter's peak adds them to this
    process's resident set."""
    meter = _metered_worker(children_interval=0.1, held_s=0.5)
    assert meter.peak_mb - meter.rss_before_mb > 120 and not meter.peak_exact


def _spin(seconds: float) -> None:
    """Python on one core for `seconds` of wall time."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not can_fork(), reason="forks a worker")
def test_the_resource_meter_counts_cpu_time_of_threads_and_joined_workers_not_waiting():
    """The meter's CPU time is work done, here or in a forked worker waited for; a block that only
    waits has next to none, so its cores busy tell an idle core from a busy one."""
    import multiprocessing
    import threading
    import time

    from chronorec.trainer.resources import ResourceMeter

    with ResourceMeter() as waiting:
        time.sleep(0.4)
    assert waiting.cpu_seconds < 0.15 and waiting.cores_busy < 0.4
    with ResourceMeter() as busy:
        _spin(0.4)
    assert busy.cpu_seconds > 0.25 and busy.cores_busy > 0.6
    with ResourceMeter() as threaded:  # a thread's work is the process's
        worker = threading.Thread(target=_spin, args=(0.4,))
        worker.start()
        worker.join()
    assert threaded.cpu_seconds > 0.25
    with ResourceMeter() as forked:  # this process waits; the worker spins
        child = multiprocessing.get_context("fork").Process(target=_spin, args=(0.4,))
        child.start()
        child.join(10)
    assert child.exitcode == 0 and forked.cpu_seconds > 0.25
    report = forked.report()
    assert report["cpu_seconds"] == round(forked.cpu_seconds, 2) and report["cores_busy"] > 0.6


@pytest.mark.skipif(not can_fork(), reason="reads /proc")
def test_the_resource_meter_counts_a_worker_gone_no_longer():
    """A worker's result handed back takes room in this process once the worker has exited: the
    worker's last reading (up to `children_interval` old) is not added to it."""
    import time

    def hold_as_much_here():  # well before the next reading of the workers
        block = np.ones(WORKER_MB * 2**20 // 8)
        time.sleep(0.3)
        del block

    # The worker's pages are read once (at 2 s), the next reading would come 2 s later.
    meter = _metered_worker(children_interval=2.0, held_s=2.2, then=hold_as_much_here)
    grown = meter.peak_mb - meter.rss_before_mb
    assert 120 < grown < 250, grown
