"""Evaluation protocols, tie-aware metrics, baselines and the eval CLI on tiny hand-built data."""

from __future__ import annotations

import itertools
import json
import math
import mmap
import platform
import time

import numpy as np
import pytest

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.importers import detect_and_load
from chronorec.trainer import baselines, evaluate, report
from chronorec.trainer.protocols import (
    SECONDS_PER_DAY, UNRANKED, Dataset, Instances, bootstrap_ci, cold_targets, exclusion_mask, expected_metrics,
    fit_and_score, gap_buckets, inner_validation_split, loo_split, prefix_item_counts, rank_counts, repeat_targets,
    score_instances, summarize, temporal_split, window_item_counts,
)

DAY = SECONDS_PER_DAY


def make_dataset(rows, n_items=6):
    """rows: (user, item, timestamp) in file order; items i0..i{n_items-1}."""
    items = [Item(item_id=f"i{k}", title=f"Item {k}") for k in range(n_items)]
    events = [Event(event_id=f"e{k}", user_id=u, item_id=i, action="view", timestamp=float(t))
              for k, (u, i, t) in enumerate(rows)]
    return Dataset(items, events)


# Ten events; two share t=5 (file order decides), user "c" only appears after the cutoff.
ROWS = [
    ("a", "i0", 1), ("b", "i1", 2), ("a", "i2", 3), ("b", "i0", 4),
    ("a", "i3", 5), ("b", "i4", 5),
    ("c", "i1", 9), ("a", "i4", 8), ("b", "i5", 8), ("a", "i5", 10),
]


# -- dataset and splits -----------------------------------------------------------------


def test_global_order_is_stable_by_time_then_file_position():
    d = make_dataset(ROWS)
    assert d.ts.tolist() == [1, 2, 3, 4, 5, 5, 8, 8, 9, 10]
    # Events 4 and 5 tie at t=5 and 7, 8 at t=8: file order decides.
    assert d.file_pos.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 6, 9]
    assert d.event_at(6).event_id == "e7"
    a = d.user_index["a"]
    assert [d.item_ids[i] for i in d.item[d.user_events(a)]] == ["i0", "i2", "i3", "i4", "i5"]
    assert d.rank_in_user[d.user_events(a)].tolist() == [0, 1, 2, 3, 4]


def test_items_only_named_by_events_are_appended_to_the_catalogue():
    d = make_dataset([("a", "i0", 1), ("a", "new", 2)], n_items=2)
    assert d.item_ids == ["i0", "i1", "new"] and d.n_catalogue_items == 2


def test_temporal_split_rules():
    d = make_dataset(ROWS)
    split = temporal_split(d, 0.6)
    # floor(0.6 * 10) = 6 -> the event at index 6 has t=8; training is t < 8.
    assert split.cutoff == 8.0 and split.n_train == 6
    # Test: events with t >= 8 of users seen before (c is new, so its event is not an instance).
    assert [d.event_at(p).event_id for p in split.instances.pos] == ["e7", "e8", "e9"]
    inst = split.instances
    last = len(inst) - 1  # a's event at t=10: history includes a's earlier test event (t=8).
    assert [d.item_ids[i] for i in d.item[inst.history(last)]] == ["i0", "i2", "i3", "i4"]
    # i5 has no training event, and it is the target twice.
    assert split.n_unseen_targets == 2
    assert split.details()["n_test_users"] == 2


def test_temporal_cutoff_ties_go_to_test():
    d = make_dataset([("a", "i0", 1), ("a", "i1", 2), ("a", "i2", 2), ("a", "i3", 3)])
    split = temporal_split(d, 0.5)  # index 2 has t=2, so the first t=2 event is test too
    assert split.n_train == 1 and len(split.instances) == 3


def test_inner_validation_split_uses_only_training_events():
    d = make_dataset(ROWS)
    outer = temporal_split(d, 0.6)
    inner = inner_validation_split(outer)
    assert inner.upto == outer.n_train
    assert inner.instances.pos.max() < outer.n_train
    assert inner.cutoff == d.ts[math.floor(0.6 * outer.n_train)]
    task = outer.tuning_task()
    assert d.ts[task.train].max() < inner.cutoff and task.instances.pos.max() < outer.n_train


def test_loo_split_rules():
    rows = ROWS + [("d", "i0", 1), ("d", "i1", 2)]  # d has 2 events: dropped
    d = make_dataset(rows)
    split = loo_split(d)
    assert split.n_dropped_users == 2  # c (1 event) and d (2 events)
    names = lambda inst: sorted((d.user_ids[u], d.item_ids[i]) for u, i in zip(inst.user, inst.target))
    assert names(split.test) == [("a", "i5"), ("b", "i5")]
    assert names(split.validation) == [("a", "i4"), ("b", "i4")]
    tuning, test = split.tuning_task(), split.test_task()
    assert set(split.validation.pos).isdisjoint(tuning.train) and set(split.validation.pos) <= set(test.train)
    assert set(split.test.pos).isdisjoint(test.train)
    assert not np.isin(d.user[test.train], [d.user_index["c"], d.user_index["d"]]).any()
    # The test history is everything of the user but the target.
    i = int(np.flatnonzero(split.test.user == d.user_index["a"])[0])
    assert split.test.hist_len[i] == 4


