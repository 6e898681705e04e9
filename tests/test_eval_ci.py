"""A CI-sized evaluation of chronorec's own variants on generated drifting-interest data.

The full ML-100K run is `chronorec-eval --plugin chronorec.trainer.chronorec_methods` (README,
"Quality"); this runs the same code on a small synthetic log with a tiny random BERT and a few
fine-tuning steps: the time-aware form must beat the time-blind one, and chronorec's scores must
be exactly what the serving TimeAwareRanker returns.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import ANCHOR

from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.ranking import RecommendQuery, TimeAwareRanker
from chronorec.trainer import chronorec_methods as cm
from chronorec.trainer import evaluate, report
from chronorec.trainer.data import TargetPositions, build_examples, event_log_from
from chronorec.trainer.forked import can_fork
from chronorec.trainer.protocols import Dataset, EvalTask, bootstrap_ci, fit_and_score, score_instances, temporal_split
from chronorec.trainer.tune import ReplayRanker, held_out_gain, paired_tuning_gain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drift() -> Dataset:
    data = generate_drift_dataset(seed=7, n_items=160, n_users=36, n_events_per_user=28, anchor=ANCHOR)
    return Dataset(data.items, data.events)


VARIANTS = ("chronorec-untuned-mean", "chronorec-untuned-decay", "chronorec-untuned-time",
            "chronorec-finetuned-time", "chronorec-finetuned-blind", "chronorec-blend", "chronorec-ranker")


@pytest.fixture(scope="module")
def ci_settings(tmp_path_factory, tiny_bert_dir) -> cm.EvalSettings:
    return cm.EvalSettings(base_model=str(tiny_bert_dir), cache_dir=str(tmp_path_factory.mktemp("eval-cache")),
                           max_length=64, finetune_steps=4, finetune_batch_size=16, finetune_valid_queries=64,
                           tune_max_instances=150, sweeps=True, sweep_max_instances=40, progress=False)


@pytest.fixture(scope="module")
def chronorec(ci_settings) -> cm.ChronorecMethods:
    """The variants of one evaluation: its settings, and the contexts they share per split."""
    return cm.ChronorecMethods(ci_settings)


def test_plugin_gives_each_evaluation_its_own_variants(monkeypatch, tmp_path):
    monkeypatch.setenv(cm.CACHE_ENV, str(tmp_path / "cache"))
    first = evaluate.load_plugins(["chronorec.trainer.chronorec_methods"], {"max_length": 48})
    assert tuple(first) == VARIANTS
    owners = {factory.__self__ for factory in first.values()}
    assert len(owners) == 1
    owner = owners.pop()
    assert owner.settings.max_length == 48 and owner.settings.cache_dir == str(tmp_path / "cache")
    # Nothing global: another evaluation (another load) has its own settings and its own contexts.
    second = evaluate.load_plugins(["chronorec.trainer.chronorec_methods"], {})
    assert second["chronorec-untuned-time"].__self__ is not owner
    assert second["chronorec-untuned-time"].__self__.settings.max_length == cm.EvalSettings().max_length
    assert not set(first) & set(evaluate.METHODS)
    with pytest.raises(TypeError, match="no_such_setting"):
        evaluate.load_plugins(["chronorec.trainer.chronorec_methods"], {"no_such_setting": 1})


def test_eval_cli_passes_its_settings_to_the_plugin(monkeypatch, capsys, tmp_path):
    plugin = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--plugin", "chronorec.trainer.chronorec_methods"]
    assert evaluate.main([*plugin, "--list-methods", "--settings", '{"max_length": 48}']) == 0
    assert capsys.readouterr().out.split() == [*evaluate.METHODS, *VARIANTS]
    # The environment variable is the fallback of --settings; a setting the plugin lacks is an error.
    monkeypatch.setenv(evaluate.SETTINGS_ENV, '{"max_lenght": 48}')
    assert evaluate.main([*plugin, "--list-methods"]) == 1
    assert "max_lenght" in capsys.readouterr().err
    assert evaluate.main([*plugin, "--list-methods", "--settings", "[48]"]) == 1


def test_time_aware_beats_time_blind_on_drifting_interests(drift, ci_settings, chronorec, tmp_path):
    per_instance: dict[str, np.ndarray] = {}
    methods = ["ItemKNN", "chronorec-finetuned-time", "chronorec-finetuned-blind"]
    document = evaluate.evaluate(drift, ["temporal"], methods, progress=False, per_instance=per_instance,
                                 factories={**evaluate.METHODS, **chronorec.factories()})
    result = document["protocols"]["temporal"]["methods"]
    aware, blind = result["chronorec-finetuned-time"], result["chronorec-finetuned-blind"]
    assert aware["metrics"]["NDCG@10"]["mean"] > blind["metrics"]["NDCG@10"]["mean"]

    # Paired over the same test instances, users resampled: the gain is not noise.
    split = temporal_split(drift)
    difference = (per_instance["temporal/chronorec-finetuned-time/NDCG@10"]
                  - per_instance["temporal/chronorec-finetuned-blind/NDCG@10"])
    low, _ = bootstrap_ci(difference, split.instances.user)
    assert low > 0

    # The blind form really is blind; the aware one was fitted on the validation window.
    assert blind["params"]["alpha"] == 0.0
    assert blind["params"]["long_term_half_life_days"] == cm.BLIND.long_term_half_life_days
    assert blind["params"]["cooccurrence_half_life_days"] == cm.BLIND.cooccurrence_half_life_days
    assert blind["params"]["trend_window_days"] == cm.BLIND.trend_window_days
    assert aware["params"]["tuned_on"].startswith("validation")
    assert aware["params"]["tuning"]["instances"] <= ci_settings.tune_max_instances
    assert aware["params"]["finetune_steps"] == ci_settings.finetune_steps

    # The report carries the sweeps as plots next to the table.
    written = report.write_report(document, tmp_path / "report")
    for parameter in cm.SWEEPS:
        assert written[f"temporal_sweep_{parameter}"].is_file()
    assert "chronorec-finetuned-time" in written["markdown"].read_text()


def test_a_plugin_drops_a_finished_splits_context_before_the_next_split_runs(drift):
    """What a split built goes before the next split's baselines run (their matrices are the peak),
    and the last split's stays for whoever reads it afterwards."""

    class Plugin:
        def __init__(self):
            self.events: list[str] = []

        def end_split(self, split):
            self.events.append(f"end {split.protocol}")

        def method(self, split):
            self.events.append(f"run {split.protocol}")
            return evaluate.METHODS["MostPop"](split)

    plugin = Plugin()
    factories = {**evaluate.METHODS, "plugin-method": plugin.method}
    evaluate.evaluate(drift, ["temporal", "loo"], ["plugin-method", "MostPop"], progress=False, factories=factories)
    assert plugin.events == ["run temporal", "end temporal", "run loo"]
    # chronorec's variants: the context of a split that ended is gone, another split's stays.
    methods = cm.ChronorecMethods(cm.EvalSettings())
    temporal = temporal_split(drift)
    methods._contexts["temporal"] = cm.SplitContext(temporal, methods.settings, methods._shared)
    methods.end_split(evaluate.build_split(drift, "loo", 0.8))
    assert "temporal" in methods._contexts
    methods.end_split(temporal)
    assert not methods._contexts


