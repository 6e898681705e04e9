"""Benchmark: users/s of one RecommendBatch of 64 users against 64 single Recommend calls (one after another, and 8 at a time)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from . import common
from .common import ANCHOR, Context, log, print_table, timestamp

BATCH = 64
K = 10


def run(ctx: Context, rounds: int | None = None) -> dict:
    from chronorec.v1 import recommender_pb2

    n_items = min(ctx.sizes.catalogs)
    setup = ctx.catalog(n_items)
    server = setup.running()
    _, recommender, _ = server.stubs()
    users = list(setup.users)
    size = min(BATCH, len(users) // 3)  # the quick run's catalogs have fewer users
    rounds = rounds or 6
    # No history text may be in the server's short-term cache: each way of each round asks for
    # users not asked for before; where the catalog has too few users (the quick run), each round
    # asks as of another day instead (most texts' relative times change).
    fresh = len(users) >= rounds * 3 * size
    at = {"now": timestamp(ANCHOR)}

    def request(user: str):
        return recommender_pb2.RecommendRequest(user_id=user, k=K, at=at["now"])

    def singles(group: list[str]) -> None:
        for user in group:
            recommender.Recommend(request(user), timeout=60)

    def concurrent_singles(group: list[str]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda user: recommender.Recommend(request(user), timeout=60), group))

    encoded = []

    def batch(group: list[str]) -> None:
        response = recommender.RecommendBatch(recommender_pb2.RecommendBatchRequest(requests=[request(u) for u in group]),
                                              timeout=60)
        assert all(entry.code == 0 for entry in response.results), "a batch entry failed"
        encoded.append(response.encoded_texts)

    recommender.Recommend(request(users[-1]), timeout=60)  # the first call pays for lazy set-up
    single, concurrent, batched = (f"{size} single calls, one after another", f"{size} single calls, 8 at a time",
                                   f"1 RecommendBatch of {size}")
    ways = {single: singles, concurrent: concurrent_singles, batched: batch}
    figures: dict[str, dict[str, list[float]]] = {name: {"users_per_s": [], "cpu_ms_per_user": []} for name in ways}
    for r in range(rounds):
        if not fresh:
            at["now"] = timestamp(ANCHOR + 3 * r * common.DAY)
        # The order rotates each round, so a drift in the machine's load hits every way alike.
        names = list(ways)[r % len(ways):] + list(ways)[: r % len(ways)]
        for n, name in enumerate(names):
            first = (3 * r + n) * size if fresh else n * size
            group = users[first:first + size]
            cpu = server.cpu_seconds()
            started = time.perf_counter()
            ways[name](group)
            wall = time.perf_counter() - started
            figures[name]["users_per_s"].append(len(group) / wall)
            figures[name]["cpu_ms_per_user"].append((server.cpu_seconds() - cpu) * 1000 / len(group))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n}: {figures[n]['users_per_s'][-1]:.0f} users/s" for n in ways))

    medians = {name: {key: statistics.median(values) for key, values in f.items()} for name, f in figures.items()}
    base = medians[single]["users_per_s"]
    rows = [[name, m["users_per_s"], m["users_per_s"] / base, m["cpu_ms_per_user"]] for name, m in medians.items()]
    print_table(f"Recommend for {size} users with history, {n_items} items, k={K} (median of {rounds} rounds)",
                ["how", "users/s", "x one after another", "server CPU ms/user"], rows)
    print(f"  texts encoded per batch: {encoded} (every user's history text, in one encoder call)")
    ratio = medians[batched]["users_per_s"] / base
    result = {"items": n_items, "batch": size, "k": K, "rounds": rounds, "per_round": figures, "median": medians,
              "encoded_texts_per_batch": encoded, "batch_vs_single_ratio": ratio,
              "batch_vs_concurrent_ratio": medians[batched]["users_per_s"] / medians[concurrent]["users_per_s"]}
    ctx.write("batch", result)
    return result


def main(argv=None) -> None:
    def options(parser) -> None:
        parser.add_argument("--rounds", type=int, default=None, help="measurements of each way (default 6)")

    common.main(__doc__, run, argv, options=options)


if __name__ == "__main__":
    main()
