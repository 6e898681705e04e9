"""Benchmark 3: Recommend over gRPC at 10k and 100k items, concurrency 1/4/16, cached vs cold users; HNSW vs exact search."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from . import common
from .common import ANCHOR, CatalogSetup, Context, log, percentile_ms, print_table, pythonpath, run_concurrently, target, timestamp

K = 10
CACHED_SHARE = 0.2  # of the generated users: warmed once, then queried again and again
EF_SWEEP = (50, 100, 200, 400)


def _call_loop(recommender, users: list[str], threads: int, *, calls: int, seconds: float, repeat: bool, server=None) -> dict:
    """Recommend from `threads` threads; `repeat` cycles `users` for at least `seconds`, else each user once."""
    from chronorec.v1 import recommender_pb2

    at = timestamp(ANCHOR)
    latencies: list[float] = []
    lock = threading.Lock()
    if repeat:
        source = itertools.cycle(users)
    else:
        if len(users) < calls:
            raise ValueError(f"only {len(users)} cold users for {calls} calls")
        source = iter(users[:calls])
    deadline = [0.0]
    count = [0]

    def take() -> str | None:
        with lock:
            if repeat and count[0] >= calls and time.perf_counter() >= deadline[0]:
                return None
            count[0] += 1
            return next(source, None)

    def work(_: int) -> None:
        local = []
        while (user := take()) is not None:
            started = time.perf_counter()
            recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=K, at=at), timeout=60)
            local.append(time.perf_counter() - started)
        with lock:
            latencies.extend(local)

    cpu_before = server.cpu_seconds() if server is not None else 0.0
    deadline[0] = time.perf_counter() + seconds
    wall = run_concurrently(threads, work)
    cpu = server.cpu_seconds() - cpu_before if server is not None else float("nan")
    return {
        "calls": len(latencies),
        "server_cpu_ms_per_call": cpu * 1000 / max(1, len(latencies)),
        "calls_per_s": len(latencies) / wall,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "max_ms": percentile_ms(latencies, 100),
    }


def grpc_figures(ctx: Context, setup: CatalogSetup, concurrency: tuple[int, ...] | None = None) -> dict:
    server = setup.running()
    _, recommender, _ = server.stubs()
    users = list(setup.users)
    n_cached = max(4, int(len(users) * CACHED_SHARE))
    cached, cold = users[:n_cached], users[n_cached:]
    # Warm-up: every cached user's short-term vector goes into the server's cache.
    _call_loop(recommender, cached, 4, calls=len(cached), seconds=0, repeat=False)
    sizes = ctx.sizes
    cells = []
    for threads in concurrency or sizes.concurrency:
        figures = _call_loop(recommender, cached, threads, calls=sizes.recommend_calls, seconds=sizes.recommend_seconds, repeat=True, server=server)
        cells.append({"users": "cached", "concurrency": threads, **figures})
        batch, cold = cold[: sizes.recommend_calls], cold[sizes.recommend_calls :]
        figures = _call_loop(recommender, batch, threads, calls=len(batch), seconds=0, repeat=False, server=server)
        cells.append({"users": "cold", "concurrency": threads, **figures})
        log(f"recommend {setup.n_items} items, concurrency {threads}: cached p99 {cells[-2]['p99_ms']:.1f} ms, cold p99 {cells[-1]['p99_ms']:.1f} ms")
    return {"cells": cells, "server_rss_mb": server.rss_mb(), "cached_users": len(cached)}


def search_figures(ctx: Context, setup: CatalogSetup) -> dict:
    """In-process, on the server's own item vectors (its vector cache): HNSW against exact
    numpy search, for the index alone and for the whole ranking."""
    from chronorec.server.core.cooccurrence import CooccurrenceModel
    from chronorec.server.core.encoder import EncoderSettings, OnnxEncoder
    from chronorec.server.core.indexing import index_catalog, open_vector_cache
    from chronorec.server.core.interactions import InteractionState
    from chronorec.server.core.manifest import load_manifest
    from chronorec.server.core.ranking import RecommendQuery, TimeAwareRanker, _UserContext
    from chronorec.server.core.repository import ModelRepository

    repo = ModelRepository(setup.models)
    version = repo.current()
    encoder = OnnxEncoder(repo.version_dir(version), prefer_int8=ctx.int8)
    cache = open_vector_cache(repo, version, encoder, EncoderSettings(prefer_int8=ctx.int8))
    started = time.perf_counter()
    index = index_catalog(encoder.encode, setup.items, encoder.dimension, cache=cache)
    build_s = time.perf_counter() - started
    del cache
    catalog = {item.item_id: item for item in setup.items}
    state = InteractionState()
    state.add(setup.events)
    cooccurrence = CooccurrenceModel.fit(state.user_sequences(), list(catalog))
    ranker = TimeAwareRanker(catalog, index, state, cooccurrence, encoder.encode, catalog_version=lambda: 0)
    params = load_manifest(repo.version_dir(version)).time_model
    users = setup.users[: ctx.sizes.recall_queries]
    queries = [RecommendQuery(user_id=u, k=K, at=ANCHOR, params=params) for u in users]
    # The blended user vectors the ranking searches with (encoding their history text once).
    vectors = []
    for query in queries:
        context = _UserContext.build(ranker, ranker.history_for(query), query)
        vectors.append(context.user_vector)

    def timed(fn) -> tuple[list, float]:
        # Median per query: a mean would carry every preemption by other processes' load.
        out, seconds = [], []
        for v in vectors:
            started = time.perf_counter()
            out.append(fn(v))
            seconds.append(time.perf_counter() - started)
        return out, float(np.median(seconds))

    exact, exact_s = timed(lambda v: [i for i, _ in index.exact_search(v, K)])
    sweep = []
    for ef in EF_SWEEP:
        hits, per = timed(lambda v: [i for i, _ in index.search(v, K, ef=ef)])
        recall = float(np.mean([len(set(h) & set(e)) / K for h, e in zip(hits, exact)]))
        sweep.append({"ef": ef, "recall_at_10": recall, "ms_per_query": per * 1000, "default": ef == index.ef_search})
    hnsw, hnsw_s = timed(lambda v: [i for i, _ in index.search(v, K)])
    index_recall = float(np.mean([len(set(h) & set(e)) / K for h, e in zip(hnsw, exact)]))

    # The ranking as served (HNSW candidates from exhaustive_below items on) against the same
    # ranking scoring every item exactly; the short-term vectors are cached by now.
    served_s, exhaustive_s, overlaps = [], [], []
    for query in queries:
        started = time.perf_counter()
        served = ranker.recommend(query)
        served_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        full = ranker.recommend(dataclasses.replace(query, exhaustive=True))
        exhaustive_s.append(time.perf_counter() - started)
        overlaps.append(len({r.item_id for r in served.items} & {r.item_id for r in full.items}) / max(1, len(full.items)))
    return {
        "queries": len(queries),
        "index_build_s_from_cache": build_s,
        "hnsw": {"ef": index.ef_search, "M": index.M, "ef_construction": index.ef_construction,
                 "recall_at_10": index_recall, "ms_per_query": hnsw_s * 1000},
        "exact_numpy": {"ms_per_query": exact_s * 1000},
        "ef_sweep": sweep,
        "ranking": {
            "hnsw_candidates_used": len(catalog) > ranker.exhaustive_below,
            "recall_at_10_vs_exhaustive": float(np.mean(overlaps)),
            "served_p50_ms": percentile_ms(served_s, 50),
            "served_p99_ms": percentile_ms(served_s, 99),
            "exhaustive_p50_ms": percentile_ms(exhaustive_s, 50),
            "exhaustive_p99_ms": percentile_ms(exhaustive_s, 99),
        },
    }


def _reuse_models(setup: CatalogSetup, keep: Path | None) -> None:
    """With `keep`, the catalog's model repository (its vector cache and saved graph filled) is
    copied from `keep` when an earlier run left it there: the generated catalog is the same
    every run, so the server starts warm instead of encoding every item again."""
    if keep is None:
        return
    kept = keep / f"models-{setup.n_items}"
    if kept.is_dir():
        shutil.rmtree(setup.models)
        shutil.copytree(kept, setup.models)
        log(f"model repository with its vector cache copied from {kept}")


def _keep_models(setup: CatalogSetup, keep: Path | None) -> None:
    if keep is None:
        return
    kept = keep / f"models-{setup.n_items}"
    if not kept.is_dir():
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copytree(setup.models, kept)
        log(f"model repository with its vector cache kept in {kept}")


def _start_tree(setup: CatalogSetup, pkgs: Path | None, label: str) -> None:
    """Start the server over `setup` from the tree whose chronorec package is in `pkgs` (None: this tree)."""
    with pythonpath(pkgs):
        setup.start(label)


def run(ctx: Context, baseline: Path | None = None, reuse: Path | None = None, concurrency: list[int] | None = None,
        rounds: int = 1, search: bool = True) -> dict:
    trees = ([("baseline", baseline)] if baseline is not None else []) + [("this tree", None)]
    levels = tuple(concurrency) if concurrency else None
    results = {}
    by_tree: dict[str, dict] = {name: {} for name, _ in trees}
    alternating = len(trees) > 1 or rounds > 1
    for n_items in ctx.sizes.catalogs:
        setup = ctx.catalog(n_items)
        _reuse_models(setup, reuse)
        for round_ in range(rounds):
            for name, pkgs in trees:  # alternated, so a change in the machine's load hits every tree
                if alternating:
                    log(f"recommend {n_items}: round {round_ + 1}: {name}")
                    _start_tree(setup, pkgs, name)
                else:
                    setup.running()  # left running for the benchmarks that share the catalog
                _keep_models(setup, reuse)
                figures = grpc_figures(ctx, setup, levels)
                if alternating:
                    setup.stop()
                by_tree[name].setdefault(str(n_items), []).append(figures)
        figures = by_tree["this tree"][str(n_items)][-1]
        if search:
            log(f"recommend {n_items}: in-process HNSW vs exact")
            figures["search"] = search_figures(ctx, setup)
        results[str(n_items)] = figures
    if alternating:
        _print_trees(by_tree)

    rows = []
    for n_items, figures in results.items():
        for cell in figures["cells"]:
            rows.append([n_items, cell["users"], cell["concurrency"], cell["calls"], cell["calls_per_s"], cell["p50_ms"], cell["p99_ms"], cell["server_cpu_ms_per_call"]])
    print_table("Recommend over gRPC on loopback (k=10, fixed `at`; server CPU = its user+system time per call, all threads)",
                ["items", "users", "concurrency", "calls", "calls/s", "p50 ms", "p99 ms", "server CPU ms/call"], rows)
    rows = []
    for n_items, figures in results.items():
        if "search" not in figures:
            continue
        s = figures["search"]
        rows.append([n_items, "HNSW (served ef)", s["hnsw"]["ef"], s["hnsw"]["recall_at_10"], s["hnsw"]["ms_per_query"]])
        rows.append([n_items, "exact numpy", "-", 1.0, s["exact_numpy"]["ms_per_query"]])
        for point in s["ef_sweep"]:
            rows.append([n_items, "HNSW sweep", point["ef"], point["recall_at_10"], point["ms_per_query"]])
        r = s["ranking"]
        rows.append([n_items, "ranking as served" + (" (HNSW)" if r["hnsw_candidates_used"] else " (exact)"), "-", r["recall_at_10_vs_exhaustive"], r["served_p50_ms"]])
        rows.append([n_items, "ranking exhaustive", "-", 1.0, r["exhaustive_p50_ms"]])
    print_table("Search: HNSW against exact numpy on the served item vectors (in-process, user vectors as queries)",
                ["items", "search", "ef", "recall@10", "ms/query (p50)"], rows)

    targets = {}
    largest = str(max(ctx.sizes.catalogs))
    for cell in results[largest]["cells"]:
        if cell["concurrency"] == 4:
            limit = 30.0 if cell["users"] == "cached" else 80.0
            targets[f"p99_{largest}_{cell['users']}_c4_le_{limit:g}ms"] = {"value": cell["p99_ms"], "met": cell["p99_ms"] <= limit}
    for n_items, figures in results.items():
        if "search" not in figures:
            continue
        recall = figures["search"]["hnsw"]["recall_at_10"]
        targets[f"hnsw_recall_at_10_{n_items}_ge_0.95"] = {"value": recall, "met": recall >= 0.95}
    for name, t in targets.items():
        print(f"  target {name}: {t['value']:.3f} {target(t['met'])}")
    result = {"k": K, "catalogs": results, "targets": targets}
    if alternating:
        result["trees"] = by_tree
    ctx.write("recommend", result)
    return result


def _print_trees(by_tree: dict[str, dict]) -> None:
    """Each tree's cells side by side, every round (CPU per call is the figure a busy machine disturbs least)."""
    rows = []
    for name, sizes in by_tree.items():
        for n_items, runs in sizes.items():
            for round_, figures in enumerate(runs, 1):
                for cell in figures["cells"]:
                    rows.append([name, n_items, round_, cell["users"], cell["concurrency"], cell["calls"],
                                 cell["p50_ms"], cell["p99_ms"], cell["server_cpu_ms_per_call"]])
    print_table("Recommend over gRPC by tree (alternated rounds)",
                ["tree", "items", "round", "users", "concurrency", "calls", "p50 ms", "p99 ms", "server CPU ms/call"], rows)


def _options(parser) -> None:
    parser.add_argument("--baseline", type=Path, help="folder holding a baseline tree's chronorec package; its server is "
                        "measured over the same catalog, alternating with this tree's")
    parser.add_argument("--reuse", type=Path, help="folder keeping each catalog's model repository with its filled vector "
                        "cache between runs (filled by the first run), so a large catalog is encoded once")
    parser.add_argument("--concurrency", type=int, nargs="+", help="client threads (default 1 4 16)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the in-process HNSW vs exact figures")


def main(argv=None) -> None:
    common.main(__doc__, run, argv, options=_options)


if __name__ == "__main__":
    main()
