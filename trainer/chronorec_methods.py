"""chronorec's own variants as `chronorec-eval` methods, ranked by the server's TimeAwareRanker.

Load with `chronorec-eval --plugin chronorec.trainer.chronorec_methods ...`. Every variant ranks
every catalogue item through `TimeAwareRanker.score_candidates` in exhaustive mode — the code that
serves Recommend — replayed over the event log by `trainer.tune.ReplayRanker`: each test instance
is scored as of its own time with exactly the events before it visible. The blend's variants run
the batch form of that replay (`trainer.batch_replay`: many events at once, the same scores bit for
bit); the learned ranker runs one ranker call per event. The encoder runs as it is served: exported
to ONNX and published into a model repository (a cache folder outside the repo), then loaded by
`OnnxEncoder`.

Methods (all fit their time model on the split's tuning task only — the inner temporal split, or
the loo validation targets — never on the test window):

- `chronorec-untuned-mean`    packaged MiniLM; semantic similarity only, user vector = the mean of
                              the history's item vectors with no decay (half-life 3650 days).
- `chronorec-untuned-decay`   the same with a 10-day half-life.
- `chronorec-untuned-time`    untuned MiniLM and the full time model: history text (short-term) and
                              decayed mean (long-term) blended by α, time-decayed co-occurrence,
                              trend, freshness; α, half-lives, trend window and weights fitted on the
                              tuning task (`tune.tune_time_model`).
- `chronorec-finetuned-time`  MiniLM fine-tuned by the trainer (`finetune.finetune`, history text →
                              next item) on training events only, then the full time model fitted
                              as above. Also reports sweeps of α and of the long-term and
                              co-occurrence half-lives on the test window (analysis only: nothing
                              is chosen from them).
- `chronorec-finetuned-blind` the same fine-tuned encoder with time removed (see BLIND): no history
                              text (it is ordered and carries time phrases), no decay (half-lives
                              3650 days), popularity over the longest window (365 days: all of
                              ML-100K's seven months), no freshness; the weights are fitted on the
                              tuning task exactly as for the time-aware form.
- `chronorec-blend`           the tuned blend over the encoder the pipeline chooses: the fine-tuned
                              one when its own retrieval on the validation window beats the base
                              encoder's, else the base one (the same rule as `chronorec-train run`).
- `chronorec-ranker`          the learned ranker (`trainer.ranker_train`, LightGBM LambdaRank) over
                              the blend's best candidates of that same encoder and time model,
                              trained on point-in-time features of earlier windows and early-stopped
                              on the validation window; served exactly so by a version carrying it.

Settings (fine-tuning steps, token length, cache folder, ...) are an `EvalSettings`, built once per
evaluation from `chronorec-eval --settings JSON` (default: the `CHRONOREC_EVAL_SETTINGS` environment
variable) and passed to `evaluation_methods`, which returns the variants of that evaluation: one
`ChronorecMethods`, which also owns what its variants share per split (`SplitContext`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.repository import _write_atomically
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.trainer.base_model import packaged_minilm
from chronorec.trainer import batch_replay
from chronorec.trainer.forked import beside, refusing_encoder, workers_for
from chronorec.trainer.protocols import (
    Dataset, Instances, LooSplit, MethodFactory, Split, TemporalSplit, batch_rank_counts, batched_rank_counts,
    exclusion_mask, expected_metrics, rank_counts, summarize,
)
from chronorec.trainer.ranker_train import RankerTrainingConfig
from chronorec.trainer.resources import release_free_heap
from chronorec.trainer.tune import (
    ReplayRanker, RankerReplay, TuningGrid, build_index, compare_tuned_blends, fit_cooccurrence, held_out_gain,
    tune_time_model,
)

log = logging.getLogger(__name__)

# Instances per batch when two tuned blends are scored on held-out validation instances: the
# evaluation's own batch (protocols.fit_and_score), a multiple of batch_replay.CHUNK_INSTANCES so
# that the scoring may split between two processes (ChronorecRanker._counts_beside).
HELD_OUT_BATCH = 1024

CACHE_ENV = "CHRONOREC_EVAL_CACHE"
# In a fine-tuning run's cache folder: the run's outcome when keep-best chose the starting weights.
KEPT_BASE_RECORD = "kept-base-weights.json"
# Encoder answers an EncoderBundle remembers (~100 batches of 1,024 history texts at 384 dimensions).
ENCODE_MEMORY_BYTES = 160 * 1024 * 1024
SWEEP_METRIC = "NDCG@10"
ITEM_TEXTS = ("catalogue", "ids")  # EvalSettings.item_text


@dataclass(frozen=True)
class EvalSettings:
    """How chronorec's variants are built for an evaluation (defaults: ML-100K, both protocols, < 30 min on 2 CPU cores)."""

    base_model: str | None = None  # Hugging Face folder; None: the packaged all-MiniLM-L6-v2
    max_length: int = 32  # tokens the encoder reads: the newest one or two events of the history text
    history_max_events: int = 20
    cache_dir: str | None = None  # exported and fine-tuned models; None: ~/.cache (evaluation_methods: $CHRONOREC_EVAL_CACHE)
    reuse_cache: bool = True  # reuse a fine-tuned model whose fingerprint (data, split, settings) matches
    finetune_steps: int = 100
    finetune_batch_size: int = 32
    finetune_lr: float = 2e-4
    finetune_temperature: float = 0.05
    finetune_examples: int | None = None  # newest training examples used; None: steps × batch size
    finetune_valid_queries: int = 500  # validation examples the encoder-only before/after metrics use
    finetune_train_layers: int | None = 2  # top transformer layers trained (the rest frozen); None: all
    # Validate during fine-tuning (on half of the validation sample) and keep the best checkpoint;
    # off: the last weights. The other half measures the encoder before and after.
    finetune_keep_best: bool = True
    finetune_whole_window: bool = False  # sample the examples from the whole training window, not the newest
    finetune_time_negatives: int = 0  # per example, items trending at its time as extra negatives
    finetune_distill: float = 0.0  # weight of the term keeping the vectors near the base encoder's
    finetune_logq: bool = True  # in-batch negatives corrected for their sampling frequency (FinetuneConfig.logq_correction)
    hard_negatives: int = 0
    tune_max_instances: int | None = 1000  # tuning instances (a seeded sample of the tuning task)
    sweeps: bool = True
    sweep_max_instances: int | None = 1000  # test instances the sweeps score (a seeded sample)
    # ... and at most this many instances × catalogue items: the sweeps score ~37 settings over the
    # whole catalogue per instance (1,000 instances on ML-100K's 1,682 items, ~200 on 9,742).
    sweep_max_item_scores: int | None = 2_000_000
    seed: int = 0
    blas_threads: int | None = 1  # BLAS threads during the replay (its mat-vecs are tiny); None: leave as is
    # Processes for the replays' pure-Python stretches (the blend's tuning replay and test scoring,
    # the sweeps, the ranker's training windows): None, up to two by the CPUs; 1, this process only.
    # The same results either way.
    replay_workers: int | None = None
    ranker_candidates: int = 200  # the blend's best the learned ranker rescores
    ranker_second_look: int = 50  # ... and this many items of each whole-history source (0: none)
    ranker_slices: int = 2  # earlier training windows the ranker learns from (temporal; loo uses one)
    # ... and windows further back of which it learns only the returning users' events (temporal;
    # ML-100K: NDCG@10 an hour to a day after the previous event 0.037 -> 0.057, after a month
    # 0.162 -> 0.176, validation 0.0965 -> 0.0979).
    ranker_returning_slices: int = 2
    ranker_groups_per_slice: int = 2500  # sampled events per training window
    # Under loo the ranker learns from one window, each user's newest `ranker_loo_events_per_user`
    # training events, and may log as many as temporal's two full windows hold. Against the newest
    # three, 2,500 of them sampled: validation NDCG@10 0.1341 -> 0.1419 on ML-100K (test 0.1240 ->
    # 0.1295), 0.0881 -> 0.0894 on ml-latest-small (1,026 events either way, by the item-score cap;
    # test 0.0814 -> 0.0854), 0.4303 -> 0.4366 on 200 generated users (test 0.4263 -> 0.4433).
    ranker_loo_events_per_user: int = 6
    ranker_loo_groups: int = 5000
    ranker_valid_groups: int = 2500  # sampled events of the validation window
    ranker_negatives: int = 10  # sampled items added to each training group
    # LightGBM's step per round, and the rounds without a better validation figure after which the fit
    # stops (at most ranker_max_rounds); by default the trainer's own (RankerTrainingConfig).
    ranker_learning_rate: float = RankerTrainingConfig.learning_rate
    ranker_early_stopping_rounds: int = RankerTrainingConfig.early_stopping_rounds
    ranker_max_rounds: int = RankerTrainingConfig.max_rounds
    # Gap ranges starting this many days after the previous event go to their best trend window unless
    # the trees beat it on validation by a bound (RankerTrainingConfig.route_trend_after_s); None: a
    # range goes to a signal only when that beats the trees by a bound, everywhere.
    ranker_trend_after_days: float | None = 7.0
    # Logged events × catalogue items per window at most (RankerTrainingConfig.max_item_scores_per_slice).
    ranker_max_item_scores: int | None = 10_000_000
    # What chronorec reads of an item: "catalogue", its title, category and text; "ids", its id
    # alone, as in a ratings log without an item file (its times kept). The difference between the
    # two is what the items' content adds: the language model's input and the category features.
    item_text: str = "catalogue"
    progress: bool | None = None  # status lines on stderr; None: when stderr is a terminal

    def __post_init__(self) -> None:
        if self.item_text not in ITEM_TEXTS:
            raise ValueError(f"item_text must be one of {', '.join(ITEM_TEXTS)}, not {self.item_text!r}")

    def with_overrides(self, **overrides: Any) -> "EvalSettings":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown evaluation setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chronorec" / "eval-models"

    def base_folder(self) -> Path:
        return Path(self.base_model) if self.base_model else packaged_minilm()

    def say(self, message: str) -> None:
        """A status line: always logged, on stderr too when `progress` (default: stderr is a terminal)."""
        log.info("%s", message)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if show:
            print(f"[chronorec] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ time models

# The semantic-only rows of QUALITY.md: no history text, no collaborative or popularity term.
UNTUNED_MEAN = TimeModelParams(alpha=0.0, long_term_half_life_days=3650.0, w_semantic=1.0, w_cooccurrence=0.0,
                               w_freshness=0.0, w_trend=0.0)
UNTUNED_DECAY = replace(UNTUNED_MEAN, long_term_half_life_days=10.0)

# What the time-aware forms may choose from on the tuning task.
TIME_GRID = TuningGrid()  # the trainer's default grid: the evaluation tunes exactly as `chronorec-train run` does

# Time removed: the history is an unordered bag. No history text (it is written newest first
# with relative-time phrases), every half-life at its bound (3650 days: no decay), popularity
# over the longest window the model has (365 days), no freshness. Only the weights are fitted.
BLIND = TimeModelParams(alpha=0.0, long_term_half_life_days=3650.0, cooccurrence_half_life_days=3650.0,
                        freshness_half_life_days=3650.0, trend_window_days=365.0, w_freshness=0.0)
BLIND_GRID = TuningGrid(
    alpha=(0.0,), long_term_half_life_days=(3650.0,), cooccurrence_half_life_days=(3650.0,),
    freshness_half_life_days=(3650.0,), trend_window_days=(365.0,),
    w_semantic=TIME_GRID.w_semantic, w_cooccurrence=TIME_GRID.w_cooccurrence, w_freshness=(0.0,),
    w_trend=TIME_GRID.w_trend, personal_half_life_days=(0.0,),
)

# Sensitivity of the fine-tuned time-aware model, on the test window (reported, never used).
SWEEPS: dict[str, tuple[float, ...]] = {
    "alpha": (0.0, 0.25, 0.5, 0.75, 1.0),
    "long_term_half_life_days": (0.1, 1.0, 10.0, 100.0, 3650.0),
    "cooccurrence_half_life_days": (0.0001, 0.001, 0.01, 0.1, 10.0, 3650.0),
    # 3650 days: practically off over a data set of months.
    "personal_half_life_days": (0.1, 1.0, 7.0, 30.0, 3650.0),
}
SEMANTIC_ONLY = {"w_semantic": 1.0, "w_cooccurrence": 0.0, "w_freshness": 0.0, "w_trend": 0.0}


# ------------------------------------------------------------------------------ helpers


def _openblas_thread_setters():
    """(get, set) of the OpenBLAS that numpy uses, or None (another BLAS, or not found)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run numpy's BLAS on `n` threads inside the block. The replay does thousands of tiny
    mat-vecs per second; on a busy machine waking BLAS threads for each costs more than the work
    (measured 4x slower per ranking call on 2 loaded cores)."""
    setters = _openblas_thread_setters() if n else None
    if setters is None:
        yield
        return
    get, put = setters
    before = int(get())
    put(int(n))
    try:
        yield
    finally:
        put(before)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- encoders


@dataclass
class EncoderBundle:
    """One served encoder (ONNX, from a model repository) and its vectors of the catalogue."""

    name: str
    encoder: Any  # chronorec.server.core.encoder.OnnxEncoder
    version_dir: Path
    item_vectors: np.ndarray  # aligned with SplitContext.item_ids
    info: dict
    calls: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)

    def encode(self, texts: list[str]) -> np.ndarray:
        """The encoder's vectors of `texts`; a call with the very same list is answered from memory.

        Variants sharing an encoder replay the same test events, so they ask for the same history
        texts in the same batches (chronorec-blend repeats one of the time-aware variants). A
        text's vector depends slightly (1e-8) on the batch it is encoded in, so the whole call is
        the key, never single texts: a reused answer is exactly what encoding would give."""
        key = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest() + f"/{len(texts)}"
        cached = self.calls.get(key)
        if cached is not None:
            self.calls.move_to_end(key)
            return cached.copy()
        vectors = self.encoder.encode(texts)
        self.calls[key] = vectors
        held = sum(v.nbytes for v in self.calls.values())
        while held > ENCODE_MEMORY_BYTES and len(self.calls) > 1:
            held -= self.calls.popitem(last=False)[1].nbytes
        return vectors.copy()


