"""Serving models: load and check a version, index the catalog with it, and hot-swap versions."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.encoder import CUDA_PROVIDER, MicroBatcher, OnnxEncoder
from chronorec.server.core.errors import FailedPrecondition, NotFound, Unavailable
from chronorec.server.core.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, ItemIndex
from chronorec.server.core.manifest import Manifest, load_manifest
from chronorec.server.core.repository import ModelRepository, ServingSettings
from chronorec.server.core.timetext import item_text
from chronorec.server.core.vector_cache import VectorCache, encoder_key, graph_fingerprint, prune, text_key

log = logging.getLogger("chronorec.serving")

INDEX_ENCODE_BATCH = 256
# Item vectors per (version, graph, text) live here under the model repository root.
VECTOR_CACHE_DIR = "vector-cache"
# Smaller catalogs build their graph in well under a second; saving it would cost more.
SAVE_GRAPH_MIN_ITEMS = 5000
# A large catalog takes minutes to encode on a CPU; say how far it got this often.
PROGRESS_LOG_S = 30.0


def text_of(item: Item) -> str:
    """The text the encoder reads for an item (one definition for indexing and history text)."""
    return item_text(item.title, item.category, item.text)


class CatalogState:
    """The live catalog in memory, with a change counter so a swap can catch up on edits."""

    def __init__(self, items: dict[str, Item] | None = None):
        self.items: dict[str, Item] = dict(items or {})
        self.lock = threading.RLock()
        self.sequence = 0
        self._last_change: dict[str, int] = {}

    def record(self, upserted: list[Item] = (), deleted: list[str] = ()) -> None:
        """Apply a committed change to the in-memory catalog (caller holds `lock`)."""
        # The counter moves after the change: a reader that sees the new number (the ranking
        # keys its catalog snapshot by it, without this lock) also sees the change.
        for item in upserted:
            self.items[item.item_id] = item
            self._last_change[item.item_id] = self.sequence + 1
            self.sequence += 1
        for item_id in deleted:
            self.items.pop(item_id, None)
            self._last_change[item_id] = self.sequence + 1
            self.sequence += 1

    def changed_since(self, sequence: int) -> list[str]:
        return [item_id for item_id, seq in self._last_change.items() if seq > sequence]

    def text_of_id(self, item_id: str) -> str:
        item = self.items.get(item_id)
        return text_of(item) if item is not None else item_id


@dataclass
class EncoderSettings:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 4096
    intra_op_threads: int | None = None
    prefer_int8: bool = False
    providers: list[str] | None = None
    on_batch: Callable[[int], None] | None = None
    # Keep item vectors on disk so a restart (or a rollback) indexes without re-encoding.
    vector_cache: bool = True
    vector_cache_dir: Path | None = None  # default: <model repository>/vector-cache

    def serving_settings(self) -> ServingSettings:
        """What a publisher preparing a version for this server must match."""
        return ServingSettings(
            vector_cache=self.vector_cache,
            vector_cache_dir=str(Path(self.vector_cache_dir).resolve()) if self.vector_cache_dir else None,
            prefer_int8=self.prefer_int8,
            hnsw_m=HNSW_M,
            hnsw_ef_construction=HNSW_EF_CONSTRUCTION,
            hnsw_ef_search=HNSW_EF_SEARCH,
        )


@dataclass
class ServingModel:
    """One loaded version: its encoder, its batcher and the catalog indexed with it."""

    version: str
    manifest: Manifest
    encoder: OnnxEncoder
    batcher: MicroBatcher
    index: ItemIndex
    engine: object
    loaded_at: float = field(default_factory=time.time)
    _inflight: int = 0
    _retired: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def providers(self) -> list[str]:
        return list(self.encoder.providers)

    def encode(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        return self.batcher.encode(texts, timeout=timeout)

    def acquire(self) -> "ServingModel":
        with self._lock:
            if self._closed:
                raise Unavailable("model version was released; retry")
            self._inflight += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            close_now = self._retired and self._inflight == 0 and not self._closed
            if close_now:
                self._closed = True
        if close_now:
            self._close()

    def retire(self) -> None:
        """Stop taking new work; close once the in-flight requests are done."""
        with self._lock:
            self._retired = True
            close_now = self._inflight == 0 and not self._closed
            if close_now:
                self._closed = True
        if close_now:
            self._close()

    def _close(self) -> None:
        self.batcher.close()
        log.info("released model version %s", self.version)

    def __enter__(self) -> "ServingModel":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def load_model(repository: ModelRepository, version: str, settings: EncoderSettings) -> tuple[OnnxEncoder, Manifest]:
    """Load a version's ONNX session and check it; any problem raises Unavailable with the reason."""
    if not repository.is_complete(version):
        raise Unavailable(f"model version {version!r} is missing or incomplete")
    try:
        encoder = OnnxEncoder(
            repository.version_dir(version),
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            prefer_int8=settings.prefer_int8,
        )
    except Unavailable:
        raise
    except Exception as exc:  # a corrupt file surfaces as many different exception types
        raise Unavailable(f"model version {version!r} failed to load: {exc}") from exc
    encoder.smoke_check()
    return encoder, encoder.manifest