def test_loo_ties_in_time_follow_file_order():
    d = make_dataset([("a", "i0", 1), ("a", "i2", 5), ("a", "i1", 5)])
    split = loo_split(d)
    assert d.item_ids[split.test.target[0]] == "i1" and d.item_ids[split.validation.target[0]] == "i2"


def test_history_flat_and_matrix_match_per_instance_histories():
    d = make_dataset(ROWS)
    inst = Instances(d, np.arange(d.n_events))
    rows, positions = inst.history_flat()
    for i in range(len(inst)):
        assert positions[rows == i].tolist() == inst.history(i).tolist()
    m = inst.history_matrix(weights=np.arange(len(rows), dtype=float) + 1)
    for i in range(len(inst)):
        expected = np.zeros(d.n_items)
        for r, p in zip(np.flatnonzero(rows == i), positions[rows == i]):
            expected[d.item[p]] += r + 1
        assert np.allclose(m[i], expected)
    gaps = inst.time_since_previous()
    assert math.isnan(gaps[0]) and gaps[d.global_pos[9]] == 2.0  # a: t=8 -> t=10


# -- metrics ----------------------------------------------------------------------------


def brute_force(better, tied, k):
    ranks = range(better + 1, better + tied + 2)
    n = tied + 1
    return (sum(r <= k for r in ranks) / n,
            sum(1 / math.log2(r + 1) for r in ranks if r <= k) / n,
            sum(1 / r for r in ranks) / n)


@pytest.mark.parametrize("better,tied", [(0, 0), (0, 5), (3, 0), (7, 4), (9, 0), (9, 3), (10, 0), (15, 20), (0, 40)])
def test_expected_metrics_closed_form_matches_enumeration(better, tied):
    got = expected_metrics(np.array([better]), np.array([tied]))
    for k in (10, 20):
        hr, ndcg, mrr = brute_force(better, tied, k)
        assert got[f"HR@{k}"][0] == pytest.approx(hr, abs=1e-12)
        assert got[f"NDCG@{k}"][0] == pytest.approx(ndcg, abs=1e-12)
    assert got["MRR"][0] == pytest.approx(brute_force(better, tied, 10)[2], abs=1e-12)


def test_tie_aware_rank_equals_average_over_all_tie_breaks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 3, size=7).astype(float)  # many ties on purpose
        target = int(rng.integers(0, 7))
        better, tied = rank_counts(scores[None, :], np.array([target]))
        got = expected_metrics(better, tied, cutoffs=(2,))
        # Average over every permutation that breaks ties (sort by score, then by permuted order).
        hits, dcg = [], []
        for perm in itertools.permutations(range(7)):
            order = sorted(range(7), key=lambda j: (-scores[j], perm[j]))
            r = order.index(target) + 1
            hits.append(r <= 2)
            dcg.append(1 / math.log2(r + 1) if r <= 2 else 0.0)
        assert got["HR@2"][0] == pytest.approx(np.mean(hits))
        assert got["NDCG@2"][0] == pytest.approx(np.mean(dcg))


def test_history_items_are_excluded_and_a_repeated_target_cannot_be_hit():
    d = make_dataset([("a", "i0", 1), ("a", "i1", 2), ("b", "i2", 1), ("a", "i2", 3), ("a", "i1", 4)], n_items=4)
    inst = Instances(d, np.array([d.global_pos[3], d.global_pos[4]]))  # a's i2 (history i0, i1); a's i1 again
    mask = exclusion_mask(inst)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    scores = np.array([[9.0, 9.0, 1.0, 1.0], [0.0, 9.0, 0.0, 0.0]])
    better, tied = rank_counts(scores, inst.target, mask)
    # The first target is ranked among the items outside the history (i3 ties with it); the second
    # repeats i1, which the history holds, so it is not ranked at all, however high its own score,
    # and scores 0 on every metric although only one item could have stood before it.
    assert better.tolist() == [0, UNRANKED] and tied.tolist() == [1, 0]
    metrics = expected_metrics(better, tied)
    assert metrics["HR@10"][0] == 1 and metrics["NDCG@10"][0] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert all(values[1] == 0 for values in metrics.values())


