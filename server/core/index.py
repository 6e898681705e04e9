"""Item vector index: hnswlib HNSW (inner product on unit vectors) plus an exact numpy copy."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import hnswlib
import numpy as np

from chronorec.server.core.errors import InvalidArgument, NotFound
from chronorec.server.core.rwlock import ReadWriteLock

log = logging.getLogger(__name__)

# hnswlib raises this when it finds fewer than k live neighbours (too many deletions
# near the query, or ef too small); the message is its only signal.
_SHORT_RESULT_MESSAGE = "contiguous 2D array"

# HNSW graph parameters the server builds with (written to the model repository's serving
# settings, so a publisher preparing a version builds the same graph).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 100

# Rows per mat-vec when a query meets every vector (row_products): 256 × 384 float32 rows, 384 kB,
# stay in a core's cache while many queries are multiplied with them.
PRODUCT_BLOCK_ROWS = 256


def row_products(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(len(queries), len(vectors)) float32 inner products, one mat-vec per block of
    PRODUCT_BLOCK_ROWS rows and query: a row's product is then the same whether one query is
    computed or many (one matrix product over many queries would round it otherwise, and the
    learned ranker's replay must give the server's scores to the last bit), and for many queries
    each block is read from memory once instead of once per query (a 10k-item catalogue is 15 MB)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    out = np.empty((len(queries), len(vectors)), dtype=np.float32)
    for start in range(0, len(vectors), PRODUCT_BLOCK_ROWS):
        block = vectors[start:start + PRODUCT_BLOCK_ROWS]
        for j in range(len(queries)):
            out[j, start:start + len(block)] = block @ queries[j]
    return out


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero or non-finite rows raise InvalidArgument."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise InvalidArgument(f"vectors must be 2-D, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise InvalidArgument("vectors contain NaN or infinity")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms <= 1e-12):
        raise InvalidArgument("a zero vector cannot be indexed or searched")
    return matrix / norms


class ItemIndex:
    """Approximate and exact nearest-neighbour search over item vectors, keyed by item id.

    hnswlib labels are row numbers of `_vectors`; a deleted item's label is reused by the
    next new item (its graph slot is revived with `unmark_deleted` and updated in place),
    so neither the graph nor the matrix grows with churn. Searches share the lock;
    writes take it exclusively because hnswlib is not safe to search while adding.
    """

    def __init__(
        self,
        dim: int,
        *,
        initial_capacity: int = 1024,
        M: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
    ):
        if dim <= 0:
            raise InvalidArgument("index dimension must be positive")
        self.dim = int(dim)
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self._initial_capacity = max(1, int(initial_capacity))
        self._lock = ReadWriteLock()
        self._reset(self._initial_capacity)

    def _reset(self, capacity: int) -> None:
        graph = hnswlib.Index(space="ip", dim=self.dim)
        graph.init_index(
            max_elements=capacity,
            ef_construction=self.ef_construction,
            M=self.M,
            allow_replace_deleted=True,
        )
        graph.set_ef(self.ef_search)
        self._graph = graph
        self._capacity = capacity
        self._vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        self._id_of_label: list[str | None] = []  # one entry per label ever used
        self._label_of: dict[str, int] = {}
        self._free_labels: list[int] = []
        # Bumped on every write so callers can cache label lookups.
        self.generation = getattr(self, "generation", 0) + 1

    # ----------------------------------------------------------------- writes

    def build(self, ids: Sequence[str], vectors: np.ndarray, num_threads: int = -1) -> None:
        """Replace the whole contents with `ids`/`vectors` (bulk, multi-threaded insert)."""
        ids, matrix = self._validated(ids, vectors)
        with self._lock.write():
            self._reset(max(self._initial_capacity, len(ids)))
            if ids:
                labels = np.arange(len(ids), dtype=np.int64)
                self._graph.add_items(matrix, labels, num_threads=num_threads)
                self._vectors[: len(ids)] = matrix
                self._id_of_label = list(ids)
                self._label_of = {item_id: i for i, item_id in enumerate(ids)}

    def save(self, path: str | os.PathLike) -> list[str]:
        """Write the HNSW graph to `path` (hnswlib's format); returns the ids in label order.

        Only an index without deletions is saved, so its labels are exactly 0..n-1 and
        `load` can rebuild the id mapping from that list alone.
        """
        with self._lock.read():
            if self._free_labels or len(self._label_of) != len(self._id_of_label):
                raise ValueError("an index with deleted items is not saved; rebuild it first")
            self._graph.save_index(os.fspath(path))
            return list(self._id_of_label)  # type: ignore[arg-type]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        initial_capacity: int = 1024,
        M: int = 16,
        ef_construction: int = 200,
        ef_search: int = 100,
    ) -> "ItemIndex":
        """An index from a graph written by `save`, its ids (label order) and their vectors.

        The graph must have been built with the same dimension, M and ef_construction, and
        its stored vectors must match `vectors`; ValueError otherwise (rebuild instead).
        """
        ids = [str(i) for i in ids]
        matrix = normalise_rows(vectors) if len(ids) else np.zeros((0, vectors.shape[1]), dtype=np.float32)
        index = cls(matrix.shape[1], initial_capacity=1, M=M, ef_construction=ef_construction, ef_search=ef_search)
        capacity = max(int(initial_capacity), len(ids), 1)
        graph = hnswlib.Index(space="ip", dim=index.dim)
        graph.load_index(os.fspath(path), max_elements=capacity, allow_replace_deleted=True)
        if graph.element_count != len(ids) or graph.M != index.M or graph.ef_construction != index.ef_construction:
            raise ValueError(
                f"saved graph has {graph.element_count} items, M={graph.M}, ef_construction={graph.ef_construction}; "
                f"expected {len(ids)}, M={index.M}, ef_construction={index.ef_construction}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids for a saved graph")
        if ids:
            # A spot check that the graph holds these vectors under these labels.
            probe = np.unique(np.linspace(0, len(ids) - 1, num=min(len(ids), 16)).astype(np.int64))
            stored = np.asarray(graph.get_items(probe), dtype=np.float32)
            if not np.allclose(stored, matrix[probe], atol=1e-5):
                raise ValueError("saved graph's vectors differ from the given ones")
        graph.set_ef(index.ef_search)
        index._graph = graph
        index._capacity = capacity
        index._vectors = np.zeros((capacity, index.dim), dtype=np.float32)
        index._vectors[: len(ids)] = matrix
        index._id_of_label = list(ids)
        index._label_of = {item_id: label for label, item_id in enumerate(ids)}
        index._free_labels = []
        index.generation += 1
        return index

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, num_threads: int = -1) -> None:
        """Add new items and replace the vectors of existing ones."""
        ids, matrix = self._validated(ids, vectors)
        if not ids:
            return
        with self._lock.write():
            labels = np.empty(len(ids), dtype=np.int64)
            revived: list[int] = []
            for row, item_id in enumerate(ids):
                label = self._label_of.get(item_id)
                if label is None:
                    if self._free_labels:
                        label = self._free_labels.pop()
                        revived.append(label)
                        self._id_of_label[label] = item_id
                    else:
                        label = len(self._id_of_label)
                        self._id_of_label.append(item_id)
                    self._label_of[item_id] = label
                labels[row] = label
            needed = len(self._id_of_label)
            if needed > self._capacity:
                self._grow(needed)
            for label in revived:
                # With allow_replace_deleted, add_items refuses a deleted label: revive
                # the slot first, then the add below updates it in place.
                self._graph.unmark_deleted(int(label))
            self._graph.add_items(matrix, labels, num_threads=num_threads)
            self._vectors[labels] = matrix
            self.generation += 1

    def delete(self, ids: Iterable[str]) -> int:
        """Hide items from search and free their slots for reuse; returns how many existed."""
        removed = 0
        with self._lock.write():
            for item_id in dict.fromkeys(ids):
                label = self._label_of.pop(item_id, None)
                if label is None:
                    continue
                self._graph.mark_deleted(label)
                self._id_of_label[label] = None
                self._vectors[label] = 0.0
                self._free_labels.append(label)
                removed += 1
            if removed:
                self.generation += 1
        return removed

    def _grow(self, needed: int) -> None:
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        self._graph.resize_index(capacity)
        grown = np.zeros((capacity, self.dim), dtype=np.float32)
        grown[: self._capacity] = self._vectors
        self._vectors = grown
        self._capacity = capacity

    def _validated(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        ids = [str(i) for i in ids]
        if not ids:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        matrix = normalise_rows(vectors)
        if matrix.shape != (len(ids), self.dim):
            raise InvalidArgument(
                f"expected {len(ids)} vectors of dimension {self.dim}, got shape {matrix.shape}"
            )
        if len(set(ids)) != len(ids):
            # The last vector given for an id wins, as if the upserts came one by one.
            last = {item_id: row for row, item_id in enumerate(ids)}
            rows = sorted(last.values())
            ids = [ids[r] for r in rows]
            matrix = matrix[rows]
        return ids, matrix

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._label_of

    @property
    def capacity(self) -> int:
        return self._capacity

    def ids(self) -> list[str]:
        with self._lock.read():
            return list(self._label_of)

    def search(self, vector: np.ndarray, k: int, ef: int | None = None) -> list[tuple[str, float]]:
        """Approximate top-k items by inner product with `vector` (normalised here)."""
        query = normalise_rows(vector)
        if query.shape[1] != self.dim:
            raise InvalidArgument(f"query dimension {query.shape[1]} != index dimension {self.dim}")
        if ef is None or ef == self.ef_search:
            with self._lock.read():
                k = min(int(k), len(self._label_of))
                if k <= 0:
                    return []
                try:
                    labels, distances = self._graph.knn_query(query, k=k, num_threads=1)
                    return self._hits(labels[0], distances[0])
                except RuntimeError as exc:
                    if _SHORT_RESULT_MESSAGE not in str(exc):
                        raise
            # Too few results at the default ef: retry wider below.
            ef = max(2 * self.ef_search, 2 * k)
        return self._search_with_ef(query, k, ef)

    def search_labels(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, int] | None:
        """(labels of the items `search(vector, k)` returns, in its order; the generation they are
        valid for), without making an id and score per hit; None where `search` would have to
        widen ef (too few hits), so the caller asks `search` instead."""
        query = normalise_rows(vector)
        if query.shape[1] != self.dim:
            raise InvalidArgument(f"query dimension {query.shape[1]} != index dimension {self.dim}")
        with self._lock.read():
            k = min(int(k), len(self._label_of))
            if k <= 0:
                return np.zeros(0, dtype=np.int64), self.generation
            try:
                labels, _ = self._graph.knn_query(query, k=k, num_threads=1)
            except RuntimeError as exc:
                if _SHORT_RESULT_MESSAGE not in str(exc):
                    raise
                return None
            labels = labels[0].astype(np.int64)
            # Deleted items' slots (id None) are skipped, as `_hits` does.
            live = np.fromiter((self._id_of_label[l] is not None for l in labels.tolist()), dtype=bool, count=len(labels))
            return labels[live], self.generation

    def _search_with_ef(self, query: np.ndarray, k: int, ef: int) -> list[tuple[str, float]]:
        # ef is a setting of the whole graph, so a search with its own ef runs alone.
        with self._lock.write():
            k = min(int(k), len(self._label_of))
            if k <= 0:
                return []
            try:
                for attempt_ef in (ef, 4 * ef):
                    self._graph.set_ef(max(attempt_ef, k))
                    try:
                        labels, distances = self._graph.knn_query(query, k=k, num_threads=1)
                        return self._hits(labels[0], distances[0])
                    except RuntimeError as exc:
                        if _SHORT_RESULT_MESSAGE not in str(exc):
                            raise
            finally:
                self._graph.set_ef(self.ef_search)
            # The graph around the query is too sparse (many deletions): answer exactly.
            log.warning("HNSW returned fewer than %d hits even at ef=%d; using exact search", k, 4 * ef)
            return self._exact_locked(query[0], k)

    def _hits(self, labels: np.ndarray, distances: np.ndarray) -> list[tuple[str, float]]:
        # Space 'ip' reports distance = 1 - inner product.
        return [
            (self._id_of_label[int(label)], float(1.0 - d))
            for label, d in zip(labels, distances)
            if self._id_of_label[int(label)] is not None
        ]

    def exact_search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Exact top-k by inner product (numpy); ties broken by item id."""
        query = normalise_rows(vector)
        with self._lock.read():
            return self._exact_locked(query[0], int(k))

    def _exact_locked(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        labels = np.fromiter(self._label_of.values(), dtype=np.int64, count=len(self._label_of))
        k = min(k, len(labels))
        if k <= 0:
            return []
        # One pass over the contiguous rows (a gather would copy the whole matrix), then the
        # id tie-break only among items scoring at least the k-th: sorting 100k id strings
        # per query cost ~150 ms at 100k items.
        used = len(self._id_of_label)
        scores = (self._vectors[:used] @ query)[labels]
        if k < len(labels):
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            pool = np.flatnonzero(scores >= kth)
            labels, scores = labels[pool], scores[pool]
        ids = np.array([self._id_of_label[l] for l in labels])
        order = np.lexsort((ids, -scores))[:k]
        return [(str(ids[i]), float(scores[i])) for i in order]

    def vector_of(self, ids: Sequence[str]) -> np.ndarray:
        """Stored unit vectors of `ids` (one row each); unknown ids raise NotFound."""
        with self._lock.read():
            labels = []
            for item_id in ids:
                label = self._label_of.get(item_id)
                if label is None:
                    raise NotFound(f"item {item_id!r} is not in the index")
                labels.append(label)
            return self._vectors[np.asarray(labels, dtype=np.int64)].copy()

    def vectors_matrix_for(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, present): rows aligned to `ids`, zero rows where `present` is False."""
        with self._lock.read():
            labels = np.fromiter(
                (self._label_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids)
            )
            present = labels >= 0
            matrix = np.zeros((len(ids), self.dim), dtype=np.float32)
            matrix[present] = self._vectors[labels[present]]
            return matrix, present

    def labels_of(self, ids: Sequence[str]) -> tuple[np.ndarray, int]:
        """(label per id, -1 where absent; the generation the labels are valid for)."""
        with self._lock.read():
            labels = np.fromiter(
                (self._label_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids)
            )
            return labels, self.generation

    def similarities_by_label(self, vector: np.ndarray, labels: np.ndarray, generation: int) -> np.ndarray | None:
        """Inner products with the rows `labels` (0 where -1); None if the index changed since
        `generation` (a freed label may now hold another item), so the caller looks them up again."""
        scores = self.similarities_by_label_many([vector], [labels], generation)
        return None if scores is None else scores[0]

    def similarities_by_label_many(self, vectors: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                                   generation: int) -> list[np.ndarray] | None:
        """similarities_by_label for each vector and its labels, the same values, the queries that
        meet most rows multiplied with them together (row_products); None if the index changed."""
        queries = [np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]
        with self._lock.read():
            if generation != self.generation:
                return None
            return self._scores_many_locked(queries, labels)

    def similarities(self, vector: np.ndarray, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(inner products of `vector` with `ids`' vectors, present mask); 0 where absent.

        `vector` is used as given (the caller normalises it), so a blended user vector
        scores exactly as the ranking defines it.
        """
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._lock.read():
            labels = np.fromiter(
                (self._label_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids)
            )
            return self._scores_many_locked([query], [labels])[0], labels >= 0

    def _scores_many_locked(self, queries: list[np.ndarray], labels: Sequence[np.ndarray]) -> list[np.ndarray]:
        used = len(self._id_of_label)
        if used == 0:
            return [np.zeros(len(wanted), dtype=np.float32) for wanted in labels]
        # One pass over every row beats a gather when most rows are wanted anyway.
        every = [j for j, wanted in enumerate(labels) if len(wanted) * 4 >= used]
        products = row_products(self._vectors[:used], np.stack([queries[j] for j in every])) if every else None
        product_of = {j: k for k, j in enumerate(every)}
        out = []
        for j, wanted in enumerate(labels):
            rows = np.maximum(wanted, 0)
            k = product_of.get(j)
            scores = products[k][rows] if k is not None else self._vectors[rows] @ queries[j]
            out.append(np.where(wanted >= 0, scores, 0.0).astype(np.float32))
        return out
