"""Indexing a catalog with a model version: vectors from the vector cache or the encoder, then the HNSW graph."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.encoder import CUDA_PROVIDER, EncoderSettings, OnnxEncoder, load_encoder
from chronorec.server.core.errors import FailedPrecondition
from chronorec.server.core.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, ItemIndex
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.manifest import Manifest
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.vector_cache import VectorCache, encoder_key, graph_fingerprint, prune, text_key

log = logging.getLogger("chronorec.indexing")

INDEX_ENCODE_BATCH = 256
# Texts per ONNX run when a catalog is indexed (each worker's chunk of INDEX_ENCODE_BATCH is run in
# runs of this many, similar lengths together). On one thread small runs keep the activations in
# cache: MiniLM int8 on ~55-token item texts gave 103 texts per CPU-second at 8-16, 86 at 64 and
# 71 at 256. Batching only groups texts: each text's vector is the same whatever its neighbours
# (fp32 exactly; int8 within its dynamic quantisation's rounding, tests/test_index_encode.py).
INDEX_SUB_BATCH = 16
# Item vectors per (version, graph, text) live here under the model repository root.
VECTOR_CACHE_DIR = "vector-cache"
# Smaller catalogs build their graph in well under a second; saving it would cost more.
SAVE_GRAPH_MIN_ITEMS = 5000
# A large catalog takes minutes to encode on a CPU; say how far it got this often.
PROGRESS_LOG_S = 30.0


def index_catalog(
    encode: Callable[[list[str]], np.ndarray],
    items: list[Item],
    dimension: int,
    *,
    cache: VectorCache | None = None,
    workers: int = 1,
    M: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
) -> ItemIndex:
    """A new HNSW index over the items; vectors come from `cache` where it has them, else are
    encoded in batches by `workers` threads calling `encode` (which must be thread-safe)."""
    capacity = max(1024, int(len(items) * 1.25))
    index = ItemIndex(dimension, initial_capacity=capacity, M=M, ef_construction=ef_construction, ef_search=ef_search)
    if not items:
        return index
    ids = [i.item_id for i in items]
    texts = [item_text(i) for i in items]
    vectors = np.zeros((len(items), dimension), dtype=np.float32)
    found = np.zeros(len(items), dtype=bool)
    keys: list[bytes] = []
    fingerprint = ""
    if cache is not None:
        keys = [text_key(t) for t in texts]
        vectors, found = cache.get(keys)
        fingerprint = graph_fingerprint(ids, keys, dimension, index.M, index.ef_construction)
        if found.all():
            loaded = _load_saved_graph(cache, fingerprint, ids, vectors, index)
            if loaded is not None:
                return loaded
    missing = np.flatnonzero(~found)
    # Similar lengths side by side keep padding, and so wasted encoder work, small.
    missing = missing[np.argsort([len(texts[i]) for i in missing], kind="stable")]
    chunks = [missing[start : start + INDEX_ENCODE_BATCH] for start in range(0, len(missing), INDEX_ENCODE_BATCH)]

    started = time.perf_counter()
    progress = {"done": 0, "logged": started}
    progress_lock = threading.Lock()

    def encode_chunk(rows: np.ndarray) -> None:
        vectors[rows] = encode([texts[i] for i in rows])
        with progress_lock:
            progress["done"] += len(rows)
            now = time.perf_counter()
            if now - progress["logged"] >= PROGRESS_LOG_S:
                progress["logged"] = now
                rate = progress["done"] / (now - started)
                log.info("encoded %d of %d items (%.0f/s, about %.0f s left)", progress["done"], len(missing),
                         rate, (len(missing) - progress["done"]) / rate)

    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index-encode") as pool:
            list(pool.map(encode_chunk, chunks))  # list() re-raises the first failure
    else:
        for rows in chunks:
            encode_chunk(rows)
    encode_s = time.perf_counter() - started
    if cache is not None and len(missing):
        cache.put([keys[i] for i in missing], vectors[missing])
    started = time.perf_counter()
    index.build(ids, vectors)
    build_s = time.perf_counter() - started
    if cache is not None and len(items) >= SAVE_GRAPH_MIN_ITEMS:
        cache.save_graph(fingerprint, index.save)
    log.info(
        "indexed %d items: %d vectors from the cache, %d encoded in %.1f s (%d workers), graph built in %.1f s",
        len(items), int(found.sum()), len(missing), encode_s, workers, build_s,
    )
    return index


def _load_saved_graph(
    cache: VectorCache, fingerprint: str, ids: list[str], vectors: np.ndarray, like: ItemIndex
) -> ItemIndex | None:
    """The index saved for exactly this catalog, or None (then it is rebuilt)."""
    saved = cache.saved_graph(fingerprint)
    if saved is None:
        return None
    path, saved_ids = saved
    row_of = {item_id: row for row, item_id in enumerate(ids)}
    if sorted(saved_ids) != sorted(ids):
        return None
    started = time.perf_counter()
    try:
        index = ItemIndex.load(
            path,
            saved_ids,
            vectors[[row_of[i] for i in saved_ids]],
            initial_capacity=like.capacity,
            M=like.M,
            ef_construction=like.ef_construction,
            ef_search=like.ef_search,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("saved graph %s unusable (%s); rebuilding it", path, exc)
        cache.drop_graph(fingerprint)
        return None
    log.info("indexed %d items from the vector cache and the saved graph in %.1f s", len(ids), time.perf_counter() - started)
    return index


def vector_cache_root(repository: ModelRepository, settings: EncoderSettings) -> Path:
    return Path(settings.vector_cache_dir) if settings.vector_cache_dir else repository.root / VECTOR_CACHE_DIR


def open_vector_cache(
    repository: ModelRepository, version: str, encoder: OnnxEncoder, settings: EncoderSettings
) -> VectorCache | None:
    """The on-disk item vectors of this version's encoder (None when disabled or unusable)."""
    if not settings.vector_cache:
        return None
    root = vector_cache_root(repository, settings)
    try:
        key = _encoder_key(root, repository.version_dir(version), encoder.model_file, encoder.manifest)
        keep = {key}
        for info in repository.describe_versions():
            if info.manifest is None:
                continue
            try:
                manifest, folder = info.manifest, repository.version_dir(info.version)
                graph = manifest.onnx_file
                if settings.prefer_int8 and manifest.int8_file and (folder / manifest.int8_file).is_file():
                    graph = manifest.int8_file
                keep.add(_encoder_key(root, folder, graph, manifest))
            except Exception:  # a half-deleted version keeps nothing alive
                continue
        prune(root, keep)
        return VectorCache(root, key, encoder.dimension)
    except Exception as exc:  # a cache problem must never stop a model from loading
        log.warning("vector cache at %s unusable, encoding every item: %s", root, exc)
        return None