def test_a_scorer_that_puts_the_users_own_items_first_gains_nothing_on_repeats():
    """The mask does not depend on the target: if it kept a repeated target rankable and the rest of
    the history excluded, ranking the user's own items first would hit every repeat at rank 1."""
    rng = np.random.default_rng(5)
    rows = [(f"u{rng.integers(0, 8)}", f"i{rng.integers(0, 6)}", t) for t in range(200)]
    d = make_dataset(rows, n_items=6)
    split = temporal_split(d, 0.6)
    inst = split.instances
    repeats = repeat_targets(inst)
    assert 0 < repeats.sum() < len(inst)
    own_first = inst.history_matrix(binary=True) * 100.0 + rng.random((len(inst), d.n_items))
    better, tied = rank_counts(own_first, inst.target, exclusion_mask(inst))
    ndcg = expected_metrics(better, tied)["NDCG@10"]
    assert (ndcg[repeats] == 0).all() and (ndcg[~repeats] > 0).all()


def test_rank_counts_rejects_nan():
    with pytest.raises(ValueError):
        rank_counts(np.array([[np.nan, 1.0]]), np.array([1]))


class FixedScores:
    """A ranker scoring items by a fixed vector."""

    def __init__(self, vector):
        self.vector = np.asarray(vector, dtype=float)

    def fit(self, train, dataset):
        self.fitted_on = np.asarray(train)

    def score_batch(self, instances):
        return np.tile(self.vector, (len(instances), 1))


def test_score_instances_with_batches_and_shape_check():
    d = make_dataset(ROWS)
    split = temporal_split(d, 0.6)
    ranker = FixedScores(np.arange(6, dtype=float))  # i5 best, i0 worst
    metrics = score_instances(ranker, split.instances, batch_size=1)
    # a@t=8 target i4: history i0 i2 i3 -> only i5 above. b@t=8 target i5: top. a@t=10 target i5: top.
    assert metrics["better"].tolist() == [1, 0, 0] and metrics["tied"].tolist() == [0, 0, 0]
    assert metrics["HR@10"].tolist() == [1.0, 1.0, 1.0]
    assert metrics["MRR"].tolist() == [0.5, 1.0, 1.0]

    class Wrong(FixedScores):
        def score_batch(self, instances):
            return np.zeros((len(instances), 2))

    with pytest.raises(ValueError):
        score_instances(Wrong([0]), split.instances)


def test_bootstrap_is_deterministic_and_sane():
    rng = np.random.default_rng(0)
    values = rng.random((200, 2))
    users = rng.integers(0, 20, 200)
    first = bootstrap_ci(values)
    assert np.array_equal(first[0], bootstrap_ci(values)[0]) and np.array_equal(first[1], bootstrap_ci(values)[1])
    assert not np.array_equal(first[0], bootstrap_ci(values, seed=1)[0])
    lo, hi = first
    assert (lo < values.mean(0)).all() and (values.mean(0) < hi).all()
    clo, chi = bootstrap_ci(values, clusters=users)
    assert (clo < values.mean(0)).all() and (values.mean(0) < chi).all()
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)
    s = summarize({"NDCG@10": values[:, 0]}, users, names=("NDCG@10",))
    assert s == summarize({"NDCG@10": values[:, 0]}, users, names=("NDCG@10",))
    assert s["NDCG@10"]["mean"] == pytest.approx(values[:, 0].mean())


def test_gap_buckets():
    d = make_dataset([("a", "i0", 0), ("a", "i1", 60), ("a", "i2", 60 + 2 * 3600), ("a", "i3", 60 + 3 * DAY),
                      ("a", "i4", 60 + 13 * DAY), ("a", "i5", 60 + 60 * DAY)])
    inst = Instances(d, np.arange(6))
    assert gap_buckets(inst).tolist() == [-1, 0, 1, 2, 3, 4]


# -- baselines --------------------------------------------------------------------------


def test_prefix_item_counts_matches_brute_force():
    d = make_dataset(ROWS)
    bounds = np.array([0, 3, 10, 3, 7])
    got = baselines.prefix_item_counts(d, bounds)
    for row, b in zip(got, bounds):
        assert row.tolist() == np.bincount(d.item[:b], minlength=d.n_items).tolist()
    visible = np.array([1, 4, 8])
    got = baselines.prefix_item_counts(d, bounds, visible)
    for row, b in zip(got, bounds):
        assert row.tolist() == np.bincount(d.item[visible[visible < b]], minlength=d.n_items).tolist()


@pytest.mark.parametrize("n_items", [6, 400])  # the windows hold more events than rows × items, and fewer
def test_window_item_counts_equal_the_difference_of_prefix_counts(n_items):
    rng = np.random.default_rng(3)
    rows = [(f"u{rng.integers(5)}", f"i{rng.integers(n_items)}", k) for k in range(300)]
    d = make_dataset(rows, n_items=n_items)
    end = rng.integers(0, 301, 40)
    start = np.maximum(0, end - rng.integers(0, 120, 40))
    start[:3] = end[:3]  # empty windows
    for visible in (None, np.sort(rng.choice(300, 170, replace=False))):
        prefix = prefix_item_counts(d, np.concatenate((end, start)), visible)
        got = window_item_counts(d, start, end, visible)
        assert got.shape == (40, n_items) and got.dtype == prefix.dtype
        assert np.array_equal(got, prefix[:40] - prefix[40:])


