"""The score formula: how the ranking components combine under a time model's weights."""

from __future__ import annotations

import numpy as np

from chronorec.client.rules import SECONDS_PER_DAY as _DAY
from chronorec.server.core.manifest import TimeModelParams

# The components a score adds up, in the order of every weight vector here.
COMPONENTS = ("semantic", "cooccurrence", "freshness", "trend")
WEIGHT_NAMES = ("w_semantic", "w_cooccurrence", "w_freshness", "w_trend")


def personal_scale(gap_seconds: float, half_life_days: float) -> float:
    """Weight of the personal terms `gap_seconds` after the user's newest event (1 when the half-life is 0)."""
    if half_life_days <= 0:
        return 1.0
    return float(2.0 ** (-max(0.0, gap_seconds) / (half_life_days * _DAY)))


def weights_of(params: TimeModelParams) -> np.ndarray:
    """The time model's four score weights, in COMPONENTS order (float64)."""
    return np.array([getattr(params, name) for name in WEIGHT_NAMES], dtype=np.float64)


def scaled_weights(weights: np.ndarray, scale: float) -> np.ndarray:
    """Weights (..., 4) with the personal terms (semantic, co-occurrence) multiplied by `scale`.

    The factor is cast to the weights' own dtype, so a float32 grid stays float32.
    """
    if scale == 1.0:
        return weights
    return weights * np.array([scale, scale, 1.0, 1.0], dtype=weights.dtype)


def score_weights(params: TimeModelParams, *, history_length: int, scale: float) -> np.ndarray:
    """The weights one Recommend applies: personal terms scaled, and only trend and freshness
    for a user without history (trend alone when both are 0, so a cold start still ranks)."""
    weights = scaled_weights(weights_of(params), scale).copy()
    if history_length == 0:
        weights[:2] = 0.0
        if weights[2] == 0 and weights[3] == 0:
            weights[3] = 1.0
    return weights


def combine(weights: np.ndarray, semantic: np.ndarray, cooccurrence: np.ndarray,
            freshness: np.ndarray, trend: np.ndarray) -> np.ndarray:
    """score = w_semantic·semantic + w_cooccurrence·cooccurrence + w_freshness·freshness + w_trend·trend.

    `weights` of shape (4,) scores the n candidates once; of shape (G, 4), once per row, giving
    (G, n) (the tuning's grid search). A single weight vector is applied as Python floats, which
    numpy treats as weak scalars: each product keeps its component's precision (the server
    passes semantic as float64, the rest float32), and the sum takes the widest.
    """
    weights = np.asarray(weights)
    if weights.ndim == 1:
        w_semantic, w_cooccurrence, w_freshness, w_trend = weights.tolist()
    else:
        w_semantic, w_cooccurrence, w_freshness, w_trend = (weights[:, k, None] for k in range(4))
    return w_semantic * semantic + w_cooccurrence * cooccurrence + w_freshness * freshness + w_trend * trend


__all__ = ["COMPONENTS", "WEIGHT_NAMES", "combine", "personal_scale", "scaled_weights", "score_weights", "weights_of"]
