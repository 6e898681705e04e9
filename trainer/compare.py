"""`chronorec-train compare`: one method's paired difference between two evaluation runs, from their per-instance rows.

`chronorec-eval --out DIR` writes DIR/per_instance.npz: per protocol, each test instance's metrics
for each method it ran. Two runs over the same data, protocol and cutoff hold the same instances in
the same order, so a change (new code, a setting, another seed) is measured by pairing them
instance by instance: the mean difference with its user-clustered bootstrap 95 % interval, over
every instance, per time-since-previous-event bucket and per target kind (warm, cold, repeat),
with the very buckets the report uses. The two sides may also be two methods of one run (the
ranker against the blend).

    chronorec-train compare --data DIR --before RUN_A --after RUN_B --protocol temporal

Several data sets at once (each flag repeated, one pair of runs per data set) give one pooled
figure: every instance of every data set counts once, and the bootstrap resamples users within
their own data set, so a change too small to settle on one draw of a generated log can be read
over several.

    chronorec-train compare --data D1 --data D2 --before A1 --before A2 --after B1 --after B2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chronorec.server.core import importers
from chronorec.trainer.evaluate import PROTOCOL_NAMES, build_split
from chronorec.trainer.flags import add_settings_flags, setting, settings_from_args
from chronorec.trainer.protocols import (
    GAP_LABELS, METRIC_NAMES, TARGET_LABELS, Dataset, bootstrap_ci, gap_buckets, target_buckets,
)

ENV_PREFIX = "CHRONOREC_COMPARE"
PER_INSTANCE = "per_instance.npz"


@dataclass
class CompareCommand:
    """One comparison: the data set, the two runs, which protocol, method and metric."""

    data: list[str] = setting(help="the data set both runs evaluated (what chronorec-eval --data was given); "
                                   "repeated, for one comparison pooled over several")
    before: list[str] = setting(help="the reference run: a chronorec-eval report folder or its per_instance.npz "
                                     "(one per data set, in --data's order)")
    after: list[str] = setting(help="the run compared with it (the same folder for two methods of one run; "
                                    "one per data set)")
    protocol: str = setting("temporal", choices=PROTOCOL_NAMES, help="the protocol whose rows are paired")
    method: str = setting("chronorec-ranker", help="the method compared")
    before_method: str | None = setting(None, help="the reference run's method, when another (default: --method)")
    metric: str = setting("NDCG@10", choices=METRIC_NAMES, help="the metric compared")
    quantile: float = setting(0.8, help="the temporal cutoff quantile both runs used")
    as_json: bool = setting(False, flag="json", help="print the rows as JSON instead of a table")


def load_rows(path: str | Path) -> Mapping[str, np.ndarray]:
    """A run's per-instance arrays (a report folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / PER_INSTANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a chronorec-eval report folder or its {PER_INSTANCE}")
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _column(rows: Mapping[str, np.ndarray], protocol: str, method: str, metric: str, side: str) -> np.ndarray:
    key = f"{protocol}/{method}/{metric}"
    if key not in rows:
        ran = sorted({k.split("/")[1] for k in rows if k.startswith(f"{protocol}/") and k.count("/") == 2})
        raise ValueError(f"the {side} run has no {metric} of {method!r} under {protocol}; "
                         f"its methods there: {', '.join(ran) or 'none'}")
    return np.asarray(rows[key], dtype=np.float64)


# The scopes a comparison reports, each with its buckets' labels (_paired gives each instance's bucket).
_SCOPES: tuple[tuple[str, tuple[str, ...]], ...] = (("all", ("all",)), ("gap", GAP_LABELS), ("target", TARGET_LABELS))


def _paired(dataset: Dataset, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], *,
            protocol: str, method: str, before_method: str | None, metric: str, quantile: float,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """(before's values, after's, each instance's user, its bucket in each of _SCOPES) of one data
    set's test instances. Raises ValueError when a run holds other test instances than this data
    set's split (another data set, cutoff or protocol)."""
    task = build_split(dataset, protocol, quantile).test_task()
    positions = task.instances.pos
    for side, rows in (("before", before), ("after", after)):
        held = rows.get(f"{protocol}/pos")
        if held is None:
            raise ValueError(f"the {side} run holds no {protocol} rows")
        if len(held) != len(positions) or not np.array_equal(held, positions):
            raise ValueError(f"the {side} run was not run on this data set's {protocol} test instances "
                             f"({len(held)} instances against {len(positions)}): another data set, cutoff or protocol")
    a = _column(before, protocol, before_method or method, metric, "before")
    b = _column(after, protocol, method, metric, "after")
    buckets = (np.zeros(len(positions), dtype=np.int64), gap_buckets(task.instances), target_buckets(task))
    return a, b, np.asarray(task.instances.user, dtype=np.int64), buckets


