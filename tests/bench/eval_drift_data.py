"""The generated drifting-interest log (the demo's generator) as a JSONL folder, for chronorec-eval with the packaged MiniLM.

    .venv/bin/python -m tests.bench.eval_drift_data --out /tmp/eval-drift --users 200
    /usr/bin/time -v .venv/bin/chronorec-eval --data /tmp/eval-drift --protocol both \\
        --plugin chronorec.trainer.chronorec_methods --out /tmp/eval-drift/report

Users whose interest moves from one topic to another over a 120-day window, items that expire and a
few published late (`server.core.demo.generate_drift_dataset`); the third data set of the README's
fine-tuning figures beside ML-100K and ml-latest-small. Same arguments, same files.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .eval_scale_data import ANCHOR, write


def generate(seed: int = 7, users: int = 200) -> tuple[list[dict], list[dict]]:
    """(items, events) as JSONL records."""
    from chronorec.server.core.demo import generate_drift_dataset

    data = generate_drift_dataset(seed=seed, n_users=users, anchor=ANCHOR)
    return [asdict(item) for item in data.items], [asdict(event) for event in data.events]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for items.jsonl and events.jsonl")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args(argv)
    items, events = generate(args.seed, args.users)
    write(args.out, items, events)
    print(f"{len(events):,} events of {args.users} users on {len(items):,} items in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
