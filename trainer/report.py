"""Evaluation report: Markdown tables, a JSON document and matplotlib plots (Agg) from one result document."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # reports are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from chronorec.trainer.resources import cores_busy, off_pin  # noqa: E402

TABLE_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")
# chronorec's forms as compared with the baselines: the first of these that ran.
CHRONOREC_FORMS = ("chronorec-ranker", "chronorec-blend", "chronorec-finetuned-time")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(summary: Mapping, key: str = "ci95") -> str:
    lo, hi = summary[key]
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def markdown_table(protocol: Mapping, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One row per method: per-instance means with 95% intervals, per-user NDCG@10, run time, peak RSS."""
    head = ["method"] + [m for m in metrics] + ["NDCG@10 per user", "time (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in protocol["methods"].items():
        cells = [name]
        for m in metrics:
            s = result["metrics"][m]
            cells.append(f"{_fmt(s['mean'])} {_interval(s)}")
        s = result["metrics"]["NDCG@10"]
        cells.append(f"{_fmt(s['per_user_mean'])} {_interval(s, 'per_user_ci95')}")
        cells.append(f"{result['timing_s']['total']:.1f}")
        cells.append(_fmt((result.get("resources") or {}).get("peak_rss_mb"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bucket_table(protocol: Mapping, key: str, title: str, described: Mapping[str, str] | None = None) -> str:
    """Metric per method and bucket (`key`: "by_gap" or "by_target"), the best of each bucket in bold;
    `described`: what each bucket holds, listed after `title` for the buckets shown."""
    methods = {name: result for name, result in protocol["methods"].items() if result.get(key)}
    if not methods:
        return ""
    first = next(iter(methods.values()))[key]
    shown = [k for k, b in enumerate(first) if b["n"]]  # a bucket no test event falls in is left out
    best = {k: max((r[key][k]["mean"] for r in methods.values() if r[key][k]["mean"] is not None), default=None)
            for k in shown}
    head = ["method"] + [f"{first[k]['bucket']} (n={first[k]['n']})" for k in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in methods.items():
        buckets = result[key]
        cells = [f"**{_fmt(buckets[k]['mean'])}**" if buckets[k]["mean"] is not None and buckets[k]["mean"] == best[k]
                 else _fmt(buckets[k]["mean"]) for k in shown]
        lines.append("| " + " | ".join([name] + cells) + " |")
    if described:
        parts = [f"{first[k]['bucket']} ({described[first[k]['bucket']]})" for k in shown]
        title += ": " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    return f"{title}\n\n" + "\n".join(lines)


def gap_table(protocol: Mapping) -> str:
    """NDCG@10 (the metric `by_gap` holds) per method and bucket of time since the user's previous event."""
    return _bucket_table(protocol, "by_gap", "NDCG@10 by time since the user's previous event")


def target_table(protocol: Mapping) -> str:
    """NDCG@10 per method on cold targets (the item has no training event), repeats (any other whose
    item is in the user's own history) and warm ones (the rest)."""
    return _bucket_table(protocol, "by_target", "NDCG@10 by target item", {
        "warm": "seen in training", "cold": "first seen after the cutoff",
        "repeat": "a warm item already in the user's history, which no method can hit: the history's items are "
                  "excluded"})


def resources_table(protocol: Mapping) -> str:
    """Wall time per phase and peak resident memory per method (MB = 2^20 bytes)."""
    methods = {name: result for name, result in protocol["methods"].items() if result.get("resources")}
    if not methods:
        return ""
    head = ["method", "setup (s)", "fit (s)", "score (s)", "total (s)", "CPU (s)", "cores busy", "peak RSS (MB)",
            "above its start (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in methods.items():
        t, r = result["timing_s"], result["resources"]
        peak = _fmt(r.get("peak_rss_mb"), 0) + ("" if r.get("peak_exact") else "*")
        lines.append("| " + " | ".join([name, f"{t['setup']:.1f}", f"{t['fit']:.1f}", f"{t['score']:.1f}",
                                        f"{t['total']:.1f}", _fmt(r.get("cpu_seconds"), 1),
                                        _fmt(r.get("cores_busy"), 2), peak,
                                        _fmt(r.get("peak_increase_mb"), 0)]) + " |")
    return ("Time and memory per method (a method's setup includes what it builds first for others, "
            "e.g. an encoder; CPU: user and system time of its threads and of the processes it forked; "
            "cores busy: CPU over wall time; * = sampled every 20 ms, below an earlier peak of the process)\n\n"
            + "\n".join(lines))


def ranker_table(protocol: Mapping, method: str = "chronorec-ranker") -> str:
    """What the learned ranker chose on the validation window: its figure against the blend's, the
    second look, and per range of time since the previous event the trees against the best single
    signal (and trend window) alone, with the route taken, if any, and the rule that took it."""
    fit = ((protocol["methods"].get(method) or {}).get("params") or {}).get("ranker")
    if not isinstance(fit, Mapping) or "valid_NDCG@10_ranker" not in fit:
        return ""
    held_out = fit.get("valid_held_out")
    fair = ""
    if isinstance(held_out, Mapping):
        # The blend's time model was tuned on the rest of the window: its figure there is its own fit's.
        fair = (f" ({_fmt(held_out.get('NDCG@10_ranker'))} against {_fmt(held_out.get('NDCG@10_blend'))} on the "
                f"{held_out.get('events')} of them the blend was not tuned on, which decide)")
    head = (f"{method} on the validation window ({fit.get('valid_instances')} events): NDCG@10 "
            f"{_fmt(fit['valid_NDCG@10_ranker'])} against the blend's {_fmt(fit.get('valid_NDCG@10_blend'))}{fair}, "
            f"{fit.get('best_iteration')} rounds on {fit.get('train_groups')} training groups; "
            f"{'used' if fit.get('used', True) else 'not used (the blend ranks)'}")
    second = fit.get("valid_NDCG@10_with_without_second_look")
    if second:
        head += (f"; second look {'kept' if fit.get('second_look') else 'not used'} ({_fmt(second[0])} with it, "
                 f"{_fmt(second[1])} without)")
    rows = fit.get("route_choice") or []
    if not rows:
        return head + "."
    lines = ["| time since the previous event | validation events | trees | best signal alone | best trend window "
             "alone | routed to |", "|---|---|---|---|---|---|"]
    for r in rows:
        trend = "–"
        if "best_trend" in r:
            # Chosen over these events and, when counted, the training windows' in the same range (choose_routes).
            pooled = r.get("trend_pooled", {}).get(r["best_trend"])
            over = "" if pooled is None else f"; {_fmt(pooled)} over these and {r['earlier_events']} training events"
            trend = f"{_fmt(r['trend_alone'])} ({r['best_trend']}{over})"
        routed = "–"
        if r.get("routed"):
            routed = f"{r.get('route', r['best_feature'])} ({r.get('rule', 'bootstrap bound')})"
        # The blend's score competes on the events its time model was not tuned on only.
        alone = (f"{_fmt(r['feature_alone'])} ({r['best_feature']})" if "feature_events" not in r else
                 f"{_fmt(r['feature_alone'])} ({r['best_feature']}; the trees {_fmt(r.get('trees_on_those'))} on its "
                 f"{r['feature_events']} events)")
        lines.append(f"| {r['gap']} | {r['events']} | {_fmt(r['trees'])} | {alone} | {trend} | {routed} |")
    return head + (". NDCG@10 per range of time since the previous event, on the validation events whose target "
                   "is among the candidates and more of the window's returning users' events:\n\n") + \
        "\n".join(lines)


# Paired comparisons the report shows when both methods ran: (method, reference, what it measures).
PAIRED_COMPARISONS = (
    ("chronorec-ranker", "chronorec-blend", "learned ranker vs the blend it reorders"),
    ("chronorec-finetuned-time", "chronorec-untuned-time", "fine-tuned vs base encoder (same tuning)"),
    ("chronorec-blend", "chronorec-untuned-time", "the pipeline's encoder choice vs the base encoder"),
    ("chronorec-finetuned-time", "chronorec-finetuned-blind", "time-aware vs time-blind"),
)


def paired_comparisons(metrics: Mapping[str, Mapping[str, np.ndarray]], users, baselines: Sequence[str],
                       metric: str = "NDCG@10") -> list[dict]:
    """Mean difference of `metric` per test instance between methods run on the same instances, with
    its user-clustered bootstrap 95% interval: PAIRED_COMPARISONS, and chronorec's best form against
    the best baseline (by mean)."""
    from chronorec.trainer.protocols import bootstrap_ci

    pairs = [(a, b, label) for a, b, label in PAIRED_COMPARISONS if a in metrics and b in metrics]
    ran_baselines = [b for b in baselines if b in metrics]
    ours = [m for m in CHRONOREC_FORMS if m in metrics]
    if ran_baselines and ours:
        pairs.append((ours[0], _best_baseline(metrics, ran_baselines, metric), "chronorec vs the best baseline"))
    out = []
    for method, reference, label in pairs:
        a, b = metrics[method][metric], metrics[reference][metric]
        low, high = bootstrap_ci(a - b, users)
        base = float(b.mean())
        out.append({"method": method, "reference": reference, "comparison": label, "metric": metric,
                    "difference": float(a.mean() - base), "ci95_user_clustered": [float(low), float(high)],
                    "relative": float(a.mean() / base - 1.0) if base > 0 else None})
    return out


def _best_baseline(metrics: Mapping[str, Mapping[str, np.ndarray]], baselines: Sequence[str], metric: str,
                   rows=None) -> str | None:
    """The baseline with the highest mean of `metric` (over `rows`, default all); the first such in
    `baselines` order on a tie."""
    ran = [b for b in baselines if b in metrics]
    if not ran:
        return None
    return max(ran, key=lambda b: float((metrics[b][metric] if rows is None else metrics[b][metric][rows]).mean()))


def bucket_comparisons(metrics: Mapping[str, Mapping[str, np.ndarray]], users, baselines: Sequence[str],
                       buckets: Mapping[str, tuple[np.ndarray, Sequence[str]]], metric: str = "NDCG@10",
                       hits: str = "HR@10") -> list[dict]:
    """chronorec's best form against the best baseline of each bucket (`buckets`: per kind, each test
    instance's bucket index and the labels; the baseline with the highest mean there): the paired
    difference of `metric` with its user-clustered bootstrap 95% interval, and each side's top-10
    hits (the sum of `hits`, HR@10's expected hits with ties), on the bucket's instances only."""
    from chronorec.trainer.protocols import bootstrap_ci

    ours = next((m for m in CHRONOREC_FORMS if m in metrics), None)
    if ours is None or not any(b in metrics for b in baselines):
        return []
    users = np.asarray(users)
    out = []
    for kind, (index, labels) in buckets.items():
        for b, label in enumerate(labels):
            rows = index == b
            if not rows.any():
                continue
            best = _best_baseline(metrics, baselines, metric, rows)
            a, r = metrics[ours][metric][rows], metrics[best][metric][rows]
            low, high = bootstrap_ci(a - r, users[rows])
            entry = {"kind": kind, "bucket": label, "n": int(rows.sum()), "method": ours, "reference": best,
                     "metric": metric, "mean": float(a.mean()), "reference_mean": float(r.mean()),
                     "difference": float(a.mean() - r.mean()), "ci95_user_clustered": [float(low), float(high)]}
            if hits in metrics[ours] and hits in metrics[best]:
                entry["hits"] = [float(metrics[ours][hits][rows].sum()), float(metrics[best][hits][rows].sum())]
            out.append(entry)
    return out


def bucket_comparisons_table(protocol: Mapping) -> str:
    rows = protocol.get("bucket_comparisons") or []
    if not rows:
        return ""
    first = rows[0]
    lines = [f"| bucket | events | {first['method']} | the bucket's best baseline | difference | "
             f"95% CI (users resampled) | top-10 hits (ours / theirs) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95_user_clustered"]
        hits = "–" if "hits" not in r else " / ".join(f"{h:.1f}".removesuffix(".0") for h in r["hits"])
        lines.append(f"| {r['bucket']} | {r['n']} | {_fmt(r['mean'])} | {_fmt(r['reference_mean'])} "
                     f"({r['reference']}) | {r['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] | {hits} |")
    return (f"{first['metric']} of chronorec against each bucket's best baseline, paired on the bucket's "
            f"test instances\n\n" + "\n".join(lines))


def comparisons_table(protocol: Mapping) -> str:
    rows = protocol.get("comparisons") or []
    if not rows:
        return ""
    lines = ["| method | reference | comparison | difference | 95% CI (users resampled) | relative |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95_user_clustered"]
        relative = "–" if r["relative"] is None else f"{r['relative']:+.1%}"
        lines.append(f"| {r['method']} | {r['reference']} | {r['comparison']} | {r['difference']:+.4f} | "
                     f"[{low:+.4f}, {high:+.4f}] | {relative} |")
    return f"Paired differences of {rows[0]['metric']} on the same test instances\n\n" + "\n".join(lines)


def _details_lines(details: Mapping) -> list[str]:
    return [f"- {k}: {v}" for k, v in details.items()]


def _cpu_words(cpu: Mapping) -> str:
    """The CPU as the report names it (e.g. AMD EPYC; NumPy's SIMD X86_V3, X86_V4; openblas kernels
    SkylakeX): what the figures' last digits depend on beside the libraries' versions."""
    parts = [cpu["model"]] if cpu.get("model") else []
    if cpu.get("simd"):
        parts.append("NumPy's SIMD " + ", ".join(cpu["simd"]))
    for blas in cpu.get("blas") or []:
        if blas.get("architecture"):
            parts.append(f"{blas.get('library') or 'BLAS'} kernels {blas['architecture']}")
    return "; ".join(dict.fromkeys(parts))  # numpy's and scipy's OpenBLAS name the same kernels once


def _pins_words(installed: Mapping[str, str], pins: Mapping[str, str] | None) -> str:
    """Whether the figures' libraries are the versions server/constraints.txt pins."""
    if not pins:
        return ""
    off = off_pin(installed, pins)
    if not off:
        return " These are the versions server/constraints.txt pins."
    return (" Not the versions server/constraints.txt pins, so the figures may differ from a pinned setup's in "
            "their last digits: " + ", ".join(f"{name} {have} (pinned {pin})" for name, (have, pin) in off.items())
            + ".")


def _cpu_of_run(document: Mapping) -> str:
    """", N s of CPU (C cores busy)" for the machine line, or "" when the run's CPU was not taken."""
    if document.get("cpu_s") is None or document.get("total_s") is None:
        return ""
    cores = cores_busy(document["cpu_s"], document["total_s"])
    return f", {document['cpu_s']:.0f} s of CPU" + ("" if cores is None else f" ({cores:.2f} cores busy)")


def markdown_report(document: Mapping) -> str:
    """The whole report as Markdown."""
    ds = document["dataset"]
    boot = document["bootstrap"]
    out = [
        "# chronorec evaluation",
        "",
        f"Dataset `{ds.get('path')}` ({ds.get('format')}): {ds['n_events']:,} events, {ds['n_users']:,} users, "
        f"{ds['n_items']:,} items; ratings file `{ds.get('ratings_file')}` sha256 `{ds.get('sha256')}`.",
        f"Full ranking over all items, history items excluded, ties at their expected rank. "
        f"Means per test instance with {int(boot['level'] * 100)}% bootstrap intervals "
        f"({boot['resamples']} resamples, seed {boot['seed']}); per user: users resampled.",
        f"Generated {document.get('generated_at', '')}.",
    ]
    machine, at_end = document.get("machine") or {}, document.get("machine_at_end") or {}
    if machine:
        cpu = _cpu_words(machine.get("cpu") or {})
        out.append(f"Machine: {machine.get('cpus')} CPUs{f' ({cpu})' if cpu else ''}, load average "
                   f"{machine.get('load_average')} at the start, "
                   f"{at_end.get('load_average')} at the end; peak RSS {document.get('peak_rss_mb')} MB"
                   + (f"; {document['total_s']:.0f} s in all" if document.get("total_s") is not None else "")
                   + _cpu_of_run(document) + ".")
    if document.get("libraries"):
        out.append("Libraries (the figures' last digits move with them): "
                   + ", ".join(f"{name} {version}" for name, version in document["libraries"].items()) + "."
                   + _pins_words(document["libraries"], document.get("libraries_pinned")))
    for name, protocol in document["protocols"].items():
        out += ["", f"## {name}", ""] + _details_lines(protocol["details"]) + ["", markdown_table(protocol)]
        params = {m: r["params"] for m, r in protocol["methods"].items() if r.get("params")}
        if params:
            out += ["", "Chosen parameters:"] + [f"- {m}: {json.dumps(_short_params(p), default=_json_default)}"
                                                 for m, p in params.items()]
        out += ["", gap_table(protocol), "", target_table(protocol), "", resources_table(protocol)]
        if ranker := ranker_table(protocol):
            out += ["", ranker]
        if protocol.get("comparisons"):
            out += ["", comparisons_table(protocol)]
        if protocol.get("bucket_comparisons"):
            out += ["", bucket_comparisons_table(protocol)]
        for plot in protocol.get("plots", []):
            out += ["", f"![{plot}]({plot})"]
    return "\n".join(out) + "\n"


def _short_params(params: Mapping) -> dict:
    # The per-candidate tuning curve belongs in the JSON, not the table's footnote.
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}


def plot_metric_intervals(protocol: Mapping, path: str | Path, metric: str = "NDCG@10", title: str | None = None) -> Path:
    """Horizontal bars of `metric` per method with 95% interval whiskers."""
    names = list(protocol["methods"])
    means = [protocol["methods"][n]["metrics"][metric]["mean"] for n in names]
    los = [protocol["methods"][n]["metrics"][metric]["ci95"][0] for n in names]
    his = [protocol["methods"][n]["metrics"][metric]["ci95"][1] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    y = range(len(names))
    ax.barh(y, means, xerr=[[m - lo for m, lo in zip(means, los)], [hi - m for m, hi in zip(means, his)]],
            color="#4c72b0", capsize=3)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (95% bootstrap interval)")
    ax.set_title(title or metric)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_by_gap(protocol: Mapping, path: str | Path, metric: str = "NDCG@10", title: str | None = None) -> Path:
    """`metric` per method against the bucketed time since the user's previous event."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels: list[str] = []
    # Ten colours repeat past ten methods: the line style tells the second round apart.
    colours = plt.get_cmap("tab10").colors
    for n, (name, result) in enumerate(protocol["methods"].items()):
        buckets = result["by_gap"]
        labels = [f"{b['bucket']}\n(n={b['n']})" for b in buckets]
        xs = [i for i, b in enumerate(buckets) if b["mean"] is not None]
        ax.plot(xs, [buckets[i]["mean"] for i in xs], marker="os^D"[n // 10 % 4], label=name,
                color=colours[n % 10], linestyle=("-", "--", ":", "-.")[n // 10 % 4])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("time since the user's previous event")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by time since the previous event")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(parameter: str, values: Sequence[float], series: Mapping[str, Sequence[Mapping]], path: str | Path,
               metric: str = "NDCG@10", log_x: bool = False, title: str | None = None) -> Path:
    """`metric` against a parameter sweep. `series` maps a method name to one summary per
    value, each {"mean": m, "ci95": [lo, hi]} (the shape protocols.summarize gives per metric);
    intervals are drawn as bands when present."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        if len(points) != len(values):
            raise ValueError(f"series {name!r} has {len(points)} points for {len(values)} values")
        means = [p["mean"] for p in points]
        line = ax.plot(values, means, marker="o", label=name)[0]
        if all(p.get("ci95") for p in points):
            ax.fill_between(values, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points],
                            color=line.get_color(), alpha=0.15)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(parameter)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against {parameter}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweeps(protocol: Mapping, out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """One plot per swept parameter found in the methods' params (`params["sweeps"][parameter]` =
    {"values": [...], "series": {label: [summary per value]}, "log_x": bool, "metric": str}), each
    series labelled "<method>: <label>"; returns {parameter: path}."""
    by_parameter: dict[str, dict] = {}
    for method, result in protocol["methods"].items():
        sweeps = (result.get("params") or {}).get("sweeps") or {}
        for parameter, sweep in sweeps.items():
            entry = by_parameter.setdefault(parameter, {"values": sweep["values"], "series": {},
                                                        "log_x": bool(sweep.get("log_x")),
                                                        "metric": sweep.get("metric", "NDCG@10"),
                                                        "note": sweep.get("window")})
            if list(sweep["values"]) != list(entry["values"]):
                raise ValueError(f"sweeps of {parameter} use different values")
            for label, points in sweep["series"].items():
                entry["series"][f"{method}: {label}"] = points
    written = {}
    for parameter, entry in by_parameter.items():
        title = f"{entry['metric']} against {parameter} — {prefix}"
        if entry["note"]:
            title += f"\n({entry['note']})"
        written[parameter] = plot_sweep(parameter, entry["values"], entry["series"],
                                        Path(out_dir) / f"{prefix}_sweep_{parameter}.png", metric=entry["metric"],
                                        log_x=entry["log_x"], title=title)
    return written


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_default(value):
    # Methods registered by others may put numpy scalars or arrays in their params.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(document: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and per-protocol PNG plots into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, protocol in document["protocols"].items():
        if not protocol["methods"]:
            continue
        bars = plot_metric_intervals(protocol, out / f"{name}_ndcg10.png", title=f"NDCG@10 — {name}")
        gaps = plot_by_gap(protocol, out / f"{name}_ndcg10_by_gap.png", title=f"NDCG@10 by time since previous event — {name}")
        protocol["plots"] = [bars.name, gaps.name]
        written[f"{name}_ndcg10"], written[f"{name}_ndcg10_by_gap"] = bars, gaps
        for parameter, path in plot_sweeps(protocol, out, name).items():
            protocol["plots"].append(path.name)
            written[f"{name}_sweep_{parameter}"] = path
    json_path = out / "report.json"
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n",
                         encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(markdown_report(document), encoding="utf-8")
    written["json"], written["markdown"] = json_path, md_path
    return written
