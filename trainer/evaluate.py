"""`chronorec-eval`: run registered recommenders through the evaluation protocols and write a report."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from chronorec.server.core import importers
from chronorec.trainer import baselines, report
from chronorec.trainer.protocols import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRIC_NAMES, Dataset, MethodFactory, Split, fit_and_score, gap_buckets, loo_split, metric_by_bucket, summarize, temporal_split,
)

log = logging.getLogger(__name__)

METHODS: dict[str, MethodFactory] = {}
PROTOCOL_NAMES = ("temporal", "loo")


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


def load_plugins(modules: Sequence[str]) -> None:
    """Import modules that call register_method (e.g. chronorec's own encoder variants)."""
    for module in modules:
        importlib.import_module(module)


def ratings_file(path: str | Path) -> Path | None:
    """The file holding the events of a dataset path (what the report's sha256 identifies)."""
    path = Path(path)
    fmt = importers.detect_format(path)
    folder = path.parent if path.is_file() and fmt != importers.JSONL else path
    candidates = {importers.ML100K: [folder / "u.data"], importers.ML_LATEST: [folder / "ratings.csv"],
                  importers.JSONL: [path] if path.is_file() else [path / "events.jsonl"]}[fmt]
    return next((c for c in candidates if c.is_file()), None)


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
    """Build (and tune), fit and score one method on a split: (its report entry, per-instance metrics)."""
    task = split.test_task()
    t0 = time.perf_counter()
    ranker = factory(split)
    setup_s = time.perf_counter() - t0
    with _progress_bar(len(task.instances), f"{split.protocol}:{name}", progress) as bar:
        result = fit_and_score(ranker, task, batch_size, bar.update)
    entry = {
        "metrics": summarize(result.metrics, task.instances.user),
        "by_gap": metric_by_bucket(result.metrics["NDCG@10"], gap_buckets(task.instances)),
        "timing_s": {"setup": setup_s, "fit": result.fit_s, "score": result.score_s,
                     "total": setup_s + result.fit_s + result.score_s},
        "params": dict(getattr(ranker, "params", {}) or {}),
    }
    return entry, result.metrics


def evaluate(dataset: Dataset, protocols: Sequence[str], methods: Sequence[str], *, data_path: str | Path | None = None,
             quantile: float = 0.8, progress: bool = True, batch_size: int = 1024,
             per_instance: dict[str, np.ndarray] | None = None) -> dict:
    """Run `methods` (names in METHODS) under each protocol; the report document (see report.py).

    `per_instance`, when given, receives "<protocol>/<method>/<metric>" arrays (and
    "<protocol>/pos", the target's global positions) for paired comparisons between methods."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    document = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset_info(dataset, data_path),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
        "metrics": list(METRIC_NAMES),
        "protocols": {},
    }
    for protocol in protocols:
        split = build_split(dataset, protocol, quantile)
        if len(split.test_task().instances) == 0:
            raise ValueError(f"the {protocol} split of this dataset has no test instances")
        entries = {}
        if per_instance is not None:
            per_instance[f"{protocol}/pos"] = split.test_task().instances.pos
        for name in methods:
            entry, metrics = run_method(name, METHODS[name], split, progress=progress, batch_size=batch_size)
            entries[name] = entry
            if per_instance is not None:
                per_instance.update({f"{protocol}/{name}/{k}": v for k, v in metrics.items()})
            m = entry["metrics"]
            log.info("%s %s: HR@10 %.4f NDCG@10 %.4f (%.1f s)", protocol, name, m["HR@10"]["mean"],
                     m["NDCG@10"]["mean"], entry["timing_s"]["total"])
        document["protocols"][protocol] = {"details": split.details(), "methods": entries}
    return document


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="MovieLens folder (ml-100k, ml-latest*) or JSONL file/folder")
    parser.add_argument("--protocol", choices=["temporal", "loo", "both"], default="both")
    parser.add_argument("--out", required=True,
                        help="report folder (report.md, report.json, PNG plots, per_instance.npz)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: all registered; see --list-methods)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first so that it can register methods (repeatable)")
    parser.add_argument("--quantile", type=float, default=0.8, help="temporal cutoff quantile (default 0.8)")
    parser.add_argument("--batch-size", type=int, default=1024, help="instances scored per call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronorec-eval", description=__doc__.split(":", 1)[1].strip())
    _add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each method's result")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Handler shared by `chronorec-eval` and a `chronorec-train eval` subcommand."""
    load_plugins(args.plugin)
    if args.list_methods:
        print("\n".join(METHODS))
        return 0
    methods = list(METHODS) if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    protocols = list(PROTOCOL_NAMES) if args.protocol == "both" else [args.protocol]
    t0 = time.perf_counter()
    dataset = Dataset(*importers.detect_and_load(args.data))
    load_s = time.perf_counter() - t0
    per_instance: dict[str, np.ndarray] = {}
    document = evaluate(dataset, protocols, methods, data_path=args.data, quantile=args.quantile,
                        progress=not args.no_progress, batch_size=args.batch_size, per_instance=per_instance)
    document["load_s"] = load_s
    document["total_s"] = time.perf_counter() - t0
    written = report.write_report(document, args.out)
    np.savez_compressed(Path(args.out) / "per_instance.npz", **per_instance)
    for name, protocol in document["protocols"].items():
        print(f"\n## {name}\n")
        print(report.markdown_table(protocol) if protocol["methods"] else "(no methods)")
    print(f"report: {written['markdown']}")
    return 0


def register_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    """Registrar for chronorec.trainer.cli.SUBCOMMANDS["eval"]."""
    parser = subparsers.add_parser("eval", help="evaluate recommenders (temporal / leave-one-out)",
                                   description=__doc__.split(":", 1)[1].strip())
    _add_arguments(parser)
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
