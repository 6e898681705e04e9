"""`chronorec-train run`: learn from the logged feedback, evaluate against the serving model, publish, gate.

One run reads the server's SQLite event log read-only (the server may keep writing), fine-tunes
the encoder on point-in-time (history text → next item) pairs, tunes the time model on the
validation window, evaluates the candidate and the serving version on the same latest window
(the temporal protocol, full ranking through the server's own ranking code), publishes the
candidate as a new version (ONNX, parity-checked) and activates it only when it is at least as
good. The running server notices the new CURRENT pointer and hot-swaps.

Exit codes (for cron, systemd and scripts):
    0  published and activated
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
import copy
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

from chronorec.server.core.manifest import TOKENIZER_MAX_LENGTH, Manifest, TimeModelParams, load_manifest
from chronorec.trainer.base_model import MINILM_NAME, resolve_base_folder
from chronorec.server.core.repository import ModelRepository

log = logging.getLogger(__name__)

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


@dataclass
class RunSettings:
    """Everything one run can be told; the defaults suit MiniLM on a small CPU machine."""

    base_model: str | None = None  # HF folder; default: the serving version's lineage
    from_base: bool = False
    test_quantile: float = 0.8  # the test window: events from this quantile of the log on
    valid_quantile: float = 0.8  # the validation window: the same rule on the events before the test window
    train_days: float | None = None  # only the last days of training targets
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    temperature: float = 0.05
    warmup_fraction: float = 0.1
    hard_negatives: int = 0
    train_layers: int | None = None  # train only the top N transformer layers (faster on CPU); None: all
    # With a step budget smaller than the window, train on the newest steps × batch examples
    # (interests drift: they are the closest to what comes next) instead of a sample of the window.
    newest_examples: bool = True
    seed: int = 0
    patience: int = 3
    eval_every: int | None = None
    device: str = "auto"
    threads: int | None = None  # CPU threads for PyTorch; None: its default (all cores)
    tune: bool = True
    max_tune_instances: int | None = 1000
    max_eval_instances: int | None = None
    int8: bool = False
    threshold: float = 0.0  # activate when candidate ≥ serving − threshold
    force: bool = False  # activate whatever the gate says
    prepare: bool = True  # encode the catalog into the new version's vector cache before activating
    prepare_int8: bool = False  # prepare the int8 graph's vectors (for a server run with --int8)
    min_new_events: int = 1
    keep_checkpoints: int = 3
    ablation: bool = False  # also evaluate the starting weights, and both encoders alone
    progress: bool | None = None


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
        with _trainer_lock(Path(models)):
            outcome = _run_locked(Path(db), Path(models), settings, say)
    except Exception as exc:  # the exit code is the contract with schedulers; the trace goes to the log
        log.exception("training run failed")
        outcome = RunOutcome(EXIT_FAILED, "failed", f"{type(exc).__name__}: {exc}")
    outcome.seconds = round(time.perf_counter() - started, 2)
    log.info("run %s (exit %d) in %.1f s: %s", outcome.status, outcome.exit_code, outcome.seconds, outcome.message)
    return outcome


def _run_locked(db: Path, models: Path, settings: RunSettings, say: Callable[[str], None]) -> RunOutcome:
    # Heavy imports here, so `chronorec-train --help` and the "nothing new" path stay quick.
    from chronorec.server.core.errors import InvalidArgument
    from chronorec.trainer.data import load_training_data, read_event_log

    repo = ModelRepository(models)
    _clean_leftovers(repo, models)
    current = repo.current()
    serving = _Serving(current, load_manifest(repo.version_dir(current)) if current else None)
    if not db.exists():
        raise FileNotFoundError(f"event store {db} does not exist")
    event_log = read_event_log(db)
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

    from chronorec.trainer.export import load_base_model, publish_module
    from chronorec.trainer.data import newest_examples
    from chronorec.trainer.finetune import FinetuneConfig, finetune, freeze_below
    from chronorec.trainer.tune import CachedEncoder, EngineReplay, torch_encoder, tune_time_model

    torch.manual_seed(settings.seed)
    if settings.threads:
        # Beside a busy server, fewer threads than cores avoid OpenMP spin-waits on descheduled threads.
        torch.set_num_threads(settings.threads)
    init_folder, root_base = _starting_weights(models, serving, settings)
    say(f"fine-tuning from {init_folder}")
    module, tokenizer = load_base_model(init_folder)
    initial_module = copy.deepcopy(module).eval() if settings.ablation else None
    trained_layers = freeze_below(module, settings.train_layers)
    item_texts = {item_id: data.event_log.item_text_of(item_id) for item_id in data.event_log.items}
    config = FinetuneConfig(
        steps=settings.steps, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        temperature=settings.temperature, warmup_fraction=settings.warmup_fraction,
        hard_negatives=settings.hard_negatives, seed=settings.seed, patience=settings.patience,
        eval_every=settings.eval_every, max_length=serving.max_length, device=settings.device,
        checkpoint_dir=str(models / CHECKPOINTS_DIR / IN_PROGRESS_DIR), progress=settings.progress,
    )
    train = list(data.train)
    if settings.newest_examples and settings.steps and settings.steps * settings.batch_size < len(train):
        train = newest_examples(train, settings.steps * settings.batch_size)
        say(f"training on the newest {len(train)} of {len(data.train)} examples "
            f"(from {_utc(train[0].timestamp)})")
    trained = finetune(module, tokenizer, train, data.valid, item_texts, config,
                       run_tag=f"{init_folder.resolve()}|{data.event_log.max_seq}")
    module.cpu().eval()
    say(f"fine-tuned {trained.steps} steps ({trained_layers} layers) at {trained.examples_per_second:.1f} examples/s "
        f"on {trained.device}; "
        f"encoder alone on validation: {config.early_stop_metric} {_fmt(trained.initial_metric)} -> "
        f"{_fmt(trained.best_metric)} (best at step {trained.best_step})")

    # Tuning, evaluation and ablation replay the same texts: each is encoded once per model.
    encode = CachedEncoder(torch_encoder(module, tokenizer, max_length=serving.max_length))
    params, tuning = serving.params, None
    if settings.tune and len(data.inner.instances):
        replay = EngineReplay(data.dataset, data.event_log.items, data.inner.train, encode)
        tuning = tune_time_model(replay, data.inner.instances, params, max_instances=settings.max_tune_instances,
                                 seed=settings.seed)
        params = tuning.params
        say(f"time model tuned on {tuning.instances} validation instances: {tuning.metric} "
            f"{tuning.default_value:.4f} -> {tuning.value:.4f}")

    initial_encode = (CachedEncoder(torch_encoder(initial_module, tokenizer, max_length=serving.max_length))
                      if initial_module is not None else None)
    evaluation = _evaluate(data, repo, serving, encode, params, settings, say, initial_encode)

    metrics: dict[str, Any] = {**evaluation["candidate"], "test_instances": evaluation["gate"]["instances"]}
    metrics.update({f"serving_{k}": v for k, v in evaluation["serving"].items()})
    metrics["train_examples_per_second"] = trained.examples_per_second
    if trained.best_metric is not None:
        metrics[f"encoder_valid_{config.early_stop_metric}"] = trained.best_metric
        metrics[f"encoder_valid_{config.early_stop_metric}_before"] = trained.initial_metric
    if tuning is not None:
        metrics[f"tuning_valid_{tuning.metric}"] = tuning.value
        metrics[f"tuning_valid_{tuning.metric}_untuned"] = tuning.default_value
    details = {"finetune": trained.to_dict(), "train_examples": {"used": len(train), "window": len(data.train), "from": float(train[0].timestamp), "newest_only": len(train) < len(data.train)}, "tuning": tuning.summary() if tuning else None,
               "gate": evaluation["gate"], "ablation": evaluation["ablation"], "time_model": params.to_dict(),
               "data": data.summary()}
    version = publish_module(
        module, tokenizer, repo, base_model=root_base, parent_version=serving.version, time_model=params,
        metrics=metrics, max_length=serving.max_length, int8=settings.int8, activate=False,
        training_window={**data.windows.to_dict(), "max_seq": data.event_log.max_seq,
                         "source": data.event_log.source},
        extra={"trainer": {**details, "protocol": "temporal", "init_from": str(init_folder),
                           "serving_version": serving.version,
                           "config": {k: v for k, v in asdict(config).items() if k != "checkpoint_dir"}}},
        tokenizer_source=init_folder,
    )
    _save_checkpoint(module, tokenizer, models, version)
    shutil.rmtree(models / CHECKPOINTS_DIR / IN_PROGRESS_DIR, ignore_errors=True)
    return _gate(repo, models, version, serving.version, evaluation, settings, details,
                 items=list(data.event_log.items.values()), say=say)


def _evaluate(data, repo: ModelRepository, serving: _Serving, encode, params: TimeModelParams,
              settings: RunSettings, say: Callable[[str], None], initial_encode=None) -> dict[str, Any]:
    """Candidate and serving version on the same latest window: the temporal protocol, full ranking."""
    from chronorec.trainer.protocols import EvalTask, bootstrap_ci, fit_and_score
    from chronorec.trainer.tune import EngineRanker

    items = data.event_log.items
    test = data.split.test_task()
    if settings.max_eval_instances is not None and len(test.instances) > settings.max_eval_instances:
        test = EvalTask(test.name, test.dataset, test.train, test.instances[: settings.max_eval_instances])
    candidate_run = fit_and_score(EngineRanker(encode, items, params), test)
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
        ablation = {name: _mean_metrics(fit_and_score(EngineRanker(enc, items, p), test).metrics)
                    for name, (enc, p) in rows.items()}
        for name, values in ablation.items():
            say(f"ablation {name}: {GATE_METRIC} {values[GATE_METRIC]:.4f}")
    return {"candidate": candidate, "serving": serving_metrics, "gate": gate, "ablation": ablation}


def _gate(repo: ModelRepository, models: Path, version: str, serving: str | None, evaluation: dict[str, Any],
          settings: RunSettings, details: dict[str, Any], items: list | None = None,
          say: Callable[[str], None] | None = None) -> RunOutcome:
    """Activate the published candidate when it passed the gate (or is forced); the exit code says which."""
    candidate, serving_metrics, passed = evaluation["candidate"], evaluation["serving"], evaluation["gate"]["passed"]
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


def _prepare(repo: ModelRepository, version: str, items: list, settings: RunSettings,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Encode the catalog with the new version into its vector cache, so the server's swap only loads it.

    The server would do the same work itself after the pointer moves, while it serves; done here it
    costs the trainer's time instead (measured: a 10k-item swap 84 s -> 1.2 s). A failure only
    costs that speed-up, so it is logged and the activation goes ahead.
    """
    from chronorec.server.core.serving import EncoderSettings, prepare_version

    try:
        figures = prepare_version(repo, version, items, EncoderSettings(prefer_int8=settings.prepare_int8),
                                  workers=settings.threads)
    except Exception as exc:
        log.warning("could not prepare %s's vector cache (the server will encode the catalog itself): %s",
                    version, exc)
        return {"error": str(exc)}
    say(f"prepared {version}: {int(figures['items'])} catalog items encoded into its vector cache "
        f"in {figures['seconds']:.1f} s")
    return {k: round(v, 3) for k, v in figures.items()}


