"""Reference recommenders every evaluation reports: MostPop, RecentPop, ItemKNN (plain and time-decayed), EASE."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy import linalg
from scipy.linalg import lapack

from chronorec.trainer.protocols import (
    SECONDS_PER_DAY, Dataset, EvalTask, Instances, MethodFactory, batch_rank_counts, expected_metrics,
    prefix_item_counts,
)

EASE_LAMBDAS = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)
TUNING_METRIC = "NDCG@10"
# EASE's solve and scores (float32: see EASE).
EASE_DTYPE = np.float32
# A history matrix with fewer than 1 in this many cells set is multiplied as a sparse matrix
# (ML-100K's and ml-latest-small's test histories are denser: they keep BLAS's dense product).
SPARSE_HISTORY_DENSITY = 100


def training_matrix(train: np.ndarray, dataset: Dataset) -> sp.csr_matrix:
    """Binary matrix (users with a training event × items) of the events at `train`, users in
    index order. Sparse: at 10k users × 10k items the dense form alone is 800 MB."""
    active, rows = np.unique(dataset.user[train], return_inverse=True)
    x = sp.csr_matrix((np.ones(len(train)), (rows, dataset.item[train])), shape=(len(active), dataset.n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def trained_columns(x: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """(x without its all-zero columns, the kept columns' indices): the items with a training event."""
    columns = np.flatnonzero(np.diff(x.tocsc().indptr))
    return x[:, columns], columns


def gram_matrix(x: sp.spmatrix, rows: bool = False, dtype=np.float64) -> np.ndarray:
    """Dense XᵀX (or XXᵀ with rows=True) of a binary matrix: counts, so exact in any order (and in
    float32 below 2^24). C order: XᵀX comes out of scipy as a CSC product, whose dense form is
    Fortran-ordered, and a sparse history times a Fortran-ordered matrix copies the whole matrix
    on every call (800 MB per ItemKNN batch at 10k items). The product is symmetric, so its
    transpose is the same matrix in C order, without a copy."""
    summed, kept = x.shape if not rows else x.shape[::-1]
    if summed <= kept:
        # Fewer rows summed over than the product has (ml-latest-small: 610 users, 9,742 items): the
        # dense matrix is smaller than the product, and BLAS forms the product without the sparse
        # one (tens of millions of co-occurring pairs, ~0.5 GB held beside the dense result).
        # Sums of 0/1 products are exact integers in any order: the same matrix.
        factor = x.toarray()
        return np.asarray(factor @ factor.T if rows else factor.T @ factor, dtype=dtype)
    # In the result's dtype from the start: no float64 copy beside it (800 MB at 10k items).
    x = x.astype(dtype, copy=False)
    dense = (x @ x.T if rows else x.T @ x).toarray()
    if not dense.flags.c_contiguous:
        dense = dense.T
    return np.asarray(dense, dtype=dtype)


class MostPop:
    """Items by their number of training events."""

    def __init__(self):
        self.counts: np.ndarray | None = None

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        self.counts = np.bincount(dataset.item[train], minlength=dataset.n_items).astype(np.float64)

    def score_batch(self, instances: Instances) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(instances), self.counts.size))


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


