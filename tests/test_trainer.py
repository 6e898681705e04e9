"""Trainer data, contrastive fine-tuning and time-model tuning on generated drifting users with a tiny BERT."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chronorec.server.core.catalog import Event
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.server.core.ranking import RecommendQuery
from chronorec.server.core.store import EventStore
from chronorec.server.core.timetext import HistoryEntry, history_text
from chronorec.trainer import finetune as finetune_module
from chronorec.trainer.data import event_log_from, is_positive, load_training_data, read_event_log
from chronorec.trainer.export import load_base_model
from chronorec.trainer.finetune import FinetuneConfig, contrastive_loss, encoder_retrieval_metrics, finetune
from chronorec.trainer.protocols import EvalTask, fit_and_score
from chronorec.trainer.tune import ReplayRanker, RankerReplay, TuningGrid, torch_encoder, tune_time_model
from tinybert import make_tiny_bert

ANCHOR = 1_790_000_000.0
TINY_LR = 2e-3  # a random tiny BERT needs a far larger step than a pretrained one
SHORT = 64  # tokens: half the serving limit keeps CPU tests quick and still holds a few history events

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def drift():
    return generate_drift_dataset(seed=7, anchor=ANCHOR)


@pytest.fixture(scope="module")
def data(drift):
    return load_training_data(event_log_from(drift.items, drift.events))


@pytest.fixture(scope="module")
def item_texts(data):
    return {item_id: data.event_log.item_text_of(item_id) for item_id in data.event_log.items}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("trainer-tiny-bert"))


@pytest.fixture(scope="module")
def trained(tiny_folder, data, item_texts):
    """The tiny BERT fine-tuned briefly with the contrastive loss, and its untouched twin."""
    module, tokenizer = load_base_model(tiny_folder)
    base, _ = load_base_model(tiny_folder)
    result = finetune(module, tokenizer, data.train, data.valid, item_texts,
                      FinetuneConfig(steps=36, lr=TINY_LR, eval_every=12, patience=10, max_length=SHORT,
                                     progress=False))
    return module, base, tokenizer, result


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over distinct pairs of unit vectors: 1.0 means every vector is the same point."""
    n = len(vectors)
    gram = vectors @ vectors.T
    return float((gram.sum() - np.trace(gram)) / (n * n - n))


def item_vectors(module, tokenizer, item_texts) -> np.ndarray:
    return module.encode_texts(tokenizer, list(item_texts.values()), max_length=SHORT).numpy()


# ------------------------------------------------------------------------------- data


def test_windows_follow_the_temporal_protocol_and_never_train_on_the_future(data):
    w = data.windows
    assert w.train_start <= w.valid_start <= w.test_start <= w.end
    assert data.split.cutoff == w.test_start and data.inner.cutoff == w.valid_start
    assert data.train and data.valid and len(data.split.instances) and len(data.inner.instances)
    assert all(e.timestamp < w.valid_start for e in data.train)
    assert all(w.valid_start <= e.timestamp < w.test_start for e in data.valid)
    assert max(e.position for e in data.valid) < w.test_begin  # test events are never examples


def test_examples_are_point_in_time_with_exactly_the_servers_history_text(data, drift):
    events = data.event_log.events
    text_of = item_text_lookup(data.event_log.items)
    for example in data.train[::97] + data.valid[::31]:
        event = events[example.position]
        assert (event.user_id, event.item_id, event.timestamp) == (example.user_id, example.item_id, example.timestamp)
        assert is_positive(event)
        earlier = [e for e in events[: example.position] if e.user_id == example.user_id]
        assert earlier, "an example always has a history"
        entries = [HistoryEntry(e.item_id, e.action, e.timestamp, e.value) for e in earlier]
        assert example.query == history_text(entries, example.timestamp, text_of, 20)
        assert set(example.history_items) == {e.item_id for e in earlier}
        assert example.positive == text_of(example.item_id)

    # And it is the very text the server's ranking writes when it replays the log to that moment.
    replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train,
                          lambda texts: np.ones((len(texts), 4), dtype=np.float32))
    params = TimeModelParams()
    for example in data.train[::211]:
        replay.advance(example.position)
        query = RecommendQuery(user_id=example.user_id, k=10, at=example.timestamp, params=params)
        assert replay.ranker.short_term_text(replay.ranker.history_for(query), example.timestamp, params) == example.query


