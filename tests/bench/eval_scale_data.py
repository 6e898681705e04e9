"""A generated ratings log the size of ml-latest-small with ~15,000 temporal test events and cold items, for chronorec-eval's scaling check.

    .venv/bin/python -m tests.bench.eval_scale_data --out /tmp/eval-scale
    /usr/bin/time -v .venv/bin/chronorec-eval --data /tmp/eval-scale --protocol temporal \\
        --plugin chronorec.trainer.chronorec_methods --out /tmp/eval-scale/report

Users outnumber items (EASE then solves items × items, its costly form), most users are active
on both sides of the temporal cutoff, and ~12% of the items are published after it, so that
about 15% of the test targets are cold. Same arguments, same files. `--bare` writes the events only
(each item is then known by its id), and `--items`, `--users`, `--late-users` size the log, e.g. a
small bare one:

    .venv/bin/python -m tests.bench.eval_scale_data --out /tmp/eval-bare --bare --items 2000 --users 1500 --late-users 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DAY = 86400.0
ANCHOR = 1_790_000_000.0  # the end of the log (fixed, so relative-time phrases are the same every run)
TOPICS = ("drama", "comedy", "thriller", "science fiction", "romance", "animation", "documentary", "horror",
          "western", "musical", "crime", "fantasy", "war", "history", "family", "sport")
WORDS = ("night", "river", "house", "last", "summer", "city", "secret", "road", "winter", "king", "game", "dark",
         "light", "blue", "garden", "island", "train", "letter", "storm", "dream", "heart", "stone", "fire", "glass")


def generate(seed: int = 11, n_items: int = 10_000, n_users: int = 11_900, events_per_user: float = 8.0,
             late_users: int = 650, late_events_per_user: float = 8.0, window_days: float = 365.0,
             cold_fraction: float = 0.03) -> tuple[list[dict], list[dict]]:
    """(items, events) as JSONL records. Regular users act across the whole window; `late_users`
    arrive in its last 14% (their events are not test instances: nothing of theirs is before the
    cutoff); items published in its last 15% (`cold_fraction` of them) are new at test time."""
    rng = np.random.default_rng(seed)
    start = ANCHOR - window_days * DAY
    topic = rng.integers(0, len(TOPICS), n_items)
    published = start + rng.uniform(0.0, 0.8, n_items) * window_days * DAY
    cold = rng.random(n_items) < cold_fraction
    published[cold] = start + rng.uniform(0.85, 0.98, int(cold.sum())) * window_days * DAY
    popularity = rng.zipf(1.6, n_items).clip(max=5_000).astype(float)
    items = [{"item_id": f"m{i}", "title": f"The {' '.join(rng.choice(WORDS, 2))} ({i % 97 + 1930})",
              "category": TOPICS[topic[i]], "published_at": float(round(published[i]))} for i in range(n_items)]

    def user_times(count: int, mean_events: float, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.maximum(2, rng.poisson(mean_events, count))
        owner = np.repeat(np.arange(count), sizes)
        return owner, start + rng.uniform(low, high, len(owner)) * window_days * DAY

    regular_owner, regular_time = user_times(n_users, events_per_user, 0.0, 1.0)
    late_owner, late_time = user_times(late_users, late_events_per_user, 0.86, 1.0)
    owner = np.concatenate((regular_owner, late_owner + n_users))
    times = np.round(np.concatenate((regular_time, late_time)))
    favourite = rng.integers(0, len(TOPICS), n_users + late_users)
    # 85% of a user's events are on their favourite topic; within a topic, items already
    # published, by popularity, with recently published ones boosted (what makes items cold-startable).
    event_topic = np.where(rng.random(len(owner)) < 0.85, favourite[owner], rng.integers(0, len(TOPICS), len(owner)))
    chosen = np.empty(len(owner), dtype=np.int64)
    for t in range(len(TOPICS)):
        members = np.flatnonzero(topic == t)
        members = members[np.argsort(published[members], kind="stable")]
        weight = popularity[members]
        cumulative = np.cumsum(weight)
        events = np.flatnonzero(event_topic == t)
        available = np.searchsorted(published[members], times[events], side="right")
        events, available = events[available > 0], available[available > 0]
        fresh = rng.random(len(events)) < 0.35
        # Fresh pick: uniformly among the topic's 30 newest published items.
        newest = np.maximum(0, available - 30)
        fresh_pick = newest + (rng.random(len(events)) * (available - newest)).astype(np.int64)
        popular_pick = np.searchsorted(cumulative, rng.random(len(events)) * cumulative[available - 1], side="right")
        chosen[events] = members[np.where(fresh, fresh_pick, np.minimum(popular_pick, available - 1))]
        event_topic[np.setdiff1d(np.flatnonzero(event_topic == t), events)] = -1
    keep = event_topic >= 0
    order = np.argsort(times[keep], kind="stable")
    owner, times, chosen = owner[keep][order], times[keep][order], chosen[keep][order]
    rating = rng.choice([1.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0, 5.0, 5.0], len(owner))
    events = [{"event_id": f"e{k}", "user_id": f"u{owner[k]}", "item_id": f"m{chosen[k]}", "action": "rating",
               "timestamp": float(times[k]), "value": float(rating[k])} for k in range(len(owner))]
    return items, events


def write(out: Path, items: list[dict], events: list[dict]) -> None:
    """events.jsonl, and items.jsonl unless `items` is empty (then any earlier one is removed)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [("events.jsonl", events)]
    if items:
        files.insert(0, ("items.jsonl", items))
    else:
        (out / "items.jsonl").unlink(missing_ok=True)
    for name, records in files:
        with (out / name).open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


def describe(folder: Path) -> str:
    """A line on the log written in `folder`, as the evaluation reads it: its size and its temporal split."""
    from chronorec.server.core.importers import detect_and_load
    from chronorec.trainer.protocols import Dataset, temporal_split

    dataset = Dataset(*detect_and_load(folder))
    details = temporal_split(dataset).details()
    return (f"{dataset.n_events:,} events, {dataset.n_users:,} users, {dataset.n_items:,} items; temporal: "
            f"{details['n_train_events']:,} training events, {details['n_test_instances']:,} test events of "
            f"{details['n_test_users']:,} users, {details['n_unseen_targets']:,} with a cold target "
            f"({details['n_unseen_targets'] / max(1, details['n_test_instances']):.0%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for items.jsonl and events.jsonl")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--items", type=int, default=10_000, help="catalogue size")
    parser.add_argument("--users", type=int, default=11_900, help="users active across the whole window")
    parser.add_argument("--late-users", type=int, default=650, help="users who arrive after the cutoff")
    parser.add_argument("--bare", action="store_true",
                        help="write events.jsonl only: a bare ratings log, each item known by its id")
    args = parser.parse_args(argv)
    items, events = generate(args.seed, n_items=args.items, n_users=args.users, late_users=args.late_users)
    write(args.out, [] if args.bare else items, events)

    print(describe(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