def index_catalog(
    encode: Callable[[list[str]], np.ndarray],
    items: list[Item],
    dimension: int,
    *,
    cache: VectorCache | None = None,
    workers: int = 1,
) -> ItemIndex:
    """A new HNSW index over the items; vectors come from `cache` where it has them, else are
    encoded in batches by `workers` threads calling `encode` (which must be thread-safe)."""
    capacity = max(1024, int(len(items) * 1.25))
    index = ItemIndex(dimension, initial_capacity=capacity)
    if not items:
        return index
    ids = [i.item_id for i in items]
    texts = [text_of(i) for i in items]
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


def open_vector_cache(
    repository: ModelRepository, version: str, encoder: OnnxEncoder, settings: EncoderSettings
) -> VectorCache | None:
    """The on-disk item vectors of this version's encoder (None when disabled or unusable)."""
    if not settings.vector_cache:
        return None
    root = settings.vector_cache_dir or repository.root / VECTOR_CACHE_DIR
    try:
        key = _encoder_key(root, repository.version_dir(version), encoder.model_file, encoder.manifest)
        keep = {key}
        for other in repository.list_versions():
            try:
                manifest = load_manifest(repository.version_dir(other))
                graph = manifest.onnx_file
                if settings.prefer_int8 and manifest.int8_file and (repository.version_dir(other) / manifest.int8_file).is_file():
                    graph = manifest.int8_file
                keep.add(_encoder_key(root, repository.version_dir(other), graph, manifest))
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
    if CUDA_PROVIDER in encoder.providers:
        return index_catalog(encoder.encode, items, encoder.dimension, cache=cache)
    try:
        bulk = OnnxEncoder(
            repository.version_dir(version),
            providers=encoder.providers,
            intra_op_threads=1,
            prefer_int8=settings.prefer_int8,
        )
    except Exception as exc:  # the serving session already loaded; it can do the work alone
        log.warning("no separate indexing session (%s); indexing with the serving one", exc)
        return index_catalog(encoder.encode, items, encoder.dimension, cache=cache)
    try:
        return index_catalog(bulk.encode, items, encoder.dimension, cache=cache, workers=workers)
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

    A publisher runs this before moving the pointer (with the server's int8 setting), so
    the server's swap loads vectors and graph instead of encoding the whole catalog while
    it serves; items changed in between are encoded at the swap as usual.
    """
    settings = settings or EncoderSettings()
    started = time.perf_counter()
    encoder, _ = load_model(repository, version, settings)
    try:
        cache = open_vector_cache(repository, version, encoder, settings)
        if cache is None:
            raise FailedPrecondition("the vector cache is disabled; nothing to prepare")
        before = len(cache)
        index = index_with(repository, version, encoder, settings, items, cache, workers or os.cpu_count() or 1)
    finally:
        encoder.close()
    return {"items": float(len(index)), "cached_before": float(before), "seconds": time.perf_counter() - started}


class ModelManager:
    """Owns the serving model and swaps in new versions without failing a request."""

    def __init__(
        self,
        repository: ModelRepository,
        catalog: CatalogState,
        settings: EncoderSettings,
        engine_factory: Callable[[ItemIndex, Callable[[list[str]], np.ndarray], Manifest], object],
    ):
        self.repository = repository
        self.engine_factory = engine_factory
        self.catalog = catalog
        self.settings = settings
        self._current: ServingModel | None = None
        self._swap_lock = threading.Lock()
        self.swap_target: str | None = None
        self.last_error: str = ""
        self.swap_count = 0
        self.last_swap_seconds: float | None = None
        self.listeners: list[Callable[[ServingModel], None]] = []

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def swap_in_progress(self) -> bool:
        return self.swap_target is not None

    def acquire(self) -> ServingModel:
        """The serving model, pinned until `release()` (use as a context manager)."""
        for _ in range(3):
            model = self._current
            if model is None:
                raise Unavailable("the model is still loading; retry shortly")
            try:
                return model.acquire()
            except Unavailable:
                continue  # swapped and released between the read and the pin; take the new one
        raise Unavailable("the model is being swapped; retry")

    def current_version(self) -> str | None:
        model = self._current
        return model.version if model else None

    def build(self, version: str) -> tuple[ServingModel, int]:
        """Load, check and index the catalog with `version`, catching up on edits made meanwhile."""
        encoder, manifest = load_model(self.repository, version, self.settings)
        batcher = MicroBatcher(
            encoder.encode,
            max_batch_size=self.settings.max_batch,
            max_wait_ms=self.settings.max_wait_ms,
            max_queue_texts=self.settings.max_queue,
            on_batch=self.settings.on_batch,
        )
        try:
            with self.catalog.lock:
                snapshot_seq = self.catalog.sequence
                items = list(self.catalog.items.values())
            # While another version serves, one core is left to it.
            cores = os.cpu_count() or 1
            workers = max(1, cores if self._current is None else cores - 1)
            cache = open_vector_cache(self.repository, version, encoder, self.settings)
            index = index_with(self.repository, version, encoder, self.settings, items, cache, workers)
            engine = self.engine_factory(index, batcher.encode, manifest)
            model = ServingModel(version, manifest, encoder, batcher, index, engine)
            return model, snapshot_seq
        except BaseException:
            batcher.close()
            raise

    def _install(self, model: ServingModel, snapshot_seq: int) -> None:
        # Edits made while the new index was built are applied under the catalog lock, so no
        # upsert or delete is lost between the snapshot and the switch.
        with self.catalog.lock:
            changed = self.catalog.changed_since(snapshot_seq)
            live = [self.catalog.items[i] for i in changed if i in self.catalog.items]
            gone = [i for i in changed if i not in self.catalog.items]
            if live:
                model.index.upsert([i.item_id for i in live], model.encoder.encode([text_of(i) for i in live]))
            if gone:
                model.index.delete([i for i in gone if i in model.index])
            old, self._current = self._current, model
        for listener in self.listeners:
            listener(model)
        if old is not None:
            old.retire()

    def load_version(self, version: str, before_install: Callable[[], None] | None = None) -> ServingModel:
        """Swap to `version` now (blocking); the old keeps serving if anything fails.

        `before_install` runs once the new version has loaded and passed its checks, just before
        it starts serving (activation moves the repository pointer there, so a version that fails
        to load never becomes the pointer's).
        """
        if not self._swap_lock.acquire(blocking=False):
            raise FailedPrecondition(f"a swap to {self.swap_target} is already in progress")
        started = time.perf_counter()
        try:
            self.swap_target = version
            model, snapshot_seq = self.build(version)
            if before_install is not None:
                try:
                    before_install()
                except BaseException:
                    model.retire()
                    raise
            self._install(model, snapshot_seq)
            self.last_swap_seconds = time.perf_counter() - started
            self.swap_count += 1
            self.last_error = ""
            log.info("serving model version %s (swap took %.2f s, providers %s)", version, self.last_swap_seconds, model.providers)
            return model
        except Exception as exc:
            self.last_error = f"version {version} refused: {exc}"
            log.error("model version %s refused, keeping %s: %s", version, self.current_version(), exc)
            raise
        finally:
            self.swap_target = None
            self._swap_lock.release()

    def check_pointer(self) -> bool:
        """Swap if the repository pointer names another version; True when a swap happened."""
        wanted = self.repository.current()
        if wanted is None or wanted == self.current_version() or self.swap_in_progress:
            return False
        if self.last_error.startswith(f"version {wanted} refused"):
            return False  # do not retry a refused version on every tick
        try:
            self.load_version(wanted)
            return True
        except Exception:
            return False

    def activate(self, version: str, wait: bool = True) -> str:
        if not self.repository.is_complete(version):
            raise NotFound(f"model version {version!r} does not exist or is incomplete")
        if not wait:
            self.last_error = ""
            self.repository.activate(version)  # the pointer watcher swaps
            return self.current_version() or ""
        self.load_version(version, before_install=lambda: self.repository.activate(version))
        return self.current_version() or ""

    def rollback(self, wait: bool = True) -> str:
        """Re-activate the previous version; returns the version the pointer names afterwards."""
        previous = self.repository.previous()
        if not wait:
            self.last_error = ""
            return self.repository.rollback()
        self.load_version(previous, before_install=self.repository.rollback)
        return previous

    def close(self) -> None:
        model, self._current = self._current, None
        if model is not None:
            model.retire()


class PointerWatcher:
    """Background thread that polls the repository pointer and hot-swaps on a change."""

    def __init__(self, manager: ModelManager, interval_s: float):
        self.manager = manager
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> "PointerWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.manager.check_pointer()
            except Exception:  # the watcher must survive a vanished repository
                log.exception("model pointer check failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
