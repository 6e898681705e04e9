"""Per-call cost of a cached Recommend, engine alone and through the server, for this tree and a baseline tree side by side."""

# Usage: python -m tests.bench.bench_overhead --baseline /path/to/pkgs [--items 10000]
# `--baseline` is a folder holding a `chronorec` package (e.g. links into an older checkout);
# each tree is measured in its own processes, over the same generated catalog and tiny model,
# so the only difference is the server code. Figures are CPU time, which the machine's other
# load disturbs less than latency; the load average is printed with them.

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import ANCHOR, REPO_ROOT, ServerProcess, log, percentile_ms, print_table, pythonpath, run_concurrently, timestamp

WORKER = Path(__file__).resolve().parent / "inproc_worker.py"


def engine_figures(pkgs: Path | None, model: Path, work: Path, items: int, users: int, calls: int) -> dict:
    """The worker's in-process figures (it also leaves the database and model repository in `work`)."""
    env = dict(os.environ)
    if pkgs is not None:
        env["PYTHONPATH"] = str(pkgs)
    out = subprocess.run(
        [sys.executable, str(WORKER), "--model", str(model), "--work", str(work), "--items", str(items),
         "--users", str(users), "--calls", str(calls)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:])


def server_figures(pkgs: Path | None, work: Path, users: list[str], calls: int, concurrency: tuple[int, ...]) -> list[dict]:
    from chronorec.v1 import recommender_pb2

    with pythonpath(pkgs):
        server = ServerProcess(work / "bench.db", work / "models", work / "server.log", int8=False)
    try:
        server.wait_serving()
        _, recommender, _ = server.stubs()
        at = timestamp(ANCHOR)

        def call(user: str) -> list[str]:
            answer = recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10, at=at), timeout=60)
            return [r.item_id for r in answer.items]

        first = call(users[0])
        for user in users:  # every user's short-term vector into the server's cache
            call(user)
        rows = []
        for threads in concurrency:
            latencies: list[list[float]] = [[] for _ in range(threads)]

            def work(t: int) -> None:
                for n in range(t, calls, threads):
                    started = time.perf_counter()
                    call(users[n % len(users)])
                    latencies[t].append(time.perf_counter() - started)

            cpu = server.cpu_seconds()
            wall = run_concurrently(threads, work)
            cpu = server.cpu_seconds() - cpu
            flat = [x for part in latencies for x in part]
            rows.append({"concurrency": threads, "calls": len(flat), "server_cpu_ms_per_call": cpu * 1000 / len(flat),
                         "calls_per_s": len(flat) / wall, "p50_ms": percentile_ms(flat, 50), "p99_ms": percentile_ms(flat, 99)})
        return [{"first": first}, *rows]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, help="folder holding the baseline's chronorec package")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chronorec-bench-overhead"))
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--engine-calls", type=int, default=2000)
    parser.add_argument("--grpc-calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="alternate the trees this many times; the best round counts")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tinybert import make_tiny_bert

    model = make_tiny_bert(args.work / "tiny-bert")
    trees = [("baseline", args.baseline)] if args.baseline else []
    trees.append(("this tree", None))
    results: dict[str, dict] = {name: {"engine": [], "grpc": []} for name, _ in trees}
    for round_ in range(args.rounds):
        for name, pkgs in trees:  # alternated, so a change in the machine's load hits both
            work = args.work / name.replace(" ", "-")
            log(f"round {round_ + 1}: {name}: engine in-process")
            engine = engine_figures(pkgs, model, work, args.items, args.users, args.engine_calls)
            users = [f"bench-user-{u:05d}" for u in range(args.users)]
            log(f"round {round_ + 1}: {name}: server over gRPC")
            grpc_rows = server_figures(pkgs, work, users, args.grpc_calls, tuple(args.concurrency))
            results[name]["engine"].append(engine)
            results[name]["grpc"].append(grpc_rows)
    firsts = {name: (r["engine"][0]["first"], r["grpc"][0][0]["first"]) for name, r in results.items()}
    same = len({json.dumps(v) for v in firsts.values()}) == 1
    rows = []
    for name, r in results.items():
        rows.append([name, "engine.recommend", "-", f"{min(e['best_ms'] for e in r['engine']):.3f}", "-", "-", "-"])
        for i, c in enumerate(args.concurrency):
            cells = [g[i + 1] for g in r["grpc"]]
            best = min(cells, key=lambda x: x["server_cpu_ms_per_call"])
            rows.append([name, "Recommend over gRPC", c, f"{best['server_cpu_ms_per_call']:.3f}", f"{best['calls_per_s']:.0f}",
                         f"{best['p50_ms']:.2f}", f"{best['p99_ms']:.2f}"])
    print_table(f"Cached Recommend, {args.items} items, tiny model, k=10, best of {args.rounds} rounds",
                ["tree", "path", "concurrency", "CPU ms/call", "calls/s", "p50 ms", "p99 ms"], rows)
    print(f"same first recommendations in every tree: {same}")


if __name__ == "__main__":
    main()