def test_item_text_ids_names_every_item_by_its_id_alone(drift):
    """The content ablation: chronorec reads each item as a bare ratings log names it, its times kept."""
    split = temporal_split(drift)
    some = next(item for item in drift.items if item.category)
    shown = cm.SplitContext(split, cm.EvalSettings()).items[some.item_id]
    assert shown == some
    context = cm.SplitContext(split, cm.EvalSettings().with_overrides(item_text="ids"))
    assert set(context.items) == set(drift.item_ids)
    bare = context.items[some.item_id]
    assert (bare.title, bare.category, bare.text, bare.attributes) == (some.item_id, "", "", {})
    assert (bare.published_at, bare.expires_at) == (some.published_at, some.expires_at)
    assert context.item_text_of(some.item_id) == some.item_id
    with pytest.raises(ValueError, match="item_text must be one of catalogue, ids"):
        cm.EvalSettings().with_overrides(item_text="titles")


def test_learned_ranker_beats_the_blend_which_beats_time_blind(drift, chronorec):
    per_instance: dict[str, np.ndarray] = {}
    methods = ["chronorec-ranker", "chronorec-blend", "chronorec-finetuned-blind"]
    document = evaluate.evaluate(drift, ["temporal"], ["MostPop", *methods], progress=False, per_instance=per_instance,
                                 factories={**evaluate.METHODS, **chronorec.factories()})
    result = document["protocols"]["temporal"]["methods"]
    ndcg = {m: result[m]["metrics"]["NDCG@10"]["mean"] for m in methods}
    assert ndcg["chronorec-ranker"] > ndcg["chronorec-blend"] > ndcg["chronorec-finetuned-blind"]
    # The report's paired comparison of the two, users resampled, lies above zero.
    comparisons = {(c["method"], c["reference"]): c for c in document["protocols"]["temporal"]["comparisons"]}
    versus_blend = comparisons[("chronorec-ranker", "chronorec-blend")]
    assert versus_blend["ci95_user_clustered"][0] > 0
    markdown = report.markdown_report(document)
    assert "Paired differences" in markdown
    # The ranker against each bucket's best baseline: one row per gap and target bucket with events,
    # their events those of the by-gap and warm/cold tables.
    by_bucket = document["protocols"]["temporal"]["bucket_comparisons"]
    entry = result["chronorec-ranker"]
    sizes = {b["bucket"]: b["n"] for b in [*entry["by_gap"], *entry["by_target"]]}
    assert {r["bucket"]: r["n"] for r in by_bucket} == {k: n for k, n in sizes.items() if n}
    assert {r["method"] for r in by_bucket} == {"chronorec-ranker"}
    assert "against each bucket's best baseline" in markdown
    # ... and what the ranker chose on validation, range by range.
    fit = result["chronorec-ranker"]["params"]["ranker"]
    assert f"NDCG@10 {fit['valid_NDCG@10_ranker']:.4f} against the blend's" in markdown
    assert all(f"| {r['gap']} | {r['events']} | " in markdown for r in fit["route_choice"])
    ranker = result["chronorec-ranker"]["params"]
    # Trained on earlier windows, early-stopped on the validation window, where it beat the blend.
    assert ranker["ranker"]["train_groups"] > 0 and ranker["ranker"]["best_iteration"] >= 1
    assert ranker["ranker"]["valid_NDCG@10_ranker"] > ranker["ranker"]["valid_NDCG@10_blend"]
    # The blend it is compared with is the ranker's own first stage: same encoder, same time model.
    blend = result["chronorec-blend"]["params"]
    assert ranker["encoder"] == blend["encoder"]
    assert {k: ranker[k] for k in TimeModelParams().to_dict()} == {k: blend[k] for k in TimeModelParams().to_dict()}


def test_the_loo_ranker_learns_from_each_users_newest_events_up_to_its_cap(drift, ci_settings):
    from chronorec.trainer.ranker_train import loo_slices

    split = evaluate.build_split(drift, "loo", 0.8)
    targets = loo_slices(split, per_user=2)[0][0].targets
    newest_two = int((drift.rank_in_user[targets] > 0).sum())
    assert newest_two > 25
    for cap, expected in ((10_000, newest_two), (25, 25)):
        settings = ci_settings.with_overrides(ranker_loo_events_per_user=2, ranker_loo_groups=cap)
        fit = cm.ChronorecMethods(settings).ranker(split).ranker_fit
        assert fit.train_groups == expected


def test_the_rankers_step_and_rounds_are_settings(drift, ci_settings, monkeypatch):
    from chronorec.trainer import ranker_train

    configs = []
    real = ranker_train.train_ranker

    def recording(*args, **kwargs):
        configs.append(args[7])
        return real(*args, **kwargs)

    monkeypatch.setattr(ranker_train, "train_ranker", recording)
    settings = ci_settings.with_overrides(ranker_learning_rate=0.2, ranker_early_stopping_rounds=3,
                                          ranker_max_rounds=8)
    fit = cm.ChronorecMethods(settings).ranker(temporal_split(drift)).ranker_fit
    (config,) = configs
    assert (config.learning_rate, config.early_stopping_rounds, config.max_rounds) == (0.2, 3, 8)
    assert 1 <= fit.best_iteration <= 8 and len(fit.curve) <= 8