def compare_runs(dataset: Dataset, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], *,
                 protocol: str = "temporal", method: str = "chronorec-ranker", before_method: str | None = None,
                 metric: str = "NDCG@10", quantile: float = 0.8) -> list[dict[str, Any]]:
    """Per scope ("all", "gap", "target") and bucket: the instances, each side's mean, and the mean of
    after − before with its user-clustered bootstrap 95 % interval. Raises ValueError when a run
    holds other test instances than this data set's split (another data set, cutoff or protocol)."""
    return compare_pooled([(dataset, before, after)], protocol=protocol, method=method,
                          before_method=before_method, metric=metric, quantile=quantile)


def compare_pooled(parts: Sequence[tuple[Dataset, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]], *,
                   protocol: str = "temporal", method: str = "chronorec-ranker", before_method: str | None = None,
                   metric: str = "NDCG@10", quantile: float = 0.8) -> list[dict[str, Any]]:
    """compare_runs over several data sets, each with its own pair of runs, pooled: every test
    instance counts once, and users are resampled within their own data set (a user of one is not
    a user of another). One data set gives compare_runs' rows exactly."""
    if not parts:
        raise ValueError("nothing to compare: give at least one data set and its two runs")
    paired = [_paired(dataset, before, after, protocol=protocol, method=method, before_method=before_method,
                      metric=metric, quantile=quantile) for dataset, before, after in parts]
    a = np.concatenate([p[0] for p in paired])
    b = np.concatenate([p[1] for p in paired])
    # One cluster per (data set, user): offsets keep each data set's users apart, in their order.
    offsets = np.cumsum([0] + [int(p[2].max()) + 1 if len(p[2]) else 0 for p in paired[:-1]])
    users = np.concatenate([p[2] + offset for p, offset in zip(paired, offsets)])
    out = []
    for k_scope, (scope, labels) in enumerate(_SCOPES):
        index = np.concatenate([p[3][k_scope] for p in paired])
        for k, label in enumerate(labels):
            rows = index == k
            if not rows.any():
                continue
            difference = b[rows] - a[rows]
            low, high = bootstrap_ci(difference, users[rows])
            out.append({"scope": scope, "bucket": label, "n": int(rows.sum()), "before": float(a[rows].mean()),
                        "after": float(b[rows].mean()), "difference": float(difference.mean()),
                        "ci95_user_clustered": [float(low), float(high)]})
    return out


def markdown(rows: list[dict[str, Any]], before: str, after: str, metric: str, data_sets: int = 1) -> str:
    pooled = f", pooled over {data_sets} data sets (users resampled within each)" if data_sets > 1 else ""
    lines = [f"{metric}, after − before, paired by instance{pooled}", "",
             f"| scope | bucket | instances | before: {before} | after: {after} | difference [95 % CI, users resampled] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95_user_clustered"]
        lines.append(f"| {r['scope']} | {r['bucket']} | {r['n']} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{r['difference']:+.4f} [{low:+.4f}, {high:+.4f}] |")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    command = settings_from_args(CompareCommand, args)
    data, befores, afters = command.data, command.before, command.after
    if not (len(data) == len(befores) == len(afters)):
        raise ValueError(f"--data, --before and --after name {len(data)}, {len(befores)} and {len(afters)} "
                         f"places: give one pair of runs per data set, in --data's order")
    parts = [(Dataset(*importers.detect_and_load(d, items_optional=True)), load_rows(b), load_rows(a))
             for d, b, a in zip(data, befores, afters)]
    rows = compare_pooled(parts, protocol=command.protocol, method=command.method,
                          before_method=command.before_method, metric=command.metric, quantile=command.quantile)
    if command.as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown(rows, f"{command.before_method or command.method} ({', '.join(befores)})",
                       f"{command.method} ({', '.join(afters)})", command.metric, data_sets=len(parts)))
    return 0


def register_compare_subcommand(subparsers) -> argparse.ArgumentParser:
    """Registrar for chronorec.trainer.cli.SUBCOMMANDS["compare"]."""
    parser = subparsers.add_parser("compare", help="pair two evaluation runs' per-instance rows: a change's effect",
                                   description=__doc__.split("\n\n")[0].split(":", 1)[1].strip())
    add_settings_flags(parser, CompareCommand, env_prefix=ENV_PREFIX)
    parser.set_defaults(handler=run_from_args)
    return parser


__all__ = ["CompareCommand", "compare_pooled", "compare_runs", "load_rows", "markdown", "register_compare_subcommand"]
