"""`chronorec-train run`: learn from the logged feedback, evaluate against the serving model, publish, gate.

One run reads the server's SQLite event log read-only (the server may keep writing), fine-tunes
the encoder on point-in-time (history text → next item) pairs, tunes the time model on the
validation window, evaluates the candidate and the serving version on the same latest window
(the temporal protocol, full ranking through the server's own ranking code), publishes the
candidate as a new version (ONNX, parity-checked) and activates it only when it is at least as
good. The running server notices the new CURRENT pointer and hot-swaps.

Canary (`--canary 10`): instead of switching everyone, the candidate that passed the gate serves
10 % of users (a stable hash of the user id) beside the serving version; every server on the
repository starts it within its watch interval. Each server then applies the rule: once both
versions logged --canary-min-impressions impressions since the canary began, the candidate is
promoted when its online CTR >= the serving version's CTR - --canary-max-ctr-drop, else the canary
is aborted and everyone returns to the serving version. While a canary runs, a run publishes its
candidate without starting another (exit 2).

Exit codes (for cron, systemd and scripts):
    0  published and activated (or started as a canary)
    1  failed (nothing was activated; a half-written version is never visible)
    2  published but gated: the candidate is kept as a version, the serving one stays
    3  nothing new to learn from (no event since the serving version's data)

Weights: a run continues from the fine-tuned weights of the serving version, kept as a Hugging
Face folder in <models>/checkpoints/<version>/ (the served ONNX graph cannot be trained), else
from the base model the manifest names (a local folder, or the packaged MiniLM); `--from-base`
starts over. An interrupted run resumes its fine-tuning from <models>/checkpoints/.in-progress/.

Once:
    chronorec-train run --db var/chronorec.db --models var/models

Every 30 minutes in the foreground (a failed run is logged and the loop goes on):
    chronorec-train run --db var/chronorec.db --models var/models --every 30m

cron (hourly; flock skips a run while the previous one is still going):
    0 * * * *  cd /srv/chronorec && flock -n var/train.lock .venv/bin/chronorec-train run \
               --db var/chronorec.db --models var/models >> var/train.log 2>&1

systemd (a oneshot service never overlaps itself; 2 and 3 are not failures):
    # /etc/systemd/system/chronorec-train.service
    [Service]
    Type=oneshot
    WorkingDirectory=/srv/chronorec
    ExecStart=/srv/chronorec/.venv/bin/chronorec-train run --db var/chronorec.db --models var/models
    SuccessExitStatus=2 3
    Nice=10
    # /etc/systemd/system/chronorec-train.timer
    [Timer]
    OnCalendar=hourly
    Persistent=true
    [Install]
    WantedBy=timers.target
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from chronorec.server.core.canary import CanaryPlan, CanaryPolicy, check_percent, read_plan, write_plan
from chronorec.server.core.manifest import TOKENIZER_MAX_LENGTH, Manifest, TimeModelParams, load_manifest
from chronorec.trainer.base_model import MINILM_NAME, resolve_base_folder
from chronorec.trainer.flags import add_settings_flags, setting, settings_from_args
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.stores import store_target

log = logging.getLogger(__name__)

ENV_PREFIX = "CHRONOREC_TRAIN"
EXIT_ACTIVATED = 0
EXIT_FAILED = 1
EXIT_GATED = 2
EXIT_NOTHING_NEW = 3

GATE_METRIC = "NDCG@10"
CHECKPOINTS_DIR = "checkpoints"
IN_PROGRESS_DIR = ".in-progress"
LOCK_FILE = ".trainer.lock"
# The language model alone: the short-term (history text) vector against item vectors.
ENCODER_ONLY = TimeModelParams(alpha=1.0, w_semantic=1.0, w_cooccurrence=0.0, w_freshness=0.0, w_trend=0.0)


DATA, FINETUNE, GATE = "data windows", "fine-tuning", "tuning, export and gate"
RANKER = "learned ranker"


@dataclass
class RunSettings:
    """Everything one run can be told; the defaults suit MiniLM on a small CPU machine.

    Each field is a flag of `chronorec-train run` (`--name-with-dashes`, its help below) with a
    CHRONOREC_TRAIN_<NAME> environment fallback.
    """

    test_quantile: float = setting(0.8, group=DATA, help="the test window starts at this quantile of event times")
    valid_quantile: float = setting(
        0.8, group=DATA, help="the validation window: the same rule on the events before the test window")
    train_days: float | None = setting(None, group=DATA, help="train only on the last N days before validation")
    min_new_events: int = setting(1, group=DATA, help="fewer new events than this: exit 3")
    base_model: str | None = setting(
        None, group=FINETUNE, help="start from this Hugging Face folder instead of the serving version's lineage")
    from_base: bool = setting(False, group=FINETUNE, help="start from the base model, not the serving weights")
    steps: int | None = setting(None, group=FINETUNE, help="optimizer steps (none: --epochs over the data)")
    epochs: float = setting(1.0, group=FINETUNE, help="passes over the training examples when --steps is not given")
    batch_size: int = setting(32, group=FINETUNE, help="examples per step")
    lr: float = setting(5e-5, group=FINETUNE, help="peak learning rate")
    temperature: float = setting(0.05, group=FINETUNE, help="contrastive loss temperature")
    warmup_fraction: float = setting(0.1, group=FINETUNE, help="share of the steps the learning rate warms up over")
    hard_negatives: int = setting(0, group=FINETUNE, help="hard negatives per example from the current index")
    time_negatives: int = setting(
        0, group=FINETUNE, help="negatives per example among the items trending at the example's time")
    distill: float = setting(
        0.0, group=FINETUNE, help="weight of a term keeping the vectors near the starting encoder's (0: off)")
    logq: bool = setting(
        True, group=FINETUNE, help="correct the in-batch negatives for how often each item is a positive (logQ; "
                                   "off: plain in-batch contrastive loss)")
    train_layers: int | None = setting(
        None, group=FINETUNE,
        help="train only the top N transformer layers, the rest frozen (about 2x the steps per second on CPU; "
             "none: all)")
    # With a step budget smaller than the window, the newest steps × batch examples are trained on
    # (interests drift: they are the closest to what comes next) unless the whole window is sampled.
    whole_window: bool = setting(
        False, group=FINETUNE, help="with --steps, sample the whole training window instead of the newest "
                                    "steps x batch examples")
    seed: int = setting(0, group=FINETUNE, help="seed of the sampling, the initialisation and the tuning sample")
    patience: int = setting(2, group=FINETUNE, help="validations without gain before an early stop")
    abandon_fraction: float | None = setting(
        0.5, group=FINETUNE, help="stop at once when a validation falls below this fraction of the best so far, "
                                  "the starting weights' included (none: never)")
    eval_every: int | None = setting(None, group=FINETUNE, help="steps between validations (none: 5 per run)")
    device: str = setting("auto", group=FINETUNE, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    threads: int | None = setting(
        None, group=FINETUNE, help="CPU threads for PyTorch (none: all cores; use fewer beside a busy server)")
    progress: bool | None = setting(None, group=FINETUNE, help="progress bar (none: when stderr is a terminal)")
    tune: bool = setting(True, group=GATE, help="fit the time model on the validation window (off: keep the serving "
                                               "version's)")
    max_tune_instances: int | None = setting(1000, group=GATE, help="validation instances the tuning samples")
    max_eval_instances: int | None = setting(None, group=GATE, help="test instances evaluated (none: all)")
    int8: bool | None = setting(None, group=GATE, help="also publish an int8 graph, cosine to fp32 recorded (none: "
                                                      "when the server serves int8, per the settings it recorded; "
                                                      "yes when none are recorded, as a server on its defaults)")
    threshold: float = setting(0.0, group=GATE, help=f"activate when {GATE_METRIC} >= serving's - threshold")
    force: bool = setting(False, group=GATE, help="activate even when the gate says no")
    # The vector cache is prepared as the server indexes: its settings are read from the repository.
    prepare: bool = setting(
        True, group=GATE, help="encode the catalog into the new version's vector cache before activating, with the "
                               "server's settings from the repository (off: the server encodes it during the swap)")
    keep_checkpoints: int = setting(3, group=GATE, help="versions whose trainable weights are kept")
    canary: float | None = setting(
        None, group=GATE, help="start the candidate as a canary serving this percentage of users (0-100) beside the "
                               "serving version instead of switching everyone; promoted or aborted by the rule below")
    canary_min_impressions: int = setting(
        1000, group=GATE, help="with --canary: impressions each version must log after the canary began before the "
                               "rule decides (0: promote or abort by hand, `chronorec canary promote|abort`)")
    canary_max_ctr_drop: float = setting(
        0.0, group=GATE, help="with --canary: promote when the canary's online CTR >= the serving version's CTR - "
                              "this (an absolute difference), else abort")
    ablation: bool = setting(
        False, group=GATE, help="also evaluate the starting weights and both encoders alone on the test window")
    ranker: bool = setting(
        True, group=RANKER, help="train a learned ranker (LightGBM LambdaRank) on earlier windows and ship it in the "
                                 "version when it beats the blend on the validation window (off: the blend alone)")
    ranker_candidates: int = setting(200, group=RANKER, help="the blend's best candidates the ranker rescores")
    ranker_second_look: int = setting(50, group=RANKER, help=(
        "items of each whole-history source (co-occurrence with the whole history, nearest the history's mean "
        "vector) the ranker also rescores; 0: the blend's best only"))
    ranker_windows: int = setting(2, group=RANKER, help="training windows before the validation window")
    ranker_returning_windows: int = setting(2, group=RANKER, help=(
        "windows further back of which only returning users' events (an hour or more after their previous one) "
        "are learned from"))
    ranker_groups: int = setting(2500, group=RANKER, help="logged events per window the ranker learns from")
    ranker_trend_after_days: float = setting(7.0, group=RANKER, help=(
        "users this many days or more since their previous event are ranked by the best trend window unless the "
        "trees beat it on their validation events (30 or more) by a bootstrap bound; below, a range is routed to a "
        "signal only when that beats the trees by a bound; negative: the latter everywhere"))


@dataclass
class RunJob:
    """Where `chronorec-train run` reads and writes, how often, and how it reports."""

    db: str = setting(help="the server's event store, read-only: an SQLite file or a postgresql:// URL")
    models: str = setting(help="model repository root (versions in <models>/encoder/)")
    every: str | None = setting(None, help="repeat at this interval (30m, 2h, 1d) until interrupted")
    json: bool = setting(False, help="print each run's outcome as one JSON line")


@dataclass
class RunOutcome:
    exit_code: int
    status: str  # activated | gated | nothing-new | failed
    message: str
    version: str | None = None
    serving_version: str | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    serving_metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _trainer_lock(models: Path) -> Iterator[None]:
    """One trainer per model repository: a second concurrent run fails fast instead of racing."""
    folder = models / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another trainer is running on {models} (lock {folder / LOCK_FILE})") from None
        yield


@contextlib.contextmanager
def _trainer_lock_of(ranks, models: Path) -> Iterator[None]:
    """The repository's trainer lock, held by rank 0 for every rank of a distributed run: the
    others learn whether it got it, so all fail or all go on together."""
    if not ranks.distributed:
        with _trainer_lock(models):
            yield
        return
    with contextlib.ExitStack() as held:
        refused = None
        if ranks.is_main:
            try:
                held.enter_context(_trainer_lock(models))
            except RuntimeError as exc:
                refused = str(exc)
        refused = ranks.broadcast(refused)
        if refused:
            raise RuntimeError(refused)
        yield


def checkpoint_dir(models: str | os.PathLike, version: str) -> Path:
    """Where the trainable (Hugging Face) weights of a published version are kept."""
    return Path(models) / CHECKPOINTS_DIR / version


def _save_checkpoint(module, tokenizer, models: Path, version: str) -> Path:
    """Write the version's HF folder under a temporary name and rename it into place."""
    target = checkpoint_dir(models, version)
    staging = target.with_name(f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    module.bert.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.rename(staging, target)
    return target


def _prune_checkpoints(repo: ModelRepository, models: Path, keep: int) -> None:
    """Keep the checkpoints of the newest `keep` versions, the last `keep` activated ones and the serving one."""
    folder = models / CHECKPOINTS_DIR
    if not folder.is_dir() or keep <= 0:
        return
    # Rollback goes back through the activation history, so its recent entries keep their weights too.
    wanted = set(repo.list_versions()[-keep:]) | set(repo.history()[-keep:]) | {repo.current()}
    for child in folder.iterdir():
        if child.is_dir() and not child.name.startswith(".") and child.name not in wanted:
            shutil.rmtree(child, ignore_errors=True)


def _clean_leftovers(repo: ModelRepository, models: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove staging folders of killed runs; only old ones, as an export-base may be writing one now."""
    now = time.time()
    for folder in (repo.encoder_dir, models / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if child.is_dir() and child.name.startswith(".staging-") and now - child.stat().st_mtime > older_than_s:
                log.info("removing %s left by an interrupted run", child)
                shutil.rmtree(child, ignore_errors=True)


def _new_events(event_log, window: dict | None) -> int:
    """Events the serving version's trainer did not see (all of them for a version never trained here)."""
    if not window or "max_seq" not in window:
        return len(event_log.events)
    later = sum(1 for e in event_log.events if e.timestamp > float(window.get("data_end", float("inf"))))
    return max(int(event_log.max_seq) - int(window["max_seq"]), later)


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean_metrics(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in metrics.items() if k not in ("better", "tied")}


def parse_interval(text: str) -> float:
    """`30m`, `2h`, `45s`, `1d` or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match:
        raise ValueError(f"interval {text!r} is not like 30m, 2h, 45s or 1d")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds <= 0:
        raise ValueError("interval must be positive")
    return seconds


# ------------------------------------------------------------------------------ run


def run_once(db: str | os.PathLike, models: str | os.PathLike, settings: RunSettings | None = None,
             report: Callable[[str], None] | None = None) -> RunOutcome:
    """One pass: read, train, tune, evaluate, publish, gate. Never raises; failures are exit code 1."""
    settings = settings or RunSettings()
    started = time.perf_counter()
    say = report or (lambda message: log.info("%s", message))
    try:
        if settings.canary is not None:
            _canary_plan("-", settings)  # a bad percentage or rule fails before any training
        from chronorec.trainer import distributed

        ranks = distributed.init_from_env()
        with _trainer_lock_of(ranks, Path(models)):
            outcome = _run_locked(store_target(db), Path(models), settings, say)
    except Exception as exc:  # the exit code is the contract with schedulers; the trace goes to the log
        log.exception("training run failed")
        outcome = RunOutcome(EXIT_FAILED, "failed", f"{type(exc).__name__}: {exc}")
    outcome.seconds = round(time.perf_counter() - started, 2)
    log.info("run %s (exit %d) in %.1f s: %s", outcome.status, outcome.exit_code, outcome.seconds, outcome.message)
    return outcome


def _run_locked(db: Path | str, models: Path, settings: RunSettings, say: Callable[[str], None]) -> RunOutcome:
    # Heavy imports here, so `chronorec-train --help` and the "nothing new" path stay quick.
    from chronorec.server.core.errors import InvalidArgument
    from chronorec.trainer import distributed
    from chronorec.trainer.data import latest_seq, load_training_data, read_event_log

    repo = ModelRepository(models)
    ranks = distributed.current()
    if ranks.is_main:
        _clean_leftovers(repo, models)
    current = repo.current()
    serving = _Serving(current, load_manifest(repo.version_dir(current)) if current else None)
    if isinstance(db, Path) and not db.exists():
        raise FileNotFoundError(f"event store {db} does not exist")
    # Every rank reads the log up to the seq rank 0 saw last, so all train on the same snapshot.
    up_to = ranks.broadcast(latest_seq(db) if ranks.is_main else None) if ranks.distributed else None
    event_log = read_event_log(db, up_to_seq=up_to)
    new = _new_events(event_log, serving.manifest.training_window if serving.manifest else None)
    if new < settings.min_new_events:
        return RunOutcome(EXIT_NOTHING_NEW, "nothing-new",
                          f"no new events since {current}'s data ({len(event_log.events)} events, "
                          f"max seq {event_log.max_seq})", serving_version=current)
    try:
        data = load_training_data(event_log, max_events=serving.params.history_max_events,
                                  test_quantile=settings.test_quantile, valid_quantile=settings.valid_quantile,
                                  train_days=settings.train_days)
    except (InvalidArgument, ValueError) as exc:
        return RunOutcome(EXIT_NOTHING_NEW, "nothing-new", f"the event log is too small to learn from: {exc}",
                          serving_version=current)
    if not data.train or not len(data.split.instances):
        return RunOutcome(EXIT_NOTHING_NEW, "nothing-new",
                          f"no training examples or no test instances in the event log ({data.summary()})",
                          serving_version=current)
    say(f"{len(event_log.events)} events ({new} new), {len(event_log.items)} items: {data.summary()}")
    return _train_evaluate_publish(data, repo, models, serving, settings, say)


@dataclass
class _Serving:
    """The version the candidate must beat, as the server runs it."""

    version: str | None
    manifest: Manifest | None

    @property
    def params(self) -> TimeModelParams:
        return self.manifest.time_model if self.manifest else TimeModelParams()

    @property
    def max_length(self) -> int:
        return self.manifest.max_length if self.manifest else TOKENIZER_MAX_LENGTH


def _starting_weights(models: Path, serving: _Serving, settings: RunSettings) -> tuple[Path, str]:
    """(HF folder to fine-tune from, lineage base model name): the serving version's weights when kept."""
    root_base = settings.base_model or (serving.manifest.base_model if serving.manifest else MINILM_NAME)
    previous = checkpoint_dir(models, serving.version) if serving.version else None
    if previous is not None and previous.is_dir() and not settings.from_base and not settings.base_model:
        return previous, root_base
    return resolve_base_folder(root_base), root_base


def _train_evaluate_publish(data, repo: ModelRepository, models: Path, serving: _Serving, settings: RunSettings,
                            say: Callable[[str], None]) -> RunOutcome:
    import torch

    from chronorec.trainer.data import newest_examples
    from chronorec.trainer import distributed
    from chronorec.trainer.finetune import FinetuneConfig, train_encoder, trending_negatives
    from chronorec.trainer.tune import (
        CachedEncoder, RankerReplay, ReplayRanker, compare_tuned_blends, held_out_gain, torch_encoder, tune_time_model,
    )

    if settings.threads:
        # Beside a busy server, fewer threads than cores avoid OpenMP spin-waits on descheduled threads.
        torch.set_num_threads(settings.threads)
    init_folder, root_base = _starting_weights(models, serving, settings)
    say(f"fine-tuning from {init_folder}")
    item_texts = {item_id: data.event_log.item_text_of(item_id) for item_id in data.event_log.items}
    config = FinetuneConfig(
        steps=settings.steps, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        temperature=settings.temperature, warmup_fraction=settings.warmup_fraction,
        hard_negatives=settings.hard_negatives, seed=settings.seed, patience=settings.patience,
        abandon_fraction=settings.abandon_fraction,
        time_negatives=settings.time_negatives, distill_weight=settings.distill, logq_correction=settings.logq,
        eval_every=settings.eval_every, max_length=serving.max_length, device=settings.device,
        checkpoint_dir=str(models / CHECKPOINTS_DIR / IN_PROGRESS_DIR), progress=settings.progress,
    )
    train = list(data.train)
    if not settings.whole_window and settings.steps and settings.steps * settings.batch_size < len(train):
        train = newest_examples(train, settings.steps * settings.batch_size)
        say(f"training on the newest {len(train)} of {len(data.train)} examples "
            f"(from {_utc(train[0].timestamp)})")
    negatives = trending_negatives(train, data.dataset) if settings.time_negatives > 0 else None
    # The starting weights are kept for the ablation and for the choice below, which tunes over them.
    encoder = train_encoder(init_folder, train, data.valid, item_texts, config, train_layers=settings.train_layers,
                            run_tag=f"{init_folder.resolve()}|{data.event_log.max_seq}",
                            keep_initial=settings.ablation or settings.tune, negatives=negatives)
    module, tokenizer, trained, initial_module = encoder.module, encoder.tokenizer, encoder.result, encoder.initial
    say(f"fine-tuned {trained.steps} steps ({encoder.trained_layers} layers) at {trained.examples_per_second:.1f} examples/s "
        f"on {trained.device}; "
        f"encoder alone on validation: {config.early_stop_metric} {_fmt(trained.initial_metric)} -> "
        f"{_fmt(trained.best_metric)} (best at step {trained.best_step})")
    # finetune() keeps the best validated weights, and the starting ones until a checkpoint beats
    # them: a fine-tuning that does not improve the encoder's own retrieval leaves the base encoder.
    encoder_choice = {
        "fine_tuned": trained.best_step > 0, "metric": config.early_stop_metric,
        "valid_before": trained.initial_metric, "valid_best": trained.best_metric, "best_step": trained.best_step,
    }
    if trained.best_metric is not None and trained.best_step == 0:
        say(f"fine-tuning did not improve the encoder's validation retrieval ({config.early_stop_metric} "
            f"{_fmt(trained.initial_metric)}): the version keeps the starting encoder's weights")
    ranks = distributed.current()
    if not ranks.is_main:
        # Rank 0 alone tunes, evaluates, publishes and activates (and trains a learned ranker).
        return RunOutcome(EXIT_ACTIVATED, "trained-shard",
                          f"rank {ranks.rank} of {ranks.world_size} trained its shard; rank 0 evaluates and publishes",
                          serving_version=serving.version)

    # Tuning, evaluation and ablation replay the same texts: each is encoded once per model.
    encode = CachedEncoder(torch_encoder(module, tokenizer, max_length=serving.max_length))
    params, tuning = serving.params, None
    if settings.tune and len(data.inner.instances):
        replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train, encode)
        tuning = tune_time_model(replay, data.inner.instances, params, max_instances=settings.max_tune_instances,
                                 seed=settings.seed)
        params = tuning.params
        say(f"time model tuned on {tuning.instances} validation instances: {tuning.metric} "
            f"{tuning.default_value:.4f} -> {tuning.value:.4f}")

    initial_encode = (CachedEncoder(torch_encoder(initial_module, tokenizer, max_length=serving.max_length))
                      if initial_module is not None else None)
    if tuning is not None and encoder_choice["fine_tuned"] and initial_encode is not None:
        # The fine-tuned weights serve only when the blend over them, tuned on the validation window,
        # beats the blend over the starting weights tuned there too, by a paired interval above zero:
        # a gain of the encoder alone that does not carry into the fused ranking is not worth a change.
        # The two compare on the window's instances neither was tuned on, when there are any.
        # The same co-occurrence: it is fitted on the window's training events, whatever the encoder.
        start_replay = RankerReplay(data.dataset, data.event_log.items, data.inner.train, initial_encode,
                                    cooccurrence=replay.cooccurrence)
        start_tuning = tune_time_model(start_replay, data.inner.instances, serving.params,
                                       max_instances=settings.max_tune_instances, seed=settings.seed)
        rankers = []
        for blend_encode, blend_tuning, blend_replay in ((encode, tuning, replay),
                                                         (initial_encode, start_tuning, start_replay)):
            # Each tuning replay's item index and co-occurrence, not built again.
            ranker = ReplayRanker(blend_encode, data.event_log.items, blend_tuning.params)
            ranker.fit(data.inner.train, data.dataset, index=blend_replay.index, cooccurrence=blend_replay.cooccurrence)
            rankers.append(ranker)
        gain = compare_tuned_blends(tuning, start_tuning, data.dataset.user,
                                    held_out_gain(*rankers, data.inner.instances,
                                                  [tuning.positions, start_tuning.positions],
                                                  settings.max_tune_instances, settings.seed))
        better = gain.low > 0
        encoder_choice["fused_valid"] = {
            "metric": tuning.metric, "fine_tuned": gain.a, "starting": gain.b,
            "difference": gain.difference, "ci95_user_clustered": [gain.low, gain.high], "instances": gain.instances,
            "held_out": gain.held_out}
        say(f"validation {tuning.metric} of the tuned blend on {gain.instances} instances "
            f"{'neither was tuned on' if gain.held_out else 'tuned on'}: fine-tuned weights {gain.a:.4f}, starting "
            f"weights {gain.b:.4f}, paired {gain.difference:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}]: "
            + ("the fine-tuned weights serve" if better else "not above zero, the version keeps the starting weights"))
        if not better:
            module = encoder.module = initial_module
            encode, params, tuning = initial_encode, start_tuning.params, start_tuning
            encoder_choice["fine_tuned"] = False

    learned, ranker_details = (_train_ranker(data, encode, params, settings, say,
                                             tuned=tuning.positions if tuning is not None else None)
                               if settings.ranker else (None, None))

    evaluation = _evaluate(data, repo, serving, encode, params, settings, say,
                           initial_encode if settings.ablation else None, learned)

    metrics: dict[str, Any] = {**evaluation["candidate"], "test_instances": evaluation["gate"]["instances"]}
    metrics.update({f"serving_{k}": v for k, v in evaluation["serving"].items()})
    metrics["train_examples_per_second"] = trained.examples_per_second
    if trained.best_metric is not None:
        # The shipped encoder's: the starting weights' when the fused test kept them.
        metrics[f"encoder_valid_{config.early_stop_metric}"] = (trained.best_metric if encoder_choice["fine_tuned"]
                                                                 else trained.initial_metric)
        metrics[f"encoder_valid_{config.early_stop_metric}_before"] = trained.initial_metric
    if tuning is not None:
        metrics[f"tuning_valid_{tuning.metric}"] = tuning.value
        metrics[f"tuning_valid_{tuning.metric}_untuned"] = tuning.default_value
    if ranker_details is not None and "valid_NDCG@10_ranker" in ranker_details:
        metrics["ranker_valid_NDCG@10"] = ranker_details["valid_NDCG@10_ranker"]
        metrics["blend_valid_NDCG@10"] = ranker_details["valid_NDCG@10_blend"]
    details = {"finetune": trained.to_dict(), "train_examples": {"used": len(train), "window": len(data.train), "from": float(train[0].timestamp), "newest_only": len(train) < len(data.train)}, "tuning": tuning.summary() if tuning else None,
               "gate": evaluation["gate"], "ablation": evaluation["ablation"], "time_model": params.to_dict(),
               "data": data.summary(), "encoder": encoder_choice, "ranker": ranker_details}
    version = encoder.publish(
        repo, base_model=root_base, parent_version=serving.version, time_model=params,
        metrics=metrics, max_length=serving.max_length, int8=_publishes_int8(repo, settings), activate=False, ranker=learned,
        training_window={**data.windows.to_dict(), "max_seq": data.event_log.max_seq,
                         "source": data.event_log.source},
        extra={"trainer": {**details, "protocol": "temporal", "init_from": str(init_folder),
                           "serving_version": serving.version,
                           "config": {k: v for k, v in asdict(config).items() if k != "checkpoint_dir"}}},
    )
    _save_checkpoint(module, tokenizer, models, version)
    shutil.rmtree(models / CHECKPOINTS_DIR / IN_PROGRESS_DIR, ignore_errors=True)
    return _gate(repo, models, version, serving.version, evaluation, settings, details,
                 items=list(data.event_log.items.values()), say=say)


def _train_ranker(data, encode, params: TimeModelParams, settings: RunSettings,
                  say: Callable[[str], None], tuned: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """(the learned ranker to ship or None, what its training said): trained on windows before the
    validation window, early-stopped on it, shipped only when it beats the blend there, on the
    window's events the blend was not tuned on when there are any (`tuned`: the positions it was
    tuned on; None: `params` were not tuned on this window)."""
    from chronorec.trainer.ranker_train import RankerTrainingConfig, temporal_slices, train_ranker

    training, validation = temporal_slices(data.split, training_slices=settings.ranker_windows, inner=data.inner,
                                           returning_slices=settings.ranker_returning_windows)
    config = RankerTrainingConfig(candidates=settings.ranker_candidates, second_look=settings.ranker_second_look,
                                  max_groups_per_slice=settings.ranker_groups,
                                  max_valid_groups=settings.ranker_groups, seed=settings.seed, threads=settings.threads,
                                  route_trend_after_s=(settings.ranker_trend_after_days * 86400.0
                                                       if settings.ranker_trend_after_days >= 0 else None))
    try:
        fit = train_ranker(data.dataset, data.event_log.items, encode, None, params, training, validation, config, say,
                           tuned=tuned)
    except ValueError as exc:  # too few logged events to learn from
        say(f"no learned ranker: {exc}")
        return None, {"used": False, "reason": str(exc)}
    details = {**fit.summary(), "used": fit.helps}
    if not fit.helps:
        ranker_figure, blend_figure, held_out = fit.deciding
        say(f"the learned ranker does not beat the blend on the validation window (NDCG@10 "
            f"{ranker_figure:.4f} vs {blend_figure:.4f}"
            f"{'' if held_out is None else f' on the {held_out} events the blend was not tuned on'}): "
            "the version ranks with the blend")
        return None, details
    return fit.ranker, details


def _evaluate(data, repo: ModelRepository, serving: _Serving, encode, params: TimeModelParams,
              settings: RunSettings, say: Callable[[str], None], initial_encode=None, learned=None) -> dict[str, Any]:
    """Candidate and serving version on the same latest window: the temporal protocol, full ranking,
    each with its learned ranker when it has one."""
    from chronorec.trainer.protocols import EvalTask, bootstrap_ci, fit_and_score
    from chronorec.trainer.tune import ReplayRanker

    items = data.event_log.items
    test = data.split.test_task()
    if settings.max_eval_instances is not None and len(test.instances) > settings.max_eval_instances:
        test = EvalTask(test.name, test.dataset, test.train, test.instances[: settings.max_eval_instances])
    candidate_run = fit_and_score(ReplayRanker(encode, items, params, learned_ranker=learned), test)
    candidate = _mean_metrics(candidate_run.metrics)
    serving_metrics: dict[str, float] = {}
    gate: dict[str, Any] = {"metric": GATE_METRIC, "threshold": settings.threshold, "instances": len(test.instances)}
    if serving.version is not None:
        serving_run = _evaluate_serving(repo, serving, items, test, settings.threads)
        if serving_run is not None:
            serving_metrics = _mean_metrics(serving_run.metrics)
            difference = candidate_run.metrics[GATE_METRIC] - serving_run.metrics[GATE_METRIC]
            low, high = bootstrap_ci(difference, test.instances.user)
            gate["difference_ci95_user_clustered"] = [float(low), float(high)]
        else:
            # A serving version that cannot even load is no bar to clear.
            gate["serving_error"] = "the serving version could not be evaluated (see the log)"
    say(f"test window ({len(test.instances)} instances): candidate {GATE_METRIC} {candidate[GATE_METRIC]:.4f}, "
        f"serving {serving.version or '-'} {_fmt(serving_metrics.get(GATE_METRIC))}")
    passes = not serving_metrics or candidate[GATE_METRIC] >= serving_metrics[GATE_METRIC] - settings.threshold
    gate.update({"passed": bool(passes), "forced": bool(settings.force and not passes)})

    ablation = None
    if initial_encode is not None:
        rows = {
            "initial_weights_tuned_time_model": (initial_encode, params),
            "initial_weights_encoder_only": (initial_encode, ENCODER_ONLY),
            "candidate_encoder_only": (encode, ENCODER_ONLY),
        }
        ablation = {name: _mean_metrics(fit_and_score(ReplayRanker(enc, items, p), test).metrics)
                    for name, (enc, p) in rows.items()}
        for name, values in ablation.items():
            say(f"ablation {name}: {GATE_METRIC} {values[GATE_METRIC]:.4f}")
    return {"candidate": candidate, "serving": serving_metrics, "gate": gate, "ablation": ablation}


def _gate(repo: ModelRepository, models: Path, version: str, serving: str | None, evaluation: dict[str, Any],
          settings: RunSettings, details: dict[str, Any], items: list | None = None,
          say: Callable[[str], None] | None = None) -> RunOutcome:
    """Activate the published candidate when it passed the gate (or is forced); the exit code says which."""
    candidate, serving_metrics, passed = evaluation["candidate"], evaluation["serving"], evaluation["gate"]["passed"]
    if (passed or settings.force) and settings.canary is not None and serving is not None:
        running = read_plan(repo)
        if running is not None:
            return RunOutcome(EXIT_GATED, "gated", f"{version} published but not started as a canary: a canary of "
                              f"{running.candidate} is running", version, serving, candidate, serving_metrics, details)
        if settings.prepare and items:
            details["prepare"] = _prepare(repo, version, items, settings, say or (lambda _m: None))
        plan = _canary_plan(version, settings)
        write_plan(repo, plan)
        _prune_checkpoints(repo, models, settings.keep_checkpoints)
        rule = (f"promoted once each version logged {plan.policy.min_impressions} impressions if its CTR >= "
                f"{serving}'s - {plan.policy.max_ctr_drop:g}, else aborted" if plan.policy.automatic
                else "promote or abort it by hand")
        return RunOutcome(EXIT_ACTIVATED, "canary", f"{version} serves {plan.percent:g}% of users as a canary beside "
                          f"{serving} ({rule})", version, serving, candidate, serving_metrics, details)
    if passed or settings.force:
        if settings.prepare and items:
            details["prepare"] = _prepare(repo, version, items, settings, say or (lambda _m: None))
        repo.activate(version)
    _prune_checkpoints(repo, models, settings.keep_checkpoints)
    if passed or settings.force:
        reason = "at least as good as" if passed else "forced over"
        return RunOutcome(EXIT_ACTIVATED, "activated", f"{version} activated ({reason} {serving or 'nothing'})",
                          version, serving, candidate, serving_metrics, details)
    return RunOutcome(
        EXIT_GATED, "gated",
        f"{version} published but not activated: {GATE_METRIC} {candidate[GATE_METRIC]:.4f} < serving "
        f"{serving_metrics[GATE_METRIC]:.4f} - threshold {settings.threshold}",
        version, serving, candidate, serving_metrics, details)


def _canary_plan(version: str, settings: RunSettings) -> CanaryPlan:
    """The canary --canary asks for (InvalidArgument for a percentage outside 0..100 or a bad rule)."""
    policy = CanaryPolicy(settings.canary_min_impressions, settings.canary_max_ctr_drop)
    return CanaryPlan(version, check_percent(settings.canary), policy=policy)


def _publishes_int8(repo: ModelRepository, settings: RunSettings) -> bool:
    """Whether the new version gets an int8 graph: as asked, else as the server serves."""
    if settings.int8 is not None:
        return settings.int8
    from chronorec.server.core.encoder import EncoderSettings

    return EncoderSettings.from_serving_settings(repo.read_serving_settings()).prefer_int8


def _prepare(repo: ModelRepository, version: str, items: list, settings: RunSettings,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Encode the catalog with the new version into its vector cache, so the server's swap only loads it.

    The server would do the same work itself after the pointer moves, while it serves; done here it
    costs the trainer's time instead (measured: a 10k-item swap 84 s -> 1.2 s). It is done as the
    server indexes (vector-cache folder, int8 graph, HNSW parameters), read from the settings the
    server recorded in the repository; without them, as a server on its defaults would. A failure
    only costs that speed-up, so it is logged and the activation goes ahead.
    """
    from chronorec.server.core.encoder import EncoderSettings
    from chronorec.server.core.indexing import prepare_version

    served = repo.read_serving_settings()
    recorded = asdict(served) if served is not None else None
    if served is not None and not served.vector_cache:
        say(f"not preparing {version}: the server runs without a vector cache")
        return {"skipped": "the server runs without a vector cache", "serving_settings": recorded}
    try:
        figures = prepare_version(repo, version, items, EncoderSettings.from_serving_settings(served),
                                  workers=settings.threads)
    except Exception as exc:
        log.warning("could not prepare %s's vector cache (the server will encode the catalog itself): %s",
                    version, exc)
        return {"error": str(exc), "serving_settings": recorded}
    source = "the server's recorded settings" if served else "the defaults (no server recorded its settings)"
    say(f"prepared {version}: {int(figures['items'])} catalog items encoded into its vector cache "
        f"in {figures['seconds']:.1f} s, with {source}")
    return {**{k: round(v, 3) for k, v in figures.items()}, "serving_settings": recorded}


def _evaluate_serving(repo: ModelRepository, serving: _Serving, items, task, threads: int | None = None):
    """The serving version as served: its ONNX graph, its manifest's time model and its learned ranker;
    None if it cannot load."""
    from chronorec.server.core.encoder import OnnxEncoder
    from chronorec.server.core.learned_ranker import load_version_ranker
    from chronorec.trainer.protocols import fit_and_score
    from chronorec.trainer.tune import ReplayRanker

    try:
        encoder = OnnxEncoder(repo.version_dir(serving.version), intra_op_threads=threads)
        learned = load_version_ranker(repo.version_dir(serving.version), serving.manifest)
    except Exception:
        log.exception("serving version %s cannot be loaded for evaluation", serving.version)
        return None
    try:
        return fit_and_score(ReplayRanker(encoder.encode, items, serving.params, learned_ranker=learned), task)
    finally:
        encoder.close()


def run(db: str | os.PathLike, models: str | os.PathLike, *, every: float | str | None = None,
        report: Callable[[str], None] | None = None, **settings: Any) -> int:
    """Run once and return its exit code; with `every` (seconds or "30m") repeat until interrupted (then 0)."""
    known = {f.name for f in fields(RunSettings)}
    unknown = set(settings) - known
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    config = RunSettings(**settings)
    once = lambda: run_once(db, models, config, report).exit_code  # noqa: E731
    return once() if every is None else repeat(once, every)


def repeat(once: Callable[[], int], every: float | str) -> int:
    """Call `once` at a fixed interval (a run longer than it is followed at once) until Ctrl-C; returns 0."""
    interval = parse_interval(every) if isinstance(every, str) else float(every)
    try:
        while True:
            began = time.monotonic()
            code = once()
            log.info("run finished with exit code %d; next in %.0f s", code, interval)
            time.sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        return EXIT_ACTIVATED


# ----------------------------------------------------------------------------- CLI


def register(subparsers) -> argparse.ArgumentParser:
    """Registrar of the `run` subcommand for chronorec.trainer.cli."""
    parser = subparsers.add_parser(
        "run", help="learn from logged feedback, evaluate against the serving model, publish and gate",
        description=__doc__.split("\n", 1)[0].split(": ", 1)[1], epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_flags(parser, RunJob, env_prefix=ENV_PREFIX)
    add_settings_flags(parser, RunSettings, env_prefix=ENV_PREFIX)
    parser.set_defaults(handler=_handle)
    return parser


def _epilog() -> str:
    text = __doc__.split("Exit codes", 1)[1]
    return "exit codes" + text


def _handle(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torch loads OpenMP: spinning workers stall each other when the server shares the cores
    # (MiniLM measured here at 2.5 examples/s with 2 spinning threads, 6.7 with passive waits).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    job, settings = settings_from_args(RunJob, args), settings_from_args(RunSettings, args)

    def once() -> int:
        # Progress (and the exporter's parity line) goes to stderr: stdout carries only the outcome.
        with contextlib.redirect_stdout(sys.stderr):
            outcome = run_once(job.db, job.models, settings, report)
        if job.json:
            print(json.dumps(outcome.to_dict(), default=str), flush=True)
        else:
            print(f"{outcome.status} (exit {outcome.exit_code}): {outcome.message}", flush=True)
        return outcome.exit_code

    try:
        return once() if job.every is None else repeat(once, job.every)
    finally:
        from chronorec.trainer import distributed

        distributed.shutdown()


__all__ = [
    "EXIT_ACTIVATED",
    "EXIT_FAILED",
    "EXIT_GATED",
    "EXIT_NOTHING_NEW",
    "RunJob",
    "RunOutcome",
    "RunSettings",
    "checkpoint_dir",
    "parse_interval",
    "register",
    "repeat",
    "run",
    "run_once",
]