def test_a_ranker_that_does_not_beat_the_blend_on_validation_is_left_out_as_the_trainer_does(drift, chronorec):
    split = temporal_split(drift)
    learned = chronorec.ranker(split)
    fit = learned.ranker_fit
    assert fit.helps and learned.replay_ranker.learned_ranker is fit.ranker and learned.params["ranker"]["used"]
    # The same trees, had they only tied the blend on validation: chronorec-train run would ship the
    # version without them, so the variant scores as the blend does.
    # (Decided on the validation events the blend was not tuned on, when it was tuned on part of them.)
    losing = replace(fit, valid_ndcg_ranker=fit.valid_ndcg_blend,
                     held_out=None if fit.held_out is None else (fit.held_out[1], fit.held_out[1], fit.held_out[2]))
    left_out = cm.LearnedChronorecRanker(learned.ctx, learned.bundle, learned.time_model, losing, learned.report)
    assert left_out.replay_ranker.learned_ranker is None and left_out.params["ranker"]["used"] is False
    test = split.test_task()
    task = EvalTask(test.name, test.dataset, test.train, test.instances[:40])
    blend = fit_and_score(chronorec.blend(split), task).metrics["NDCG@10"]
    np.testing.assert_array_equal(fit_and_score(left_out, task).metrics["NDCG@10"], blend)
    assert not np.array_equal(fit_and_score(learned, task).metrics["NDCG@10"], blend)


def test_fine_tuning_that_kept_the_base_weights_uses_the_base_encoder(drift, chronorec, monkeypatch):
    split = temporal_split(drift)
    ctx = chronorec.context(split)
    base = ctx.untuned()
    info = {"selection_queries": 32, "best_step": 0, "steps": 4,
            "encoder_valid_NDCG@10_before": 0.05, "encoder_valid_NDCG@10_after": 0.05}
    monkeypatch.setattr(ctx, "_finetune", lambda: (base.version_dir, info))
    ctx.bundles.pop("finetuned", None)
    try:
        finetuned = ctx.finetuned()
        # The very same encoder and vectors, under the base encoder's name: its index and tuning are shared.
        assert finetuned.item_vectors is base.item_vectors and finetuned.name == base.name
        assert finetuned.info["kept_base_weights"] and finetuned.info["finetune"] == info
        assert ctx.encoder_choice()[0] is base
        report_line = cm._encoder_report(finetuned)
        assert report_line["encoder"].startswith("untuned") and report_line["encoder_only_valid_NDCG@10"] == [0.05, 0.05]
    finally:
        ctx.bundles.pop("finetuned", None)
    assert not cm.kept_base_weights({**info, "best_step": 3})
    assert not cm.kept_base_weights({**info, "selection_queries": 0})


def test_a_fine_tuned_encoder_serves_only_when_the_blend_over_it_gains(drift, chronorec):
    ctx = chronorec.context(temporal_split(drift))
    base = ctx.untuned()
    info = {"selection_queries": 32, "best_step": 2, "steps": 4,
            "encoder_valid_NDCG@10_before": 0.05, "encoder_valid_NDCG@10_after": 0.06}
    # Its own retrieval improved, but it gives the base encoder's vectors: the blend over it ties.
    same = cm.EncoderBundle("finetuned", base.encoder, base.version_dir, base.item_vectors, info)
    saved = {"bundle": ctx.bundles.get("finetuned"), "tuning": ctx.tunings.pop("finetuned-time", None),
             "replay": ctx._replays.pop("finetuned", None), "index": ctx._indexes.pop("finetuned", None)}
    ctx.bundles["finetuned"] = same
    try:
        bundle, why = ctx.encoder_choice()
        fused, plain = ctx.tunings["finetuned-time"], ctx.tunings["untuned-time"]
        assert len(fused.per_instance) == fused.instances
        np.testing.assert_array_equal(fused.per_instance, plain.per_instance)
        assert bundle is base and why.startswith("base encoder") and "not above zero" in why
        # A blend over it that does better on every tuning instance: the fine-tuned encoder serves.
        ctx.tunings["finetuned-time"] = replace(fused, per_instance=fused.per_instance + 0.05)
        bundle, why = ctx.encoder_choice()
        assert bundle is same and why.startswith("fine-tuned encoder") and "+0.0500 [+0.0500, +0.0500]" in why
        # Tuned on every instance of the task: the two compare on those (compare_tuned_blends' fallback).
        assert "the blend over it on the tuning task" in why
        # ... unless its own retrieval did not improve.
        same.info["encoder_valid_NDCG@10_after"] = 0.05
        bundle, why = ctx.encoder_choice()
        assert bundle is base and "did not improve" in why
        with pytest.raises(ValueError, match="different instances"):
            paired_tuning_gain(replace(fused, positions=fused.positions + 1), plain, drift.user)
    finally:
        for key, store, name in (("bundle", ctx.bundles, "finetuned"), ("tuning", ctx.tunings, "finetuned-time"),
                                 ("replay", ctx._replays, "finetuned"), ("index", ctx._indexes, "finetuned")):
            if saved[key] is not None:
                store[name] = saved[key]
            else:
                store.pop(name, None)


def test_two_tuned_blends_compare_on_the_instances_neither_was_tuned_on(drift, ci_settings):
    # Tuned on 60 of the tuning task's instances: the rest compare the two blends.
    capped = cm.ChronorecMethods(ci_settings.with_overrides(tune_max_instances=60))
    ctx = capped.context(temporal_split(drift))
    base = ctx.untuned()
    task = ctx.tuning
    assert len(task.instances) > 2 * 60
    info = {"selection_queries": 32, "best_step": 2, "steps": 4,
            "encoder_valid_NDCG@10_before": 0.05, "encoder_valid_NDCG@10_after": 0.06}
    ctx.bundles["finetuned"] = cm.EncoderBundle("finetuned", base.encoder, base.version_dir, base.item_vectors, info)
    bundle, why = ctx.encoder_choice()
    fused, plain = ctx.tunings["finetuned-time"], ctx.tunings["untuned-time"]
    assert bundle is base and "on the 60 tuning instances neither blend was tuned on" in why
    assert "paired +0.0000 [+0.0000, +0.0000]: not above zero" in why

    # The tuned blend against the untuned time model, on instances of the task neither was tuned on.
    tuned_ranker, untuned_ranker = (ReplayRanker(base.encode, ctx.items, params, item_vectors=base.item_vectors)
                                    for params in (plain.params, TimeModelParams()))
    for ranker in (tuned_ranker, untuned_ranker):
        ranker.fit(task.train, drift, index=ctx.index(base), cooccurrence=ctx.cooccurrence("tuning"))
    held = held_out_gain(tuned_ranker, untuned_ranker, task.instances, [plain.positions], None, seed=0)
    rest = task.instances[~np.isin(task.instances.pos, plain.positions)]
    assert held.instances == len(rest) == len(task.instances) - len(plain.positions)
    expected = [score_instances(r, rest)["NDCG@10"].mean() for r in (tuned_ranker, untuned_ranker)]
    assert (held.a, held.b) == pytest.approx(expected) and held.difference == pytest.approx(expected[0] - expected[1])
    assert held.low <= held.difference <= held.high
    # At most max_instances of them, a seeded draw; none left: None.
    assert held_out_gain(tuned_ranker, untuned_ranker, task.instances, [plain.positions], 20, seed=0).instances == 20
    assert held_out_gain(tuned_ranker, untuned_ranker, task.instances, [task.instances.pos], None, seed=0) is None


