"""Reference recommenders every evaluation reports: MostPop, RecentPop, ItemKNN (plain and time-decayed), EASE."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chronorec.trainer.protocols import (
    SECONDS_PER_DAY, Dataset, EvalTask, Instances, MethodFactory, exclusion_mask, expected_metrics, rank_counts,
)

EASE_LAMBDAS = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)
TUNING_METRIC = "NDCG@10"


def _binary_matrix(train: np.ndarray, dataset: Dataset) -> np.ndarray:
    return dataset.interaction_matrix(train, binary=True, dtype=np.float64)


class MostPop:
    """Items by their number of training events."""

    def __init__(self):
        self.counts: np.ndarray | None = None

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        self.counts = np.bincount(dataset.item[train], minlength=dataset.n_items).astype(np.float64)

    def score_batch(self, instances: Instances) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(instances), self.counts.size))


def prefix_item_counts(dataset: Dataset, boundaries: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """(len(boundaries), n_items): per boundary b, item counts of the (visible) events at
    global positions < b. One pass: bucket events by the first boundary above them, cumulate."""
    bounds, inverse = np.unique(np.asarray(boundaries, dtype=np.int64), return_inverse=True)
    positions = np.arange(dataset.n_events) if visible is None else visible
    positions = positions[positions < bounds[-1]]
    n_items = dataset.n_items
    segment = np.searchsorted(bounds, positions, side="right")
    increments = np.bincount(segment * n_items + dataset.item[positions], minlength=bounds.size * n_items)
    return np.cumsum(increments.reshape(bounds.size, n_items), axis=0)[inverse]


class RecentPop:
    """Items by their number of events in the `window_days` before the prediction time.

    Counts events earlier in the global order than the target (the live server has seen
    them: other users' test-period events included) with ts >= time - window; ties are broken
    by all-time counts up to then. `observe="train"` counts only the fitted events instead."""

    def __init__(self, window_days: float, observe: str = "all"):
        if observe not in ("all", "train"):
            raise ValueError("observe must be 'all' or 'train'")
        self.window_s = window_days * SECONDS_PER_DAY
        self.observe = observe
        self.dataset: Dataset | None = None
        self.visible: np.ndarray | None = None

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        self.dataset = dataset
        self.visible = None if self.observe == "all" else np.asarray(train)

    def score_batch(self, instances: Instances) -> np.ndarray:
        d = self.dataset
        window_start = np.searchsorted(d.ts, instances.time - self.window_s, side="left")
        counts = prefix_item_counts(d, np.concatenate((instances.pos, window_start)), self.visible)
        up_to_now, before_window = counts[:len(instances)], counts[len(instances):]
        # Lexicographic (window count, all-time count) as one exact float64 key.
        return (up_to_now - before_window) * float(d.n_events + 1) + up_to_now


def cosine_item_similarity(x: np.ndarray) -> np.ndarray:
    """Cosine between item columns of a binary users × items matrix, zero diagonal."""
    co = x.T @ x
    norm = np.sqrt(np.diag(co))
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    sim = co * inv[:, None] * inv[None, :]
    np.fill_diagonal(sim, 0.0)
    return sim


class ItemKNN:
    """Sum over the history of cosine item-item similarities; with `half_life_days` each
    history event is weighted 0.5 ** (age at the prediction time / half-life)."""

    def __init__(self, half_life_days: float | None = None):
        self.half_life_s = None if half_life_days is None else half_life_days * SECONDS_PER_DAY
        self.similarity: np.ndarray | None = None
        self.dataset: Dataset | None = None

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        self.dataset = dataset
        self.similarity = cosine_item_similarity(_binary_matrix(train, dataset))

    def score_batch(self, instances: Instances) -> np.ndarray:
        weights = None
        if self.half_life_s is not None:
            rows, positions = instances.history_flat()
            age = instances.time[rows] - self.dataset.ts[positions]
            weights = np.exp2(-age / self.half_life_s)
        return instances.history_matrix(weights) @ self.similarity


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE closed form: B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, i.e. zero diagonal."""
    g = gram.copy()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


class EASE:
    """Embarrassingly shallow autoencoder (Steck 2019) on the binary training matrix.

    With fewer training users than items the item-item inverse is replaced by the
    Woodbury identity P = (I - Xᵀ(XXᵀ + λI)⁻¹X)/λ and scores h·B = h - (h·P)/diag(P) are
    computed without forming B: a users × users inverse instead of items × items (minutes
    instead of hours on a 10k-item catalogue). Both give the same scores up to rounding."""

    def __init__(self, lam: float = 500.0, solver: str = "auto"):
        if solver not in ("auto", "primal", "dual"):
            raise ValueError("solver must be 'auto', 'primal' or 'dual'")
        self.lam = float(lam)
        self.solver = solver
        self.weights: np.ndarray | None = None  # primal: B (items × items)
        self.users_x: np.ndarray | None = None  # dual: X of users with training events
        self.k_x: np.ndarray | None = None  # dual: (XXᵀ + λI)⁻¹X
        self.denominator: np.ndarray | None = None  # dual: λ·diag(P)
        self.params: dict = {"lambda": self.lam}

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        x = _binary_matrix(train, dataset)
        x = x[x.any(axis=1)]
        if self.solver == "primal" or (self.solver == "auto" and x.shape[0] >= x.shape[1]):
            self.weights = ease_weights(x.T @ x, self.lam)
            self.users_x = self.k_x = self.denominator = None
        else:
            self.fit_dual(x, x @ x.T)

    def fit_dual(self, x: np.ndarray, user_gram: np.ndarray) -> None:
        """Woodbury form from the active users' binary matrix and its XXᵀ."""
        k = user_gram.copy()
        k[np.diag_indices_from(k)] += self.lam
        self.users_x, self.k_x = x, np.linalg.solve(k, x)
        self.denominator = 1.0 - np.einsum("ui,ui->i", x, self.k_x)
        self.weights = None

    def score_batch(self, instances: Instances) -> np.ndarray:
        h = instances.history_matrix(binary=True)
        if self.weights is not None:
            return h @ self.weights
        # λ·(h·P) = h - (h·Xᵀ)·(XXᵀ + λI)⁻¹X; λ cancels against λ·diag(P).
        return h - (h - (h @ self.users_x.T) @ self.k_x) / self.denominator


def tune_ease(task: EvalTask, lambdas: Sequence[float] = EASE_LAMBDAS, metric: str = TUNING_METRIC,
              solver: str = "auto", batch_size: int = 2048) -> EASE:
    """EASE with λ maximising `metric` on the tuning task. The Gram matrix is built once and
    each batch's history matrix is shared by all λ (it dominates the cost otherwise)."""
    x = _binary_matrix(task.train, task.dataset)
    x = x[x.any(axis=1)]
    models = []
    user_gram = x @ x.T if solver == "dual" or (solver == "auto" and x.shape[0] < x.shape[1]) else None
    gram = x.T @ x if user_gram is None else None
    for lam in lambdas:
        model = EASE(lam, solver)
        if user_gram is None:
            model.weights = ease_weights(gram, lam)
        else:
            model.fit_dual(x, user_gram)
        models.append(model)
    instances = task.instances
    totals = np.zeros(len(models))
    for start in range(0, len(instances), batch_size):
        batch = instances[start:start + batch_size]
        excluded = exclusion_mask(batch)
        for j, model in enumerate(models):
            better, tied = rank_counts(model.score_batch(batch), batch.target, excluded)
            totals[j] += float(expected_metrics(better, tied)[metric].sum())
    results = {float(lam): float(t) / max(len(instances), 1) for lam, t in zip(lambdas, totals)}
    best = max(results, key=lambda lam: (results[lam], -lam))
    chosen = EASE(best, solver)
    # A best λ at either end of the grid means the grid, not the data, chose it.
    chosen.params = {"lambda": best, "tuned_on": task.name, "tuning_metric": metric,
                     "at_grid_edge": best in (min(results), max(results)),
                     "tuning": {str(k): v for k, v in results.items()}}
    return chosen


BASELINES: dict[str, MethodFactory] = {
    "MostPop": lambda split: MostPop(),
    "RecentPop-7d": lambda split: RecentPop(7.0),
    "RecentPop-30d": lambda split: RecentPop(30.0),
    "ItemKNN": lambda split: ItemKNN(),
    "ItemKNN-hl10d": lambda split: ItemKNN(half_life_days=10.0),
    "EASE": lambda split: tune_ease(split.tuning_task()),
}
