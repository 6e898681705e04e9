"""Times and profiles ChronorecEngine.recommend for cached users in-process, for whichever chronorec the path imports."""

# Run as a script (not a module of tests.bench) so PYTHONPATH alone decides which chronorec
# it measures: bench_overhead.py runs it once per tree and prints the figures side by side.

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a BERT folder (model + tokenizer)")
    parser.add_argument("--work", required=True)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

    from tests.bench.common import ANCHOR, make_catalog

    from chronorec.server.core import engine as engine_module
    try:
        from chronorec.server.core.encoder import EncoderSettings
    except ImportError:  # before the split of serving.py
        from chronorec.server.core.serving import EncoderSettings
    from chronorec.server.core.repository import ModelRepository
    from chronorec.server.core.store import EventStore
    from chronorec.trainer.export import publish_base_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "models"
    if not (repo / "CURRENT").exists():
        publish_base_model(args.model, repo, activate=True)
    items, events = make_catalog(args.items, args.users)
    fresh = not (work / "bench.db").exists()
    store = EventStore(work / "bench.db")
    if fresh:  # a later round reuses the database of the first
        store.bulk_import(items, events)
    engine = engine_module.ChronorecEngine(store, ModelRepository(repo), EncoderSettings(), cooccurrence_refresh_s=0,
                                           watch_interval_s=None)
    engine.start()
    users = sorted({e.user_id for e in events})
    if hasattr(engine_module, "RecommendRequest"):
        make = lambda user: engine_module.RecommendRequest(user_id=user, k=10, at=ANCHOR)  # noqa: E731
    else:
        from chronorec.server.core.ranking import RecommendQuery

        make = lambda user: RecommendQuery(user_id=user, k=10, at=ANCHOR)  # noqa: E731
    for user in users:  # warm: every user's short-term vector is cached
        engine.recommend(make(user))
    answer = engine.recommend(make(users[0]))
    first = [r.item_id for r in getattr(answer, "result", answer).items]
    timings = []
    for _ in range(3):
        started = time.process_time()
        for n in range(args.calls):
            engine.recommend(make(users[n % len(users)]))
        timings.append((time.process_time() - started) * 1000 / args.calls)
    report = {"tree": str(Path(engine_module.__file__).resolve()), "cpu_ms_per_call": timings,
              "best_ms": min(timings), "first": first}
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for n in range(args.calls):
            engine.recommend(make(users[n % len(users)]))
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
        report["profile"] = out.getvalue()
    engine.close()
    store.close()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
