"""Validation through cached frozen layers gives the full encoder's vectors; the fine-tuning study runs end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.timetext import HistoryEntry, history_text
from chronorec.trainer.data import event_log_from, load_training_data
from chronorec.trainer.export import load_base_model
from chronorec.trainer.finetune import FinetuneConfig, FrozenPrefix, collapsed, finetune, freeze_below, frozen_layers
from bench import bench_finetune
from tinybert import make_tiny_bert

ANCHOR = 1_790_000_000.0
SHORT = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("study-tiny-bert"))


@pytest.fixture(scope="module")
def data():
    drift = generate_drift_dataset(seed=7, n_users=30, anchor=ANCHOR)
    return load_training_data(event_log_from(drift.items, drift.events))


@pytest.fixture(scope="module")
def item_texts(data):
    return {item_id: data.event_log.item_text_of(item_id) for item_id in data.event_log.items}


def nudge_top_layer(module, scale: float) -> None:
    with torch.no_grad():
        generator = torch.Generator().manual_seed(int(scale * 1000))
        for parameter in module.bert.encoder.layer[-1].parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def test_frozen_layers_counts_the_fixed_bottom(tiny_folder):
    module, _ = load_base_model(tiny_folder)
    assert frozen_layers(module) is None  # everything trains
    freeze_below(module, 1)
    assert frozen_layers(module) == 1
    freeze_below(module, 0)
    assert frozen_layers(module) == 2


def test_the_prefix_gives_the_vectors_of_the_whole_module_as_the_top_layer_changes(tiny_folder, data, item_texts):
    module, tokenizer = load_base_model(tiny_folder)
    freeze_below(module, 1)
    prefix = FrozenPrefix.of(module, tokenizer, SHORT)
    # Texts of very different lengths (some truncated at SHORT tokens) batched together.
    texts = list(item_texts.values())[:40] + [e.query for e in data.valid[:40]]
    for scale in (0.0, 0.05, 0.2):
        nudge_top_layer(module, scale)
        expected = module.encode_texts(tokenizer, texts, 16, SHORT).numpy()
        np.testing.assert_allclose(prefix.encode(module, texts), expected, atol=1e-5)
    assert set(prefix.states) == set(texts)  # computed once, reused after each change of the top layer


def test_validation_through_the_prefix_matches_the_module_and_a_full_cache_falls_back(tiny_folder, data, item_texts):
    def run(prefix_bytes: int | None):
        module, tokenizer = load_base_model(tiny_folder)
        freeze_below(module, 1)
        given = None if prefix_bytes is None else FrozenPrefix(tokenizer, 1, SHORT, max_bytes=prefix_bytes)
        config = FinetuneConfig(steps=4, batch_size=16, lr=2e-3, eval_every=2, patience=10, max_length=SHORT,
                                max_valid_queries=60, progress=False)
        result = finetune(module, tokenizer, data.train[:120], data.valid, item_texts, config, frozen_prefix=given)
        return [[e[k] for k in ("step", "HR@10", "NDCG@10", "MRR")] for e in result.evaluations], given

    cached, _ = run(None)
    full, empty = run(0)  # no room: every validation encodes through the whole module
    assert empty.states == {}
    assert len(cached) == 3
    np.testing.assert_allclose(cached, full, atol=1e-6)


def test_training_through_a_given_prefix_takes_the_same_steps_as_the_module(tiny_folder, data, item_texts):
    def trained(with_prefix: bool):
        module, tokenizer = load_base_model(tiny_folder)
        for layer in module.modules():  # dropout off: the only difference a cached bottom makes
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        freeze_below(module, 1)
        given = FrozenPrefix(tokenizer, 1, SHORT) if with_prefix else None
        config = FinetuneConfig(steps=3, batch_size=16, lr=2e-3, max_length=SHORT, progress=False, distill_weight=1.0)
        finetune(module, tokenizer, data.train[:48], [], item_texts, config, frozen_prefix=given)
        return torch.cat([p.detach().flatten() for p in module.bert.encoder.layer[-1].parameters()])

    torch.testing.assert_close(trained(True), trained(False), atol=1e-5, rtol=1e-4)


def test_train_encoder_measures_through_one_prefix_and_trains_the_whole_module(tiny_folder, data, item_texts,
                                                                              monkeypatch):
    # The before/after measures get an encode over a FrozenPrefix: the module's vectors; the
    # training steps run the whole module (with its dropout): the weights of a plain finetune call.
    # The starting weights' catalogue vectors are computed once, for the measure before and the
    # first validation.
    from chronorec.trainer.finetune import FrozenPrefix, encoder_retrieval_metrics, train_encoder

    catalogue_encodes = []
    encode_texts = FrozenPrefix.encode

    def counting(self, module, texts):
        texts = list(texts)
        if texts == list(item_texts.values()):
            catalogue_encodes.append(len(texts))
        return encode_texts(self, module, texts)

    monkeypatch.setattr(FrozenPrefix, "encode", counting)

    sample = data.valid[:30]
    seen = []

    def measure(module, tokenizer, encode):
        seen.append(encode)
        texts = [e.query for e in sample]
        np.testing.assert_allclose(encode(texts), module.encode_texts(tokenizer, texts, 16, SHORT).numpy(), atol=1e-5)
        return encoder_retrieval_metrics(module, tokenizer, sample, item_texts, max_length=SHORT, encode=encode)

    config = FinetuneConfig(steps=4, batch_size=16, lr=2e-3, eval_every=2, patience=10, max_length=SHORT,
                            max_valid_queries=40, progress=False, seed=3)
    trained = train_encoder(tiny_folder, data.train[:64], data.valid[30:70], item_texts, config, train_layers=1,
                            measure=measure)
    assert len(seen) == (1 if trained.result.best_step == 0 else 2) and all(e is not None for e in seen)
    assert trained.measured_before.keys() == trained.measured_after.keys() and "NDCG@10" in trained.measured_before

    torch.manual_seed(config.seed)
    module, tokenizer = load_base_model(tiny_folder)
    freeze_below(module, 1)
    kept_start = trained.result.best_step == 0
    assert len(catalogue_encodes) == len(trained.result.evaluations) + (0 if kept_start else 1)
    plain = finetune(module, tokenizer, data.train[:64], data.valid[30:70], item_texts, config)
    for mine, theirs in zip(trained.module.parameters(), module.cpu().parameters()):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    assert trained.result.evaluations == plain.evaluations


def test_a_stored_start_gives_the_same_run_without_the_catalogue_pass(tiny_folder, data, item_texts, tmp_path,
                                                                     monkeypatch):
    # The first run writes the catalogue's frozen states and the starting vectors; a second run from
    # the same starting weights reads them instead of encoding the catalogue, and measures, trains
    # and validates exactly as the first did. A torn file is computed again and written over.
    from chronorec.trainer.finetune import encoder_retrieval_metrics, train_encoder

    catalogue = list(item_texts.values())
    catalogue_passes = []
    add = FrozenPrefix.add

    def counting(self, module, texts):
        texts = list(texts)
        if texts == catalogue and any(t not in self.states for t in texts):
            catalogue_passes.append(len(texts))
        return add(self, module, texts)

    monkeypatch.setattr(FrozenPrefix, "add", counting)

    def measure(module, tokenizer, encode):
        return encoder_retrieval_metrics(module, tokenizer, data.valid[:30], item_texts, max_length=SHORT, encode=encode)

    config = FinetuneConfig(steps=4, batch_size=16, lr=2e-3, eval_every=2, patience=10, max_length=SHORT,
                            max_valid_queries=40, progress=False, seed=3)
    stored = tmp_path / "start" / "catalogue.pt"

    def run():
        return train_encoder(tiny_folder, data.train[:64], data.valid[30:70], item_texts, config, train_layers=1,
                             measure=measure, start_cache=stored)

    first = run()
    assert stored.exists() and len(catalogue_passes) == 1
    second = run()
    assert len(catalogue_passes) == 1  # read, not computed
    assert second.measured_before == first.measured_before and second.measured_after == first.measured_after
    assert second.result.evaluations == first.result.evaluations
    for mine, theirs in zip(second.module.parameters(), first.module.parameters()):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)

    stored.write_bytes(stored.read_bytes()[:100])
    third = run()
    assert len(catalogue_passes) == 2 and third.measured_before == first.measured_before
    assert len(torch.load(stored, weights_only=True)["texts"]) == len(catalogue)  # written over


def test_without_the_start_competing_the_best_trained_checkpoint_is_kept(tiny_folder, data, item_texts):
    module, tokenizer = load_base_model(tiny_folder)
    freeze_below(module, 1)
    # A learning rate this small barely moves the weights: with the start competing it usually wins.
    config = FinetuneConfig(steps=4, batch_size=16, lr=1e-6, eval_every=2, patience=10, max_length=SHORT,
                            max_valid_queries=40, progress=False)
    result = finetune(module, tokenizer, data.train[:100], data.valid, item_texts, config, start_competes=False)
    assert result.evaluations[0]["step"] == 0 and result.best_step in (2, 4)


def test_plain_history_drops_only_the_relative_time_phrases():
    entries = [HistoryEntry("a", "rating", ANCHOR - 30, 5.0), HistoryEntry("b", "like", ANCHOR - 3 * 86400),
               HistoryEntry("c", "view", ANCHOR - 2 * 3600), HistoryEntry("d", "view", ANCHOR - 86400 - 5)]
    text = history_text(entries, ANCHOR, lambda i: f"item {i} (1995) | Drama")
    assert bench_finetune.plain_history(text) == (
        "rated 5: item a (1995) | Drama ; viewed: item c (1995) | Drama ; viewed: item d (1995) | Drama ; "
        "liked: item b (1995) | Drama")


def test_the_study_measures_each_variant_against_the_base_encoder(tiny_folder, tmp_path):
    document = bench_finetune.run("generated", ["default", "last", "norm-head", "plain-text"], steps=2, threads=1,
                                  out=tmp_path, users=12, selection_max=20, measure_max=40, max_length=SHORT,
                                  base_model=str(tiny_folder), seed=0, eval_every=1)
    written = json.loads((tmp_path / "finetune-generated.json").read_text())
    assert [row["variant"] for row in written["variants"]] == ["default", "last", "norm-head", "plain-text"]
    for row in document["variants"]:
        for metric in ("NDCG@10", "HR@10"):
            figures = row[metric]
            assert figures["low"] <= figures["difference"] <= figures["high"]
            assert figures["difference"] == pytest.approx(figures["value"] - figures["base"])
    by_name = {row["variant"]: row for row in document["variants"]}
    assert by_name["last"]["best_step"] == 2 and by_name["last"]["beats_start_on_selection"] is None
    assert by_name["norm-head"]["trained_layers"] == "output LayerNorm"
    assert "| plain-text |" in (tmp_path / "finetune-generated.md").read_text()


def test_collapsed_compares_the_newest_validation_with_the_best_before_it():
    config = FinetuneConfig(abandon_fraction=0.5)
    runs = [{"step": 0, "MRR": 0.030}, {"step": 20, "MRR": 0.040}]
    assert not collapsed(runs[:1], config)  # nothing to compare with
    assert not collapsed(runs, config)
    assert not collapsed(runs + [{"step": 40, "MRR": 0.020}], config)  # half of the best: not below it
    assert collapsed(runs + [{"step": 40, "MRR": 0.0199}], config)  # the best, not the start, is the reference
    assert not collapsed(runs + [{"step": 40, "MRR": 0.0}], FinetuneConfig(abandon_fraction=None))
    assert not collapsed([{"step": 0, "MRR": 0.0}, {"step": 20, "MRR": 0.0}], config)  # nothing retrieved to lose


def test_a_run_that_wrecks_the_encoder_stops_at_its_first_validation(tiny_folder, data, item_texts):
    def run(**options):
        module, tokenizer = load_base_model(tiny_folder)
        freeze_below(module, 1)
        # A learning rate this large throws the top layer's weights far from anything learned (with the
        # plain loss: the logQ-corrected one loses only a quarter of it by the first validation). (The
        # tiny encoder retrieves only about twice as well as chance, so it cannot lose half of it.)
        settings = {"abandon_fraction": 0.7, "logq_correction": False,
                    **{k: v for k, v in options.items() if k != "start_competes"}}
        config = FinetuneConfig(steps=6, batch_size=16, lr=5.0, warmup_fraction=0.0, eval_every=2, patience=10,
                                max_length=SHORT, max_valid_queries=40, progress=False, **settings)
        return finetune(module, tokenizer, data.train[:100], data.valid, item_texts, config,
                        start_competes=options.get("start_competes", True))

    kept = run()
    start, first = kept.evaluations[0]["MRR"], kept.evaluations[1]["MRR"]
    assert first < 0.7 * start  # the premise: the first trained weights lost over 30 % of it
    assert kept.steps == 2 and kept.stopped_early and kept.best_step == 0 and len(kept.evaluations) == 2
    # The same run without the rule, or as a study of what training does, runs every step.
    assert run(abandon_fraction=None).steps == 6
    assert run(start_competes=False).steps == 6