def _load_version(repo_root: Path):
    from chronorec.server.core.repository import ModelRepository

    repo = ModelRepository(repo_root)
    current = repo.current()
    if current is not None and repo.is_complete(current):
        return repo, current
    return repo, None


def _onnx_encoder(version_dir: Path):
    from chronorec.server.core.encoder import OnnxEncoder

    return OnnxEncoder(version_dir)


def untuned_version_dir(settings: EvalSettings) -> Path:
    """The base model exported to ONNX once (published into a repository in the cache)."""
    base = settings.base_folder().resolve()
    root = settings.cache_root() / f"base-{_digest(str(base), settings.max_length)}"
    repo, version = _load_version(root)
    if version is None:
        from chronorec.trainer.export import publish_base_model

        settings.say(f"exporting {base.name} to ONNX (max_length {settings.max_length}) into {root}")
        version = publish_base_model(base, root, activate=True, max_length=settings.max_length, base_model=str(base))
    return repo.version_dir(version)


# ------------------------------------------------------------------------ split context


def catalogue_of(dataset: Dataset, ids_only: bool = False) -> dict[str, Item]:
    """Every item the evaluation ranks, by id: the data set's items, and each item named only by
    its events (a ratings log without an item file, or with a partial one) as an item whose title
    is its id, the text the server reads for an item it does not know (itemtext.item_text_lookup).
    The protocols rank every catalogue item (protocols.Dataset), so chronorec must be able to
    recommend these too: they are reached through co-occurrence, trend and the learned ranker.

    ids_only (EvalSettings.item_text "ids"): every item is named so, its title, category, text
    and attributes left out and its publication and expiry times kept."""
    items = {item.item_id: item for item in dataset.items}
    if ids_only:
        items = {i: Item(item_id=i, title=i, published_at=item.published_at, expires_at=item.expires_at)
                 for i, item in items.items()}
    for item_id in dataset.item_ids:
        if item_id not in items:
            items[item_id] = Item(item_id=item_id, title=item_id)
    return items