def cosine_item_similarity(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Cosine between item columns of a binary users × items matrix, zero diagonal."""
    co = gram_matrix(sp.csr_matrix(x))
    norm = np.sqrt(np.diag(co))
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    # In place, in the order of co * inv[:, None] * inv[None, :]: two fewer items × items temporaries.
    co *= inv[:, None]
    co *= inv[None, :]
    np.fill_diagonal(co, 0.0)
    return co


class ItemKNN:
    """Sum over the history of cosine item-item similarities; with `half_life_days` each
    history event is weighted 0.5 ** (age at the prediction time / half-life)."""

    def __init__(self, half_life_days: float | None = None):
        self.half_life_s = None if half_life_days is None else half_life_days * SECONDS_PER_DAY
        self.similarity: np.ndarray | None = None
        self.dataset: Dataset | None = None

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        self.dataset = dataset
        self.similarity = cosine_item_similarity(training_matrix(train, dataset))

    def score_batch(self, instances: Instances) -> np.ndarray:
        weights = None
        if self.half_life_s is not None:
            rows, positions = instances.history_flat()
            age = instances.time[rows] - self.dataset.ts[positions]
            weights = np.exp2(-age / self.half_life_s)
        if instances.history_density() * SPARSE_HISTORY_DENSITY < 1:
            # A few events per history over 10k items: (events × items) work instead of (n × items²).
            return np.asarray(instances.history_sparse(weights) @ self.similarity)
        return instances.history_matrix(weights) @ self.similarity


def _symmetric_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix, computed in its place (Cholesky):
    n³ flops against LU inversion's ~2.7n³, and no second n × n array."""
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (matrix,))
    # matrix.T is the same symmetric matrix in Fortran order: LAPACK works on it without a copy.
    factor, info = potrf(matrix.T, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: Gram matrix + λI is not positive definite (potrf info {info})")
    inverse, info = potri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: inversion failed (potri info {info})")
    out = inverse.T  # C order again; LAPACK filled its lower triangle, i.e. our upper one
    n = out.shape[0]
    block = 512
    for start in range(0, n, block):
        # Mirror the upper triangle into the lower one a band at a time (no n² index arrays).
        end = min(start + block, n)
        out[end:, start:end] = out[start:end, end:].T
        square = out[start:end, start:end]
        lower = np.tril_indices(end - start, -1)
        square[lower] = square.T[lower]
    return out


def ease_weights(gram: np.ndarray, lam: float, dtype=EASE_DTYPE) -> np.ndarray:
    """EASE closed form: B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, i.e. zero diagonal."""
    p = np.array(gram, dtype=dtype)
    p[np.diag_indices_from(p)] += lam
    p = _symmetric_inverse(p)
    diagonal = np.diag(p).copy()
    p /= -diagonal[None, :]
    np.fill_diagonal(p, 0.0)
    return p


class EASE:
    """Embarrassingly shallow autoencoder (Steck 2019) on the binary training matrix.

    With fewer training users than items the item-item inverse is replaced by the
    Woodbury identity P = (I - Xᵀ(XXᵀ + λI)⁻¹X)/λ and scores h·B = h - (h·P)/diag(P) are
    computed without forming B: a users × users inverse instead of items × items (minutes
    instead of hours on a 10k-item catalogue). Both give the same scores up to rounding.

    The solve and the scores are in float32 (`dtype`): half the memory and ~2x the speed of
    float64, and on ML-100K and ml-latest-small every reported figure is the same to the
    fourth decimal (README, "Quality").

    Only the items with a training event take part in the solve: an item without one has a zero
    row and column in XᵀX, so (XᵀX + λI)⁻¹ is block diagonal, its B row and column are zero and
    its score is 0 either way. Leaving them out is the same model, solved over a smaller matrix
    (the solve is cubic: on a 10k-item set whose tuning window reaches 77 % of the items, 46 % of
    the work). The scores are computed over those items alone, then set among zeros for the
    others: the same products, without widening an items × items matrix for each λ tried.
    """

    def __init__(self, lam: float = 500.0, solver: str = "auto", dtype=EASE_DTYPE):
        if solver not in ("auto", "primal", "dual"):
            raise ValueError("solver must be 'auto', 'primal' or 'dual'")
        self.lam = float(lam)
        self.solver = solver
        self.dtype = np.dtype(dtype)
        self.weights: np.ndarray | None = None  # primal: B (solved items × solved items)
        self.users_x: np.ndarray | None = None  # dual: X of users with training events (solved items)
        self.k_x: np.ndarray | None = None  # dual: (XXᵀ + λI)⁻¹X (× solved items)
        self.denominator: np.ndarray | None = None  # dual: λ·diag(P) (solved items)
        self.n_items = 0  # the width the scores are set among zeros to (every item of the data set)
        self.columns: np.ndarray | None = None  # the items solved for (those with a training event)
        self.params: dict = {"lambda": self.lam}

    def uses_primal(self, x: sp.spmatrix) -> bool:
        return self.solver == "primal" or (self.solver == "auto" and x.shape[0] >= x.shape[1])

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        x, columns = trained_columns(training_matrix(train, dataset))
        if self.uses_primal(x):
            self.fit_primal(gram_matrix(x, dtype=self.dtype), columns, dataset.n_items)
        else:
            self.fit_dual(x, gram_matrix(x, rows=True, dtype=self.dtype), columns, dataset.n_items)

    def fit_primal(self, gram: np.ndarray, columns: np.ndarray, n_items: int) -> None:
        """B from the Gram matrix XᵀX of the items at `columns` (of `n_items`)."""
        self.weights = ease_weights(gram, self.lam, self.dtype)
        self.users_x = self.k_x = self.denominator = None
        self.columns, self.n_items = columns, n_items

    def fit_dual(self, x: sp.spmatrix, user_gram: np.ndarray, columns: np.ndarray, n_items: int) -> None:
        """Woodbury form from the active users' binary matrix over the items at `columns` (of
        `n_items`) and its XXᵀ."""
        k = np.array(user_gram, dtype=self.dtype)
        k[np.diag_indices_from(k)] += self.lam
        self.users_x = np.asarray(x.todense(), dtype=self.dtype)
        self.k_x = linalg.cho_solve(linalg.cho_factor(k, overwrite_a=True), self.users_x)
        self.denominator = 1.0 - np.einsum("ui,ui->i", self.users_x, self.k_x)
        self.weights = None
        self.columns, self.n_items = columns, n_items

    def score_batch(self, instances: Instances) -> np.ndarray:
        h = instances.history_sparse(binary=True, dtype=self.dtype)
        solved = h[:, self.columns]
        # Sparse histories (a few events of 10k items) multiply as sparse: (history events × items)
        # work instead of (n × items²). Denser ones go to BLAS, ~50x faster per multiply-add.
        sparse = instances.history_density() * SPARSE_HISTORY_DENSITY < 1
        if self.weights is not None:
            return _widened(np.asarray(solved @ self.weights) if sparse else solved.toarray() @ self.weights,
                            self.columns, self.n_items)
        # λ·(h·P) = h - (h·Xᵀ)·(XXᵀ + λI)⁻¹X; λ cancels against λ·diag(P).
        dense_h = solved.toarray()
        hx = np.asarray(solved @ self.users_x.T) if sparse else dense_h @ self.users_x.T
        return _widened(dense_h - (dense_h - hx @ self.k_x) / self.denominator, self.columns, self.n_items)


def _widened(matrix: np.ndarray, columns: np.ndarray, width: int, rows_per_copy: int = 64) -> np.ndarray:
    """`matrix` with its columns at `columns` of `width` zero columns (itself when `columns` is every
    column in order). Copied a band of rows at a time: a column scatter over every row at once is
    ~4x slower (10k-wide rows)."""
    if len(columns) == width and np.array_equal(columns, np.arange(width)):
        return matrix
    out = np.zeros((matrix.shape[0], width), dtype=matrix.dtype)
    for start in range(0, matrix.shape[0], rows_per_copy):
        out[start:start + rows_per_copy, columns] = matrix[start:start + rows_per_copy]
    return out


def tune_ease(task: EvalTask, lambdas: Sequence[float] = EASE_LAMBDAS, metric: str = TUNING_METRIC,
              solver: str = "auto", batch_size: int = 2048, dtype=EASE_DTYPE) -> EASE:
    """EASE with λ maximising `metric` on the tuning task. The Gram matrix is built once; one
    model is held at a time (eight 10k × 10k ones held together took 6 GB)."""
    x, columns = trained_columns(training_matrix(task.train, task.dataset))
    n_items = task.dataset.n_items
    probe = EASE(lambdas[0], solver, dtype)
    primal = probe.uses_primal(x)
    gram = gram_matrix(x, rows=not primal, dtype=probe.dtype)
    instances = task.instances
    results = {}
    for lam in lambdas:
        model = EASE(lam, solver, dtype)
        if primal:
            model.fit_primal(gram, columns, n_items)
        else:
            model.fit_dual(x, gram, columns, n_items)
        total = 0.0
        for start in range(0, len(instances), batch_size):
            batch = instances[start:start + batch_size]
            better, tied = batch_rank_counts(model.score_batch(batch), batch)
            total += float(expected_metrics(better, tied)[metric].sum())
        results[float(lam)] = total / max(len(instances), 1)
        del model
    best = max(results, key=lambda lam: (results[lam], -lam))
    chosen = EASE(best, solver, dtype)
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