def test_negative_feedback_and_cold_events_are_not_examples(data):
    positions = {e.position for e in data.train + data.valid}
    seen_users: set[str] = set()
    for position, event in enumerate(data.event_log.events[: data.windows.test_begin]):
        if not is_positive(event) or event.user_id not in seen_users:
            assert position not in positions
        seen_users.add(event.user_id)
    actions = {data.event_log.events[p].action for p in positions}
    assert "skip" not in actions and "dislike" not in actions


def test_trainer_reads_read_only_while_the_server_writes(tmp_path, drift):
    db = tmp_path / "events.db"
    initial, later = drift.events[:1500], drift.events[1500:]
    with EventStore(db) as store:
        store.bulk_import(drift.items, initial)
    errors: list[BaseException] = []
    snapshots = []
    done = threading.Event()
    reading = threading.Event()

    def server_writes() -> None:
        try:
            with EventStore(db) as server:  # its own connections, as the server process has
                reading.wait(timeout=30)
                for start in range(0, len(later), 7):
                    server.add_events(later[start : start + 7])
                    # Idempotent retries of a batch the client did not see acknowledged.
                    server.add_events(later[start : start + 3])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=server_writes)
    writer.start()
    try:
        while not done.is_set() or len(snapshots) < 3:
            snapshots.append(read_event_log(db))
            reading.set()
    finally:
        writer.join(timeout=60)
    assert not errors, errors

    final = read_event_log(db)
    assert len(final.events) == len(drift.events)
    assert {e.event_id for e in final.events} == {e.event_id for e in drift.events}
    with EventStore(db, read_only=True) as store:
        by_seq = [(seq, event.event_id) for seq, event in store.iter_events()]
    # Every snapshot holds exactly the events committed up to its seq: nothing missed, no gap.
    assert any(len(s.events) < len(drift.events) for s in snapshots)
    for snapshot in snapshots:
        expected = {event_id for seq, event_id in by_seq if seq <= snapshot.max_seq}
        assert {e.event_id for e in snapshot.events} == expected


# ------------------------------------------------------------------------------ loss


def test_contrastive_loss_masks_other_rows_with_the_same_item():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    items = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    items[1] = items[0]  # rows 0 and 1 were both followed by the same item
    keys = torch.tensor([5, 5, 9])
    loss = contrastive_loss(queries, items, keys, temperature=0.1)

    logits = queries @ items.T / 0.1
    mask = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    masked = logits.masked_fill(mask, float("-inf"))
    targets = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(masked, targets)
                + torch.nn.functional.cross_entropy(masked.T, targets)) / 2
    assert torch.allclose(loss, expected)
    unmasked = contrastive_loss(queries, items, torch.tensor([5, 6, 9]), temperature=0.1)
    assert loss < unmasked  # a positive is never pushed away as someone else's negative

    hard = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    with_hard = contrastive_loss(queries, items, keys, 0.1, hard, torch.tensor([9, 7]))
    assert torch.isfinite(with_hard) and with_hard > loss  # more negatives, harder task



