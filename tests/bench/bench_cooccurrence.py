"""Co-occurrence block reads (the learned ranker's history × candidates similarities), each stored
value placed among the candidates through a catalogue-sized map against by binary search, side by side."""

# Usage: python -m tests.bench.bench_cooccurrence [--items 9742] [--history 100] [--candidates 210]
# The model is fitted on generated baskets (Zipf-popular items, top 200 neighbours kept, sparse as
# any catalogue above 3,000 items); each round times the same calls both ways, alternating, and
# checks that they give the same bits. CPU time of this process, which other load disturbs less.

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from chronorec.server.core.cooccurrence import CooccurrenceModel

from .common import DEFAULT_OUT, log, print_table


def fitted(items: int, users: int, seed: int) -> tuple[CooccurrenceModel, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"i{j}" for j in range(items)]
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    popularity /= popularity.sum()
    baskets = {f"u{u}": [ids[j] for j in rng.choice(items, size=int(rng.integers(20, 300)), p=popularity)]
               for u in range(users)}
    return CooccurrenceModel.fit(baskets, ids, dense_max_items=0), ids, popularity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=9742, help="catalogue size (ml-latest-small's)")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--history", type=int, default=100, help="history items per call")
    parser.add_argument("--candidates", type=int, default=210, help="candidates per call (the ranker's 200 and added rows)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for cooccurrence.json")
    args = parser.parse_args()

    log(f"fitting on {args.users} generated users, {args.items} items")
    model, ids, popularity = fitted(args.items, args.users, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    calls = [(model.indices_of([ids[j] for j in rng.choice(args.items, args.history, replace=False, p=popularity)]),
              model.indices_of([ids[j] for j in rng.choice(args.items, args.candidates, replace=False)]))
             for _ in range(args.calls)]
    values = np.mean([len(model._row_entries(rows)[0]) for rows, _ in calls])
    for rows, cols in calls[:20]:
        assert model._sparse_block(rows, cols, column_map=True).tobytes() == \
            model._sparse_block(rows, cols, column_map=False).tobytes()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for column_map in (False, True):
            started = time.process_time()
            for rows, cols in calls:
                model._sparse_block(rows, cols, column_map=column_map)
            times[column_map].append((time.process_time() - started) / len(calls) * 1e3)
    search, mapped = float(np.median(times[False])), float(np.median(times[True]))
    print_table(f"history {args.history} items x {args.candidates} candidates, {values:.0f} stored values read per call",
                ["placement", "ms per call (median of rounds)", "rounds"],
                [["binary search (baseline)", f"{search:.3f}", " ".join(f"{t:.3f}" for t in times[False])],
                 ["column map", f"{mapped:.3f}", " ".join(f"{t:.3f}" for t in times[True])]])
    print(f"\ncolumn map / binary search: {mapped / search:.2f}x the time")
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"items": args.items, "users": args.users, "history": args.history, "candidates": args.candidates,
               "values_read_per_call": round(float(values)), "calls": args.calls,
               "binary_search_ms": times[False], "column_map_ms": times[True],
               "binary_search_ms_median": search, "column_map_ms_median": mapped,
               "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    (args.out / "cooccurrence.json").write_text(json.dumps(figures, indent=2))
    log(f"-> {args.out / 'cooccurrence.json'}")


if __name__ == "__main__":
    main()