def test_item_vectors_are_kept_with_the_cached_models(drift, chronorec):
    ctx = chronorec.context(temporal_split(drift))
    base = ctx.untuned()
    texts = [ctx.item_text_of(i) for i in ctx.item_ids]
    first, _ = ctx._item_vectors(base.encoder, base.version_dir, texts)
    again, reused = ctx._item_vectors(base.encoder, base.version_dir, texts)
    # Read back bit for bit what the encoder gives; other texts are another entry.
    assert reused
    np.testing.assert_array_equal(again, base.encoder.encode(texts))
    np.testing.assert_array_equal(first, again)
    _, other = ctx._item_vectors(base.encoder, base.version_dir, texts[:5])
    assert not other


def test_fine_tuning_never_reads_the_test_window(drift, chronorec):
    split = temporal_split(drift)
    ctx = chronorec.context(split)
    train, valid = ctx.training_examples()
    inner_cutoff_position = ctx.tuning.train.size
    assert train and valid
    assert max(e.position for e in train) < inner_cutoff_position
    assert all(inner_cutoff_position <= e.position < split.n_train for e in valid)
    # loo: examples are the training targets, validation the second-to-last events.
    loo = evaluate.build_split(drift, "loo")
    loo_train, loo_valid = chronorec.context(loo).training_examples()
    assert {e.position for e in loo_train} <= set(loo.train.tolist())
    assert {e.position for e in loo_valid} <= set(loo.validation.pos.tolist())
    assert not {e.position for e in loo_train + loo_valid} & set(loo.test.pos.tolist())


def test_loo_examples_match_the_trainers_examples(drift, ci_settings, chronorec):
    # Targets named by position (loo) get exactly the pairs the same events get as a time window.
    split = temporal_split(drift)
    train, _ = chronorec.context(split).training_examples()
    by_position, none = build_examples(event_log_from(drift.items, drift.events),
                                       TargetPositions.of([e.position for e in train], []),
                                       max_events=ci_settings.history_max_events)
    assert not none
    assert [(e.position, e.query, e.positive, e.history_items) for e in by_position] == \
           [(e.position, e.query, e.positive, e.history_items) for e in train]


def test_picked_examples_are_the_full_lists_examples_at_those_indices(drift, ci_settings, chronorec):
    # The fine-tuning writes only the examples it uses: the same examples as the full lists hold.
    split = temporal_split(drift)
    ctx = chronorec.context(split)
    train, valid = ctx.training_examples()
    train_rows, valid_rows = [len(train) - 1, 0, 3, 3], [2, len(valid) - 1]
    seen = []

    def pick(n_train, n_valid):
        seen.append((n_train, n_valid))
        return train_rows, valid_rows

    picked_train, picked_valid = ctx.training_examples(pick)
    assert seen == [(len(train), len(valid))]
    assert picked_train == [train[0], train[3], train[-1]]
    assert picked_valid == [valid[2], valid[-1]]


def _evaluated_temporal_split(chronorec, drift):
    """The temporal split the evaluation above ran (its context holds the trained ranker and the
    tunings), or a new one when this test runs alone."""
    ctx = chronorec._contexts.get("temporal")
    return ctx.split if ctx is not None else temporal_split(drift)


def test_skipping_the_rerank_of_unreachable_targets_keeps_every_rank(drift, chronorec):
    """chronorec-ranker keeps the blend's scores (the second look's items lifted above the rest) for a
    target with at least `candidates` items above it and outside the second look (its rerank cannot
    move it): the same better/tied counts as reranking every instance. The
    second scoring walks back in time, so it also checks the rerank reads the replay's reset state."""
    from chronorec.trainer.protocols import exclusion_mask, rank_counts

    split = _evaluated_temporal_split(chronorec, drift)
    ranker = chronorec.ranker(split)
    task = split.test_task()
    ranker.fit(task.train, task.dataset)
    assert ranker.replay_ranker.rerank_reachable_only
    # A small cut leaves many targets out of reach on this small catalogue (the fit is shared: restored).
    learned = ranker.replay_ranker.learned_ranker
    spec = learned.spec
    learned.spec = replace(spec, candidates=8)
    instances = task.instances[::3]
    counts = []
    try:
        for skip in (True, False):
            ranker.replay_ranker.rerank_reachable_only = skip
            scores = ranker.score_batch(instances)
            counts.append(rank_counts(scores, instances.target, exclusion_mask(instances)))
    finally:
        learned.spec = spec
    skipped = counts[0][0] >= 8
    assert skipped.any() and (~skipped).any()
    np.testing.assert_array_equal(counts[0][0], counts[1][0])
    np.testing.assert_array_equal(counts[0][1], counts[1][1])