def test_logq_correction_subtracts_each_in_batch_items_log_frequency():
    torch.manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    items = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    keys = torch.tensor([1, 2, 3, 4])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    corrected = contrastive_loss(queries, items, keys, 0.1, log_q=log_q)

    logits = queries @ items.T / 0.1
    targets = torch.arange(4)
    # Query to item: each item's column is lowered by its log frequency (a popular item, often a
    # negative in others' rows, is no longer pushed away for it). Item to query: unchanged.
    expected = (torch.nn.functional.cross_entropy(logits - log_q[None, :], targets)
                + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    assert torch.allclose(corrected, expected)
    # Equal frequencies shift every logit alike: the plain loss.
    uniform = contrastive_loss(queries, items, keys, 0.1, log_q=torch.full((4,), -3.0))
    assert torch.allclose(uniform, contrastive_loss(queries, items, keys, 0.1))
    # Hard negatives keep their logits; only the in-batch columns are corrected.
    hard = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    with_hard = contrastive_loss(queries, items, keys, 0.1, hard, torch.tensor([7, 8]), log_q=log_q)
    all_logits = torch.cat([logits - log_q[None, :], queries @ hard.T / 0.1], dim=1)
    assert torch.allclose(with_hard, (torch.nn.functional.cross_entropy(all_logits, targets)
                                      + torch.nn.functional.cross_entropy(logits.T, targets)) / 2)


def test_finetuning_corrects_each_positive_by_its_share_of_the_training_positives(tiny_folder, data, item_texts,
                                                                                monkeypatch):
    train = data.train[:64]
    share = {}
    for e in train:
        share[e.item_id] = share.get(e.item_id, 0) + 1 / len(train)
    seen = []
    real_loss = finetune_module.contrastive_loss

    def spy(queries, items, keys, temperature, hard_items=None, hard_keys=None, log_q=None):
        seen.append(None if log_q is None else log_q.clone())
        return real_loss(queries, items, keys, temperature, hard_items, hard_keys, log_q=log_q)

    monkeypatch.setattr(finetune_module, "contrastive_loss", spy)
    module, tokenizer = load_base_model(tiny_folder)
    config = FinetuneConfig(steps=2, batch_size=16, lr=TINY_LR, max_length=SHORT, progress=False)
    assert config.logq_correction  # the default recipe
    finetune(module, tokenizer, train, [], item_texts, config)
    batches = finetune_module._Batches(len(train), 16, config.seed)
    for step, log_q in enumerate(seen):
        expected = [np.log(share[train[r].item_id]) for r in batches.at(step)]
        assert np.allclose(log_q.numpy(), expected, atol=1e-5)
    seen.clear()
    finetune(module, tokenizer, train, [], item_texts, replace(config, logq_correction=False))
    assert seen == [None, None]

# ------------------------------------------------------------------------ fine-tuning


def test_finetuning_improves_the_encoders_retrieval(trained, data, item_texts):
    module, base, tokenizer, result = trained
    assert result.steps == 36 and result.examples == 36 * 32 and result.examples_per_second > 0
    before = encoder_retrieval_metrics(base, tokenizer, data.valid, item_texts, max_length=SHORT)
    after = encoder_retrieval_metrics(module, tokenizer, data.valid, item_texts, max_length=SHORT)
    metric = FinetuneConfig().early_stop_metric
    assert result.initial_metric == pytest.approx(before[metric])
    assert result.best_metric == pytest.approx(after[metric])  # the best weights are the ones kept
    assert after["NDCG@10"] > before["NDCG@10"] + 0.02
    assert after["HR@10"] > before["HR@10"] + 0.05


def test_contrastive_training_spreads_items_apart(trained, item_texts):
    module, base, tokenizer, _ = trained
    untrained = mean_pairwise_cosine(item_vectors(base, tokenizer, item_texts))
    after = mean_pairwise_cosine(item_vectors(module, tokenizer, item_texts))
    # A random BERT's mean-pooled vectors are nearly parallel; in-batch negatives pull them apart.
    assert after < 0.9 and after < untrained - 0.1


def test_cosine_regression_without_negatives_collapses_and_the_check_catches_it(tiny_folder, data, item_texts):
    """The seed article's loss — cos(history, item) regressed to 1 — trained the same way: every item
    lands on one point, which the collapse check above would reject."""
    module, tokenizer = load_base_model(tiny_folder)
    optimizer = torch.optim.AdamW(module.parameters(), lr=TINY_LR)
    generator = torch.Generator().manual_seed(0)
    module.train()
    for _ in range(15):
        batch = [data.train[r] for r in torch.randperm(len(data.train), generator=generator)[:32].tolist()]
        queries = module(**module.tokenize(tokenizer, [e.query for e in batch], SHORT))
        positives = module(**module.tokenize(tokenizer, [e.positive for e in batch], SHORT))
        loss = (1 - (queries * positives).sum(dim=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    collapsed = mean_pairwise_cosine(item_vectors(module, tokenizer, item_texts))
    assert collapsed > 0.99
    assert not collapsed < 0.9  # the assertion the contrastive model passes fails here


def test_finetuning_resumes_from_its_checkpoint_exactly(tiny_folder, data, item_texts, tmp_path, monkeypatch):
    config = FinetuneConfig(steps=6, batch_size=8, lr=TINY_LR, checkpoint_dir=str(tmp_path / "ckpt"),
                            checkpoint_every=2, max_length=SHORT, progress=False)
    train = data.train[:200]
    straight, tokenizer = load_base_model(tiny_folder)
    finetune(straight, tokenizer, train, [], item_texts, FinetuneConfig(**{**config.__dict__, "checkpoint_dir": None}))

    interrupted, _ = load_base_model(tiny_folder)
    real_loss = finetune_module.contrastive_loss
    calls = {"n": 0}

    def crash_on_fifth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "contrastive_loss", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, tokenizer, train, [], item_texts, config)
    monkeypatch.setattr(finetune_module, "contrastive_loss", real_loss)

    resumed, _ = load_base_model(tiny_folder)
    result = finetune(resumed, tokenizer, train, [], item_texts, config)
    assert result.resumed_from_step == 4 and result.steps == 6
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name

    # Other data is another run: the checkpoint is not reused.
    other, _ = load_base_model(tiny_folder)
    assert finetune(other, tokenizer, data.train[200:400], [], item_texts, config).resumed_from_step == 0


def test_hard_negatives_come_from_the_index_and_never_from_the_users_items(tiny_folder, data, item_texts):
    module, tokenizer = load_base_model(tiny_folder)
    config = FinetuneConfig(steps=2, batch_size=8, lr=TINY_LR, hard_negatives=3, max_length=SHORT, progress=False)
    miner = finetune_module._HardNegativeMiner(item_texts, data.train, config)
    miner.refresh(module, tokenizer, 0)
    batch = data.train[:8]
    texts, keys = miner.mine(module, tokenizer, batch)
    assert len(texts) == 24
    for row, example in enumerate(batch):
        touched = {e.item_id for e in data.train if e.user_id == example.user_id}
        touched |= {i for e in data.train if e.user_id == example.user_id for i in e.history_items}
        mined = {miner.item_ids[k] for k in keys[row * 3 : row * 3 + 3]}
        assert not mined & touched
        assert not mined & {e.item_id for e in batch}
    result = finetune(module, tokenizer, data.train, [], item_texts, config)
    assert result.steps == 2


# ----------------------------------------------------------------------------- tuning


def test_tuning_chooses_parameters_that_score_what_it_reports(trained, data):
    module, _, tokenizer, _ = trained
    encode = torch_encoder(module, tokenizer, max_length=SHORT)
    replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train, encode)
    instances = data.inner.instances[::2]
    result = tune_time_model(replay, instances, TimeModelParams())
    assert result.value >= result.default_value and result.instances == len(instances)
    assert result.params != TimeModelParams()
    # The numpy grid reproduces exactly what the server's ranking scores with the chosen parameters.
    task = EvalTask("tuning", data.dataset, data.inner.train, instances)
    check = fit_and_score(ReplayRanker(encode, data.event_log.items, result.params), task)
    assert float(check.metrics["NDCG@10"].mean()) == pytest.approx(result.value, abs=1e-9)
    # ... instance by instance too, paired by position (what comparing two tunings reads).
    assert sorted(result.positions.tolist()) == sorted(np.asarray(instances.pos).tolist())
    by_position = dict(zip(np.asarray(instances.pos).tolist(), check.metrics["NDCG@10"].tolist()))
    np.testing.assert_allclose(result.per_instance, [by_position[p] for p in result.positions.tolist()], atol=1e-9)
    default = fit_and_score(ReplayRanker(encode, data.event_log.items, TimeModelParams()), task)
    assert float(default.metrics["NDCG@10"].mean()) == pytest.approx(result.default_value, abs=1e-9)


def test_tuning_with_a_personal_half_life_scores_what_the_server_scores(trained, data):
    """The tuning's numpy search scales the personal weights per instance exactly as the ranker does."""
    module, _, tokenizer, _ = trained
    encode = torch_encoder(module, tokenizer, max_length=SHORT)
    replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train, encode)
    instances = data.inner.instances[::3]
    base = TimeModelParams(personal_half_life_days=2.0)
    result = tune_time_model(replay, instances, base, TuningGrid(personal_half_life_days=(2.0,)))
    assert result.params.personal_half_life_days == 2.0
    task = EvalTask("tuning", data.dataset, data.inner.train, instances)
    check = fit_and_score(ReplayRanker(encode, data.event_log.items, result.params), task)
    assert float(check.metrics["NDCG@10"].mean()) == pytest.approx(result.value, abs=1e-9)
    # The data's users are away for days between events: the half-life moves the metric.
    off = fit_and_score(ReplayRanker(encode, data.event_log.items, replace(result.params, personal_half_life_days=0.0)), task)
    assert float(off.metrics["NDCG@10"].mean()) != pytest.approx(result.value, abs=1e-9)