def test_recentpop_counts_the_window_before_the_target_and_breaks_ties_by_all_time_counts():
    rows = [("x", "i0", 0), ("x", "i0", 1), ("y", "i0", 2),  # i0 popular long ago
            ("x", "i1", 10 * DAY), ("y", "i2", 10 * DAY), ("y", "i2", 10 * DAY + 1),
            ("z", "i3", 10 * DAY + 2), ("z", "i1", 10 * DAY + 2)]
    d = make_dataset(rows, n_items=5)
    target = Instances(d, np.array([d.global_pos[6]]))  # z's i3; the i1 at the same second comes after it
    ranker = baselines.RecentPop(7.0)
    ranker.fit(np.arange(3), d)
    scores = ranker.score_batch(target)[0]
    order = np.argsort(-scores, kind="stable")
    # Window counts: i2 2, i1 1 (the later same-second event is not earlier in the global order);
    # i0 and i3 0 in the window, i0 has 3 all-time events.
    assert [d.item_ids[i] for i in order[:4]] == ["i2", "i1", "i0", "i3"]
    assert scores[d.item_index["i3"]] == scores[d.item_index["i4"]] == 0
    only_train = baselines.RecentPop(7.0, observe="train")
    only_train.fit(np.arange(3), d)
    assert d.item_ids[int(np.argmax(only_train.score_batch(target)[0]))] == "i0"


def test_gram_matrices_are_c_ordered_counts():
    # A Fortran-ordered item Gram matrix made every sparse-history ItemKNN batch copy it whole.
    import scipy.sparse as sp

    # Both forms: the sparse product (more rows summed over than the product has) and BLAS's.
    rng = np.random.default_rng(1)
    for shape in ((60, 40), (40, 60)):
        x = sp.csr_matrix((rng.random(shape) < 0.1).astype(float))
        dense = x.toarray()
        for rows, expected in ((False, dense.T @ dense), (True, dense @ dense.T)):
            for dtype in (np.float64, np.float32):
                gram = baselines.gram_matrix(x, rows=rows, dtype=dtype)
                assert gram.flags.c_contiguous and gram.dtype == dtype
                np.testing.assert_array_equal(gram, expected.astype(dtype))
        assert baselines.cosine_item_similarity(x).flags.c_contiguous


def test_itemknn_cosine_and_decay():
    d = make_dataset(ROWS)
    x = d.interaction_matrix(np.arange(6))
    sim = baselines.cosine_item_similarity(x)
    for i in range(d.n_items):
        for j in range(d.n_items):
            ni, nj = np.linalg.norm(x[:, i]), np.linalg.norm(x[:, j])
            expected = 0.0 if i == j or ni == 0 or nj == 0 else x[:, i] @ x[:, j] / (ni * nj)
            assert sim[i, j] == pytest.approx(expected)
    split = temporal_split(d, 0.6)
    plain, decayed = baselines.ItemKNN(), baselines.ItemKNN(half_life_days=1 / DAY)  # 1-second half-life
    for r in (plain, decayed):
        r.fit(split.train, d)
    inst = split.instances[[2]]  # a at t=10: history ages 9, 7, 5, 2 seconds
    h = inst.history(0)
    w = 0.5 ** (10 - d.ts[h])
    assert np.allclose(decayed.score_batch(inst)[0], w @ sim[d.item[h]])
    assert np.allclose(plain.score_batch(inst)[0], sim[d.item[h]].sum(0))


def test_ease_closed_form_and_tuning():
    d = make_dataset(ROWS)
    x = d.interaction_matrix(np.arange(d.n_events))
    b = baselines.ease_weights(x.T @ x, 2.0, dtype=np.float64)
    assert np.allclose(np.diag(b), 0)
    # Column j solves the ridge regression of x_j on the other columns (the EASE constraint).
    for j in range(d.n_items):
        others = [k for k in range(d.n_items) if k != j]
        xo = x[:, others]
        coef = np.linalg.solve(xo.T @ xo + 2.0 * np.eye(len(others)), xo.T @ x[:, j])
        assert np.allclose(b[others, j], coef)
    # The default solve is float32 (Cholesky in place): the same weights to float32 precision.
    b32 = baselines.ease_weights(x.T @ x, 2.0)
    assert b32.dtype == np.float32 and np.allclose(b32, b, rtol=1e-5, atol=1e-6)
    # The inverse is computed in place and mirrored band by band: check across band boundaries.
    users = (np.random.default_rng(0).random((40, 1100)) < 0.2).astype(float)
    gram = users.T @ users  # 1100 × 1100 of rank 40: λ makes it definite
    p = np.linalg.inv(gram + 5.0 * np.eye(1100))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(baselines.ease_weights(gram, 5.0, dtype=np.float64), expected, atol=1e-9)
    split = temporal_split(d, 0.6)
    model = baselines.tune_ease(split.tuning_task(), lambdas=(1.0, 10.0))
    assert model.params["lambda"] in (1.0, 10.0) and set(model.params["tuning"]) == {"1.0", "10.0"}
    result = fit_and_score(model, split.test_task())
    assert result.metrics["HR@10"].shape == (len(split.instances),)