def test_a_repeated_variant_reads_back_the_test_rank_counts(drift, chronorec):
    from chronorec.trainer.protocols import exclusion_mask, rank_counts, score_instances

    split = _evaluated_temporal_split(chronorec, drift)
    task = split.test_task()
    first, again = chronorec.untuned_time(split), chronorec.untuned_time(split)
    for ranker in (first, again):
        ranker.fit(task.train, task.dataset)
    rows = first.score_batch(task.instances)
    expected = rank_counts(rows, task.instances.target, exclusion_mask(task.instances))
    reference = score_instances(first, task.instances, batch_size=64)
    np.testing.assert_array_equal(reference["better"], expected[0])
    np.testing.assert_array_equal(reference["tied"], expected[1])
    assert chronorec.context(split).test_counts
    again.replay_ranker.replay = None  # a second scoring would fail: the counts come from the context
    repeated = score_instances(again, task.instances, batch_size=64)
    for name in reference:
        np.testing.assert_array_equal(repeated[name], reference[name])


def test_only_the_repeatable_variants_keep_their_test_rank_counts(drift, chronorec):
    from chronorec.trainer.protocols import score_instances

    split = _evaluated_temporal_split(chronorec, drift)
    task = split.test_task()
    chronorec.context(split).test_counts.clear()
    mean = chronorec.untuned_mean(split)
    mean.fit(task.train, task.dataset)
    score_instances(mean, task.instances)
    assert not chronorec.context(split).test_counts
    assert chronorec.untuned_time(split).repeatable and chronorec.blend(split).repeatable
    assert not chronorec.ranker(split).repeatable


def test_a_ranker_that_does_not_help_is_the_blend_scored_as_the_blend_is(drift, chronorec):
    # The version would serve the blend: the variant is chronorec-blend itself, its test counts
    # read back from the blend's, so no second scoring (nor history-text encoding) is done.
    from chronorec.trainer.protocols import exclusion_mask, rank_counts

    split = _evaluated_temporal_split(chronorec, drift)
    task = split.test_task()
    learned = chronorec.ranker(split)
    assert learned.ranker_fit.helps
    blend = chronorec.blend(split)
    unhelpful = cm.LearnedChronorecRanker(learned.ctx, learned.bundle, learned.time_model,
                                          replace(learned.ranker_fit, ranker=None), learned.report)
    assert unhelpful.repeatable and unhelpful.replay_ranker.learned_ranker is None
    assert unhelpful.time_model == blend.time_model and unhelpful.bundle is blend.bundle
    for ranker in (blend, unhelpful):
        ranker.fit(task.train, task.dataset)
    instances = task.instances[:200]
    rows = unhelpful.score_batch(instances)
    np.testing.assert_array_equal(rows, blend.score_batch(instances))
    expected = rank_counts(rows, instances.target, exclusion_mask(instances))
    reference = score_instances(blend, task.instances, batch_size=64)
    unhelpful.replay_ranker.replay = None  # a second scoring would fail: the counts come from the context
    repeated = score_instances(unhelpful, task.instances, batch_size=64)
    for name in reference:
        np.testing.assert_array_equal(repeated[name], reference[name])
    np.testing.assert_array_equal(repeated["better"][:200], expected[0])


def test_evaluation_ranks_through_the_serving_ranker(drift, chronorec, monkeypatch):
    split = temporal_split(drift)
    ranker = chronorec.untuned_time(split)
    assert isinstance(ranker.replay_ranker, ReplayRanker)
    task = split.test_task()
    ranker.fit(task.train, task.dataset)
    assert isinstance(ranker.replay_ranker.replay.ranker, TimeAwareRanker)

    calls = []
    original = TimeAwareRanker.score_candidates

    def counting(self, query):
        calls.append(query)
        return original(self, query)

    monkeypatch.setattr(TimeAwareRanker, "score_candidates", counting)
    instances = task.instances[:25]
    ranker.replay_ranker.per_event = True
    reference = ranker.score_batch(instances)
    assert len(calls) == len(instances) and all(q.exhaustive for q in calls)
    assert all(q.params == ranker.time_model for q in calls)
    # The batch form (the default) calls no ranker per event and gives the very same scores.
    calls.clear()
    ranker.replay_ranker.per_event = False
    scores = ranker.score_batch(instances)
    assert not calls
    np.testing.assert_array_equal(scores, reference)

    # A ranker built the way the server builds one, fed the events before each instance, and
    # asked Recommend: its top 10 are the evaluation's top 10.
    replay = ranker.replay_ranker.replay
    d = drift
    for row in range(0, len(instances), 6):
        position = int(instances.pos[row])
        state = InteractionState()
        state.add(d.event_at(p) for p in range(position))
        index = ItemIndex(ranker.bundle.item_vectors.shape[1])
        index.build(replay.item_ids, ranker.bundle.item_vectors)
        served_ranker = TimeAwareRanker(replay.items, index, state, replay.cooccurrence, ranker.bundle.encode)
        user_id = d.user_ids[d.user[position]]
        served = served_ranker.recommend(RecommendQuery(user_id=user_id, k=10, at=float(d.ts[position]),
                                                 params=ranker.time_model))
        row_scores = scores[row].copy()
        row_scores[d.item[instances.history(row)]] = -np.inf  # the server never returns seen items
        order = sorted(range(d.n_items), key=lambda i: (-row_scores[i], d.item_ids[i]))[:10]
        assert [r.item_id for r in served.items] == [d.item_ids[i] for i in order]
        np.testing.assert_allclose([r.score for r in served.items], row_scores[order], rtol=1e-5, atol=1e-6)


# Time models that exercise every branch of the ranker the batch replay mirrors: the history text
# alone and blended, long-term decay, co-occurrence, freshness, trend windows, the personal
# half-life, a zero semantic weight (no user vector) and trend alone.
REPLAY_MODELS = (
    TimeModelParams(history_max_events=20),
    TimeModelParams(alpha=0.0, long_term_half_life_days=3650.0, w_semantic=1.0, w_cooccurrence=0.0,
                    w_freshness=0.0, w_trend=0.0),
    TimeModelParams(alpha=0.5, long_term_half_life_days=1.0, cooccurrence_half_life_days=0.0003, w_semantic=0.5,
                    w_cooccurrence=1.0, w_freshness=0.05, w_trend=0.1, personal_half_life_days=1.0, history_max_events=3),
    TimeModelParams(alpha=1.0, w_semantic=2.0, w_cooccurrence=1.0, w_trend=0.5, trend_window_days=1.0,
                    freshness_half_life_days=3.0, w_freshness=0.2, personal_half_life_days=0.1),
    TimeModelParams(w_semantic=0.0, w_cooccurrence=0.0, w_freshness=0.0, w_trend=1.0),
)