def test_tuning_leaves_a_component_alone_when_it_never_varies(trained, drift):
    """Without publication times freshness is 0 everywhere: its weight cannot matter and is kept."""
    from dataclasses import replace

    module, _, tokenizer, _ = trained
    timeless = [replace(item, published_at=None, expires_at=None) for item in drift.items]
    data = load_training_data(event_log_from(timeless, drift.events))
    encode = torch_encoder(module, tokenizer, max_length=SHORT)
    replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train, encode)
    instances = data.inner.instances[::3]
    base = TimeModelParams(w_freshness=0.7, freshness_half_life_days=5.0)
    result = tune_time_model(replay, instances, base)
    assert result.params.w_freshness == 0.7 and result.params.freshness_half_life_days == 5.0
    task = EvalTask("tuning", data.dataset, data.inner.train, instances)
    check = fit_and_score(ReplayRanker(encode, data.event_log.items, result.params), task)
    assert float(check.metrics["NDCG@10"].mean()) == pytest.approx(result.value, abs=1e-9)


def test_replay_ranker_never_ranks_what_the_server_would_not_return(data, drift):
    vectors = lambda texts: np.random.default_rng(len(texts)).normal(size=(len(texts), 8)).astype(np.float32)  # noqa: E731
    ranker = ReplayRanker(vectors, data.event_log.items, TimeModelParams())
    task = data.split.test_task()
    ranker.fit(task.train, task.dataset)
    batch = task.instances[:40]
    scores = ranker.score_batch(batch)
    dataset = data.dataset
    for row in range(len(batch)):
        history = {dataset.item_ids[dataset.item[p]] for p in batch.history(row)}
        at = float(batch.time[row])
        for column, item_id in enumerate(dataset.item_ids):
            item = data.event_log.items[item_id]
            hidden = item_id in history or not item.available_at(at)
            assert np.isneginf(scores[row, column]) == hidden, (row, item_id)