def test_ease_dual_form_gives_the_primal_scores():
    rng = np.random.default_rng(2)
    rows = [(f"u{rng.integers(0, 5)}", f"i{rng.integers(0, 12)}", t) for t in range(60)]
    d = make_dataset(rows, n_items=14)  # i12, i13 never seen: both forms must score them exactly 0
    split = temporal_split(d, 0.7)
    primal, dual = baselines.EASE(3.0, solver="primal"), baselines.EASE(3.0, solver="dual")
    primal.fit(split.train, d)
    dual.fit(split.train, d)
    assert dual.weights is None and primal.weights is not None
    a, b = primal.score_batch(split.instances), dual.score_batch(split.instances)
    keep = ~exclusion_mask(split.instances) | (np.arange(d.n_items) == split.instances.target[:, None])
    assert np.allclose(a[keep], b[keep])
    assert (b[:, 12:] == 0).all() and (a[:, 12:] == 0).all()
    # Only the items with a training event are solved for; the solve over every item (zero rows
    # and columns for the others) is the same model.
    assert primal.columns.tolist() == sorted(set(d.item[split.train].tolist())) and len(primal.columns) < 14
    # Held over the solved items alone (no items × items copy widened with zero columns).
    solved = len(primal.columns)
    assert primal.weights.shape == (solved, solved) and dual.k_x.shape[1] == solved == len(dual.denominator)
    x = d.interaction_matrix(split.train)
    whole = baselines.ease_weights(x.T @ x, 3.0, dtype=np.float64)
    h = split.instances.history_matrix(binary=True)
    np.testing.assert_allclose(a, h @ whole, rtol=1e-5, atol=1e-5)
    tuned = baselines.tune_ease(split.tuning_task(), lambdas=(1.0, 3.0), solver="dual")
    assert tuned.params["at_grid_edge"] is True


def test_mostpop_uses_training_counts_only():
    d = make_dataset(ROWS)
    split = temporal_split(d, 0.6)
    r = baselines.MostPop()
    r.fit(split.train, d)
    assert r.counts.tolist() == [2, 1, 1, 1, 1, 0]


# -- evaluation run and report ----------------------------------------------------------


def write_jsonl(folder, rows, n_items=6):
    folder.mkdir()
    with (folder / "items.jsonl").open("w") as f:
        for k in range(n_items):
            f.write(json.dumps({"item_id": f"i{k}", "title": f"Item {k}"}) + "\n")
    with (folder / "events.jsonl").open("w") as f:
        for k, (u, i, t) in enumerate(rows):
            f.write(json.dumps({"event_id": f"e{k}", "user_id": u, "item_id": i, "action": "view",
                                "timestamp": t}) + "\n")


def test_register_method_and_cli_report(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "METHODS", dict(evaluate.METHODS))
    evaluate.register_method("fixed", lambda split: FixedScores(np.arange(split.dataset.n_items, dtype=float)))
    with pytest.raises(ValueError):
        evaluate.register_method("fixed", lambda split: FixedScores([0]))

    @evaluate.register_method("fixed-reversed")
    def _reversed(split):
        return FixedScores(-np.arange(split.dataset.n_items, dtype=float))

    rng = np.random.default_rng(5)
    rows = [(f"u{rng.integers(0, 8)}", f"i{rng.integers(0, 6)}", int(t)) for t in np.sort(rng.integers(0, 90 * DAY, 120))]
    write_jsonl(tmp_path / "data", rows)
    out = tmp_path / "report"
    code = evaluate.main(["--data", str(tmp_path / "data"), "--protocol", "both", "--out", str(out),
                          "--methods", "MostPop,RecentPop-7d,ItemKNN-hl10d,fixed,fixed-reversed", "--no-progress"])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["protocols"]) == {"temporal", "loo"}
    assert doc["dataset"]["sha256"] and doc["dataset"]["ratings_file"].endswith("events.jsonl")
    entry = doc["protocols"]["temporal"]["methods"]["fixed"]
    assert set(entry["timing_s"]) == {"setup", "fit", "score", "total"}
    assert entry["metrics"]["NDCG@10"]["ci95"][0] <= entry["metrics"]["NDCG@10"]["mean"]
    assert len(entry["by_gap"]) == 5
    for name in ("report.md", "temporal_ndcg10.png", "temporal_ndcg10_by_gap.png", "loo_ndcg10.png"):
        assert (out / name).stat().st_size > 0
    assert "| fixed-reversed |" in (out / "report.md").read_text()
    saved = np.load(out / "per_instance.npz")
    assert saved["temporal/fixed/NDCG@10"].shape == saved["temporal/pos"].shape
    assert evaluate.main(["--data", str(tmp_path / "data"), "--out", str(out), "--methods", "nope",
                          "--no-progress"]) == 1


