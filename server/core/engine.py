"""The transport-free data plane the servicers call: catalog, feedback, encoding, recommendation and models."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from chronorec.server.core.canary import CanaryJudge, CanaryPlan, CanaryPolicy, CanaryState
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.catalog_state import CatalogState
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.encoder import EncoderSettings
from chronorec.server.core.errors import ChronorecError, InvalidArgument, NotFound, Unavailable
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.model_lifecycle import ModelManager, PointerWatcher, RankerInputs
from chronorec.server.core.online_metrics import FeedbackAttribution, Figures, RecommendationRef
from chronorec.server.core.ranking import CooccurrenceSource, RecommendQuery, RecommendResult
from chronorec.server.core.replication import LogFollower, ReplicaHeartbeat, ReplicaInfo
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.similar import SimilarItem, SimilarQuery, default_semantic_weight, similar_items
from chronorec.server.core.stores import SharedLog, Store

log = logging.getLogger("chronorec.engine")
# Erasures, one line each, naming the user and the caller: what an auditor asks for.
audit = logging.getLogger("chronorec.audit")


@dataclass
class Recommendations:
    result: RecommendResult
    model_version: str
    at: float
    recommendation_id: str = ""


@dataclass(frozen=True)
class SimilarItems:
    """SimilarItems' answer: the neighbours, the version that compared them, the as-of time and
    the semantic weight used."""

    items: list[SimilarItem]
    model_version: str
    at: float
    semantic_weight: float


@dataclass(frozen=True)
class LoadedVersion:
    """A version in memory, its role ("current" or "canary") and its estimated bytes."""

    version: str
    role: str
    memory_bytes: int


@dataclass(frozen=True)
class ServingStatus:
    """The serving model and the swap machinery, as GetStatus and the metrics report them."""

    serving_version: str  # "" while none is loaded
    manifest_json: str
    providers: list[str]
    swap_in_progress: bool
    swap_target: str
    last_error: str  # why the last version tried was refused; never a server path
    index_size: int
    loaded_at: float | None
    metrics: dict[str, float]
    swap_count: int
    last_swap_seconds: float | None
    encoder_queue_depth: int
    canary: CanaryState | None = None
    online: dict[str, Figures] = field(default_factory=dict)  # per version, over the sliding window
    loaded_versions: list[LoadedVersion] = field(default_factory=list)
    resident_memory_bytes: int = 0
    unattributed_feedback: int = 0
    last_canary_outcome: str = ""
    # Every replica of the service heard from lately (this one alone over an SQLite store).
    replicas: list[ReplicaInfo] = field(default_factory=list)
    applied_seq: int = 0  # how far this replica has followed the shared change log (0 over SQLite)


@dataclass(frozen=True)
class VersionStatus:
    """One version of the repository as ListVersions reports it."""

    version: str
    parent_version: str
    created_at: str
    metrics: dict[str, float]
    serving: bool
    active: bool
    unusable_reason: str  # "" for a version that can serve
    online: Figures | None = None  # over the sliding window, when it served attributed feedback there
    canary: bool = False


class ChronorecEngine:
    """Owns the store, the in-memory interaction state, the co-occurrence model and the serving model.

    Over a shared store (PostgreSQL) the engine is one replica of the service: a LogFollower
    applies every change any replica, importer or other process commits, and a heartbeat
    registers the replica as `replica_name`. Its own writes are applied at once and again when
    they come back through the log, which is harmless: events are ignored by id, and a catalog
    change is applied only when its seq is newer than the last one applied to that item.
    """

    def __init__(
        self,
        store: Store,
        repository: ModelRepository,
        settings: EncoderSettings | None = None,
        *,
        cooccurrence_refresh_s: float = 300.0,
        watch_interval_s: float | None = 2.0,
        online_metrics_window_s: float = 3600.0,
        served_log_capacity: int = 100_000,
        replica_name: str = "",
        heartbeat_interval_s: float = 2.0,
    ):
        self.store = store
        self.replica_name = replica_name
        self.heartbeat_interval_s = heartbeat_interval_s
        self.follower: LogFollower | None = None
        self.heartbeat: ReplicaHeartbeat | None = None
        # Seq of the last change applied to each item (under catalog.lock), over a shared log only.
        self._item_seq: dict[str, int] = {}
        self.started_at = time.time()
        self.repository = repository
        self.catalog = CatalogState()
        self.state = InteractionState()
        self.cooccurrence = CooccurrenceSource()
        self.manager = ModelManager(
            repository, settings or EncoderSettings(), RankerInputs(self.catalog, self.state, self.cooccurrence)
        )
        self.cooccurrence_refresh_s = cooccurrence_refresh_s
        self.online = FeedbackAttribution.for_repository(repository.root, online_metrics_window_s, served_log_capacity)
        self.canary_judge = CanaryJudge(self.manager, self.online.metrics)
        self.manager.canary_judge = self.canary_judge
        # A user's events reach the store and the memory in one step, and leave them in one step:
        # an erasure never interleaves with a write of the same user's events.
        self._user_writes = threading.Lock()
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
        self._load_state()
        self.refit_cooccurrence()
        version = self._wait_for_version()
        if version is None:
            return
        serving = self._load_first_good(version)
        self.manager.sync_canary()  # resume a canary the repository records
        if self.watch_interval_s:
            self._watcher = PointerWatcher(self.manager, self.watch_interval_s).start()
        if self.cooccurrence_refresh_s:
            self._refresher = threading.Thread(target=self._refresh_loop, name="cooccurrence-refresh", daemon=True)
            self._refresher.start()
        self.ready.set()
        log.info(
            "engine ready in %.2f s: %d items, %d events, model %s",
            time.perf_counter() - started,
            len(self.catalog),
            self.state.event_count,
            serving,
        )

    def _load_state(self) -> None:
        """The catalog and the event log into memory; over a shared log, then follow it."""
        if not isinstance(self.store, SharedLog):
            self.catalog.upsert(self.store.iter_items())
            self.state.add([event for _, event in self.store.iter_events()])
            return
        # The cursor first: every change up to it is committed, so the events up to it are the
        # log's prefix, and the follower replays everything after it. Items are read after the
        # cursor and may be newer; replaying their later changes in order ends in the same state.
        cursor = self.store.max_change_seq()
        self.catalog.upsert(self.store.iter_items())
        events = []
        for seq, event in self.store.iter_events():
            if seq > cursor:
                break
            events.append(event)
        self.state.add(events)
        # Started before a model is loaded: until one is, changes reach the catalog only, and the
        # first model indexes the catalog as it is then (catching up on later edits at install).
        self.follower = LogFollower(self.store, self._apply_logged_changes, cursor).start()
        if self.replica_name:
            self.heartbeat = ReplicaHeartbeat(self.store, self.replica_name, self._replica_position,
                                              interval_s=self.heartbeat_interval_s, started_at=self.started_at).start()

    def _replica_position(self) -> tuple[str, int]:
        return self.serving_version() or "", self.follower.cursor if self.follower else 0

    def _apply_logged_changes(self, changes: list) -> None:
        """Apply a page of the shared log (in seq order) to the catalog, the index and the
        interaction state: catalog changes first, so events of this page find their items."""
        latest: dict[str, object] = {}
        events = []
        # Events and erasures in log order: an erasure removes the events before it, never later ones.
        user_changes: list[tuple[str, object]] = []
        for change in changes:
            if change.kind == "event":
                events.append(change.event)
            elif change.kind == "delete_user":
                user_changes += [("events", events), ("erase", change.user_id)]
                events = []
            else:
                latest[change.item_id] = change  # within a page only an item's last change matters
        user_changes.append(("events", events))
        if latest:
            with self.catalog.lock:
                fresh = [c for c in latest.values() if c.seq > self._item_seq.get(c.item_id, 0)]
                upserts = [c.item for c in fresh if c.kind == "upsert"]
                deletes = [c.item_id for c in fresh if c.kind == "delete"]
                model = self.manager.try_acquire()
                try:
                    # Encoded before anything changes: a failure leaves the page to be read again.
                    vectors = model.encode([item_text(i) for i in upserts]) if model is not None and upserts else None
                    if upserts:
                        self.catalog.upsert(upserts)
                    if deletes:
                        self.catalog.delete(deletes)
                    if model is not None:
                        if upserts:
                            model.index.upsert([i.item_id for i in upserts], vectors)
                        gone = [i for i in deletes if i in model.index]
                        if gone:
                            model.index.delete(gone)
                finally:
                    if model is not None:
                        model.release()
                for change in fresh:
                    self._item_seq[change.item_id] = change.seq
        for kind, payload in user_changes:
            if kind == "erase":
                self.forget_user(payload)
            elif payload:
                self.state.add(payload)

    def _write_serving_settings(self) -> None:
        """Tell publishers how this server indexes versions (the trainer's prepare step reads it)."""
        try:
            self.repository.write_serving_settings(self.manager.settings.serving_settings())
        except OSError as exc:  # a read-only repository still serves; publishers use their defaults
            log.warning("could not record the serving settings in the model repository: %s", exc)

    def _load_first_good(self, version: str) -> str:
        """Serve the active version, or else the most recent earlier one that loads and checks;
        returns the version serving."""
        candidates = [version] + [v for v in reversed(self.repository.history()) if v != version]
        first_error = ""
        for candidate in dict.fromkeys(candidates):
            try:
                self.manager.load_version(candidate)
            except Exception as exc:  # any version that cannot serve is passed over, whatever the cause
                log.error("model version %s cannot serve: %s", candidate, exc)
                first_error = first_error or self.manager.last_error
                continue
            if candidate != version:
                log.error("active version %s is unusable; serving %s instead", version, candidate)
                # GetStatus keeps saying why the active version is not the one serving.
                self.manager.last_error = first_error
            return candidate
        raise Unavailable(f"no usable model version in the repository ({self.manager.last_error})")

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
        if self.heartbeat:
            self.heartbeat.stop()
        if self.follower:
            self.follower.stop()
        self.manager.close()

    # ---- co-occurrence ------------------------------------------------------------
    def refit_cooccurrence(self) -> None:
        """Refit item co-occurrence from the whole event log; every ranker reads it from the next request."""
        count = self.state.event_count
        sequences, times = self.state.user_items_and_times()
        self.cooccurrence.model = CooccurrenceModel.fit(sequences, list(self.catalog), times=times)
        self._events_at_fit = count

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

    def submit_encode(self, texts: list[str]) -> tuple[concurrent.futures.Future, str]:
        """Queue texts for the serving version's encoder without waiting for it: a Future of
        their vectors, and the version. The version stays pinned until the Future is done;
        cancelling it drops the texts not yet started. The request must fit in the encoder
        queue (MicroBatcher.submit)."""
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise InvalidArgument(f"text {i} is empty")
        model = self.manager.acquire()
        try:
            future = model.batcher.submit(texts)
        except BaseException:
            model.release()
            raise
        future.add_done_callback(lambda _done: model.release())
        return future, model.version

    def recommend(self, query: RecommendQuery, timeout: float | None = None) -> Recommendations:
        """Top-k as of `query.at` (default now) with the serving version's time model and the
        query's overrides; `timeout` bounds the wait for the encoder (DEADLINE_EXCEEDED past it)."""
        at = self._checked_time(query)
        with self.manager.acquire_for(query.user_id) as model:
            timeout = query.encode_timeout if timeout is None else timeout
            # One copy of the query with everything resolved (RecommendQuery.resolved's params).
            params = (query.params or model.manifest.time_model or TimeModelParams()).with_overrides(dict(query.overrides))
            resolved = replace(query, at=at, user_id=query.user_id or None, encode_timeout=timeout, params=params, overrides={})
            result = model.ranker.recommend(resolved)
            return self._named(result, model.version, at, resolved.user_id)

    def _checked_time(self, query: RecommendQuery) -> float:
        """The query's as-of time (default now), once its inline history names catalog items at or before it."""
        at = time.time() if query.at is None else float(query.at)
        for i, entry in enumerate(query.inline_history):
            if entry.item_id not in self.catalog:
                raise NotFound(f"history event {i}: item {entry.item_id!r} is not in the catalog")
            if entry.timestamp > at:
                raise InvalidArgument(f"history event {i} is after the request's time `at`")
        return at

    def _named(self, result: RecommendResult, version: str, at: float, user_id: str | None) -> Recommendations:
        recommendation_id = self.online.issue(version, user_id, [r.item_id for r in result.items])
        return Recommendations(result, version, at, recommendation_id)

    def recommend_batch(
        self, queries: list[RecommendQuery | ChronorecError], timeout: float | None = None
    ) -> tuple[list[Recommendations | ChronorecError], int]:
        """Recommend for each query, in order; an entry that is already an error (the servicer's
        validation), or fails here, is answered by its error alone. The history texts the cache
        lacks are encoded together, one encoder call per serving version (current, canary).
        Returns (one answer per entry, texts encoded)."""
        answers: list[Recommendations | ChronorecError] = list(queries)
        groups: dict[int, tuple[object, list[tuple[int, RecommendQuery]]]] = {}
        pinned = []
        try:
            for i, query in enumerate(queries):
                if isinstance(query, ChronorecError):
                    continue
                try:
                    at = self._checked_time(query)
                    model = self.manager.acquire_for(query.user_id)
                except ChronorecError as error:
                    answers[i] = error
                    continue
                pinned.append(model)
                try:
                    resolved = replace(query, at=at, user_id=query.user_id or None, encode_timeout=timeout)
                    resolved = resolved.resolved(model.manifest.time_model)
                except ChronorecError as error:
                    answers[i] = error
                    continue
                groups.setdefault(id(model), (model, []))[1].append((i, resolved))
            encoded = 0
            for model, members in groups.values():
                encoded += model.ranker.warm_short_term([query for _, query in members], timeout)
                for i, query in members:
                    try:
                        answers[i] = self._named(model.ranker.recommend(query), model.version, query.at, query.user_id)
                    except ChronorecError as error:
                        answers[i] = error
            return answers, encoded
        finally:
            for model in pinned:
                model.release()

    def similar_items(self, query: SimilarQuery, timeout: float | None = None) -> SimilarItems:
        """The items most like `query`'s item (or text) and available at its time (default now)."""
        at = time.time() if query.at is None else float(query.at)
        query = replace(query, at=at)
        with self.manager.acquire() as model:
            if query.item_id is not None:
                item = self.catalog.get(query.item_id)
                if item is None:
                    raise NotFound(f"item {query.item_id!r} is not in the catalog")
                vectors, present = model.index.vectors_matrix_for([query.item_id])
                vector = vectors[0] if present[0] else model.encode([item_text(item)], timeout=timeout)[0]
            else:
                if not query.text or not query.text.strip():
                    raise InvalidArgument("give an item_id or a non-empty text")
                vector = model.encode([query.text], timeout=timeout)[0]
            norm = float(np.linalg.norm(vector))
            if not norm > 1e-12:
                raise InvalidArgument("the item's vector is zero; it has no semantic neighbours")
            weight = query.semantic_weight
            if weight is None:
                weight = default_semantic_weight(model.manifest.time_model)
            items = similar_items(query, (vector / norm).astype(np.float32), self.catalog, model.index,
                                  self.cooccurrence.model, weight)
            return SimilarItems(items, model.version, at, weight)

    def feedback(
        self,
        events: list[Event],
        impressions: Sequence[Impression] = (),
        sources: dict[str, RecommendationRef] | None = None,
    ) -> tuple[int, int]:
        """Store a batch atomically; the next Recommend sees it. Returns (stored, duplicates).

        `impressions` (what users were shown) are stored in their own transaction after the events
        and enter no history; `sources` maps event ids to the recommendation they answer. Newly
        stored impressions and clicks, likes and purchases are attributed in the online metrics
        (a retried batch counts nothing twice: only new rows count)."""
        with self._user_writes:
            stored, duplicates = self.store.add_events(events) if events else ([], 0)
            self.state.add(stored)
        shown: list[Impression] = []
        if impressions:
            shown, repeated = self.store.add_impressions(impressions)
            duplicates += repeated
        self.online.attribute(stored, sources or {}, shown)
        return len(stored) + len(shown), duplicates

    def delete_user(self, user_id: str, by: str = "") -> tuple[int, int]:
        """Erase `user_id` (idempotent): their events and impressions leave the store for good, and
        every in-memory trace goes (history, co-occurrence, trend counts, cached history vectors,
        recorded recommendations); the erasure is recorded, so their events dated before it are
        never stored again and the trainer leaves them out. Returns (events, impressions) deleted;
        `by` names the caller in the audit line."""
        with self._user_writes:
            events, impressions = self.store.delete_user(user_id)
            removed = self.state.remove_user(user_id)
        self._forget_traces(user_id, refit=removed > 0)
        audit.info("user erased: user_id=%r by=%s events=%d impressions=%d", user_id, by or "-", events, impressions)
        return events, impressions

    def forget_user(self, user_id: str) -> None:
        """Drop every in-memory trace of `user_id` (what a replica does when the log says the user
        was erased elsewhere). The co-occurrence model is refitted without them (0.6 s for
        ML-100K's 100k events), and the short-term caches are emptied: their keys do not say whose a vector is."""
        removed = self.state.remove_user(user_id)
        self._forget_traces(user_id, refit=removed > 0)
        if removed:
            log.info("forgot %d in-memory events of an erased user", removed)

    def _forget_traces(self, user_id: str, refit: bool) -> None:
        """What an erased user leaves beside their history: their share of the co-occurrence model
        (refitted when they had events here), cached history vectors, recorded recommendations."""
        if refit:
            self.refit_cooccurrence()
        for _, model in self.manager.loaded():
            model.ranker.clear_cache()
        self.online.forget_user(user_id)

    def upsert_items(self, items: list[Item]) -> tuple[int, int]:
        # The catalog lock first: a swap installs its model under it, so the model pinned here
        # is the one serving until the change is in its index.
        with self.catalog.lock, self.manager.acquire() as model:
            vectors = model.encode([item_text(i) for i in items]) if items else None
            if isinstance(self.store, SharedLog):
                seqs = self.store.upsert_items_logged(items)
                # The batch's last copy of each id, unless the follower already applied a newer change.
                fresh = {}
                for item, vector in zip(items, vectors if vectors is not None else []):
                    if seqs[item.item_id] > self._item_seq.get(item.item_id, 0):
                        fresh[item.item_id] = (item, vector)
                if fresh:
                    self.catalog.upsert([item for item, _ in fresh.values()])
                    model.index.upsert(list(fresh), np.stack([vector for _, vector in fresh.values()]))
                    for item_id in fresh:
                        self._item_seq[item_id] = seqs[item_id]
                return len(items), len(model.index)
            count = self.store.upsert_items(items)
            self.catalog.upsert(items)
            if items:
                model.index.upsert([i.item_id for i in items], vectors)
            return count, len(model.index)

    def delete_items(self, item_ids: list[str]) -> tuple[int, int]:
        with self.catalog.lock, self.manager.acquire() as model:
            if isinstance(self.store, SharedLog):
                seqs = self.store.delete_items_logged(item_ids)
                # Ids deleted earlier took no new seq: the follower applies their own delete.
                gone = [i for i, seq in seqs.items() if seq > self._item_seq.get(i, 0)]
                self.catalog.delete(gone)
                model.index.delete([i for i in gone if i in model.index])
                for item_id in gone:
                    self._item_seq[item_id] = seqs[item_id]
                return len(seqs), len(model.index)
            count = self.store.delete_items(item_ids)
            self.catalog.delete(item_ids)
            model.index.delete([i for i in item_ids if i in model.index])
            return count, len(model.index)

    def get_item(self, item_id: str) -> Item:
        item = self.catalog.get(item_id)
        if item is None:
            raise NotFound(f"item {item_id!r} is not in the catalog")
        return item

    # ---- models ---------------------------------------------------------------------
    def serving_version(self) -> str | None:
        """The version answering requests now (None while none is loaded)."""
        return self.manager.current_version()

    def status(self) -> ServingStatus:
        manager = self.manager
        model = manager.try_acquire()
        common = dict(
            swap_in_progress=manager.swap_in_progress,
            swap_target=manager.swap_target or "",
            last_error=manager.last_error,
            swap_count=manager.swap_count,
            last_swap_seconds=manager.last_swap_seconds,
            **self._online_status(),
            replicas=self.replicas(),
            applied_seq=self.follower.cursor if self.follower else 0,
        )
        if model is None:
            return ServingStatus(serving_version="", manifest_json="", providers=[], index_size=0, loaded_at=None,
                                 metrics={}, encoder_queue_depth=0, **common)
        with model:  # pinned only while reading, so a status call never delays releasing a swapped-out model
            return ServingStatus(
                serving_version=model.version,
                manifest_json=model.manifest.to_json(),
                providers=model.providers,
                index_size=len(model.index),
                loaded_at=model.loaded_at,
                metrics=_numeric(model.manifest.metrics),
                encoder_queue_depth=model.batcher.queue_depth,
                **common,
            )

    def replicas(self) -> list[ReplicaInfo]:
        """The replicas of the service: over a shared store, every one whose heartbeat is recent
        (as of this replica's last heartbeat); otherwise this server alone."""
        applied = self.follower.cursor if self.follower else 0
        this = ReplicaInfo(self.replica_name, self.serving_version() or "", applied, 0.0, True)
        others = [r for r in self.heartbeat.replicas() if not r.this_replica] if self.heartbeat else []
        # This replica as it is now, not as its last heartbeat described it.
        return sorted(others + [this], key=lambda r: r.name)

    def _online_status(self) -> dict:
        """GetStatus' canary, online metrics and memory."""
        loaded = [LoadedVersion(model.version, role, model.memory_bytes()) for role, model in self.manager.loaded()]
        return dict(
            canary=self.canary_judge.state(),
            online=self.online.metrics.window(),
            loaded_versions=loaded,
            resident_memory_bytes=resident_memory_bytes(),
            unattributed_feedback=self.online.metrics.unattributed,
            last_canary_outcome=self.manager.last_canary_outcome,
        )

    def list_versions(self) -> list[VersionStatus]:
        """Every version of the repository, those that cannot serve with the reason."""
        serving = self.manager.current_version()
        active = self.repository.current()
        online = self.online.metrics.window()
        canary = self.manager.canary_version()
        out = []
        for info in self.repository.describe_versions():
            manifest = info.manifest
            out.append(
                VersionStatus(
                    version=info.version,
                    parent_version=(manifest.parent_version or "") if manifest else "",
                    created_at=manifest.created_at if manifest else "",
                    metrics=_numeric(manifest.metrics) if manifest else {},
                    serving=info.version == serving,
                    active=info.version == active,
                    unusable_reason=self.manager.public_message(info.problem),
                    online=online.get(info.version),
                    canary=info.version == canary,
                )
            )
        return out

    def activate(self, version: str, wait: bool = True) -> str:
        """Make `version` the active one (with `wait`, after it loaded and passed its checks);
        returns the version serving afterwards."""
        return self.manager.activate(version, wait=wait)

    def start_canary(self, version: str, percent: float, policy: CanaryPolicy | None = None) -> CanaryPlan:
        """Serve `version` to `percent` % of users beside the current version (it loads first);
        InvalidArgument for a percentage outside 0..100, FailedPrecondition while a canary runs."""
        plan = CanaryPlan(version, percent, policy=policy or CanaryPolicy())
        self.manager.start_canary(plan)
        return plan

    def promote_canary(self) -> str:
        """The canary serves everyone from now on; returns it."""
        return self.manager.promote_canary("by hand")

    def abort_canary(self) -> str:
        """Everyone is served by the current version again; returns the dropped candidate."""
        return self.manager.abort_canary("by hand")

    def rollback(self, wait: bool = True) -> tuple[str, str]:
        """Re-activate the previous version; returns (the version now active, the one serving)."""
        active = self.manager.rollback(wait=wait)
        return active, self.manager.current_version() or ""


def resident_memory_bytes() -> int:
    """The process's resident memory now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out
