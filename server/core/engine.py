"""The transport-free service core: catalog, feedback, encoding and time-aware recommendation."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.errors import InvalidArgument, NotFound, Unavailable
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.manifest import Manifest, load_manifest
from chronorec.server.core.ranking import RankingEngine, RecommendQuery, RecommendResult
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.serving import (
    CatalogState,
    EncoderSettings,
    ModelManager,
    PointerWatcher,
    ServingModel,
    text_of,
)
from chronorec.server.core.store import EventStore
from chronorec.server.core.timetext import HistoryEntry

log = logging.getLogger("chronorec.engine")


@dataclass
class RecommendRequest:
    """A Recommend call in domain terms (times in unix seconds)."""

    user_id: str | None
    k: int
    at: float | None = None
    inline_history: list[HistoryEntry] = field(default_factory=list)
    exclude: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    allow_repeats: bool = False
    overrides: dict = field(default_factory=dict)


@dataclass
class Recommendations:
    result: RecommendResult
    model_version: str
    at: float


class ChronorecEngine:
    """Owns the store, the in-memory interaction state, the co-occurrence model and the serving model."""

    def __init__(
        self,
        store: EventStore,
        repository: ModelRepository,
        settings: EncoderSettings | None = None,
        *,
        cooccurrence_refresh_s: float = 300.0,
        watch_interval_s: float | None = 2.0,
    ):
        self.store = store
        self.repository = repository
        self.catalog = CatalogState()
        self.state = InteractionState()
        self.cooccurrence: CooccurrenceModel | None = None
        self.manager = ModelManager(repository, self.catalog, settings or EncoderSettings(), self._make_ranking)
        self.cooccurrence_refresh_s = cooccurrence_refresh_s
        self.watch_interval_s = watch_interval_s
        self._watcher: PointerWatcher | None = None
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()
        self._events_at_fit = 0
        self.ready = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Load the catalog, the event log and the serving model; blocks until ready."""
        started = time.perf_counter()
        self._write_serving_settings()
        with self.catalog.lock:
            self.catalog.record(upserted=list(self.store.iter_items()))
        self.state.add([event for _, event in self.store.iter_events()])
        self.refit_cooccurrence()
        version = self._wait_for_version()
        if version is None:
            return
        self._load_first_good(version)
        if self.watch_interval_s:
            self._watcher = PointerWatcher(self.manager, self.watch_interval_s).start()
        if self.cooccurrence_refresh_s:
            self._refresher = threading.Thread(target=self._refresh_loop, name="cooccurrence-refresh", daemon=True)
            self._refresher.start()
        self.ready.set()
        log.info(
            "engine ready in %.2f s: %d items, %d events, model %s",
            time.perf_counter() - started,
            len(self.catalog.items),
            self.state.event_count,
            version,
        )

    def _write_serving_settings(self) -> None:
        """Tell publishers how this server indexes versions (the trainer's prepare step reads it)."""
        try:
            self.repository.write_serving_settings(self.manager.settings.serving_settings())
        except OSError as exc:  # a read-only repository still serves; publishers use their defaults
            log.warning("could not record the serving settings in the model repository: %s", exc)

    def _load_first_good(self, version: str) -> None:
        """Serve the active version, or else the most recent earlier one that loads and checks."""
        candidates = [version] + [v for v in reversed(self.repository.history()) if v != version]
        for candidate in dict.fromkeys(candidates):
            try:
                self.manager.load_version(candidate)
                if candidate != version:
                    log.error("active version %s is unusable; serving %s instead", version, candidate)
                return
            except Unavailable as exc:
                log.error("model version %s cannot serve: %s", candidate, exc)
        raise Unavailable(f"no usable model version in {self.repository.root} ({self.manager.last_error})")

    def _wait_for_version(self) -> str | None:
        """The active version; with none yet, wait (health stays NOT_SERVING) until one appears."""
        warned = False
        while not self._stop.is_set():
            version = self.repository.current()
            if version is not None:
                return version
            if not warned:
                log.warning(
                    "no model version is active in %s; waiting for one (export one with "
                    "`chronorec-train export-base --models %s`)",
                    self.repository.root,
                    self.repository.root,
                )
                warned = True
            self._stop.wait(self.watch_interval_s or 1.0)
        return None

    def close(self) -> None:
        self._stop.set()
        if self._watcher:
            self._watcher.stop()
        self.manager.close()

    # ---- co-occurrence ------------------------------------------------------------
    def _make_ranking(self, index, encode, manifest: Manifest) -> RankingEngine:
        return RankingEngine(
            catalog=self.catalog.items,
            index=index,
            state=self.state,
            cooccurrence=self.cooccurrence,
            encode=encode,
            item_text_of=self.catalog.text_of_id,
            catalog_version=lambda: self.catalog.sequence,
        )

    def refit_cooccurrence(self) -> None:
        """Refit item co-occurrence from the whole event log and hand it to the serving ranking."""
        count = self.state.event_count
        model = CooccurrenceModel.fit(self.state.user_sequences(), list(self.catalog.items))
        self.cooccurrence = model
        self._events_at_fit = count
        current = self.manager._current
        if current is not None:
            current.engine.set_cooccurrence(model)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.cooccurrence_refresh_s):
            if self.state.event_count != self._events_at_fit:
                try:
                    self.refit_cooccurrence()
                except Exception:
                    log.exception("co-occurrence refresh failed")

    # ---- operations -----------------------------------------------------------------
    def encode(self, texts: list[str], timeout: float | None = None) -> tuple[np.ndarray, str]:
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise InvalidArgument(f"text {i} is empty")
        with self.manager.acquire() as model:
            return model.encode(texts, timeout=timeout), model.version

    def recommend(self, request: RecommendRequest, timeout: float | None = None) -> Recommendations:
        """Top-k as of `at`; `timeout` bounds the wait for the encoder (DEADLINE_EXCEEDED past it)."""
        at = time.time() if request.at is None else float(request.at)
        for i, entry in enumerate(request.inline_history):
            if entry.item_id not in self.catalog.items:
                raise NotFound(f"history event {i}: item {entry.item_id!r} is not in the catalog")
            if entry.timestamp > at:
                raise InvalidArgument(f"history event {i} is after the request's time `at`")
        with self.manager.acquire() as model:
            params = model.manifest.time_model.with_overrides(request.overrides)
            query = RecommendQuery(
                user_id=request.user_id or None,
                k=request.k,
                at=at,
                inline_history=list(request.inline_history),
                exclude=frozenset(request.exclude),
                categories=frozenset(request.categories),
                allow_repeats=request.allow_repeats,
                params=params,
                encode_timeout=timeout,
            )
            result = model.engine.recommend(query)
            return Recommendations(result, model.version, at)

    def feedback(self, events: list[Event]) -> tuple[int, int]:
        """Store a batch atomically; the next Recommend sees it. Returns (stored, duplicates)."""
        stored, duplicates = self.store.add_events(events)
        self.state.add(stored)
        return len(stored), duplicates

    def upsert_items(self, items: list[Item]) -> tuple[int, int]:
        with self.manager.acquire() as model, self.catalog.lock:
            vectors = model.encode([text_of(i) for i in items]) if items else None
            count = self.store.upsert_items(items)
            self.catalog.record(upserted=items)
            if items:
                model.index.upsert([i.item_id for i in items], vectors)
            return count, len(model.index)

    def delete_items(self, item_ids: list[str]) -> tuple[int, int]:
        with self.manager.acquire() as model, self.catalog.lock:
            count = self.store.delete_items(item_ids)
            self.catalog.record(deleted=item_ids)
            model.index.delete([i for i in item_ids if i in model.index])
            return count, len(model.index)

    def get_item(self, item_id: str) -> Item:
        item = self.catalog.items.get(item_id)
        if item is None:
            raise NotFound(f"item {item_id!r} is not in the catalog")
        return item

    def status(self) -> dict:
        model = self.manager._current
        manifest = model.manifest if model else None
        return {
            "serving_version": model.version if model else "",
            "manifest_json": manifest.to_json() if manifest else "",
            "providers": model.providers if model else [],
            "swap_in_progress": self.manager.swap_in_progress,
            "swap_target": self.manager.swap_target or "",
            "last_error": self.manager.last_error,
            "index_size": len(model.index) if model else 0,
            "loaded_at": model.loaded_at if model else None,
            "metrics": _numeric(manifest.metrics) if manifest else {},
            "swap_count": self.manager.swap_count,
        }

    def list_versions(self) -> list[dict]:
        serving = self.manager.current_version()
        active = self.repository.current()
        out = []
        for version in self.repository.list_versions():
            manifest = load_manifest(self.repository.version_dir(version))
            out.append(
                {
                    "version": version,
                    "parent_version": manifest.parent_version or "",
                    "created_at": manifest.created_at,
                    "metrics": _numeric(manifest.metrics),
                    "serving": version == serving,
                    "active": version == active,
                }
            )
        return out


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out
