"""`chronorec-eval`: run registered recommenders through the evaluation protocols and write a report."""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chronorec.server.core import importers
from chronorec.trainer import baselines, report
from chronorec.trainer.flags import Verbosity, add_settings_flags, setting, settings_from_args
from chronorec.trainer.protocols import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, GAP_LABELS, METRIC_NAMES, TARGET_LABELS, Dataset, MethodFactory, Split,
    fit_and_score, gap_buckets, loo_split, metric_by_bucket, summarize, target_buckets, temporal_split,
)
from chronorec.trainer.resources import (ResourceMeter, cpu_description, cpu_seconds, library_versions,
                                          machine_load, peak_rss_mb, pinned_versions, release_free_heap)

log = logging.getLogger(__name__)

METHODS: dict[str, MethodFactory] = {}
PROTOCOL_NAMES = ("temporal", "loo")
# Every flag's environment fallback is CHRONOREC_EVAL_<FLAG>; --settings' is the one most used.
ENV_PREFIX = "CHRONOREC_EVAL"
SETTINGS_ENV = f"{ENV_PREFIX}_SETTINGS"


def register_method(name: str, factory: MethodFactory | None = None, *, replace: bool = False):
    """Add a method to METHODS; usable directly or as a decorator (`@register_method("x")`)."""

    def add(f: MethodFactory) -> MethodFactory:
        if name in METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = f
        return f

    return add if factory is None else add(factory)


for _name, _factory in baselines.BASELINES.items():
    register_method(_name, _factory)


def load_plugins(modules: Sequence[str], settings: Mapping[str, Any] | None = None) -> dict[str, MethodFactory]:
    """Import plugin modules; the methods they give this evaluation, by name.

    A module with an `evaluation_methods(settings)` function (chronorec's own variants) is asked
    for its methods, built with `settings`: they and whatever they cache belong to this
    evaluation. A module without one registers its methods at import (`register_method`).
    """
    found: dict[str, MethodFactory] = {}
    for name in modules:
        module = importlib.import_module(name)
        provide = getattr(module, "evaluation_methods", None)
        if callable(provide):
            found.update(provide(dict(settings or {})))
    return found


def parse_settings(text: str | None) -> dict[str, Any]:
    """The plugins' settings from a JSON object (empty or None: none)."""
    if not text or not text.strip():
        return {}
    settings = json.loads(text)
    if not isinstance(settings, dict):
        raise ValueError(f"plugin settings must be a JSON object, not {text!r}")
    return settings


def ratings_file(path: str | Path) -> Path | None:
    """The file holding the events of a dataset path (what the report's sha256 identifies)."""
    path = Path(path)
    fmt = importers.detect_format(path)
    folder = path.parent if path.is_file() and fmt != importers.JSONL else path
    if fmt == importers.JSONL:
        candidate = path if path.is_file() else path / "events.jsonl"
    else:
        candidate = folder / importers.RATINGS_FILES[fmt]
    return candidate if candidate.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_info(dataset: Dataset, path: str | Path | None) -> dict:
    info = {"path": str(path) if path is not None else None, "format": None, "ratings_file": None, "sha256": None,
            "n_events": dataset.n_events, "n_users": dataset.n_users, "n_items": dataset.n_items,
            "n_items_not_in_catalogue": dataset.n_items - dataset.n_catalogue_items}
    if path is not None:
        info["format"] = importers.detect_format(path)
        rf = ratings_file(path)
        if rf is not None:
            info["ratings_file"], info["sha256"] = str(rf), sha256_file(rf)
    return info


def build_split(dataset: Dataset, protocol: str, quantile: float = 0.8) -> Split:
    """The split of `protocol` ("temporal" or "loo")."""
    if protocol == "temporal":
        return temporal_split(dataset, quantile)
    if protocol == "loo":
        return loo_split(dataset)
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOL_NAMES)}")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="inst", leave=False, disable=not enabled, file=sys.stderr)