def test_event_log_keeps_arrival_order_for_equal_times():
    from chronorec.server.core.catalog import Item

    items = [Item(f"i{k}", f"title {k}") for k in range(3)]
    events = [Event("e1", "u", "i0", "view", 10.0), Event("e2", "u", "i1", "view", 5.0),
              Event("e3", "u", "i2", "view", 10.0)]
    assert [e.event_id for e in event_log_from(items, events).events] == ["e2", "e1", "e3"]


def test_time_negatives_are_the_items_trending_before_each_example(data, item_texts, tiny_folder):
    from chronorec.trainer.finetune import trending_negatives

    examples = data.train[-40:]
    negatives = trending_negatives(examples, data.dataset, window_days=3.0, top=5)
    assert len(negatives) == len(examples) and any(negatives)
    d = data.dataset
    for example, picked in zip(examples[::7], negatives[::7]):
        # Counted over the 3 days before the event only, never the event itself or later ones.
        start = int(np.searchsorted(d.ts, example.timestamp - 3 * 86400.0, side="left"))
        counts = np.bincount(d.item[start:example.position], minlength=d.n_items)
        assert all(counts[d.item_index[i]] > 0 for i in picked)
        assert example.item_id not in picked and not set(picked) & set(example.history_items)
        assert [counts[d.item_index[i]] for i in picked] == sorted((counts[d.item_index[i]] for i in picked), reverse=True)
    # They train: each example draws one as an extra negative, next to a distillation term.
    module, tokenizer = load_base_model(tiny_folder)
    config = FinetuneConfig(steps=3, batch_size=8, lr=TINY_LR, max_length=SHORT, progress=False, time_negatives=1,
                            distill_weight=1.0)
    result = finetune(module, tokenizer, examples, [], item_texts, config, negatives=negatives)
    assert result.steps == 3
    with pytest.raises(ValueError, match="aligned"):
        finetune(module, tokenizer, examples, [], item_texts, config, negatives=negatives[:-1])


def test_distillation_keeps_the_encoder_nearer_its_starting_weights(tiny_folder, data, item_texts):
    def drift_from_start(distill: float) -> float:
        start, tokenizer = load_base_model(tiny_folder)
        module, _ = load_base_model(tiny_folder)
        config = FinetuneConfig(steps=8, batch_size=16, lr=TINY_LR, max_length=SHORT, progress=False,
                                distill_weight=distill)
        finetune(module, tokenizer, data.train[:400], [], item_texts, config)
        texts = [e.query for e in data.train[400:460]]
        before = start.encode_texts(tokenizer, texts, 32, SHORT).numpy()
        after = module.encode_texts(tokenizer, texts, 32, SHORT).numpy()
        return float(1 - (before * after).sum(axis=1).mean())

    assert drift_from_start(5.0) < drift_from_start(0.0)