def _encoder_key(root: Path, version_dir: Path, graph_file: str, manifest: Manifest) -> str:
    # Everything besides the files that decides the vectors.
    settings = (manifest.dimension, manifest.max_length, manifest.pooling, manifest.normalize)
    return encoder_key(root, version_dir, graph_file, settings)


def index_with(
    repository: ModelRepository,
    version: str,
    encoder: OnnxEncoder,
    settings: EncoderSettings,
    items: list[Item],
    cache: VectorCache | None,
    workers: int,
) -> ItemIndex:
    """index_catalog with `workers` parallel one-thread sessions of the version on CPU.

    Whole batches in parallel on one-thread sessions beat one batch at a time spread over
    every core: small matrices leave intra-op threads waiting on each other, and spinning
    ones take CPU from everything else (measured 1.4-1.6x on 2 busy cores).
    """
    graph = dict(M=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search)
    if CUDA_PROVIDER in encoder.providers:
        return index_catalog(encoder.encode, items, encoder.dimension, cache=cache, **graph)
    try:
        bulk = OnnxEncoder(
            repository.version_dir(version),
            providers=encoder.providers,
            intra_op_threads=1,
            prefer_int8=settings.prefer_int8,
            max_batch_size=INDEX_SUB_BATCH,
        )
    except Exception as exc:  # the serving session already loaded; it can do the work alone
        log.warning("no separate indexing session (%s); indexing with the serving one", exc)
        return index_catalog(encoder.encode, items, encoder.dimension, cache=cache, **graph)
    try:
        return index_catalog(bulk.encode, items, encoder.dimension, cache=cache, workers=workers, **graph)
    finally:
        bulk.close()


def prepare_version(
    repository: ModelRepository,
    version: str,
    items: list[Item],
    settings: EncoderSettings | None = None,
    *,
    workers: int | None = None,
) -> dict[str, float]:
    """Encode `items` with a published version into its vector cache and save its graph.

    A publisher runs this before moving the pointer, with the settings the server recorded
    in the repository (`EncoderSettings.from_serving_settings(repository.read_serving_settings())`),
    so the server's swap loads vectors and graph instead of encoding the whole catalog while
    it serves; items changed in between are encoded at the swap as usual.
    """
    settings = settings or EncoderSettings.from_serving_settings(repository.read_serving_settings())
    started = time.perf_counter()
    encoder = load_encoder(repository, version, settings)
    try:
        cache = open_vector_cache(repository, version, encoder, settings)
        if cache is None:
            raise FailedPrecondition("the vector cache is disabled; nothing to prepare")
        before = len(cache)
        index = index_with(repository, version, encoder, settings, items, cache, workers or os.cpu_count() or 1)
    finally:
        encoder.close()
    return {"items": float(len(index)), "cached_before": float(before), "seconds": time.perf_counter() - started}


__all__ = [
    "INDEX_ENCODE_BATCH",
    "INDEX_SUB_BATCH",
    "SAVE_GRAPH_MIN_ITEMS",
    "VECTOR_CACHE_DIR",
    "index_catalog",
    "index_with",
    "open_vector_cache",
    "prepare_version",
    "vector_cache_root",
]
