"""A generated log of short-lived items: a steady inflow of new ones, each popular for days after its release and then forgotten, read in sessions.

    .venv/bin/python -m tests.bench.eval_trend_data --out /tmp/eval-trend
    .venv/bin/chronorec-eval --data /tmp/eval-trend --protocol both \\
        --plugin chronorec.trainer.chronorec_methods --out /tmp/eval-trend/report

The other generated sets reward a user's standing taste (co-occurrence, EASE). Here what is
popular this week is the strongest plain signal (RecentPop-7d leads the baselines), about a fifth
of the test targets are items released after the cutoff, and a user's visits are sessions of a
few events minutes apart: the shape of a news or new-releases log. Each item's appeal is its
quality times a floor (`evergreen`) plus a decay with its age, at a half-life of its own (a week
at the median, a few days to weeks); half a session's events keep to its topic, which is the
user's favourite in 30 % of sessions. `--bare` writes the events only (each item known by its id).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .eval_scale_data import ANCHOR, DAY, TOPICS, WORDS, describe, write


def generate(seed: int = 5, n_items: int = 3000, n_users: int = 3000, sessions_per_user: float = 4.0,
             events_per_session: float = 3.0, window_days: float = 180.0, favourite_share: float = 0.3,
             evergreen: float = 0.3, session_share: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(items, events) as JSONL records."""
    rng = np.random.default_rng(seed)
    start = ANCHOR - window_days * DAY
    topic = rng.integers(0, len(TOPICS), n_items)
    # Released steadily from a month before the window to its end.
    published = start + rng.uniform(-30.0, window_days, n_items) * DAY
    quality = rng.zipf(1.8, n_items).clip(max=200).astype(float)
    half_life = np.exp(rng.normal(np.log(7.0), 0.6, n_items)) * DAY
    items = [{"item_id": f"n{i}", "title": f"The {' '.join(rng.choice(WORDS, 2))} {TOPICS[topic[i]]} ({i})",
              "category": TOPICS[topic[i]], "published_at": float(round(published[i]))} for i in range(n_items)]

    sessions = np.maximum(1, rng.poisson(sessions_per_user, n_users))
    session_user = np.repeat(np.arange(n_users), sessions)
    session_start = start + rng.uniform(0.0, window_days, len(session_user)) * DAY
    favourite = rng.integers(0, len(TOPICS), n_users)
    session_topic = np.where(rng.random(len(session_user)) < favourite_share, favourite[session_user],
                             rng.integers(0, len(TOPICS), len(session_user)))
    lengths = rng.geometric(1.0 / events_per_session, len(session_user))
    event_session = np.repeat(np.arange(len(session_user)), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step = rng.exponential(8 * 60.0, len(event_session))
    step[first] = 0.0
    # Minutes apart within a session: the offset from its start is the running sum of the steps.
    offset = np.cumsum(step) - np.repeat(np.cumsum(step)[first], lengths)
    times = np.round(session_start[event_session] + offset)
    keep = times < ANCHOR
    event_session, times = event_session[keep], times[keep]
    owner, event_topic = session_user[event_session], session_topic[event_session]
    # Some events stray from their session's topic.
    stray = rng.random(len(times)) >= session_share
    event_topic = np.where(stray, rng.integers(0, len(TOPICS), len(times)), event_topic)

    chosen = np.full(len(times), -1, dtype=np.int64)
    for t in range(len(TOPICS)):
        members = np.flatnonzero(topic == t)
        events = np.flatnonzero(event_topic == t)
        for chunk in np.array_split(events, max(1, len(events) // 2000)):
            age = times[chunk, None] - published[None, members]
            appeal = quality[members] * (evergreen + np.exp2(-np.maximum(age, 0.0) / half_life[members]))
            weight = np.where(age >= 0, appeal, 0.0)  # not before its release
            total = weight.sum(axis=1)
            ok = total > 0
            cumulative = np.cumsum(weight[ok], axis=1)
            draw = rng.random(int(ok.sum())) * total[ok]
            picks = (cumulative < draw[:, None]).sum(axis=1)
            chosen[chunk[ok]] = members[np.minimum(picks, len(members) - 1)]
    keep = chosen >= 0
    order = np.argsort(times[keep], kind="stable")
    owner, times, chosen = owner[keep][order], times[keep][order], chosen[keep][order]
    rating = rng.choice([3.0, 4.0, 4.0, 5.0, 5.0], len(owner))
    events = [{"event_id": f"e{k}", "user_id": f"u{owner[k]}", "item_id": f"n{chosen[k]}", "action": "rating",
               "timestamp": float(times[k]), "value": float(rating[k])} for k in range(len(owner))]
    return items, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for items.jsonl and events.jsonl")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--items", type=int, default=3000, help="catalogue size")
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--bare", action="store_true",
                        help="write events.jsonl only: a bare log, each item known by its id")
    args = parser.parse_args(argv)
    items, events = generate(args.seed, n_items=args.items, n_users=args.users)
    write(args.out, [] if args.bare else items, events)

    print(describe(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