def _replay_pair(chronorec, split, bundle_name="untuned"):
    """Two replays of the split's test task with their own vector caches: per event, and batch."""
    ctx = chronorec.context(split)
    bundle = ctx.untuned() if bundle_name == "untuned" else ctx.finetuned()
    task = split.test_task()
    pair = []
    for per_event in (True, False):
        replay_ranker = ReplayRanker(bundle.encode, ctx.items, REPLAY_MODELS[0], item_vectors=bundle.item_vectors,
                                     per_event=per_event)
        replay_ranker.fit(task.train, task.dataset)
        pair.append(replay_ranker)
    return pair


@pytest.mark.parametrize("protocol", ["temporal", "loo"])
def test_batch_replay_gives_the_per_event_rankers_scores(drift, chronorec, protocol):
    split = evaluate.build_split(drift, protocol)
    per_event, batch = _replay_pair(chronorec, split)
    instances = split.test_task().instances
    assert batch.replay.scorer() is not None
    for params in REPLAY_MODELS:
        per_event.params = batch.params = params
        # Bit for bit: the report's figures must not move by a last-digit tie.
        np.testing.assert_array_equal(batch.score_batch(instances), per_event.score_batch(instances))


def test_semantic_prefetched_for_a_chunk_gives_the_same_candidates(drift, chronorec):
    split = evaluate.build_split(drift, "temporal")
    _, batch = _replay_pair(chronorec, split)
    scorer = batch.replay.scorer()
    params = REPLAY_MODELS[0]
    instances = split.test_task().instances[:40]
    texts = scorer.prime(instances, params)
    (_, ahead), = scorer.chunks(instances, texts)
    (_, plain), = scorer.chunks(instances, texts)
    ahead.prefetch_semantic(params)
    assert len(ahead._memos) == np.count_nonzero(ahead.n_hist) > 0
    for i in range(len(instances)):
        a, b = ahead.candidates(i, params), plain.candidates(i, params)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.semantic, b.semantic)
    assert not ahead._memos  # each instance's memo is handed over once


def test_components_left_out_by_a_zero_weight_are_completed_as_computed_at_once(drift, chronorec):
    """The walks that ask whether an event is wanted score it without the components its zero
    weights leave out, then work those out for the wanted events alone: the same candidates,
    scores and components, bit for bit, as computing every component at once."""
    split = evaluate.build_split(drift, "temporal")
    _, batch = _replay_pair(chronorec, split)
    scorer = batch.replay.scorer()
    params = REPLAY_MODELS[0].with_overrides({"w_cooccurrence": 0.0, "w_trend": 0.0})
    instances = split.test_task().instances[:40]
    texts = scorer.prime(instances, params)
    (_, lazy), = scorer.chunks(instances, texts)
    (_, eager), = scorer.chunks(instances, texts)
    left_out = 0
    for i in range(len(instances)):
        partial = lazy.candidates(i, params, components=False)
        whole, expected = lazy.completed(i, params, partial), eager.candidates(i, params)
        left_out += int(not (np.array_equal(partial.cooccurrence, expected.cooccurrence)
                             and np.array_equal(partial.trend, expected.trend)))
        for name in ("item_ids", "score", "semantic", "cooccurrence", "freshness", "trend"):
            np.testing.assert_array_equal(getattr(whole, name), getattr(expected, name))
    assert left_out  # the zero-weight components were left out of some scores


