"""The one score formula: what the server's ranking and the trainer's grid search both compute."""

from __future__ import annotations

import numpy as np
import pytest

from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.scoring import combine, personal_scale, scaled_weights, score_weights, weights_of


def components(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(n).astype(np.float32) for _ in range(4)]


def test_the_score_is_the_weighted_sum_of_the_components_in_float64():
    semantic, cooccurrence, freshness, trend = components(200)
    params = TimeModelParams(w_semantic=0.7, w_cooccurrence=1.0, w_freshness=0.05, w_trend=0.2)
    score = combine(score_weights(params, history_length=3, scale=1.0), semantic.astype(np.float64),
                    cooccurrence, freshness, trend)
    assert score.dtype == np.float64
    expected = 0.7 * semantic.astype(np.float64) + 1.0 * cooccurrence + 0.05 * freshness + 0.2 * trend
    assert np.array_equal(score, expected)


def test_the_personal_scale_fades_semantic_and_cooccurrence_only():
    params = TimeModelParams(w_semantic=2.0, w_cooccurrence=1.0, w_freshness=0.05, w_trend=0.2,
                             personal_half_life_days=1.0)
    scale = personal_scale(86400.0, params.personal_half_life_days)
    assert scale == 0.5
    assert score_weights(params, history_length=5, scale=scale).tolist() == [1.0, 0.5, 0.05, 0.2]
    assert personal_scale(10 * 86400.0, 0.0) == 1.0  # a half-life of 0 turns the fading off
    assert personal_scale(-5.0, 1.0) == 1.0  # an event in the future of `at` does not boost


def test_a_cold_start_ranks_by_trend_and_freshness_and_by_trend_when_both_are_off():
    params = TimeModelParams(w_semantic=2.0, w_cooccurrence=1.0, w_freshness=0.05, w_trend=0.2)
    assert score_weights(params, history_length=0, scale=1.0).tolist() == [0.0, 0.0, 0.05, 0.2]
    silent = TimeModelParams(w_semantic=2.0, w_cooccurrence=1.0, w_freshness=0.0, w_trend=0.0)
    assert score_weights(silent, history_length=0, scale=1.0).tolist() == [0.0, 0.0, 0.0, 1.0]
    # The time model itself is untouched.
    assert weights_of(silent).tolist() == [2.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_a_grid_of_weights_scores_each_row_as_the_formula_does_for_that_row(scale):
    """The tuning's (G, 4) grid in float32: row g is exactly one call with weights g, so the search
    ranks the candidates as a server running with those weights would."""
    parts = components(300, seed=1)
    grid = np.array([[0.0, 1.0, 0.05, 0.2], [0.5, 1.0, 0.0, 0.02], [4.0, 0.0, 0.2, 0.5]], dtype=np.float32)
    rows = scaled_weights(grid, scale)
    assert rows.dtype == np.float32
    scores = combine(rows, *parts)
    assert scores.shape == (3, 300) and scores.dtype == np.float32
    for g in range(len(grid)):
        assert np.array_equal(scores[g], combine(rows[g], *parts))