def test_movielens_dat_folder_evaluates_as_its_jsonl_twin(tmp_path):
    """An ML-1M / ML-10M folder ("::" files) is read by the evaluation, named in the report, and
    scores as the same ratings written as JSONL."""
    rng = np.random.default_rng(11)
    times = np.sort(rng.choice(np.arange(0, 90 * DAY, 60), size=150, replace=False))
    rows = [(str(rng.integers(1, 9)), str(rng.integers(1, 7)), int(t), int(rng.integers(1, 6))) for t in times]
    dat = tmp_path / "ml-1m"
    dat.mkdir()
    (dat / "movies.dat").write_text("".join(f"{k}::Item {k} (1999)::Drama\n" for k in range(1, 7)), encoding="latin-1")
    (dat / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, t, r in rows))
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "items.jsonl").write_text("".join(
        json.dumps({"item_id": str(k), "title": f"Item {k} (1999)", "category": "Drama"}) + "\n" for k in range(1, 7)))
    (twin / "events.jsonl").write_text("".join(
        json.dumps({"event_id": f"e{n}", "user_id": u, "item_id": i, "action": "rating", "timestamp": t,
                    "value": r}) + "\n" for n, (u, i, t, r) in enumerate(rows)))
    doc = _evaluated_alike(tmp_path, dat, twin)
    assert doc["dataset"]["format"] == "movielens-dat"
    assert doc["dataset"]["ratings_file"].endswith("ratings.dat") and doc["dataset"]["sha256"]
    assert doc["dataset"]["n_events"] == len(rows)


def _evaluated_alike(tmp_path, folder, twin) -> dict:
    """Both data sets evaluated (both protocols, two baselines) to the same per-instance arrays;
    the first one's report.json."""
    saved = {}
    for name, data in (("first", folder), ("twin", twin)):
        out = tmp_path / f"report-{name}"
        assert evaluate.main(["--data", str(data), "--protocol", "both", "--out", str(out),
                              "--methods", "MostPop,ItemKNN-hl10d", "--no-progress"]) == 0
        saved[name] = dict(np.load(out / "per_instance.npz"))
    assert saved["first"].keys() == saved["twin"].keys()
    for key, values in saved["first"].items():
        np.testing.assert_array_equal(values, saved["twin"][key], err_msg=key)
    return json.loads((tmp_path / "report-first" / "report.json").read_text())


def test_a_ratings_csv_without_movies_evaluates_as_its_events_only_jsonl_twin(tmp_path):
    """A MovieLens folder holding ratings.csv alone is a bare ratings log, as events.jsonl alone is."""
    rng = np.random.default_rng(12)
    times = np.sort(rng.choice(np.arange(0, 90 * DAY, 60), size=150, replace=False))
    rows = [(str(rng.integers(1, 9)), str(rng.integers(1, 7)), int(t), int(rng.integers(1, 6))) for t in times]
    bare = tmp_path / "ratings-only"
    bare.mkdir()
    (bare / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r},{t}\n" for u, i, t, r in rows))
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "events.jsonl").write_text("".join(
        json.dumps({"event_id": f"e{n}", "user_id": u, "item_id": i, "action": "rating", "timestamp": t,
                    "value": r}) + "\n" for n, (u, i, t, r) in enumerate(rows)))
    doc = _evaluated_alike(tmp_path, bare, twin)
    assert doc["dataset"]["format"] == "movielens-latest" and doc["dataset"]["n_items"] == 6


class _Allocating(FixedScores):
    """Fixed scores that hold a big array for a moment while fitting: a peak the report must show."""

    def fit(self, train, dataset):
        # 40 MB of fresh pages, touched: an anonymous mapping, because malloc may hand numpy a free
        # chunk that is already resident after earlier tests, and RSS would not move at all.
        mapping = mmap.mmap(-1, 40 * 1024 * 1024)
        block = np.frombuffer(mapping, dtype=np.uint8)
        block[:] = 1
        time.sleep(0.2)  # longer than the sampling interval, in case the process peaked higher before
        del block
        mapping.close()