def run_method(name: str, factory: MethodFactory, split: Split, *, progress: bool = True,
               batch_size: int = 1024) -> tuple[dict, dict[str, np.ndarray]]:
    """Build (and tune), fit and score one method on a split: (its report entry, per-instance metrics).

    The entry holds the metrics, NDCG@10 by time since the user's previous event (`by_gap`) and
    by warm or cold target item (`by_target`), the wall time of each phase and the method's
    peak resident memory (`resources`; what the method built for others, such as a shared
    encoder, is counted where it is first built)."""
    task = split.test_task()
    with ResourceMeter() as meter:
        t0 = time.perf_counter()
        ranker = factory(split)
        setup_s = time.perf_counter() - t0
        with _progress_bar(len(task.instances), f"{split.protocol}:{name}", progress) as bar:
            result = fit_and_score(ranker, task, batch_size, bar.update)
        params = dict(getattr(ranker, "params", {}) or {})
    # The ranker (a 10k × 10k similarity, a replay) goes now, not at the next cycle collection.
    del ranker
    gc.collect()
    ndcg = result.metrics["NDCG@10"]
    entry = {
        "metrics": summarize(result.metrics, task.instances.user),
        "by_gap": metric_by_bucket(ndcg, gap_buckets(task.instances)),
        "by_target": metric_by_bucket(ndcg, target_buckets(task), TARGET_LABELS),
        "timing_s": {"setup": setup_s, "fit": result.fit_s, "score": result.score_s,
                     "total": setup_s + result.fit_s + result.score_s},
        "resources": meter.report(),
        "params": params,
    }
    return entry, result.metrics


def _end_split(factories: Mapping[str, MethodFactory], split: Split) -> None:
    """Tells each plugin whose methods hold what a split built (encoders, replays, models: ~1 GB
    on a 10k-item catalogue) that the split is done, before the next split's methods run (the
    baselines first, with the largest matrices): its `end_split(split)`, when it has one."""
    owners = {id(o): o for o in (getattr(f, "__self__", None) for f in factories.values()) if hasattr(o, "end_split")}
    for owner in owners.values():
        owner.end_split(split)
    gc.collect()
    # What the split's objects held goes back to the system, not kept free in the C heap (by how
    # it fell, 1.7 to 2.1 GB stayed resident on ml-latest-small into loo's baselines, whose
    # 760 MB item similarity then peaked the process at 2.9 GB).
    release_free_heap()


