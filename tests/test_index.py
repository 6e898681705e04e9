"""Tests of the item vector index (hnswlib + exact copy) and its readers-writer lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chronorec.server.core.errors import InvalidArgument, NotFound
from chronorec.server.core.index import PRODUCT_BLOCK_ROWS, ItemIndex, row_products
from chronorec.server.core.rwlock import ReadWriteLock

DIM = 16


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ids(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def test_search_finds_the_item_itself_with_score_one():
    index = ItemIndex(DIM, initial_capacity=64)
    vectors = unit_vectors(50)
    index.upsert(ids(50), vectors)
    hits = index.search(vectors[7], k=3)
    assert hits[0][0] == "item00007"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert len(index) == 50


def test_vectors_are_normalised_on_upsert():
    index = ItemIndex(DIM)
    index.upsert(["a"], 5.0 * unit_vectors(1))
    assert np.linalg.norm(index.vector_of(["a"])[0]) == pytest.approx(1.0, abs=1e-6)


def test_grows_past_initial_capacity_by_doubling():
    index = ItemIndex(DIM, initial_capacity=8)
    vectors = unit_vectors(100)
    for start in range(0, 100, 7):
        index.upsert(ids(100)[start : start + 7], vectors[start : start + 7])
    assert len(index) == 100
    assert index.capacity == 128
    for i in (0, 50, 99):
        assert index.search(vectors[i], k=1)[0][0] == f"item{i:05d}"


def test_upsert_replaces_an_existing_vector():
    index = ItemIndex(DIM)
    vectors = unit_vectors(20)
    index.upsert(ids(20), vectors)
    index.upsert(["item00003"], vectors[15])
    assert len(index) == 20
    np.testing.assert_allclose(index.vector_of(["item00003"])[0], vectors[15], atol=1e-6)
    top_two = {item_id for item_id, _ in index.search(vectors[15], k=2)}
    assert top_two == {"item00003", "item00015"}


def test_duplicate_ids_in_one_upsert_keep_the_last_vector():
    index = ItemIndex(DIM)
    vectors = unit_vectors(2)
    index.upsert(["x", "x"], vectors)
    assert len(index) == 1
    np.testing.assert_allclose(index.vector_of(["x"])[0], vectors[1], atol=1e-6)


def test_delete_hides_items_and_frees_their_slots():
    index = ItemIndex(DIM, initial_capacity=16)
    vectors = unit_vectors(16)
    index.upsert(ids(16), vectors)
    assert index.delete(["item00004", "nope"]) == 1
    assert "item00004" not in index
    assert len(index) == 15
    assert all(item_id != "item00004" for item_id, _ in index.search(vectors[4], k=15))
    assert all(item_id != "item00004" for item_id, _ in index.exact_search(vectors[4], k=15))
    with pytest.raises(NotFound):
        index.vector_of(["item00004"])
    # A new item takes the freed slot instead of growing the index.
    fresh = unit_vectors(1, seed=9)
    index.upsert(["new"], fresh)
    assert index.capacity == 16
    assert index.search(fresh[0], k=1)[0][0] == "new"
    # The deleted item can come back.
    index.upsert(["item00004"], vectors[4])
    assert index.search(vectors[4], k=1)[0][0] == "item00004"
    assert index.capacity == 32 and len(index) == 17


def test_k_larger_than_live_count_is_clamped():
    index = ItemIndex(DIM)
    assert index.search(unit_vectors(1)[0], k=5) == []
    index.upsert(ids(3), unit_vectors(3))
    assert len(index.search(unit_vectors(1, seed=2)[0], k=10)) == 3
    assert len(index.exact_search(unit_vectors(1, seed=2)[0], k=10)) == 3


def test_search_survives_heavy_deletion():
    # Deleting most of the graph leaves hnswlib unable to find k live neighbours at low
    # ef ("Cannot return the results in a contiguous 2D array"); the index must recover.
    index = ItemIndex(DIM, initial_capacity=512, M=4, ef_construction=20, ef_search=10)
    vectors = unit_vectors(500, seed=3)
    index.upsert(ids(500), vectors)
    index.delete(ids(500)[:480])
    for q in unit_vectors(20, seed=4):
        hits = index.search(q, k=20)
        assert {h for h, _ in hits} == set(ids(500)[480:])


class _FlakyGraph:
    """Wraps the hnswlib graph; its first `failures` searches fail as hnswlib does when short."""

    def __init__(self, graph, failures: int):
        self._graph = graph
        self.failures = failures
        self.efs: list[int] = []

    def knn_query(self, *args, **kwargs):
        self.efs.append(self._graph.ef)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
        return self._graph.knn_query(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._graph, name)


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_short_result_error_is_retried_with_higher_ef_then_exact(failures):
    index = ItemIndex(DIM, ef_search=10)
    vectors = unit_vectors(100, seed=11)
    index.upsert(ids(100), vectors)
    flaky = index._graph = _FlakyGraph(index._graph, failures)
    hits = index.search(vectors[42], k=5)
    assert hits[0][0] == "item00042" and len(hits) == 5
    assert flaky.efs[0] == 10 and all(ef > 10 for ef in flaky.efs[1:])
    assert flaky._graph.ef == 10  # the default ef is restored after the retry


def test_exact_search_matches_brute_force():
    index = ItemIndex(DIM)
    vectors = unit_vectors(200, seed=5)
    index.upsert(ids(200), vectors)
    query = unit_vectors(1, seed=6)[0]
    expected = np.argsort(-(vectors @ query))[:10]
    assert [h for h, _ in index.exact_search(query, 10)] == [f"item{i:05d}" for i in expected]
    approximate = {h for h, _ in index.search(query, 10)}
    assert len(approximate & {f"item{i:05d}" for i in expected}) >= 9


def test_build_replaces_contents():
    index = ItemIndex(DIM, initial_capacity=4)
    index.upsert(["old"], unit_vectors(1))
    vectors = unit_vectors(30, seed=7)
    index.build(ids(30), vectors)
    assert "old" not in index and len(index) == 30 and index.capacity >= 30
    assert index.search(vectors[12], k=1)[0][0] == "item00012"


def test_vectors_matrix_and_similarities_mark_missing_items():
    index = ItemIndex(DIM)
    vectors = unit_vectors(5)
    index.upsert(ids(5), vectors)
    matrix, present = index.vectors_matrix_for(["item00001", "missing", "item00004"])
    assert present.tolist() == [True, False, True]
    np.testing.assert_allclose(matrix[[0, 2]], vectors[[1, 4]], atol=1e-6)
    assert not matrix[1].any()
    scores, present = index.similarities(vectors[1], ["item00001", "missing"])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] == 0.0


def test_row_products_give_each_query_the_same_bits_alone_or_among_many():
    """One mat-vec per block and query: a query's products do not depend on the others computed
    with it (a matrix product over many would round them otherwise)."""
    n = 3 * PRODUCT_BLOCK_ROWS + 17  # a short last block too
    vectors, queries = unit_vectors(n, seed=1, dim=64), unit_vectors(9, seed=2, dim=64)
    together = row_products(vectors, queries)
    for j in range(len(queries)):
        assert np.array_equal(together[j], row_products(vectors, queries[j:j + 1])[0])
    np.testing.assert_allclose(together, queries @ vectors.T, atol=1e-5)


def test_similarities_for_many_queries_are_each_querys_own_to_the_last_bit():
    """similarities_by_label_many gives each vector what similarities_by_label gives it alone,
    whether its labels take most rows (products over every row) or few (a gather), with 0 for
    label -1; a changed index gives None, so the caller looks the labels up again."""
    n = 2 * PRODUCT_BLOCK_ROWS + 40
    index = ItemIndex(DIM, initial_capacity=n)
    index.upsert(ids(n), unit_vectors(n, seed=3))
    labels, generation = index.labels_of(ids(n) + ["missing"])
    rng = np.random.default_rng(4)
    wanted = [labels, labels[rng.choice(len(labels), 30, replace=False)], labels[::-1][: n // 2], labels[:0]]
    queries = unit_vectors(len(wanted), seed=5)
    many = index.similarities_by_label_many(list(queries), wanted, generation)
    for query, rows, scores in zip(queries, wanted, many):
        alone = index.similarities_by_label(query, rows, generation)
        assert scores.dtype == np.float32 and np.array_equal(scores, alone)
        assert (scores[rows < 0] == 0).all()
    index.upsert(["item00000"], unit_vectors(1, seed=6))
    index.delete(["item00001"])
    assert index.similarities_by_label_many(list(queries), wanted, generation) is None


def test_invalid_vectors_are_rejected():
    index = ItemIndex(DIM)
    with pytest.raises(InvalidArgument):
        index.upsert(["a"], np.zeros((1, DIM)))
    with pytest.raises(InvalidArgument):
        index.upsert(["a", "b"], unit_vectors(1))
    with pytest.raises(InvalidArgument):
        index.upsert(["a"], np.full((1, DIM), np.nan))
    with pytest.raises(InvalidArgument):
        index.search(np.ones(DIM + 1), k=1)


def test_searches_during_concurrent_upserts_and_deletes_raise_nothing():
    index = ItemIndex(DIM, initial_capacity=16)
    vectors = unit_vectors(2000, seed=8)
    index.upsert(ids(100), vectors[:100])
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        queries = unit_vectors(50, seed=seed)
        try:
            while not stop.is_set():
                for q in queries:
                    hits = index.search(q, k=10)
                    assert 0 < len(hits) <= 10
        except BaseException as exc:  # noqa: BLE001 - any failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for start in range(100, 2000, 50):
            index.upsert(ids(2000)[start : start + 50], vectors[start : start + 50])
            index.delete(ids(2000)[start - 100 : start - 90])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(index) == 2000 - 10 * len(range(100, 2000, 50))


def test_rwlock_readers_share_and_writers_exclude():
    lock = ReadWriteLock()
    inside = []
    both_readers_in = threading.Barrier(2, timeout=5)

    def reader() -> None:
        with lock.read():
            inside.append("r")
            both_readers_in.wait()  # would time out if readers excluded each other

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert inside == ["r", "r"]

    with lock.write():
        entered = threading.Event()

        def blocked_reader() -> None:
            with lock.read():
                entered.set()

        t = threading.Thread(target=blocked_reader)
        t.start()
        assert not entered.wait(0.1)
    t.join(2)
    assert entered.is_set()


def test_rwlock_prefers_a_waiting_writer_over_new_readers():
    lock = ReadWriteLock()
    order = []
    first_reader_in = threading.Event()
    release_first_reader = threading.Event()

    def first_reader() -> None:
        with lock.read():
            first_reader_in.set()
            release_first_reader.wait(5)

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("late reader")

    t1 = threading.Thread(target=first_reader)
    t1.start()
    first_reader_in.wait(5)
    t2 = threading.Thread(target=writer)
    t2.start()
    time.sleep(0.05)  # let the writer queue up
    t3 = threading.Thread(target=late_reader)
    t3.start()
    time.sleep(0.05)
    assert order == []
    release_first_reader.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert order == ["writer", "late reader"]


def test_rwlock_nested_write_raises_instead_of_deadlocking():
    lock = ReadWriteLock()
    with lock.write():
        with pytest.raises(RuntimeError):
            with lock.write():
                pass