def _evaluate_serving(repo: ModelRepository, serving: _Serving, items, task, threads: int | None = None):
    """The serving version as served: its ONNX graph and its manifest's time model; None if it cannot load."""
    from chronorec.server.core.encoder import OnnxEncoder
    from chronorec.trainer.protocols import fit_and_score
    from chronorec.trainer.tune import EngineRanker

    try:
        encoder = OnnxEncoder(repo.version_dir(serving.version), intra_op_threads=threads)
    except Exception:
        log.exception("serving version %s cannot be loaded for evaluation", serving.version)
        return None
    try:
        return fit_and_score(EngineRanker(encoder.encode, items, serving.params), task)
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
    parser.add_argument("--db", required=True, help="the server's SQLite event store (read-only)")
    parser.add_argument("--models", required=True, help="model repository root (versions in <models>/encoder/)")
    parser.add_argument("--every", default=None, help="repeat at this interval (30m, 2h, 1d) until interrupted")
    parser.add_argument("--json", action="store_true", help="print each run's outcome as one JSON line")
    group = parser.add_argument_group("data windows")
    group.add_argument("--test-quantile", type=float, default=0.8,
                       help="the test window starts at this quantile of event times (default 0.8)")
    group.add_argument("--valid-quantile", type=float, default=0.8,
                       help="the validation window: the same rule on the events before the test window (default 0.8)")
    group.add_argument("--train-days", type=float, default=None, help="train only on the last N days before validation")
    group.add_argument("--min-new-events", type=int, default=1, help="fewer new events than this: exit 3 (default 1)")
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--base-model", default=None, help="start from this Hugging Face folder instead")
    group.add_argument("--from-base", action="store_true", help="start from the base model, not the serving weights")
    group.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    group.add_argument("--epochs", type=float, default=1.0)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, default=5e-5)
    group.add_argument("--temperature", type=float, default=0.05)
    group.add_argument("--hard-negatives", type=int, default=0, help="hard negatives per example from the current index")
    group.add_argument("--whole-window", action="store_true",
                       help="with --steps, sample the whole training window instead of the newest steps x batch examples")
    group.add_argument("--train-layers", type=int, default=None,
                       help="train only the top N transformer layers, the rest frozen (about 2x the steps per "
                            "second on CPU; default: all)")
    group.add_argument("--patience", type=int, default=3, help="validations without gain before an early stop")
    group.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: 5 per run)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for PyTorch (default: all cores; use fewer beside a busy server)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("tuning, export and gate")
    group.add_argument("--no-tune", action="store_true", help="keep the serving version's time model")
    group.add_argument("--max-tune-instances", type=int, default=1000)
    group.add_argument("--int8", action="store_true", help="also publish an int8 graph (cosine to fp32 recorded)")
    group.add_argument("--threshold", type=float, default=0.0,
                       help=f"activate when {GATE_METRIC} >= serving's - threshold (default 0)")
    group.add_argument("--force", action="store_true", help="activate even when the gate says no")
    group.add_argument("--no-prepare", action="store_true",
                       help="activate without encoding the catalog into the new version's vector cache first "
                            "(the server then encodes it during the swap)")
    group.add_argument("--prepare-int8", action="store_true",
                       help="prepare the int8 graph's vectors: the server runs with --int8")
    group.add_argument("--ablation", action="store_true",
                       help="also evaluate the starting weights and both encoders alone on the test window")
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

    settings = RunSettings(
        base_model=args.base_model, from_base=args.from_base, test_quantile=args.test_quantile,
        valid_quantile=args.valid_quantile, train_days=args.train_days, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, temperature=args.temperature, hard_negatives=args.hard_negatives,
        train_layers=args.train_layers, newest_examples=not args.whole_window,
        seed=args.seed, patience=args.patience, eval_every=args.eval_every, device=args.device, threads=args.threads,
        tune=not args.no_tune, max_tune_instances=args.max_tune_instances, int8=args.int8,
        threshold=args.threshold, force=args.force, min_new_events=args.min_new_events, ablation=args.ablation,
        prepare=not args.no_prepare, prepare_int8=args.prepare_int8,
        progress=False if args.no_progress else None,
    )

    def once() -> int:
        # Progress (and the exporter's parity line) goes to stderr: stdout carries only the outcome.
        with contextlib.redirect_stdout(sys.stderr):
            outcome = run_once(args.db, args.models, settings, report)
        if args.json:
            print(json.dumps(outcome.to_dict(), default=str), flush=True)
        else:
            print(f"{outcome.status} (exit {outcome.exit_code}): {outcome.message}", flush=True)
        return outcome.exit_code

    return once() if args.every is None else repeat(once, args.every)


__all__ = [
    "EXIT_ACTIVATED",
    "EXIT_FAILED",
    "EXIT_GATED",
    "EXIT_NOTHING_NEW",
    "RunOutcome",
    "RunSettings",
    "checkpoint_dir",
    "parse_interval",
    "register",
    "repeat",
    "run",
    "run_once",
]
