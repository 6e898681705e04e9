"""What a new session can be ranked by on the short-lived log: the week's counts, with and without the generator's own topics.

    .venv/bin/python -m tests.bench.eval_trend_data --out /tmp/eval-trend-g1 --bare --seed 1
    .venv/bin/python -m tests.bench.eval_trend_ceiling --data /tmp/eval-trend-g1 --seed 1

The log's generator (eval_trend_data) starts each session at a random time, on the user's
favourite topic in 30 % of sessions, and half a session's events keep to its topic. So a test
event an hour or more after the user's previous one starts a new session, and what there is to
know about it is what is popular now and which topic the user favours. This ranks the temporal
test events (the evaluation's split) over the whole catalogue by the 7-day count times
(1 + β × the user's history's share in the item's topic, topics as generated), ties broken by the
all-time count, the history excluded, for a few β, and prints NDCG@10 per time-since-previous-
event bucket. β = 0 is RecentPop-7d's ranking, to the last tie. Nothing is fitted: it tells how
far any recommender can get past the week's popularity on those users, given the true topics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chronorec.server.core import importers
from chronorec.trainer.protocols import (
    GAP_LABELS, UNRANKED, Dataset, expected_metrics, exclusion_mask, gap_buckets, prefix_item_counts, rank_counts,
    temporal_split,
)

from .eval_trend_data import generate

WINDOW_S = 7 * 86400.0
BETAS = (0.0, 1.0, 3.0, 10.0)


def topics_of(dataset: Dataset, seed: int, n_items: int, n_users: int) -> np.ndarray:
    """Each catalogue item's generated topic (an index), from the generator run again with the log's arguments."""
    items, events = generate(seed, n_items=n_items, n_users=n_users)
    times = np.sort(np.array([e["timestamp"] for e in events]))
    if len(events) != dataset.n_events or not np.array_equal(times, dataset.ts):  # both in time order
        raise SystemExit(f"the log is not the one the generator makes with seed {seed}, {n_items} items and "
                         f"{n_users} users ({dataset.n_events} events against {len(events)}): give the log's own arguments")
    names = sorted({item["category"] for item in items})
    topic = {item["item_id"]: names.index(item["category"]) for item in items}
    return np.array([topic[i] for i in dataset.item_ids], dtype=np.int64)


def ndcg_per_instance(dataset: Dataset, topic: np.ndarray, betas=BETAS, batch: int = 512) -> tuple[dict, np.ndarray]:
    """({β: NDCG@10 per temporal test instance}, gap bucket per instance)."""
    split = temporal_split(dataset)
    instances = split.instances
    out = {beta: np.zeros(len(instances)) for beta in betas}
    n_topics = int(topic.max()) + 1
    for a in range(0, len(instances), batch):
        part = instances[a:a + batch]
        start = np.searchsorted(dataset.ts, part.time - WINDOW_S, side="left")
        counts = prefix_item_counts(dataset, np.concatenate((part.pos, start)))
        all_time = counts[:len(part)].astype(np.float64)
        window = all_time - counts[len(part):]
        rows, positions = part.history_flat()
        share = np.bincount(rows * n_topics + topic[dataset.item[positions]],
                            minlength=len(part) * n_topics).reshape(len(part), n_topics).astype(np.float64)
        share /= np.maximum(part.hist_len, 1)[:, None]
        excluded = exclusion_mask(part)
        at = np.arange(len(part))
        for beta in betas:
            primary = window * (1.0 + beta * share[:, topic])
            # Lexicographic (primary, all-time count): the candidates above the target on the first,
            # then, among those level with it there, the all-time count's own better and tied.
            above, _ = rank_counts(primary, part.target, excluded)
            level = np.where(primary == primary[at, part.target][:, None], all_time, -np.inf)
            above_level, tied = rank_counts(level, part.target, excluded)
            better = np.where(above == UNRANKED, UNRANKED, above + above_level)
            out[beta][a:a + len(part)] = expected_metrics(better, tied, cutoffs=(10,))["NDCG@10"]
    return out, gap_buckets(instances)


def table(per_instance: dict, buckets: np.ndarray) -> list[dict]:
    rows = []
    for beta, values in per_instance.items():
        row = {"beta": beta, "all": float(values.mean())}
        for b, label in enumerate(GAP_LABELS):
            chosen = values[buckets == b]
            row[label] = {"n": int(chosen.size), "ndcg10": float(chosen.mean()) if chosen.size else None}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the log eval_trend_data wrote")
    parser.add_argument("--seed", type=int, default=5, help="the seed it was written with")
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    dataset = Dataset(*importers.detect_and_load(args.data, items_optional=True))
    per_instance, buckets = ndcg_per_instance(dataset, topics_of(dataset, args.seed, args.items, args.users))
    rows = table(per_instance, buckets)
    print("temporal NDCG@10 over the whole catalogue: 7-day count × (1 + β × the history's share in the item's topic)")
    print("| β | all | " + " | ".join(f"{label} ({rows[0][label]['n']})" for label in GAP_LABELS) + " |")
    print("|---|---|" + "---|" * len(GAP_LABELS))
    for row in rows:
        cells = [f"{row[label]['ndcg10']:.4f}" if row[label]["ndcg10"] is not None else "–" for label in GAP_LABELS]
        print(f"| {row['beta']:g} | {row['all']:.4f} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