class SplitContext:
    """What the variants of one split share: catalogue, encoders, co-occurrence, tuning replays."""

    def __init__(self, split: Split, settings: EvalSettings, shared: dict | None = None):
        self.split = split
        self.settings = settings
        # Across the splits of one evaluation: the base encoder and its item vectors (the same
        # catalogue encoded by the same model gives the same vectors, ~1 min for 10k items).
        self._shared = shared if shared is not None else {}
        self.dataset: Dataset = split.dataset
        self.items: dict[str, Item] = catalogue_of(self.dataset, ids_only=settings.item_text == "ids")
        self.item_text_of = item_text_lookup(self.items)
        self.item_ids = list(self.dataset.item_ids)
        self.tuning = split.tuning_task()
        self.bundles: dict[str, EncoderBundle] = {}
        self._indexes: dict[str, Any] = {}
        self._cooccurrence: dict[str, Any] = {}
        self._replays: dict[str, RankerReplay] = {}
        self.tunings: dict[str, Any] = {}
        self.ranker_fits: dict[str, Any] = {}
        # Test-window rank counts (better, tied) by (encoder, time model, instances): variants that
        # are the same ranker (finetuned-time when fine-tuning kept the base weights,
        # chronorec-blend) read them back (16 bytes per event, where the rows were 8 per item).
        self.test_counts: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    # -- encoders

    def _bundle(self, name: str, version_dir: Path, info: dict) -> EncoderBundle:
        encoder = _onnx_encoder(version_dir)
        started = time.perf_counter()
        texts = [self.item_text_of(i) for i in self.item_ids]
        vectors, reused = self._item_vectors(encoder, version_dir, texts)
        info = {**info, "item_encode_s": round(time.perf_counter() - started, 2), "item_vectors_reused": reused}
        return EncoderBundle(name, encoder, version_dir, vectors, info)

    def _item_vectors(self, encoder, version_dir: Path, texts: list[str]) -> tuple[np.ndarray, bool]:
        """The catalogue's vectors by this encoder, kept next to the cached models (`reuse_cache`):
        a version folder is written once and never changed, so the same folder and texts give the
        same vectors (encoding 10k items takes about a minute on 2 cores)."""
        if not self.settings.reuse_cache:
            return encoder.encode(texts), False
        path = self.settings.cache_root() / "item-vectors" / f"{_digest(str(version_dir.resolve()), texts)}.npy"
        if path.is_file():
            try:
                vectors = np.load(path)
                if vectors.shape[0] == len(texts):
                    return vectors, True
            except (OSError, ValueError):
                pass  # unreadable: encode again and replace it
        vectors = encoder.encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        with open(staging, "wb") as handle:
            np.save(handle, vectors)
        os.replace(staging, path)
        return vectors, False

    def untuned(self) -> EncoderBundle:
        if "untuned" not in self.bundles:
            dataset, bundle = self._shared.get("untuned", (None, None))
            if dataset is not self.dataset:
                version_dir = untuned_version_dir(self.settings)
                bundle = self._bundle("untuned", version_dir, {
                    "encoder": str(self.settings.base_folder()), "onnx": str(version_dir),
                    "max_length": self.settings.max_length})
                self._shared["untuned"] = (self.dataset, bundle)
            self.bundles["untuned"] = bundle
        return self.bundles["untuned"]

    def finetuned(self) -> EncoderBundle:
        """The fine-tuned encoder; the base one itself when fine-tuning kept the starting weights (no
        checkpoint improved validation retrieval): the same vectors, so its index, replays and
        tuning are the base encoder's, not computed again."""
        if "finetuned" not in self.bundles:
            version_dir, info = self._finetune()
            # The run's tensors (the catalogue's frozen states above all, ~10k small ones) leave
            # their memory free in the C heap, resident for the rest of the evaluation otherwise.
            gc.collect()
            release_free_heap()
            if kept_base_weights(info) or info.get("skipped"):
                base = self.untuned()
                why = info.get("skipped") or "no checkpoint improved the encoder's validation retrieval"
                self.settings.say(f"{self.split.protocol}: fine-tuning kept the base weights ({why}): the fine-tuned "
                                  f"variants use the base encoder")
                self.bundles["finetuned"] = EncoderBundle(base.name, base.encoder, base.version_dir, base.item_vectors,
                                                          {**base.info, "finetune": info, "kept_base_weights": True},
                                                          base.calls)
            else:
                self.bundles["finetuned"] = self._bundle("finetuned", version_dir, info)
        return self.bundles["finetuned"]

    def encoder_choice(self) -> tuple[EncoderBundle, str]:
        """(the encoder the pipeline would serve, why). The fine-tuned one only when (1) its own
        retrieval on the validation window improved (NDCG@10, the base encoder's measured on the
        same queries), and (2) the blend over it, tuned on the tuning task as chronorec-finetuned-time
        is, beats the blend over the base encoder (chronorec-untuned-time) with a paired bootstrap
        interval above zero (users resampled): a gain of the encoder alone that does not carry into
        the fused ranking is not worth the fine-tuned model. The two blends compare on the tuning
        task's instances neither was tuned on (tune.held_out_gain), or on those they were tuned on
        when there are no others (loo's windows, under the tuning's cap)."""
        finetuned = self.finetuned()
        info = finetuned.info.get("finetune", finetuned.info)
        before = info.get("encoder_valid_NDCG@10_before")
        after = info.get("encoder_valid_NDCG@10_after")
        if info.get("skipped"):
            reason = f"base encoder: fine-tuning was skipped ({info['skipped']})"
            bundle = self.untuned()
        elif before is None or after is None or not after > before:
            reason = (f"base encoder: the fine-tuned encoder's validation retrieval did not improve "
                      f"(NDCG@10 {_fmt(before)} -> {_fmt(after)})")
            bundle = self.untuned()
        else:
            base = TimeModelParams(history_max_events=self.settings.history_max_events)
            fused = self.tune(finetuned, base, TIME_GRID, f"{finetuned.name}-time")
            plain = self.tune(self.untuned(), base, TIME_GRID, "untuned-time")
            gain = compare_tuned_blends(fused, plain, self.dataset.user,
                                        self._held_out_gain((finetuned, fused), (self.untuned(), plain)))
            where = (f"on the {gain.instances} tuning instances neither blend was tuned on" if gain.held_out
                     else "on the tuning task")
            better = gain.low > 0
            reason = (f"{'fine-tuned' if better else 'base'} encoder: its validation retrieval improved (NDCG@10 "
                      f"{_fmt(before)} -> {_fmt(after)}); the blend over it {where} "
                      f"{gain.a:.4f} against the base encoder's {gain.b:.4f}, paired "
                      f"{gain.difference:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}]{'' if better else ': not above zero'}")
            bundle = finetuned if better else self.untuned()
        self.settings.say(f"{self.split.protocol}: {reason}")
        return bundle, reason

    def _held_out_gain(self, *blends: tuple[EncoderBundle, Any]):
        """tune.held_out_gain of two (encoder, tuning) blends on the tuning task (None: no instance
        is left that neither was tuned on, or a tuning that did not keep its instances' positions)."""
        if any(tuning.positions is None for _, tuning in blends):
            return None
        rankers = []
        for bundle, tuning in blends:
            # Scored as the test window is (in two processes when the settings allow).
            ranker = ChronorecRanker(self, bundle, tuning.params, {})
            ranker.fit(self.tuning.train, self.dataset)
            rankers.append(ranker)
        return held_out_gain(*rankers, self.tuning.instances, [t.positions for _, t in blends],
                             self.settings.tune_max_instances, self.settings.seed, batch_size=HELD_OUT_BATCH)

    def ranker_fit(self, bundle: EncoderBundle, params: TimeModelParams, key: str, tuned: np.ndarray | None = None):
        """The learned ranker over `bundle` and the tuned blend `params`, trained once per key (`tuned`:
        the positions of the instances `params` were tuned on, train_ranker's `tuned`)."""
        if key not in self.ranker_fits:
            from chronorec.trainer.ranker_train import slices_of, train_ranker

            s = self.settings
            temporal = isinstance(self.split, TemporalSplit)
            options = ({"training_slices": s.ranker_slices, "returning_slices": s.ranker_returning_slices}
                       if temporal else {"per_user": s.ranker_loo_events_per_user})
            training, validation = slices_of(self.split, **options)
            config = RankerTrainingConfig(candidates=s.ranker_candidates, second_look=s.ranker_second_look,
                                          negatives=s.ranker_negatives, learning_rate=s.ranker_learning_rate,
                                          early_stopping_rounds=s.ranker_early_stopping_rounds,
                                          max_rounds=s.ranker_max_rounds,
                                          max_groups_per_slice=s.ranker_groups_per_slice if temporal
                                          else s.ranker_loo_groups,
                                          max_valid_groups=s.ranker_valid_groups,
                                          max_item_scores_per_slice=s.ranker_max_item_scores,
                                          route_trend_after_s=None if s.ranker_trend_after_days is None
                                          else s.ranker_trend_after_days * 86400.0,
                                          collect_workers=s.replay_workers, seed=s.seed)
            s.say(f"{self.split.protocol}: training the learned ranker over the {bundle.name} encoder "
                  f"({len(training)} training windows, validation: {self.tuning.name})")
            def fitted(feature_slice):
                # The validation window's co-occurrence is the tuning task's (the same events).
                same = np.array_equal(feature_slice.fit, self.tuning.train)
                return self.cooccurrence("tuning") if same else None

            with blas_threads(s.blas_threads):
                self.ranker_fits[key] = train_ranker(
                    self.dataset, self.items, bundle.encode, bundle.item_vectors, params, training, validation,
                    config, say=lambda m: s.say(f"{self.split.protocol}: {m}"), index=self.index(bundle),
                    fitted=fitted, tuned=tuned)
        return self.ranker_fits[key]

    def training_examples(self, pick=None):
        """(train, validation) examples: targets in the training part; validation = the tuning targets
        (`pick`: build_examples's, which of them to write)."""
        from chronorec.trainer.data import TargetPositions, TimeWindows, build_examples, event_log_from

        split, d = self.split, self.dataset
        if isinstance(split, TemporalSplit):
            # Training targets: before the inner cutoff; validation: the inner split's window; the
            # test window (from split.n_train on) is never read.
            valid_begin = int(self.tuning.train.size)
            windows = TimeWindows(
                train_begin=0, valid_begin=valid_begin, test_begin=split.n_train, n_events=d.n_events,
                train_start=float(d.ts[0]), valid_start=float(d.ts[valid_begin]), test_start=split.cutoff,
                end=float(d.ts[-1]),
            )
        elif isinstance(split, LooSplit):
            windows = TargetPositions.of(split.train, split.validation.pos)
        else:
            raise TypeError(f"unknown split {type(split).__name__}")
        # event_log_from orders events as the Dataset does (time, then file order): positions agree.
        return build_examples(event_log_from(list(self.items.values()), d.events), windows,
                              max_events=self.settings.history_max_events,
                              pick=pick)

    def _finetune(self) -> tuple[Path | None, dict]:
        """(the fine-tuned version's folder, what the run did): the folder is None when keep-best
        chose the starting weights, which are the base model already exported, so only the outcome
        is stored (KEPT_BASE_RECORD in the run's cache folder), not an identical copy of the model; and
        None with `skipped` saying why when the training window holds no example to learn from."""
        from chronorec.trainer.finetune import FinetuneConfig, encoder_retrieval_metrics, train_encoder

        s = self.settings
        budget = s.finetune_examples or s.finetune_steps * s.finetune_batch_size
        # Only the examples used are written (a history text each): the training budget, and the
        # validation examples of the two halves below (one chooses the checkpoint, one measures).
        drawn: dict[str, Any] = {}

        def pick(n_train: int, n_valid: int):
            if s.finetune_whole_window and budget < n_train:
                train_rows = np.random.default_rng(s.seed).choice(n_train, budget, replace=False)
            else:  # the newest `budget` (build_examples lists them in the global order)
                train_rows = range(max(0, n_train - budget), n_train) if budget > 0 else range(0)
            order = np.random.default_rng(s.seed).permutation(n_valid).tolist()
            half = n_valid // 2 if s.finetune_keep_best else 0
            drawn.update(n_valid=n_valid, selection=order[:half][: s.finetune_valid_queries],
                         sample=order[half:][: s.finetune_valid_queries])
            return train_rows, drawn["selection"] + drawn["sample"]

        train, picked_valid = self.training_examples(pick)
        if not train:
            return None, {"skipped": "no training examples to fine-tune on"}
        d = self.dataset
        base = s.base_folder().resolve()
        config = FinetuneConfig(
            steps=s.finetune_steps, batch_size=s.finetune_batch_size, lr=s.finetune_lr,
            temperature=s.finetune_temperature, hard_negatives=s.hard_negatives, seed=s.seed,
            max_valid_queries=s.finetune_valid_queries,
            max_length=s.max_length, device="auto",
            progress=None if s.progress is None else s.progress,
            time_negatives=s.finetune_time_negatives, distill_weight=s.finetune_distill,
            logq_correction=s.finetune_logq,
        )
        fingerprint = _digest(
            "finetune-v3", s.finetune_keep_best, str(base), self.split.protocol, d.user, d.item, d.ts, self.item_ids,
            [self.item_text_of(i) for i in self.item_ids], self.tuning.train, self.tuning.instances.pos,
            [(e.position, e.query) for e in train], {k: v for k, v in asdict(config).items() if k != "progress"},
        )
        root = s.cache_root() / f"finetuned-{self.split.protocol}-{fingerprint}"
        kept_record = root / KEPT_BASE_RECORD
        if s.reuse_cache and kept_record.is_file():
            try:
                info = dict(json.loads(kept_record.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                info = {}  # unreadable: fine-tune again and write it anew
            if kept_base_weights(info):
                s.say(f"{self.split.protocol}: reusing the fine-tuning outcome {kept_record} (same data, split and "
                      f"settings): the base weights were kept")
                info["reused_from_cache"] = True
                return None, info
        repo, version = _load_version(root)
        if version is not None and s.reuse_cache:
            s.say(f"{self.split.protocol}: reusing the fine-tuned encoder {root} (same data, split and settings)")
            from chronorec.server.core.manifest import load_manifest

            info = dict(load_manifest(repo.version_dir(version)).extra.get("evaluation", {}))
            info["reused_from_cache"] = True
            return repo.version_dir(version), info
        s.say(f"{self.split.protocol}: fine-tuning {base} on {len(train)} training examples "
              f"({config.steps} steps of {config.batch_size}, max_length {config.max_length}); "
              f"{drawn['n_valid']} validation examples")
        item_texts = {i: self.item_text_of(i) for i in self.item_ids}
        # The validation window's examples, shuffled once: one half chooses the checkpoint (with
        # keep_best), the other measures the encoder before and after, so the reported gain is not
        # the maximum of the checkpoints' noise.
        valid_at = dict(zip(sorted(set(drawn["selection"] + drawn["sample"])), picked_valid))
        selection = [valid_at[k] for k in drawn["selection"]]
        sample = sorted((valid_at[k] for k in drawn["sample"]), key=lambda e: e.position)

        def retrieval(module, tokenizer, encode) -> dict:
            if not sample:
                return {}
            return encoder_retrieval_metrics(module, tokenizer, sample, item_texts, max_length=s.max_length,
                                             encode=encode)

        started = time.perf_counter()
        negatives = None
        if s.finetune_time_negatives > 0:
            from chronorec.trainer.finetune import trending_negatives

            negatives = trending_negatives(train, d)
        # The starting weights' catalogue pass (its frozen layers' states and vectors) is the same for
        # both protocols' runs: the second reads what the first wrote (~17 s on 9,742 items).
        import torch

        start = s.cache_root() / "finetune-start" / (_digest(
            "finetune-start-v1", str(base), s.seed, s.finetune_train_layers, s.max_length, torch.__version__,
            list(item_texts.values())) + ".pt")
        trained = train_encoder(base, train, selection, item_texts, config, train_layers=s.finetune_train_layers,
                                run_tag=fingerprint, measure=retrieval, negatives=negatives,
                                start_cache=start if s.reuse_cache else None)
        result, before, after = trained.result, trained.measured_before, trained.measured_after
        info = {
            "encoder": str(base), "max_length": s.max_length, "train_examples": len(train),
            "train_window": [float(train[0].timestamp), float(train[-1].timestamp)],
            "valid_queries": len(sample), "finetune_s": round(time.perf_counter() - started, 2),
            "trained_layers": trained.trained_layers, "steps": result.steps, "lr": s.finetune_lr,
            "best_step": result.best_step if selection else result.steps, "selection_queries": len(selection),
            "whole_window": s.finetune_whole_window, "time_negatives": s.finetune_time_negatives,
            "distill": s.finetune_distill, "logq": s.finetune_logq,
            "examples_per_second": round(result.examples_per_second, 2),
            "encoder_valid_before": before, "encoder_valid_after": after,
            "encoder_valid_NDCG@10_before": before.get("NDCG@10"), "encoder_valid_NDCG@10_after": after.get("NDCG@10"),
            "reused_from_cache": False,
        }
        s.say(f"{self.split.protocol}: fine-tuned in {info['finetune_s']:.0f} s; encoder-only retrieval on "
              f"{len(sample)} validation queries: " + ", ".join(
                  f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in ("HR@10", "NDCG@10", "NDCG@20") if k in before))
        if kept_base_weights(info):
            root.mkdir(parents=True, exist_ok=True)
            _write_atomically(kept_record, json.dumps(info, sort_keys=True, default=str))
            return None, info
        version = trained.publish(repo, base_model=str(base), max_length=s.max_length, activate=True,
                                  extra={"evaluation": info},
                                  training_window={"protocol": self.split.protocol, "fingerprint": fingerprint})
        return repo.version_dir(version), info

    # -- replays and tuning

    def cooccurrence(self, which: str):
        """The server's co-occurrence model fitted on the tuning task's or the test task's training events."""
        if which not in self._cooccurrence:
            task = self.tuning if which == "tuning" else self.split.test_task()
            self._cooccurrence[which] = fit_cooccurrence(self.dataset, task.train, self.item_ids)
        return self._cooccurrence[which]

    def index(self, bundle: EncoderBundle):
        """The item index of `bundle`'s vectors, built once for every replay of that encoder (and,
        like the base encoder's vectors, once for both splits: the same vectors give the same index)."""
        if bundle.name not in self._indexes:
            shared = self._shared.setdefault("indexes", {})
            key = (id(self.dataset), id(bundle.item_vectors))
            if key not in shared:
                # The vectors are held with their index, so their id names them while it is kept.
                shared[key] = (bundle.item_vectors, build_index(self.item_ids, bundle.item_vectors))
            self._indexes[bundle.name] = shared[key][1]
        return self._indexes[bundle.name]

    def tuning_replay(self, bundle: EncoderBundle) -> RankerReplay:
        if bundle.name not in self._replays:
            self._replays[bundle.name] = RankerReplay(
                self.dataset, self.items, self.tuning.train, bundle.encode, item_vectors=bundle.item_vectors,
                cooccurrence=self.cooccurrence("tuning"), index=self.index(bundle))
        return self._replays[bundle.name]

    def tune(self, bundle: EncoderBundle, base: TimeModelParams, grid: TuningGrid, key: str):
        if key not in self.tunings:
            replay = self.tuning_replay(bundle)
            s = self.settings
            s.say(f"{self.split.protocol}: fitting the {key} time model on {self.tuning.name} "
                  f"({min(len(self.tuning.instances), s.tune_max_instances or 10**12)} instances)")
            with blas_threads(s.blas_threads):
                self.tunings[key] = tune_time_model(replay, self.tuning.instances, base, grid,
                                                    max_instances=s.tune_max_instances, seed=s.seed,
                                                    replay_workers=s.replay_workers)
        return self.tunings[key]


# ------------------------------------------------------------------------------- ranker


class ChronorecRanker:
    """A protocols.Ranker that is `tune.ReplayRanker` (the server's TimeAwareRanker, exhaustive) with
    one served encoder and one time model, plus what the report shows about it (`params`).

    `repeatable`: another variant may be this same ranker (the time-tuned ones: finetuned-time when
    fine-tuning kept the base weights, chronorec-blend), so its test rank counts are kept for it to
    read back.
    """

    def __init__(self, ctx: SplitContext, bundle: EncoderBundle, params: TimeModelParams, report: dict,
                 sweeps: Mapping[str, Sequence[float]] | None = None, repeatable: bool = False):
        self.ctx = ctx
        self.repeatable = repeatable
        self.settings = ctx.settings
        self.bundle = bundle
        self.time_model = params
        self.replay_ranker = ReplayRanker(bundle.encode, ctx.items, params, item_vectors=bundle.item_vectors)
        self.report = dict(report)
        self.sweeps = dict(sweeps or {})
        self.sweep_results: dict[str, dict] = {}
        self._on_test_task = False  # fitted on the split's own training events (fit)

    @property
    def params(self) -> dict:
        out = {**self.time_model.to_dict(), **self.report}
        if self.sweep_results:
            out["sweeps"] = self.sweep_results
        return out

    def fit(self, train: np.ndarray, dataset: Dataset) -> None:
        ctx = self.ctx
        self._on_test_task = dataset is ctx.dataset and np.array_equal(train, ctx.split.test_task().train)
        if self._on_test_task:
            # The split's own training events: the encoder's index and the co-occurrence fitted on
            # them are shared by every variant (each variant keeps its own history-text vectors).
            self.replay_ranker.fit(train, dataset, index=ctx.index(self.bundle), cooccurrence=ctx.cooccurrence("test"))
        elif dataset is ctx.dataset and np.array_equal(train, ctx.tuning.train):
            # The tuning task's (SplitContext._held_out_gain): its co-occurrence is fitted already.
            self.replay_ranker.fit(train, dataset, index=ctx.index(self.bundle), cooccurrence=ctx.cooccurrence("tuning"))
        else:
            self.replay_ranker.fit(train, dataset)
        if self.sweeps:
            self._run_sweeps()

    @property
    def reads_history_text(self) -> bool:
        """Whether the ranker encodes the history text (α > 0 and a semantic weight)."""
        return self.time_model.alpha > 0 and self.time_model.w_semantic > 0

    def score_batch(self, instances: Instances) -> np.ndarray:
        with blas_threads(self.settings.blas_threads):
            scorer = None if self.replay_ranker.per_event else self.replay_ranker.replay.scorer()
            if scorer is not None:
                # A time model that never reads the history text encodes none ahead (the ranker
                # then encodes one only for a user none of whose items has a vector).
                return scorer.score_rows(instances, self.time_model, prime=self.reads_history_text)
            if self.reads_history_text:
                return self.replay_ranker.score_batch(instances)
            # ReplayRanker.score_batch without its batch pre-encoding of history texts, which
            # this time model never reads: the same ranker calls, minus thousands of encodings.
            replay = self.replay_ranker.replay
            scores = np.full((len(instances), replay.dataset.n_items), -np.inf)
            for row, user_id, at in replay.walk(instances):
                scored = replay.score(user_id, at, self.time_model)
                scores[row, replay.columns_of(scored.item_ids)] = scored.score
            return scores

    def rank_counts_all(self, instances: Instances, batch_size: int,
                        progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What the evaluation computes from score_batch's rows, batch after batch
        (protocols.batched_rank_counts). The same encoder, time model and instances give the same
        rows: a variant that repeats an earlier one (chronorec-blend is one of the time-aware
        variants) reads the earlier one's counts back."""
        if not self._on_test_task or self.replay_ranker.per_event or not self.repeatable:
            return self._counts_beside(instances, batch_size, progress)
        key = (self.bundle.name, id(self.bundle.item_vectors), self.time_model, batch_size, _digest(instances.pos))
        counts = self.ctx.test_counts.get(key)
        if counts is None:
            counts = self.ctx.test_counts[key] = self._counts_beside(instances, batch_size, progress)
        elif progress is not None:
            progress(len(instances))
        return counts[0].copy(), counts[1].copy()

    def _counts(self, instances: Instances, batch_size: int,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return batched_rank_counts(lambda batch: batch_rank_counts(self.score_batch(batch), batch), instances,
                                   batch_size, progress)

    def _counts_beside(self, instances: Instances, batch_size: int,
                       progress: Callable[[int], None] | None) -> tuple[np.ndarray, np.ndarray]:
        """_counts(instances), the later instances scored in one forked process when `replay_workers`
        allow. The blend's chunks read no replayed state and the split falls on a chunk boundary
        (both parts are batched from a multiple of the chunk size, so their chunks are one pass's),
        so each part is scored as one pass scores it, and an instance's counts read only its own
        row. The history texts are encoded here first, batch by batch as one pass encodes them;
        a child that needs the encoder fails, and its part is then scored here. The learned
        ranker's rerank is not split: its child would need every text of its part encoded here
        first, where the walk encodes only the reranked quarter, and that ate the gain
        (ml-latest-small temporal: 15.9 s in one process, 15.4 s in two)."""
        replay = self.replay_ranker.replay
        n, split = len(instances), batch_replay.chunk_split(len(instances))
        if (replay is None or self.replay_ranker.per_event or self.replay_ranker.learned_ranker is not None
                or split is None or batch_size % batch_replay.CHUNK_INSTANCES
                or workers_for(self.settings.replay_workers) < 2):
            return self._counts(instances, batch_size, progress)
        if self.reads_history_text:
            # Every batch's texts, in the calls one pass makes (an encoder's vectors depend on the
            # texts encoded with them, slightly), before the fork: the child then only reads them.
            scorer = replay.scorer()
            for start in range(0, n, batch_size):
                scorer.prime(instances[start:start + batch_size], self.time_model)
        (better, tied), (later_better, later_tied) = beside(
            functools.partial(self._counts, instances[:split], batch_size, progress),
            functools.partial(self._counts, instances[split:], batch_size),
            name="test scoring", in_child=refusing_encoder(replay))
        if progress is not None:
            progress(n - split)
        return np.concatenate([better, later_better]), np.concatenate([tied, later_tied])

    # -- sensitivity on the test window (analysis only)

    def _sweep_per_event(self, instances: Instances, settings: list, better: np.ndarray, tied: np.ndarray) -> None:
        """The sweeps' counts with one ranker call per event and setting (a ranker with a learned model)."""
        replay = self.replay_ranker.replay
        n_items = self.ctx.dataset.n_items
        excluded = exclusion_mask(instances)
        replay.prime(instances, self.time_model)
        for row, user_id, at in replay.walk(instances):
            for k, (_, _, _, params) in enumerate(settings):
                scored = replay.score(user_id, at, params)
                scores = np.full(n_items, -np.inf)
                scores[replay.columns_of(scored.item_ids)] = scored.score
                counts = rank_counts(scores[None, :], np.array([instances.target[row]]), excluded[row][None, :])
                better[k, row], tied[k, row] = counts[0][0], counts[1][0]

    def _sweep_counts(self, scorer, instances: Instances, texts, settings: list[TimeModelParams]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(better, tied) of each setting (row) on each instance (column), through the batch replay:
        instance by instance, every setting, only the two counts kept per setting (the settings
        share the instance's user vectors and co-occurrence: ReplayChunk's memo)."""
        n_items = self.ctx.dataset.n_items
        better = np.zeros((len(settings), len(instances)), dtype=np.int64)
        tied = np.zeros_like(better)
        for part, chunk in scorer.chunks(instances, texts):
            excluded = exclusion_mask(chunk.instances)
            for i in range(len(chunk)):
                row = part.start + i
                target = instances.target[row]
                rows = chunk.rows_kept(i)
                target_row = scorer.row_of_column[target]
                at = int(np.searchsorted(rows, target_row))
                returned = target_row >= 0 and at < len(rows) and rows[at] == target_row
                for k, params in enumerate(settings):
                    score = chunk.candidates(i, params, components=False).score
                    if returned:
                        # What rank_counts gives on the full row: the other items score -inf
                        # or are history items, excluded, so only the candidates count.
                        better[k, row] = np.count_nonzero(score > score[at])
                        tied[k, row] = np.count_nonzero(score == score[at]) - 1
                        continue
                    scores = np.full(n_items, -np.inf)
                    scores[chunk.columns_kept(i)] = score
                    counts = rank_counts(scores[None, :], np.array([target]), excluded[i][None, :])
                    better[k, row], tied[k, row] = counts[0][0], counts[1][0]
        return better, tied

    def _run_sweeps(self) -> None:
        s = self.settings
        instances = self.ctx.split.test_task().instances
        rng = np.random.default_rng(s.seed)
        cap = s.sweep_max_instances
        if s.sweep_max_item_scores is not None:
            by_size = max(1, s.sweep_max_item_scores // max(1, self.ctx.dataset.n_items))
            cap = by_size if cap is None else min(cap, by_size)
        if cap is not None and len(instances) > cap:
            instances = instances[np.sort(rng.choice(len(instances), cap, replace=False))]
        settings: list[tuple[str, str, float, TimeModelParams]] = []
        semantic_only = self.time_model.with_overrides(SEMANTIC_ONLY)
        for parameter, values in self.sweeps.items():
            for value in values:
                settings.append((parameter, "tuned score", value, self.time_model.with_overrides({parameter: value})))
                if parameter in ("alpha", "long_term_half_life_days"):
                    settings.append((parameter, "semantic only", value, semantic_only.with_overrides({parameter: value})))
                elif parameter == "cooccurrence_half_life_days":
                    settings.append((parameter, "co-occurrence only", value, self.time_model.with_overrides(
                        {"w_semantic": 0.0, "w_cooccurrence": 1.0, "w_freshness": 0.0, "w_trend": 0.0, parameter: value})))
        s.say(f"{self.ctx.split.protocol}: sweeps, {len(settings)} settings on {len(instances)} test instances")
        started = time.perf_counter()
        replay = self.replay_ranker.replay
        better = np.zeros((len(settings), len(instances)), dtype=np.int64)
        tied = np.zeros_like(better)
        with blas_threads(s.blas_threads):
            scorer = None if self.replay_ranker.per_event else replay.scorer()
            if scorer is None:
                self._sweep_per_event(instances, settings, better, tied)
            else:
                texts = scorer.prime(instances, self.time_model)
                params = [p for _, _, _, p in settings]
                half = len(params) // 2
                if workers_for(s.replay_workers) < 2 or half < 1:
                    better[:], tied[:] = self._sweep_counts(scorer, instances, texts, params)
                else:
                    # Each setting's counts read only that setting's scores: half the settings in a
                    # forked process (the texts are encoded already).
                    counted = beside(
                        functools.partial(self._sweep_counts, scorer, instances, texts, params[:half]),
                        functools.partial(self._sweep_counts, scorer, instances, texts, params[half:]),
                        name="sweeps", in_child=refusing_encoder(replay))
                    for (b, t), rows in zip(counted, (slice(0, half), slice(half, None))):
                        better[rows], tied[rows] = b, t
        values: dict[tuple[str, str], list[np.ndarray]] = {}
        for s, (parameter, label, _, _) in enumerate(settings):
            values.setdefault((parameter, label), []).append(expected_metrics(better[s], tied[s])[SWEEP_METRIC])
        for parameter, grid in self.sweeps.items():
            series = {}
            for (p, label), per_value in values.items():
                if p != parameter:
                    continue
                series[label] = [
                    {k: v for k, v in summarize({SWEEP_METRIC: m}, instances.user, names=(SWEEP_METRIC,))[SWEEP_METRIC].items()
                     if k in ("mean", "ci95")}
                    for m in per_value
                ]
            self.sweep_results[parameter] = {
                "values": list(grid), "log_x": parameter != "alpha", "metric": SWEEP_METRIC,
                "instances": len(instances), "window": "test (sensitivity only; the model was chosen on validation)",
                "chosen": float(getattr(self.time_model, parameter)), "series": series,
            }
        self.report["sweep_s"] = round(time.perf_counter() - started, 1)


class LearnedChronorecRanker(ChronorecRanker):
    """chronorec-ranker: the serving TimeAwareRanker with the version's learned ranker, replayed.

    As `chronorec-train run` ships a learned ranker only when it beats the blend on the validation
    window (RankerFit.helps), a ranker that does not is left out here too: the version would serve
    the blend, and so does this variant (its report says `ranker.used` false): it is then
    chronorec-blend itself, scored as that is (and its test counts read back from it)."""

    def __init__(self, ctx: SplitContext, bundle: EncoderBundle, params: TimeModelParams, fit, report: dict):
        super().__init__(ctx, bundle, params, report, repeatable=not fit.helps)
        self.ranker_fit = fit
        self.replay_ranker.learned_ranker = fit.ranker if fit.helps else None
        # A target the learned ranker cannot reach keeps the blend's rank: its rerank is skipped
        # (ReplayRanker._score_learned; every metric is the same).
        self.replay_ranker.rerank_reachable_only = True

    @property
    def params(self) -> dict:
        # The ranker's summary is read once the test window is scored: its importances by gap are
        # computed beside the scoring (ranker_train.importances_beside).
        return {**super().params, **_ranker_report(self.ranker_fit)}

    def score_batch(self, instances: Instances) -> np.ndarray:
        if self.replay_ranker.learned_ranker is None:
            # The blend serves: its batch scoring, which encodes only the history texts it reads
            # (a forked half of the test window is handed none to encode).
            return super().score_batch(instances)
        # One ranker call per instance: the learned ranker reorders each one's own candidates.
        with blas_threads(self.settings.blas_threads):
            return self.replay_ranker.score_batch(instances)


# ------------------------------------------------------------------------------ methods


def kept_base_weights(info: Mapping[str, Any]) -> bool:
    """Whether a fine-tuning run (its evaluation info) ended on its starting weights: keep-best chose
    the validation before the first step."""
    return bool(info.get("selection_queries")) and info.get("best_step") == 0


def _encoder_report(bundle: EncoderBundle) -> dict:
    """Scalars for the report's parameter line; the rest (paths, timings) nested, JSON only."""
    out = {"encoder": "fine-tuned" if bundle.name == "finetuned" else "untuned",
           "max_length": bundle.info.get("max_length"), "encoder_info": dict(bundle.info)}
    if bundle.info.get("kept_base_weights"):
        finetune = bundle.info["finetune"]
        out["encoder"] = "untuned (fine-tuning kept the base weights)"
        out["finetune_steps"] = finetune.get("steps")
        out["encoder_only_valid_NDCG@10"] = [finetune.get("encoder_valid_NDCG@10_before"),
                                              finetune.get("encoder_valid_NDCG@10_after")]
    if bundle.name == "finetuned":
        out["finetune_steps"] = bundle.info.get("steps")
        out["encoder_only_valid_NDCG@10"] = [bundle.info.get("encoder_valid_NDCG@10_before"),
                                              bundle.info.get("encoder_valid_NDCG@10_after")]
    return out


def _ranker_report(fit) -> dict:
    return {"ranker": {**fit.summary(), "used": fit.helps},
            "ranker_valid_NDCG@10": [round(fit.valid_ndcg_blend, 5), round(fit.valid_ndcg_ranker, 5)]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _tuning_report(tuning) -> dict:
    return {"tuning": {**tuning.summary(), "trace": tuning.trace}, "tuned_on": "validation window (tuning task)"}


class ChronorecMethods:
    """chronorec's variants for one evaluation: its settings, and per split the context they share
    (encoders, co-occurrence, tunings), so each is built once whichever variants run."""

    def __init__(self, settings: EvalSettings | None = None):
        self.settings = settings or EvalSettings()
        self._contexts: dict[str, SplitContext] = {}
        self._shared: dict = {}

    def context(self, split: Split) -> SplitContext:
        """The context of `split`. Only one is held: the evaluation runs one split's methods after
        the other's, and a finished split's encoders, replays and models are ~1 GB on a 10k-item
        catalogue. What both splits share (the base encoder's item vectors) is kept."""
        ctx = self._contexts.get(split.protocol)
        if ctx is None or ctx.split is not split:
            self._contexts.clear()
            ctx = self._contexts[split.protocol] = SplitContext(split, self.settings, self._shared)
        return ctx

    def end_split(self, split: Split) -> None:
        """The evaluation is done with `split`: its context goes now, not when the next split's first
        chronorec variant runs (after the baselines, whose peak memory it would add to)."""
        ctx = self._contexts.get(split.protocol)
        if ctx is not None and ctx.split is split:
            del self._contexts[split.protocol]

    def factories(self) -> dict[str, MethodFactory]:
        """The variants by their `chronorec-eval` names."""
        return {
            "chronorec-untuned-mean": self.untuned_mean,
            "chronorec-untuned-decay": self.untuned_decay,
            "chronorec-untuned-time": self.untuned_time,
            "chronorec-finetuned-time": self.finetuned_time,
            "chronorec-finetuned-blind": self.finetuned_blind,
            "chronorec-blend": self.blend,
            "chronorec-ranker": self.ranker,
        }

    def _semantic_only(self, split: Split, params: TimeModelParams) -> ChronorecRanker:
        ctx = self.context(split)
        bundle = ctx.untuned()
        return ChronorecRanker(ctx, bundle, replace(params, history_max_events=self.settings.history_max_events),
                               _encoder_report(bundle))

    def untuned_mean(self, split: Split) -> ChronorecRanker:
        return self._semantic_only(split, UNTUNED_MEAN)

    def untuned_decay(self, split: Split) -> ChronorecRanker:
        return self._semantic_only(split, UNTUNED_DECAY)

    def untuned_time(self, split: Split) -> ChronorecRanker:
        ctx = self.context(split)
        bundle = ctx.untuned()
        base = TimeModelParams(history_max_events=self.settings.history_max_events)
        tuning = ctx.tune(bundle, base, TIME_GRID, "untuned-time")
        return ChronorecRanker(ctx, bundle, tuning.params, {**_encoder_report(bundle), **_tuning_report(tuning)},
                               repeatable=True)

    def finetuned_time(self, split: Split) -> ChronorecRanker:
        ctx = self.context(split)
        bundle = ctx.finetuned()
        base = TimeModelParams(history_max_events=self.settings.history_max_events)
        # "untuned-time" when fine-tuning kept the base weights: the same encoder, the same tuning.
        tuning = ctx.tune(bundle, base, TIME_GRID, f"{bundle.name}-time")
        return ChronorecRanker(ctx, bundle, tuning.params, {**_encoder_report(bundle), **_tuning_report(tuning)},
                               sweeps=SWEEPS if self.settings.sweeps else None, repeatable=True)

    def finetuned_blind(self, split: Split) -> ChronorecRanker:
        ctx = self.context(split)
        bundle = ctx.finetuned()
        base = replace(BLIND, history_max_events=self.settings.history_max_events)
        tuning = ctx.tune(bundle, base, BLIND_GRID, "finetuned-blind")
        return ChronorecRanker(ctx, bundle, tuning.params, {**_encoder_report(bundle), "time": "removed (see BLIND)",
                                                            **_tuning_report(tuning)})


    def _chosen_blend(self, split: Split):
        ctx = self.context(split)
        bundle, why = ctx.encoder_choice()
        base = TimeModelParams(history_max_events=self.settings.history_max_events)
        # The same key as untuned-time / finetuned-time: the encoder chosen is one of those two.
        tuning = ctx.tune(bundle, base, TIME_GRID, f"{bundle.name}-time")
        return ctx, bundle, tuning, {**_encoder_report(bundle), "encoder_choice": why, **_tuning_report(tuning)}

    def blend(self, split: Split) -> ChronorecRanker:
        ctx, bundle, tuning, report = self._chosen_blend(split)
        return ChronorecRanker(ctx, bundle, tuning.params, report, repeatable=True)

    def ranker(self, split: Split) -> ChronorecRanker:
        ctx, bundle, tuning, report = self._chosen_blend(split)
        fit = ctx.ranker_fit(bundle, tuning.params, f"{bundle.name}-time", tuned=tuning.positions)
        return LearnedChronorecRanker(ctx, bundle, tuning.params, fit, report)


def evaluation_methods(settings: Mapping[str, Any]) -> dict[str, MethodFactory]:
    """The plugin's entry for `chronorec-eval --plugin`: the variants of one evaluation, built with
    its settings (`--settings` / CHRONOREC_EVAL_SETTINGS); the cache folder defaults to
    $CHRONOREC_EVAL_CACHE."""
    overrides = dict(settings)
    if not overrides.get("cache_dir") and os.environ.get(CACHE_ENV):
        overrides["cache_dir"] = os.environ[CACHE_ENV]
    return ChronorecMethods(EvalSettings().with_overrides(**overrides)).factories()


__all__ = [
    "BLIND",
    "BLIND_GRID",
    "CACHE_ENV",
    "ChronorecMethods",
    "ChronorecRanker",
    "EvalSettings",
    "LearnedChronorecRanker",
    "SWEEPS",
    "SplitContext",
    "TIME_GRID",
    "blas_threads",
    "evaluation_methods",
]
