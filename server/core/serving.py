"""Serving models: load and check a version, index the catalog with it, and hot-swap versions."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.encoder import MicroBatcher, OnnxEncoder
from chronorec.server.core.errors import FailedPrecondition, NotFound, Unavailable
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.manifest import Manifest
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.timetext import item_text

log = logging.getLogger("chronorec.serving")

INDEX_ENCODE_BATCH = 256


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
        for item in upserted:
            self.sequence += 1
            self.items[item.item_id] = item
            self._last_change[item.item_id] = self.sequence
        for item_id in deleted:
            self.sequence += 1
            self.items.pop(item_id, None)
            self._last_change[item_id] = self.sequence

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


def index_catalog(encode: Callable[[list[str]], np.ndarray], items: list[Item], dimension: int) -> ItemIndex:
    """A new HNSW index over the items, encoded in batches."""
    index = ItemIndex(dimension, initial_capacity=max(1024, int(len(items) * 1.25)))
    for start in range(0, len(items), INDEX_ENCODE_BATCH):
        chunk = items[start : start + INDEX_ENCODE_BATCH]
        index.upsert([i.item_id for i in chunk], encode([text_of(i) for i in chunk]))
    return index


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
            index = index_catalog(encoder.encode, items, encoder.dimension)
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
