"""ML-100K: split counts and baseline rows must reproduce /work/shared/QUALITY.md (skipped without the data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chronorec.server.core.importers import load_movielens_100k
from chronorec.trainer import baselines
from chronorec.trainer.protocols import Dataset, fit_and_score, loo_split, temporal_split

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML100K = DATA / "ml-100k"
TOLERANCE = 0.003  # QUALITY.md: an implementation of the protocol agrees within about ±0.003

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"{ML100K} is absent"),
]

# (method, HR@10, NDCG@10) from QUALITY.md.
TEMPORAL = [
    ("MostPop", 0.0670, 0.0313),
    ("RecentPop-7d", 0.0779, 0.0398),
    ("RecentPop-30d", 0.0803, 0.0415),
    ("ItemKNN", 0.0921, 0.0442),
    ("ItemKNN-hl10d", 0.1334, 0.0650),
    ("EASE", 0.1121, 0.0567),
]
LOO = [
    ("MostPop", 0.0859, 0.0444),
    ("RecentPop-7d", 0.0896, 0.0467),
    ("ItemKNN", 0.1092, 0.0563),
    ("ItemKNN-hl10d", 0.1220, 0.0626),
    ("EASE", 0.1485, 0.0723),
]


@pytest.fixture(scope="module")
def dataset():
    return Dataset(*load_movielens_100k(ML100K))


@pytest.fixture(scope="module")
def temporal(dataset):
    return temporal_split(dataset, 0.8)


@pytest.fixture(scope="module")
def loo(dataset):
    return loo_split(dataset)


def test_temporal_counts(temporal):
    assert temporal.cutoff == 889237269.0  # 1998-03-07 02:21:09 UTC
    assert temporal.n_train == 79_999
    assert len(temporal.instances) == 2_953
    assert np.unique(temporal.instances.user).size == 109
    assert temporal.n_unseen_targets == 89


def test_loo_counts(loo):
    assert len(loo.test) == len(loo.validation) == 943
    assert loo.n_dropped_users == 0
    assert loo.train.size == 100_000 - 2 * 943


def _check(split, method, hr10, ndcg10):
    result = fit_and_score(baselines.BASELINES[method](split), split.test_task())
    assert result.metrics["HR@10"].mean() == pytest.approx(hr10, abs=TOLERANCE)
    assert result.metrics["NDCG@10"].mean() == pytest.approx(ndcg10, abs=TOLERANCE)


@pytest.mark.parametrize("method,hr10,ndcg10", TEMPORAL)
def test_temporal_baselines(temporal, method, hr10, ndcg10):
    _check(temporal, method, hr10, ndcg10)


@pytest.mark.parametrize("method,hr10,ndcg10", LOO)
def test_loo_baselines(loo, method, hr10, ndcg10):
    _check(loo, method, hr10, ndcg10)
