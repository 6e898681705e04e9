"""Model lifecycle: load and check a version, build its ranker, hot-swap versions and follow the pointer."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from chronorec.server.core.canary import CanaryJudge, CanaryPlan, read_plan, write_plan
from chronorec.server.core.catalog_state import CatalogState
from chronorec.server.core.encoder import CUDA_PROVIDER, EncoderSettings, MicroBatcher, OnnxEncoder, load_encoder
from chronorec.server.core.errors import FailedPrecondition, NotFound, Unavailable, redact_paths
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.indexing import index_with, open_vector_cache
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.learned_ranker import RankerError, load_version_ranker
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.manifest import Manifest
from chronorec.server.core.ranking import CooccurrenceSource, TimeAwareRanker
from chronorec.server.core.repository import ModelRepository

log = logging.getLogger("chronorec.models")


@dataclass(frozen=True)
class RankerInputs:
    """The live state every version's ranker reads; shared, so a swap carries nothing over by hand."""

    catalog: CatalogState
    interactions: InteractionState
    cooccurrence: CooccurrenceSource


@dataclass
class ServingModel:
    """One loaded version: its encoder, its batcher, the catalog indexed with it and its ranker."""

    version: str
    manifest: Manifest
    encoder: OnnxEncoder
    batcher: MicroBatcher
    index: ItemIndex
    ranker: TimeAwareRanker
    loaded_at: float = field(default_factory=time.time)
    # The catalog version its index reflects (a canary's index catches up on each watcher tick).
    catalog_version: int = 0
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

    def memory_bytes(self) -> int:
        """What this version holds in memory, estimated from its parts: the index's vector matrix,
        hnswlib's graph (its level 0 keeps a copy of each vector with 2·M links), the encoder graph
        (ONNX Runtime holds about its file's size in weights) and the short-term vector cache."""
        index = self.index
        vectors = index.capacity * index.dim * 4
        graph = index.capacity * (index.dim * 4 + 2 * index.M * 4 + 16)
        try:
            weights = (self.encoder.version_dir / self.encoder.model_file).stat().st_size
        except OSError:
            weights = 0
        return vectors + graph + weights + int(getattr(self.ranker, "short_term_cache_bytes", 0))

    def __enter__(self) -> "ServingModel":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelManager:
    """Owns the serving model and swaps in new versions without failing a request."""

    def __init__(self, repository: ModelRepository, settings: EncoderSettings, inputs: RankerInputs):
        self.repository = repository
        self.settings = settings
        self.inputs = inputs
        self._current: ServingModel | None = None
        # A candidate serving canary_plan.percent of users beside the current version.
        self._canary: ServingModel | None = None
        self.canary_plan: CanaryPlan | None = None
        self.last_canary_outcome = ""
        # Applies a canary's promote/abort rule on each watcher tick (set by the engine).
        self.canary_judge: CanaryJudge | None = None
        # Held only to flip the canary (never across a build), so an abort never waits for a swap.
        self._canary_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self.swap_target: str | None = None
        self.last_error: str = ""
        self.swap_count = 0
        self.last_swap_seconds: float | None = None

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

    def acquire_for(self, user_id: str | None) -> ServingModel:
        """The model serving `user_id`: the canary for the users its plan picks, else the
        current one; pinned as `acquire()` pins."""
        canary, plan = self._canary, self.canary_plan
        if canary is not None and plan is not None and plan.serves(user_id):
            try:
                return canary.acquire()
            except Unavailable:
                pass  # aborted between the read and the pin: the current version serves
        return self.acquire()

    def loaded(self) -> list[tuple[str, ServingModel]]:
        """(role, model) of the versions in memory: "current", then "canary"."""
        out = []
        for role, model in (("current", self._current), ("canary", self._canary)):
            if model is not None:
                out.append((role, model))
        return out

    def canary_version(self) -> str | None:
        model = self._canary
        return model.version if model is not None else None

    def try_acquire(self) -> ServingModel | None:
        """The serving model pinned as `acquire()` does, or None while none is loaded."""
        try:
            return self.acquire()
        except Unavailable:
            return None

    def current_version(self) -> str | None:
        model = self._current
        return model.version if model else None

    def public_message(self, text: str) -> str:
        """`text` with the repository's and the vector cache's paths replaced by placeholders."""
        roots = [self.repository.root] + ([self.settings.vector_cache_dir] if self.settings.vector_cache_dir else [])
        return redact_paths(text, roots)

    def build(self, version: str) -> tuple[ServingModel, int]:
        """Load, check and index the catalog with `version`, catching up on edits made meanwhile."""
        encoder = load_encoder(self.repository, version, self.settings)
        try:
            # The ranker is part of the version: one that cannot load refuses the whole version.
            learned_ranker = load_version_ranker(self.repository.version_dir(version), encoder.manifest)
        except RankerError as exc:
            encoder.close()
            raise FailedPrecondition(f"model version {version!r} is unusable: {exc}") from None
        except BaseException:
            encoder.close()
            raise
        batcher = MicroBatcher(
            encoder.encode,
            max_batch_size=self.settings.max_batch,
            max_wait_ms=self.settings.max_wait_ms,
            max_queue_texts=self.settings.max_queue,
            on_batch=self.settings.on_batch,
            # A GPU runs one batch at a time; on CPU each core runs its own.
            workers=1 if CUDA_PROVIDER in encoder.providers else self.settings.batch_workers(),
        )
        try:
            catalog = self.inputs.catalog
            with catalog.lock:
                snapshot_version = catalog.version
                items = catalog.snapshot()
            # Every core encodes, also while another version serves: leaving one core to traffic
            # made a 10k-item swap of a retrained encoder take 64-84 s on 2 cores. ONNX Runtime
            # runs without the GIL, so serving threads still get their turns from the OS; the
            # latency during a swap is in tests/bench/bench_swap.py.
            workers = max(1, os.cpu_count() or 1)
            cache = open_vector_cache(self.repository, version, encoder, self.settings)
            index = index_with(self.repository, version, encoder, self.settings, items, cache, workers)
            ranker = TimeAwareRanker(
                catalog=catalog,
                index=index,
                state=self.inputs.interactions,
                cooccurrence=self.inputs.cooccurrence,
                encode=batcher.encode,
                encoder_max_length=encoder.max_length,
                learned_ranker=learned_ranker,
            )
            model = ServingModel(version, encoder.manifest, encoder, batcher, index, ranker)
            model.catalog_version = snapshot_version
            return model, snapshot_version
        except BaseException:
            batcher.close()
            raise

    def _catch_up(self, model: ServingModel, snapshot_version: int) -> None:
        # Caller holds the catalog lock. Edits made while the new index was built are applied
        # before the model serves, so no upsert or delete is lost between the snapshot and the switch.
        catalog = self.inputs.catalog
        changed = catalog.changed_since(snapshot_version)
        live = [item for item in map(catalog.get, changed) if item is not None]
        gone = [i for i in changed if i not in catalog]
        if live:
            model.index.upsert([i.item_id for i in live], model.encoder.encode([item_text(i) for i in live]))
        if gone:
            model.index.delete([i for i in gone if i in model.index])
        model.catalog_version = catalog.version

    def _install(self, model: ServingModel, snapshot_version: int) -> None:
        with self.inputs.catalog.lock:
            self._catch_up(model, snapshot_version)
            old, self._current = self._current, model
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
            model, snapshot_version = self.build(version)
            if before_install is not None:
                try:
                    before_install()
                except BaseException:
                    model.retire()
                    raise
            self._install(model, snapshot_version)
            self.last_swap_seconds = time.perf_counter() - started
            self.swap_count += 1
            self.last_error = ""
            log.info("serving model version %s (swap took %.2f s, providers %s)", version, self.last_swap_seconds, model.providers)
            return model
        except Exception as exc:
            self.last_error = self.public_message(f"version {version} refused: {exc}")
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
        if wanted == self.canary_version():
            return False  # promoted by another server on this repository: sync_canary adopts it
        if self.last_error.startswith(f"version {wanted} refused"):
            return False  # do not retry a refused version on every tick
        try:
            self.load_version(wanted)
            return True
        except Exception:
            return False

    def _check_activatable(self, version: str) -> None:
        info = self.repository.describe(version)
        if info is None:
            raise NotFound(f"model version {version!r} does not exist or is incomplete")
        if not info.usable:
            # The version is there, but broken: the caller's request is fine, the repository is not.
            raise FailedPrecondition(self.public_message(f"model version {version!r} is unusable: {info.problem}"))

    def _refuse_during_canary(self, what: str) -> None:
        plan = self.canary_plan
        if plan is not None:
            raise FailedPrecondition(f"a canary of {plan.candidate} is running: promote or abort it before {what}")

    def activate(self, version: str, wait: bool = True) -> str:
        """Make `version` the active one; returns the version serving afterwards."""
        self._refuse_during_canary(f"activating {version}")
        self._check_activatable(version)
        if not wait:
            self.last_error = ""
            self.repository.activate(version)  # the pointer watcher swaps
            return self.current_version() or ""
        self.load_version(version, before_install=lambda: self.repository.activate(version))
        return self.current_version() or ""

    def rollback(self, wait: bool = True) -> str:
        """Re-activate the previous version; returns the version the pointer names afterwards."""
        self._refuse_during_canary("rolling back")
        previous = self.repository.previous()
        if not wait:
            self.last_error = ""
            return self.repository.rollback()
        self.load_version(previous, before_install=self.repository.rollback)
        return previous

    # ---- canary -----------------------------------------------------------------------

    def start_canary(self, plan: CanaryPlan, record: bool = True) -> ServingModel:
        """Load `plan.candidate` beside the current version and serve it to the plan's users.

        The plan is recorded in the repository (with `record`) only once the candidate loaded and
        passed its checks, so a candidate that cannot serve never becomes every replica's canary.
        FailedPrecondition while a canary runs, a swap is in progress, or the candidate serves already.
        """
        if self.canary_plan is not None:
            raise FailedPrecondition(f"a canary of {self.canary_plan.candidate} is running: promote or abort it first")
        if plan.candidate == self.current_version():
            raise FailedPrecondition(f"model version {plan.candidate} is serving already; a canary needs another version")
        self._check_activatable(plan.candidate)
        if not self._swap_lock.acquire(blocking=False):
            raise FailedPrecondition(f"a swap to {self.swap_target} is in progress; start the canary after it")
        try:
            if self.canary_plan is not None:
                raise FailedPrecondition(f"a canary of {self.canary_plan.candidate} is running: promote or abort it first")
            self.swap_target = plan.candidate
            try:
                model, snapshot_version = self.build(plan.candidate)
            except Exception as exc:
                self.last_error = self.public_message(f"canary {plan.candidate} refused: {exc}")
                log.error("canary version %s refused: %s", plan.candidate, exc)
                raise
            try:
                if record:
                    write_plan(self.repository, plan)
                with self.inputs.catalog.lock, self._canary_lock:
                    self._catch_up(model, snapshot_version)
                    self._canary, self.canary_plan = model, plan
                    if self.canary_judge is not None:
                        self.canary_judge.started(plan, self.current_version())
            except BaseException:
                model.retire()
                raise
            self.last_error = ""
            log.info("canary: %s serves %g%% of users beside %s", plan.candidate, plan.percent, self.current_version())
            return model
        finally:
            self.swap_target = None
            self._swap_lock.release()

    def promote_canary(self, outcome: str = "by hand", move_pointer: bool = True) -> str:
        """Make the canary the current version for everyone, without reloading it; returns it.
        The repository pointer moves first, so a restart serves what this server serves."""
        if not self._swap_lock.acquire(blocking=False):
            raise FailedPrecondition(f"a swap to {self.swap_target} is in progress; promote after it")
        try:
            with self._canary_lock:
                canary, plan = self._canary, self.canary_plan
                if canary is None or plan is None:
                    raise FailedPrecondition("no canary is running")
                if move_pointer:
                    self.repository.activate(plan.candidate)
                self.repository.clear_canary()
                with self.inputs.catalog.lock:
                    self._catch_up(canary, canary.catalog_version)
                    old, self._current = self._current, canary
                    self._canary, self.canary_plan = None, None
            self.swap_count += 1
            self.last_canary_outcome = f"promoted {plan.candidate} over {old.version if old else '-'} ({outcome})"
            log.info("canary %s", self.last_canary_outcome)
            if old is not None:
                old.retire()
            return plan.candidate
        finally:
            self._swap_lock.release()

    def abort_canary(self, outcome: str = "by hand", clear_record: bool = True) -> str:
        """Serve everyone with the current version again; returns the dropped candidate. Calls
        pinned to the canary finish on it, then it is released: no call fails."""
        with self._canary_lock:
            canary, plan = self._canary, self.canary_plan
            if canary is None or plan is None:
                raise FailedPrecondition("no canary is running")
            if clear_record:
                self.repository.clear_canary()
            self._canary, self.canary_plan = None, None
        self.last_canary_outcome = f"aborted {plan.candidate} ({outcome})"
        log.info("canary %s", self.last_canary_outcome)
        canary.retire()
        return plan.candidate

    def catch_up_canary(self) -> None:
        """Bring the canary's index up to the catalog: catalog edits reach the current version's
        index at once and the canary's here, on each watcher tick (the ranking re-checks every
        returned item against the live catalog, so a lagging canary never returns a deleted or
        unavailable item; it can only miss a new one's semantic match until the tick)."""
        canary = self._canary
        catalog = self.inputs.catalog
        if canary is None or canary.catalog_version == catalog.version:
            return
        with catalog.lock:
            if self._canary is canary:
                self._catch_up(canary, canary.catalog_version)

    def judge_canary(self) -> None:
        if self.canary_judge is not None:
            self.canary_judge.tick()

    def sync_canary(self) -> None:
        """Follow the canary the repository records: start the one another process recorded (the
        trainer, another replica), drop one that was aborted, adopt one that was promoted."""
        plan = read_plan(self.repository)
        loaded = self.canary_plan
        pointer = self.repository.current()
        try:
            if loaded is not None and plan != loaded:
                if pointer == loaded.candidate:
                    self.promote_canary("by another server on this repository", move_pointer=False)
                elif plan is not None and (plan.candidate, plan.started_at) == (loaded.candidate, loaded.started_at):
                    with self._canary_lock:  # only the share or the rule changed: no reload
                        if self.canary_plan is loaded:
                            self.canary_plan = plan
                    return
                else:
                    self.abort_canary("by another server on this repository" if plan is None
                                      else "replaced by another canary in the repository", clear_record=False)
                loaded = None
            if loaded is not None:
                self.catch_up_canary()
                return
            if plan is None or self.swap_in_progress:
                return
            if pointer == plan.candidate:
                self.repository.clear_canary()  # promoted, and the record outlived it
                return
            self.start_canary(plan, record=False)
        except FailedPrecondition:
            return  # a swap or a canary change is under way; the next tick looks again
        except Exception:
            if plan is None or self.canary_plan is not None:
                log.exception("following the canary record failed")
                return
            # A candidate that cannot serve here is dropped for everyone: the current version serves.
            self.repository.clear_canary()
            self.last_canary_outcome = f"aborted {plan.candidate} (it could not be loaded: see last_error)"
            log.exception("canary %s could not start; its record is cleared", plan.candidate)

    def close(self) -> None:
        model, self._current = self._current, None
        canary, self._canary = self._canary, None
        for released in (model, canary):
            if released is not None:
                released.retire()


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
                self.manager.sync_canary()
                self.manager.judge_canary()
                self.manager.check_pointer()
            except Exception:  # the watcher must survive a vanished repository
                log.exception("model pointer check failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["ModelManager", "PointerWatcher", "RankerInputs", "ServingModel"]