def test_batch_replay_follows_the_states_rules_on_duplicates_and_cold_starts(drift, chronorec):
    """A repeated event id is ignored by the interaction state (and so by the batch replay); a user
    with no earlier event is a cold start scored by trend alone."""
    from chronorec.server.core.catalog import Event
    from chronorec.trainer.protocols import Instances

    events = list(drift.events)
    # The same event delivered twice (a retried Feedback), and a user whose first event is the target.
    events.append(events[len(events) // 2])
    events.append(Event("cold-1", "newcomer", events[-5].item_id, "view", float(drift.ts[-1])))
    data = Dataset(drift.items, events)
    split = temporal_split(data)
    per_event, batch = _replay_pair(chronorec, split)
    newcomer = data.user_index["newcomer"]
    instances = Instances(data, np.concatenate((split.instances.pos, data.user_events(newcomer))))
    for params in REPLAY_MODELS:
        per_event.params = batch.params = params
        np.testing.assert_array_equal(batch.score_batch(instances), per_event.score_batch(instances))


def test_a_data_sets_history_entries_are_built_once_and_are_the_events(drift):
    from chronorec.server.core.timetext import HistoryEntry

    entries = drift.history_entries
    assert drift.history_entries is entries  # one list, shared by every replay of the data
    for p in (0, len(entries) // 2, len(entries) - 1):
        e = drift.event_at(p)
        assert entries[p] == HistoryEntry(drift.item_ids[drift.item[p]], e.action, float(e.timestamp), e.value)


def test_tuning_and_sweeps_are_the_same_with_the_batch_replay(drift, chronorec, monkeypatch):
    from chronorec.trainer.tune import RankerReplay, TuningGrid, tune_time_model

    split = temporal_split(drift)
    ctx = chronorec.context(split)
    bundle = ctx.untuned()
    base = TimeModelParams(history_max_events=20)
    results = []
    for per_event in (True, False):
        replay = RankerReplay(drift, ctx.items, ctx.tuning.train, bundle.encode, item_vectors=bundle.item_vectors)
        if per_event:
            monkeypatch.setattr(replay, "scorer", lambda: None)
        results.append(tune_time_model(replay, ctx.tuning.instances, base, TuningGrid(), max_instances=120))
    (a, b) = results
    assert (a.params, a.value, a.default_value, a.trace) == (b.params, b.value, b.default_value, b.trace)

    sweeps = []
    for per_event in (True, False):
        ranker = cm.ChronorecRanker(ctx, bundle, a.params, {}, sweeps=cm.SWEEPS)
        ranker.replay_ranker.per_event = per_event
        ranker.fit(split.test_task().train, drift)
        sweeps.append(ranker.sweep_results)
    assert sweeps[0] == sweeps[1]



def _static_taste_log(folder) -> Dataset:
    """A year of ratings from users who keep their favourite topic (the evaluation's scaling set in
    small, written and read back as that set is): the taste does not drift, so what a user rated
    months ago predicts the next item as well as what they rated last."""
    from bench.eval_scale_data import generate, write

    from chronorec.server.core.importers import detect_and_load

    write(folder, *generate(seed=3, n_items=240, n_users=260, events_per_user=9.0, late_users=10))
    return Dataset(*detect_and_load(folder))


def test_the_drift_log_written_for_the_evaluation_reads_back_as_generated(tmp_path):
    from bench.eval_drift_data import generate
    from bench.eval_scale_data import write

    from chronorec.server.core.importers import detect_and_load

    write(tmp_path, *generate(seed=7, users=30))
    items, events = detect_and_load(tmp_path)
    original = generate_drift_dataset(seed=7, n_users=30, anchor=1_790_000_000.0)
    assert sorted(items, key=lambda i: i.item_id) == sorted(original.items, key=lambda i: i.item_id)
    assert sorted(events, key=lambda e: e.event_id) == sorted(original.events, key=lambda e: e.event_id)


def test_time_aware_tuning_scores_at_least_the_timeless_blend(drift, chronorec, tmp_path):
    """The time grid holds the timeless blend (α 0, no decay, a year's popularity) and the search
    starts there when it beats the starting parameters, so the time-aware tuning scores at least
    what the time-blind tuning does on the same instances: on a log whose taste does not drift (where
    an ascent from decayed settings turned co-occurrence off) and on drifting users."""
    from chronorec.trainer.tune import RankerReplay, TuningGrid, tune_time_model

    grid = TuningGrid()
    assert max(grid.cooccurrence_half_life_days) == cm.BLIND.cooccurrence_half_life_days
    assert max(grid.long_term_half_life_days) == cm.BLIND.long_term_half_life_days
    assert max(grid.trend_window_days) == cm.BLIND.trend_window_days
    starts = {}
    for name, data in (("static", _static_taste_log(tmp_path)), ("drift", drift)):
        ctx = chronorec.context(temporal_split(data))
        bundle = ctx.untuned()

        def tuned(base, tuning_grid):
            replay = RankerReplay(data, ctx.items, ctx.tuning.train, bundle.encode, item_vectors=bundle.item_vectors)
            return tune_time_model(replay, ctx.tuning.instances, base, tuning_grid, max_instances=150, replay_workers=1)

        timed = tuned(TimeModelParams(history_max_events=20), grid)
        blind = tuned(replace(cm.BLIND, history_max_events=20), cm.BLIND_GRID)
        assert timed.value >= blind.value - 1e-9, name
        starts[name] = timed.start
    assert starts == {"static": "timeless", "drift": "given"}
    chronorec.end_split(ctx.split)


@pytest.mark.skipif(not can_fork(), reason="the forked replay runs where fork is the platform's way")
def test_tuning_replayed_in_two_processes_is_the_same(drift, chronorec, monkeypatch, caplog):
    """The tuning replay's later chunks run in a forked process: the same choice, value and trace as
    one process; and a child that would need the encoder hands its part back to the parent."""
    from chronorec.trainer import batch_replay, forked
    from chronorec.trainer.batch_replay import HistoryTexts, ReplayScorer
    from chronorec.trainer.tune import RankerReplay, TuningGrid, tune_time_model

    monkeypatch.setattr(batch_replay, "CHUNK_INSTANCES", 32)  # several chunks on a small tuning window
    ctx = chronorec.context(temporal_split(drift))
    bundle = ctx.untuned()
    base = TimeModelParams(history_max_events=20)

    def tuned(workers: int):
        replay = RankerReplay(drift, ctx.items, ctx.tuning.train, bundle.encode, item_vectors=bundle.item_vectors)
        return tune_time_model(replay, ctx.tuning.instances, base, TuningGrid(), max_instances=120,
                               replay_workers=workers)

    one, two = tuned(1), tuned(2)
    assert (one.params, one.value, one.default_value, one.trace) == (two.params, two.value, two.default_value, two.trace)
    # Texts left to be encoded when reached: the child refuses to encode, the parent replays its
    # chunks, and the result is one process's under the same rule.
    monkeypatch.setattr(ReplayScorer, "prime", lambda self, instances, params: HistoryTexts(
        params.history_max_events, self.texts(instances, params)))
    lazy = tuned(1)
    with caplog.at_level("WARNING", logger=forked.__name__):
        fallback = tuned(2)
    assert "second process failed (EncoderNeeded" in caplog.text
    assert (fallback.params, fallback.value, fallback.trace) == (lazy.params, lazy.value, lazy.trace)


@pytest.mark.skipif(not can_fork(), reason="the forked test scoring runs where fork is the platform's way")
def test_test_scoring_and_sweeps_in_two_processes_are_the_same(drift, chronorec, monkeypatch, caplog):
    """The blend's later test chunks are scored in a forked process, and the sweeps' later settings:
    the same counts as one process (here on a shuffled test window). A child that meets a text its
    parent did not encode hands its part back, and the counts are still one process's."""
    from chronorec.trainer import batch_replay, forked
    from chronorec.trainer.batch_replay import HistoryTexts, ReplayScorer
    from chronorec.trainer.protocols import score_instances

    monkeypatch.setattr(batch_replay, "CHUNK_INSTANCES", 32)  # several chunks on a small test window
    split = _evaluated_temporal_split(chronorec, drift)
    task = split.test_task()
    shuffled = task.instances[np.random.default_rng(3).permutation(len(task.instances))]
    assert len(shuffled) > 2 * batch_replay.CHUNK_INSTANCES
    ctx = chronorec.context(split)
    # A blend that reads the history text: its texts are encoded before the fork.
    params = TimeModelParams(history_max_events=20, alpha=0.5, w_semantic=1.0)
    forks: list[str] = []
    split_here = cm.beside
    monkeypatch.setattr(cm, "beside", lambda *a, **k: forks.append(k["name"]) or split_here(*a, **k))

    def counted(workers: int):
        ranker = cm.ChronorecRanker(ctx, ctx.untuned(), params, {}, sweeps=cm.SWEEPS)
        ranker.settings = replace(ranker.settings, replay_workers=workers)
        ranker.fit(task.train, task.dataset)
        # One batch (split between its chunks), then batches of 64 (the split within the second).
        scored = [score_instances(ranker, shuffled, batch_size=size) for size in (1024, 64)]
        return {f"{name} ({size})": v for size, m in zip((1024, 64), scored) for name, v in m.items()}, \
            ranker.sweep_results

    (one, one_sweeps), (two, two_sweeps) = counted(1), counted(2)
    assert forks == ["sweeps", "test scoring", "test scoring"]  # only with two workers
    for metric in one:
        np.testing.assert_array_equal(one[metric], two[metric], err_msg=metric)
    assert one_sweeps == two_sweeps

    monkeypatch.setattr(ReplayScorer, "prime", lambda self, instances, params: HistoryTexts(
        params.history_max_events, self.texts(instances, params)))
    lazy, lazy_sweeps = counted(1)  # texts encoded when reached, in one process
    with caplog.at_level("WARNING", logger=forked.__name__):
        fallback, fallback_sweeps = counted(2)
    assert "test scoring: the second process failed (EncoderNeeded" in caplog.text
    assert "sweeps: the second process failed (EncoderNeeded" in caplog.text
    for metric in lazy:
        np.testing.assert_array_equal(lazy[metric], fallback[metric], err_msg=metric)
    assert fallback_sweeps == lazy_sweeps


def test_fine_tuning_that_kept_the_base_weights_stores_its_outcome_not_a_model(drift, ci_settings, tmp_path):
    # No step after the validation of the starting weights: keep-best keeps them.
    settings = ci_settings.with_overrides(cache_dir=str(tmp_path), finetune_steps=0, finetune_examples=32)
    ctx = cm.ChronorecMethods(settings).context(temporal_split(drift))
    version_dir, info = ctx._finetune()
    assert version_dir is None and cm.kept_base_weights(info) and not info["reused_from_cache"]
    [record] = tmp_path.glob(f"finetuned-temporal-*/{cm.KEPT_BASE_RECORD}")
    assert [p.name for p in record.parent.iterdir()] == [cm.KEPT_BASE_RECORD]  # no copy of the base model
    # Another evaluation with the same data, split and settings reads the outcome back.
    again_dir, again = cm.ChronorecMethods(settings).context(temporal_split(drift))._finetune()
    assert again_dir is None and again.pop("reused_from_cache")
    stored = json.loads(json.dumps(info, default=str))
    assert again == {k: v for k, v in stored.items() if k != "reused_from_cache"}
    finetuned = ctx.finetuned()
    assert finetuned.item_vectors is ctx.untuned().item_vectors and finetuned.info["kept_base_weights"]


def test_items_named_only_by_their_events_are_ranked_by_chronorec_too(ci_settings, tmp_path):
    """A ratings log without an item file: every item is known by its id alone. The protocols rank
    all of them, and so does chronorec: each is an item titled by its id (the text the server reads
    for an item it does not know), reached through co-occurrence and trend, so the time-aware blend
    ranks well above what is merely popular, and fine-tuning has examples to learn from."""
    from bench.eval_scale_data import generate, write

    from chronorec.server.core.importers import detect_and_load

    _, events = generate(seed=3, n_items=240, n_users=500, events_per_user=12.0, late_users=10)
    write(tmp_path / "log", [], events)  # no items: events.jsonl alone
    assert not (tmp_path / "log" / "items.jsonl").exists()
    data = Dataset(*detect_and_load(tmp_path / "log"))
    assert not data.items and data.n_items == len({e["item_id"] for e in events})

    chronorec = cm.ChronorecMethods(ci_settings.with_overrides(cache_dir=str(tmp_path / "cache")))
    split = temporal_split(data)
    ctx = chronorec.context(split)
    assert ctx.item_ids == data.item_ids
    assert all(ctx.item_text_of(i) == i for i in data.item_ids)
    train, _ = ctx.training_examples()
    assert train and all(example.positive == example.item_id for example in train)
    # A window with no example to learn from skips fine-tuning and says why, instead of failing.
    empty = cm.SplitContext(split, chronorec.settings)
    empty.training_examples = lambda pick=None: ([], [])
    bundle, reason = empty.encoder_choice()
    assert bundle is empty.untuned() and "skipped (no training examples" in reason

    methods = ["MostPop", "chronorec-untuned-time", "chronorec-finetuned-time"]
    document = evaluate.evaluate(data, ["temporal"], methods, progress=False,
                                 factories={**evaluate.METHODS, **chronorec.factories()})
    result = document["protocols"]["temporal"]["methods"]
    # On the warm targets: half of this log's targets are repeats of the user's own items, which the
    # protocol excludes with the rest of the history (the "repeat" bucket: no method hits them).
    assert all(result[name]["by_target"][2]["n"] > 0 and result[name]["by_target"][2]["mean"] == 0 for name in methods)
    warm = {name: result[name]["by_target"][0]["mean"] for name in methods}
    assert warm["chronorec-untuned-time"] > 3 * warm["MostPop"] > 0
    assert result["chronorec-finetuned-time"]["params"]["finetune_steps"] >= 1


def test_the_short_lived_items_log_is_led_by_recent_popularity(tmp_path):
    """The generated log of short-lived items (tests/bench/eval_trend_data) has the shape its
    docstring gives: sessions of events minutes apart, a share of the test targets released after
    the cutoff, and this week's popularity ahead of all-time popularity, of the decayed neighbours
    and of EASE, as of each test event."""
    from bench.eval_scale_data import write
    from bench.eval_trend_data import generate

    from chronorec.server.core.importers import detect_and_load
    from chronorec.trainer.protocols import Instances, target_buckets

    write(tmp_path, [], generate(seed=2, n_items=600, n_users=900)[1])
    data = Dataset(*detect_and_load(tmp_path))
    gaps = Instances(data, np.arange(data.n_events)).time_since_previous()  # nan for a user's first
    assert np.mean(gaps[~np.isnan(gaps)] < 3600) > 0.4
    split = temporal_split(data)
    cold = np.mean(target_buckets(split.test_task()) == 1)
    assert 0.08 < cold < 0.4
    methods = ["MostPop", "RecentPop-7d", "ItemKNN-hl10d", "EASE"]
    document = evaluate.evaluate(data, ["temporal"], methods, progress=False)
    ndcg = {m: document["protocols"]["temporal"]["methods"][m]["metrics"]["NDCG@10"]["mean"] for m in methods}
    assert ndcg["RecentPop-7d"] == max(ndcg.values())