def test_report_has_time_memory_gap_and_warm_cold_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "METHODS", dict(evaluate.METHODS))
    evaluate.register_method("allocating", lambda split: _Allocating(np.arange(split.dataset.n_items, dtype=float)))
    # i5 appears only late: in the temporal split it is a cold target (no training event).
    rng = np.random.default_rng(9)
    times = np.sort(rng.integers(0, 60 * DAY, 150))
    rows = [(f"u{rng.integers(0, 6)}", f"i{rng.integers(0, 5)}", int(t)) for t in times]
    rows += [(f"u{k % 6}", "i5", int(61 * DAY + k)) for k in range(12)]
    write_jsonl(tmp_path / "data", rows)
    out = tmp_path / "report"
    assert evaluate.main(["--data", str(tmp_path / "data"), "--protocol", "both", "--out", str(out),
                          "--methods", "MostPop,allocating", "--no-progress"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["peak_rss_mb"] > 0 and doc["machine"]["cpus"] >= 1 and len(doc["machine"]["load_average"]) == 3
    # The versions behind the figures: this interpreter's and the installed libraries', in the Markdown too.
    import lightgbm
    import tokenizers
    assert doc["libraries"]["python"] == platform.python_version()
    assert doc["libraries"]["numpy"] == np.__version__ and doc["libraries"]["lightgbm"] == lightgbm.__version__
    assert doc["libraries"]["tokenizers"] == tokenizers.__version__
    assert f"numpy {np.__version__}" in (out / "report.md").read_text()
    # ...beside the versions setup.sh pins, and the CPU whose kernels the libraries chose.
    assert doc["libraries_pinned"]["numpy"] and "server/constraints.txt pins" in (out / "report.md").read_text()
    assert set(doc["machine"]["cpu"]) <= {"model", "simd", "blas"}
    temporal = doc["protocols"]["temporal"]
    cold = {name: entry["by_target"][1] for name, entry in temporal["methods"].items()}
    for name, entry in temporal["methods"].items():
        resources = entry["resources"]
        assert resources["seconds"] >= 0 and resources["peak_rss_mb"] >= resources["rss_before_mb"] > 0
        assert resources["cpu_seconds"] >= 0
        assert [b["bucket"] for b in entry["by_gap"]] == ["<1h", "1h-1d", "1-7d", "7-30d", ">30d"]
        assert [b["bucket"] for b in entry["by_target"]] == ["warm", "cold", "repeat"]
        assert sum(b["n"] for b in entry["by_target"]) == temporal["details"]["n_test_instances"]
    # Cold targets are the test instances whose item has no training event; repeats, the others
    # whose item is in the user's history (on five items, most are).
    assert cold["MostPop"]["n"] == temporal["details"]["n_unseen_targets"] > 0
    repeat = temporal["methods"]["MostPop"]["by_target"][2]
    split = temporal_split(Dataset(*detect_and_load(tmp_path / "data")))
    assert 0 < repeat["n"] <= temporal["details"]["n_repeat_targets"]
    assert repeat["n"] == int((repeat_targets(split.instances) & ~cold_targets(split.test_task())).sum())
    # The 40 MB block is seen in the method's own peak (measured or sampled).
    assert temporal["methods"]["allocating"]["resources"]["peak_increase_mb"] >= 30
    markdown = (out / "report.md").read_text()
    assert doc["cpu_s"] >= 0 and f"{doc['cpu_s']:.0f} s of CPU" in markdown
    for heading in ("by time since the user's previous event", "by target item: warm", "Time and memory per method",
                    "CPU (s) | cores busy", "peak RSS (MB)", "load average"):
        assert heading in markdown
    assert "| allocating |" in markdown.split("Time and memory per method")[1]


def test_report_shows_what_the_ranker_chose_on_validation_and_each_routes_rule():
    from chronorec.trainer import report

    fit = {"valid_NDCG@10_ranker": 0.1013, "valid_NDCG@10_blend": 0.0829, "valid_instances": 2500,
           "best_iteration": 256, "train_groups": 4247, "second_look": 0, "used": True,
           "valid_held_out": {"NDCG@10_ranker": 0.0951, "NDCG@10_blend": 0.0702, "events": 1500},
           "valid_NDCG@10_with_without_second_look": [0.0948, 0.1007],
           "route_choice": [
               {"gap": "<1h", "events": 1502, "trees": 0.1433, "best_feature": "blend_score", "feature_alone": 0.1236,
                "feature_events": 900, "trees_on_those": 0.1401, "routed": False},
               {"gap": "1-7d", "events": 46, "trees": 0.2, "best_feature": "cooccurrence_1h", "feature_alone": 0.3,
                "difference_ci": [0.01, 0.2], "routed": True, "rule": "bootstrap bound", "route": "cooccurrence_1h"},
               {"gap": ">30d", "events": 30, "trees": 0.3327, "best_feature": "blend_score", "feature_alone": 0.45,
                "best_trend": "trend_30d", "trend_alone": 0.4264, "routed": True,
                "rule": "trend after a long absence", "route": "trend_30d"},
               {"gap": "7-30d", "events": 67, "trees": 0.2838, "best_feature": "blend_score", "feature_alone": 0.19,
                "best_trend": "trend_7d", "trend_alone": 0.1613, "earlier_events": 194,
                "trend_pooled": {"trend_1d": 0.0786, "trend_7d": 0.0905, "trend_30d": 0.0648},
                "trees_lead_ci": [0.044, 0.212], "routed": False}]}
    protocol = {"methods": {"chronorec-ranker": {"params": {"ranker": fit}}, "MostPop": {"params": {}}}}
    table = report.ranker_table(protocol)
    assert "NDCG@10 0.1013 against the blend's 0.0829 (0.0951 against 0.0702 on the 1500 of them the blend was " \
        "not tuned on, which decide)" in table and "second look not used (0.0948 with it" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["<1h"].endswith("| 0.1236 (blend_score; the trees 0.1401 on its 900 events) | – | – |")
    assert rows["1-7d"].endswith("| cooccurrence_1h (bootstrap bound) |")
    # Routed to the trend window, though another signal alone did better: the rule says why.
    assert rows[">30d"].endswith("| 0.4264 (trend_30d) | trend_30d (trend after a long absence) |")
    # The trend window chosen over the training windows' events too says so, and on how many.
    assert rows["7-30d"].endswith("| 0.1613 (trend_7d; 0.0905 over these and 194 training events) | – |")
    # No learned ranker in the run, or one without its fit's figures: no section.
    assert report.ranker_table({"methods": {"MostPop": {"params": {}}}}) == ""
    assert report.ranker_table({"methods": {"chronorec-ranker": {"params": {"ranker": {"used": False}}}}}) == ""


def test_chronorec_meets_each_buckets_own_best_baseline_paired_on_its_instances():
    users = np.array(["a", "a", "b", "b", "c", "c", "d", "e", "e", "f", "f", "a"])
    gap = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1])  # -1: a first event, in no bucket
    ours = np.array([0.5, 0.5, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    ease = np.array([1.0, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    mostpop = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    metrics = {name: {"NDCG@10": v, "HR@10": (v > 0).astype(float)}
               for name, v in (("chronorec-ranker", ours), ("EASE", ease), ("MostPop", mostpop))}
    labels = ("<1h", "1h-1d", "1-7d")
    rows = report.bucket_comparisons(metrics, users, ["MostPop", "EASE", "ItemKNN"], {"gap": (gap, labels)})
    # One row per bucket with instances; each against the baseline that is best there.
    assert [(r["bucket"], r["n"], r["reference"]) for r in rows] == [("<1h", 6, "EASE"), ("1h-1d", 4, "MostPop")]
    for r, members in zip(rows, (gap == 0, gap == 1)):
        reference = metrics[r["reference"]]["NDCG@10"]
        assert r["method"] == "chronorec-ranker" and r["kind"] == "gap"
        assert r["difference"] == pytest.approx(ours[members].mean() - reference[members].mean())
        low, high = bootstrap_ci(ours[members] - reference[members], users[members])
        assert r["ci95_user_clustered"] == [pytest.approx(low), pytest.approx(high)]
        assert low <= r["difference"] <= high
        assert r["hits"] == [(ours[members] > 0).sum(), (reference[members] > 0).sum()]
    assert rows[0]["difference"] == pytest.approx(1 / 12) and rows[1]["difference"] == pytest.approx(-0.375)
    table = report.bucket_comparisons_table({"bucket_comparisons": rows})
    assert "| 1h-1d | 4 | 0.2500 | 0.6250 (MostPop) | -0.3750 |" in table and table.endswith("| 1 / 3 |")
    # Nothing to compare without a chronorec form or a baseline.
    assert report.bucket_comparisons({"EASE": metrics["EASE"]}, users, ["EASE"], {"gap": (gap, labels)}) == []
    assert report.bucket_comparisons_table({}) == ""


def test_plot_sweep(tmp_path):
    values = [1, 3, 10, 30]
    series = {"decayed mean": [{"mean": 0.01 * k, "ci95": [0.01 * k - 0.002, 0.01 * k + 0.002]} for k in range(4)],
              "no interval": [{"mean": 0.02} for _ in values]}
    path = report.plot_sweep("half-life (days)", values, series, tmp_path / "sweep.png", log_x=True)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError):
        report.plot_sweep("x", [1, 2], {"bad": [{"mean": 0.1}]}, tmp_path / "bad.png")