def evaluate(dataset: Dataset, protocols: Sequence[str], methods: Sequence[str], *, data_path: str | Path | None = None,
             quantile: float = 0.8, progress: bool = True, batch_size: int = 1024,
             per_instance: dict[str, np.ndarray] | None = None,
             factories: Mapping[str, MethodFactory] | None = None) -> dict:
    """Run `methods` (names in `factories`, default METHODS) under each protocol; the report document
    (see report.py).

    `per_instance`, when given, receives "<protocol>/<method>/<metric>" arrays (and
    "<protocol>/pos", the target's global positions) for paired comparisons between methods; its
    "better" and "tied" arrays are rank_counts' (better = protocols.UNRANKED: a repeated target,
    not ranked)."""
    factories = METHODS if factories is None else factories
    unknown = [m for m in methods if m not in factories]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(factories)}")
    document = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset_info(dataset, data_path),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
        "metrics": list(METRIC_NAMES),
        "machine": {**machine_load(), "cpu": cpu_description()},
        "libraries": library_versions(),
        "libraries_pinned": pinned_versions(),
        "protocols": {},
    }
    for protocol in protocols:
        split = build_split(dataset, protocol, quantile)
        if len(split.test_task().instances) == 0:
            raise ValueError(f"the {protocol} split of this dataset has no test instances")
        entries = {}
        if per_instance is not None:
            per_instance[f"{protocol}/pos"] = split.test_task().instances.pos
        paired: dict[str, dict[str, np.ndarray]] = {}
        for name in methods:
            entry, metrics = run_method(name, factories[name], split, progress=progress, batch_size=batch_size)
            entries[name] = entry
            paired[name] = {"NDCG@10": metrics["NDCG@10"], "HR@10": metrics["HR@10"]}
            if per_instance is not None:
                per_instance.update({f"{protocol}/{name}/{k}": v for k, v in metrics.items()})
            m = entry["metrics"]
            log.info("%s %s: HR@10 %.4f NDCG@10 %.4f (%.1f s, %s cores busy, peak RSS %s MB)", protocol, name,
                     m["HR@10"]["mean"], m["NDCG@10"]["mean"], entry["timing_s"]["total"],
                     entry["resources"]["cores_busy"], entry["resources"]["peak_rss_mb"])
        task = split.test_task()
        users = task.instances.user
        document["protocols"][protocol] = {
            "details": split.details(), "methods": entries,
            "comparisons": report.paired_comparisons(paired, users, list(baselines.BASELINES)),
            "bucket_comparisons": report.bucket_comparisons(
                paired, users, list(baselines.BASELINES),
                {"gap": (gap_buckets(task.instances), GAP_LABELS), "target": (target_buckets(task), TARGET_LABELS)}),
        }
        if protocol != protocols[-1]:
            _end_split(factories, split)
    document["machine_at_end"] = machine_load()
    document["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return document


@dataclass
class EvalCommand:
    """One `chronorec-eval` (or `chronorec-train eval`) run: data, protocols, methods, report folder."""

    data: str = setting(help="MovieLens folder (ml-100k, ml-latest*, ml-1m, ml-10m) or JSONL file/folder")
    out: str = setting(help="report folder (report.md, report.json, PNG plots, per_instance.npz)")
    protocol: str = setting("both", choices=("temporal", "loo", "both"), help="evaluation protocol")
    methods: str | None = setting(None, help="comma-separated method names (none: all; see --list-methods)")
    plugin: list[str] = setting(default_factory=list, help=(
        "import MODULE first so that it can give methods (repeatable; comma-separated in the environment)"))
    settings: str | None = setting(None, help="the plugins' settings as a JSON object, e.g. '{\"max_length\": 64}'")
    quantile: float = setting(0.8, help="temporal cutoff quantile")
    batch_size: int = setting(1024, help="instances scored per call")
    progress: bool = setting(True, help="progress bars")
    list_methods: bool = setting(False, help="print the available methods and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronorec-eval", description=__doc__.split(":", 1)[1].strip())
    add_settings_flags(parser, EvalCommand, env_prefix=ENV_PREFIX)
    add_settings_flags(parser, Verbosity, env_prefix=ENV_PREFIX)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Handler shared by `chronorec-eval` and a `chronorec-train eval` subcommand."""
    command = settings_from_args(EvalCommand, args)
    factories = {**METHODS, **load_plugins(command.plugin, parse_settings(command.settings))}
    if command.list_methods:
        print("\n".join(factories))
        return 0
    methods = list(factories) if not command.methods else [m.strip() for m in command.methods.split(",") if m.strip()]
    protocols = list(PROTOCOL_NAMES) if command.protocol == "both" else [command.protocol]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    # A ratings file without its item file is a bare ratings log: each item is known by its id.
    dataset = Dataset(*importers.detect_and_load(command.data, items_optional=True))
    load_s = time.perf_counter() - t0
    per_instance: dict[str, np.ndarray] = {}
    document = evaluate(dataset, protocols, methods, data_path=command.data, quantile=command.quantile,
                        progress=command.progress, batch_size=command.batch_size, per_instance=per_instance,
                        factories=factories)
    document["load_s"] = load_s
    document["total_s"] = time.perf_counter() - t0
    document["cpu_s"] = round(cpu_seconds() - cpu0, 1)
    written = report.write_report(document, command.out)
    np.savez_compressed(Path(command.out) / "per_instance.npz", **per_instance)
    for name, protocol in document["protocols"].items():
        print(f"\n## {name}\n")
        print(report.markdown_table(protocol) if protocol["methods"] else "(no methods)")
    print(f"report: {written['markdown']}")
    return 0


def register_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    """Registrar for chronorec.trainer.cli.SUBCOMMANDS["eval"]."""
    parser = subparsers.add_parser("eval", help="evaluate recommenders (temporal / leave-one-out)",
                                   description=__doc__.split(":", 1)[1].strip())
    add_settings_flags(parser, EvalCommand, env_prefix=ENV_PREFIX)
    parser.set_defaults(handler=run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `chronorec-eval`; 0 on success, 1 on a failure."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("chronorec").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.verbose:
            log.exception("evaluation failed")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
