"""tests/bench/eval_trend_ceiling: the short-lived log's new sessions ranked by the week's counts and the generated topics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chronorec.server.core.importers import detect_and_load
from chronorec.trainer.baselines import RecentPop
from chronorec.trainer.protocols import (
    GAP_LABELS, Dataset, batch_rank_counts, expected_metrics, gap_buckets, temporal_split,
)

SIZE = {"n_items": 300, "n_users": 400}


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    from bench.eval_scale_data import write
    from bench.eval_trend_data import generate

    data = tmp_path_factory.mktemp("ceiling") / "data"
    write(data, [], generate(seed=3, **SIZE)[1])
    return data, Dataset(*detect_and_load(data, items_optional=True))


def test_beta_zero_is_recentpop_7d_to_the_last_tie(log):
    from bench.eval_trend_ceiling import ndcg_per_instance, topics_of

    _, dataset = log
    topic = topics_of(dataset, 3, SIZE["n_items"], SIZE["n_users"])
    assert topic.min() >= 0 and len(np.unique(topic)) > 1
    per_instance, buckets = ndcg_per_instance(dataset, topic, betas=(0.0, 3.0))

    split = temporal_split(dataset)
    baseline = RecentPop(7)
    baseline.fit(split.train, dataset)
    better, tied = batch_rank_counts(baseline.score_batch(split.instances), split.instances)
    expected = expected_metrics(better, tied, cutoffs=(10,))["NDCG@10"]
    np.testing.assert_array_equal(per_instance[0.0], expected)
    np.testing.assert_array_equal(buckets, gap_buckets(split.instances))
    # The topic boost ranks by something else: within the hour, where the session's own topic is in
    # the history, it must move the figure.
    assert not np.array_equal(per_instance[3.0], per_instance[0.0])
    assert ((per_instance[3.0] >= 0) & (per_instance[3.0] <= 1)).all()


def test_command_prints_and_writes_every_bucket(log, tmp_path, capsys):
    from bench.eval_trend_ceiling import main

    data, dataset = log
    out = tmp_path / "ceiling.json"
    assert main(["--data", str(data), "--seed", "3", "--items", "300", "--users", "400", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(label in printed for label in GAP_LABELS)
    rows = json.loads(out.read_text())
    assert [row["beta"] for row in rows] == [0.0, 1.0, 3.0, 10.0]
    n_test = len(temporal_split(dataset).instances)
    with_gap = sum(rows[0][label]["n"] for label in GAP_LABELS)
    assert 0 < with_gap <= n_test


def test_other_arguments_than_the_logs_are_refused(log):
    from bench.eval_trend_ceiling import topics_of

    _, dataset = log
    with pytest.raises(SystemExit, match="give the log's own arguments"):
        topics_of(dataset, 4, SIZE["n_items"], SIZE["n_users"])
