"""How cost grows with the catalog: Recommend p50/p99, server CPU per call, RSS and bytes per item, index build time and HNSW recall@10 at 10k, 100k and 1M items.

    python -m tests.bench.bench_growth                         # 10k, 100k, 1M items (MiniLM int8 server)
    python -m tests.bench.bench_growth --sizes 1000000         # one size (results merge into growth.json)
    python -m tests.bench.bench_growth --quick                 # CI size: tiny BERT, 300 and 2,000 items
    python -m tests.bench.bench_growth --sizes 1000000 --reuse DIR   # keep the built repository in DIR; a
                                                               # later run starts its server from it

Item vectors are GENERATED at every size (encoding 1M items with MiniLM takes hours on two
cores): each is a random mix of two real item vectors (the version's encoder on `--basis`
distinct catalog texts) plus Gaussian noise, normalised. They are written into the server's own
vector cache under the catalog's real item texts, so everything after the encoder runs for
real: the server loads the catalog from its database, takes the vectors from the cache, and the
HNSW graph, the availability filters and the ranking serve real Recommend calls over gRPC.
The graph is built in this process exactly as the server builds it (`index_catalog`, which saves
it beside the vectors), then the server starts from it; recall@10 is measured against exact
search over the same vectors, for the server's ef and a sweep.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import common
from .common import ANCHOR, Context, ServerProcess, log, make_catalog, percentile_ms, print_table, target

K = 10
EF_SWEEP = (50, 100, 200, 400)
NOISE = 0.35  # of the generated vectors, relative to a unit vector (see `generated_vectors`)
TARGET_RECALL_1M, TARGET_P99_1M_MS = 0.95, 50.0


def basis_vectors(encoder, items, n: int) -> np.ndarray:
    """Real vectors of `n` distinct catalog texts, encoded by the served version's encoder."""
    from chronorec.server.core.itemtext import item_text

    texts = list(dict.fromkeys(item_text(i) for i in items))[:n]
    return encoder.encode(texts)


def generated_vectors(basis: np.ndarray, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`n` unit vectors: w·a + (1-w)·b + noise for random basis vectors a, b and w in [0.5, 0.9]."""
    rng = np.random.default_rng(seed)
    dim = basis.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        a, b = rng.integers(0, len(basis), m), rng.integers(0, len(basis), m)
        w = rng.uniform(0.5, 0.9, (m, 1)).astype(np.float32)
        v = w * basis[a] + (1 - w) * basis[b]
        v += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(NOISE / np.sqrt(dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[start : start + m] = v
    return out


def nearest_cosine(vectors: np.ndarray, sample: int, seed: int = 0) -> float:
    """Mean cosine of a sample's nearest other vector: how clustered the vectors are."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), min(sample, len(vectors)), replace=False)
    best = np.full(len(rows), -1.0, dtype=np.float32)
    for start in range(0, len(vectors), 200_000):
        sims = vectors[rows] @ vectors[start : start + 200_000].T
        own = (rows >= start) & (rows < start + 200_000)
        sims[np.flatnonzero(own), rows[own] - start] = -1.0
        best = np.maximum(best, sims.max(axis=1))
    return float(best.mean())


def exact_top(vectors: np.ndarray, ids: list[str], queries: np.ndarray) -> list[set[str]]:
    """Exact top-10 ids per query, scanning the matrix in blocks (memory stays bounded at 1M)."""
    top = []
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), K), dtype=np.int64)
    for start in range(0, len(vectors), 200_000):
        scores = queries @ vectors[start : start + 200_000].T
        part = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    for row in best_i:
        top.append({ids[i] for i in row})
    return top


def recall_figures(index, vectors: np.ndarray, ids: list[str], queries: np.ndarray) -> dict:
    started = time.perf_counter()
    exact = exact_top(vectors, ids, queries)
    exact_ms = (time.perf_counter() - started) * 1000 / len(queries)
    sweep = []
    for ef in sorted(set(EF_SWEEP) | {index.ef_search}):
        seconds, recalls = [], []
        for q, truth in zip(queries, exact):
            started = time.perf_counter()
            hits = index.search(q, K, ef=ef)
            seconds.append(time.perf_counter() - started)
            recalls.append(len({i for i, _ in hits} & truth) / K)
        sweep.append({"ef": ef, "recall_at_10": float(np.mean(recalls)), "ms_per_query_median": float(np.median(seconds) * 1000),
                      "served": ef == index.ef_search})
    served = next(s for s in sweep if s["served"])
    return {"queries": len(queries), "ef": index.ef_search, "recall_at_10": served["recall_at_10"],
            "hnsw_ms_per_query": served["ms_per_query_median"], "exact_ms_per_query_batched": exact_ms, "ef_sweep": sweep}


def profile_server(server: ServerProcess, seconds: float, out: Path) -> dict:
    """py-spy on the server for `seconds` (while calls run): the functions holding most samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed"}
    raw = out.with_suffix(".txt")
    proc = subprocess.Popen([spy, "record", "-p", str(server.proc.pid), "-d", str(int(seconds)), "-r", "200",
                             "-f", "raw", "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return {"process": proc, "raw": raw}


def summarize_profile(raw: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    if not raw.exists():
        return {"error": "no profile written"}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if any(f in ("wait", "_wait_for_tstate_lock", "select", "poll", "epoll_wait") for f in frames[-1:]):
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    share = lambda d: [(k, round(v / max(1, total), 4)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _built(ctx: Context, n_items: int, items: list, basis_cache: dict) -> tuple[Path, dict]:
    """A fresh model repository whose vector cache holds the generated vectors and whose saved
    graph the server starts from; with what building it measured (build time, recall)."""
    from chronorec.server.core.encoder import EncoderSettings, OnnxEncoder
    from chronorec.server.core.indexing import index_catalog, open_vector_cache
    from chronorec.server.core.itemtext import item_text
    from chronorec.server.core.repository import ModelRepository
    from chronorec.server.core.vector_cache import text_key

    models = ctx.fresh_repo(f"growth-{n_items}")
    repo = ModelRepository(models)
    version = repo.current()
    settings = EncoderSettings(prefer_int8=ctx.int8)
    encoder = OnnxEncoder(repo.version_dir(version), prefer_int8=ctx.int8)
    if "basis" not in basis_cache:
        basis_cache["basis"] = basis_vectors(encoder, items, 100 if ctx.quick else 2000)
        basis_cache["basis_nearest_cosine"] = nearest_cosine(basis_cache["basis"], 200)
    texts = [item_text(i) for i in items]
    keys = [text_key(t) for t in texts]
    vectors = generated_vectors(basis_cache["basis"], len(items), seed=n_items)
    cache = open_vector_cache(repo, version, encoder, settings)
    assert cache is not None
    cache.put(keys, vectors)
    del cache
    gc.collect()

    # The server's own indexing, with every vector in the cache: the graph, then saved beside them.
    cache = open_vector_cache(repo, version, encoder, settings)
    started = time.perf_counter()
    index = index_catalog(encoder.encode, items, encoder.dimension, cache=cache, M=settings.hnsw_m,
                          ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search)
    build_s = time.perf_counter() - started
    ids = [i.item_id for i in items]
    # Items sharing a text share its vector: the index holds them as the cache gives them.
    queries = generated_vectors(basis_cache["basis"], ctx.sizes.recall_queries, seed=n_items + 1)
    recall = recall_figures(index, vectors, ids, queries)
    spread = nearest_cosine(vectors, 200)
    log(f"growth {n_items}: graph built in {build_s:.1f} s; recall@10 {recall['recall_at_10']:.3f} at ef {recall['ef']}")
    del index, cache, vectors, texts, keys
    encoder.close()
    gc.collect()
    return models, {"index_build_s": build_s, "recall": recall,
                    "nearest_neighbour_cosine": {"generated": spread, "real_basis": basis_cache["basis_nearest_cosine"]}}


def _reused(ctx: Context, n_items: int, items: list, basis_cache: dict, reuse: Path | None) -> tuple[Path, dict]:
    """`_built`, or with `reuse` a copy of the repository an earlier run built and kept there
    (its build time and recall are that run's, marked `reused`); a new build is kept there."""
    kept = None if reuse is None else reuse / f"growth-{n_items}"
    if kept is not None and (kept / "built.json").exists():
        models = ctx.work / f"growth-{n_items}" / "models"
        shutil.rmtree(models, ignore_errors=True)
        shutil.copytree(kept / "models", models)
        built = json.loads((kept / "built.json").read_text())
        log(f"growth {n_items}: repository with its vectors and graph copied from {kept} (built in {built['index_build_s']:.1f} s)")
        return models, {**built, "reused": str(kept)}
    models, built = _built(ctx, n_items, items, basis_cache)
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(models, kept / "models")
        (kept / "built.json").write_text(json.dumps(built))
    return models, built


def one_size(ctx: Context, n_items: int, basis_cache: dict, *, profile_s: float, reuse: Path | None = None) -> dict:
    from chronorec.server.core.store import EventStore

    from .bench_recommend import CACHED_SHARE, _call_loop

    sizes = ctx.sizes
    folder = ctx.work / f"growth-{n_items}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    items, events = make_catalog(n_items, sizes.recommend_users)
    db = folder / "chronorec.db"
    with EventStore(db) as store:
        store.bulk_import(items, events)
    users = sorted({e.user_id for e in events})
    log(f"growth {n_items}: catalog and {len(events)} events in {time.perf_counter() - started:.1f} s")
    models, built = _reused(ctx, n_items, items, basis_cache, reuse)
    del items
    gc.collect()

    server = ServerProcess(db, models, folder / "server.log", int8=ctx.int8)
    try:
        start_s = server.wait_serving(timeout=3600)
        rss_serving = server.rss_mb()
        _, recommender, _ = server.stubs()
        n_cached = max(4, int(len(users) * CACHED_SHARE))
        cached, cold = users[:n_cached], users[n_cached:]
        _call_loop(recommender, cached, 4, calls=len(cached), seconds=0, repeat=False)
        cells = []
        spy = None
        for threads in (1, 4):
            if threads == 4 and profile_s > 0:
                spy = profile_server(server, profile_s, ctx.out / f"growth-{n_items}-profile")
            figures = _call_loop(recommender, cached, threads, calls=sizes.recommend_calls,
                                 seconds=max(sizes.recommend_seconds, profile_s if threads == 4 else 0), repeat=True, server=server)
            cells.append({"users": "cached", "concurrency": threads, **figures})
        batch = cold[: sizes.recommend_calls]
        figures = _call_loop(recommender, batch, 4, calls=len(batch), seconds=0, repeat=False, server=server)
        cells.append({"users": "cold", "concurrency": 4, **figures})
        profile = None
        if spy is not None and "process" in spy:
            spy["process"].wait(timeout=profile_s + 60)
            profile = summarize_profile(spy["raw"])
        rss_after = server.rss_mb()
        peak = server.peak_rss_mb()
        with open(folder / "server.log", errors="replace") as handle:
            indexing = [line.strip() for line in handle if "indexed " in line]
    finally:
        server.stop()
    for cell in cells:
        log(f"growth {n_items}: {cell['users']} c{cell['concurrency']}: p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms, "
            f"CPU {cell['server_cpu_ms_per_call']:.2f} ms/call")
    return {
        "items": n_items,
        "vectors": "generated (mix of two real item vectors + noise; see the module docstring)",
        **built,
        "server_start_s_warm": start_s,
        "server_indexing_log": indexing[-1] if indexing else "",
        "cells": cells,
        "rss_mb_serving": rss_serving,
        "rss_mb_after_calls": rss_after,
        "peak_rss_mb": peak,
        "rss_bytes_per_item": rss_after * 2**20 / n_items,
        "profile_c4_cached": profile,
        "load_average": list(os.getloadavg()),
    }


def run(ctx: Context, sizes: str | None = None, profile: float = 0.0, reuse: Path | None = None) -> dict:
    chosen = [int(x) for x in sizes.split(",")] if sizes else ([300, 2000] if ctx.quick else [10_000, 100_000, 1_000_000])
    path = ctx.out / ("growth-quick.json" if ctx.quick else "growth.json")
    merged = json.loads(path.read_text()) if path.exists() and not ctx.quick else {"sizes": {}}
    basis: dict = {}
    for n in chosen:
        merged["sizes"][str(n)] = one_size(ctx, n, basis, profile_s=profile, reuse=reuse)
        ctx.write(path.stem, merged)
    rows = []
    ordered = sorted(merged["sizes"].values(), key=lambda r: r["items"])
    previous = None
    for r in ordered:
        cell = {(c["users"], c["concurrency"]): c for c in r["cells"]}
        c1, c4, cold = cell[("cached", 1)], cell[("cached", 4)], cell[("cold", 4)]
        marginal = ((r["rss_mb_after_calls"] - previous["rss_mb_after_calls"]) * 2**20 / (r["items"] - previous["items"])
                    if previous else None)
        rows.append([r["items"], c1["p50_ms"], c1["p99_ms"], c4["p50_ms"], c4["p99_ms"], c4["server_cpu_ms_per_call"],
                     cold["p99_ms"], cold["server_cpu_ms_per_call"], r["rss_mb_after_calls"], marginal, r["index_build_s"],
                     r["recall"]["recall_at_10"], r["recall"]["hnsw_ms_per_query"], r["load_average"][0]])
        previous = r
    print_table(
        f"Growth: Recommend over gRPC, server {'int8' if ctx.int8 else 'fp32'}, GENERATED item vectors",
        ["items", "c1 p50", "c1 p99", "c4 p50", "c4 p99", "c4 CPU ms", "cold c4 p99", "cold CPU ms", "RSS MB",
         "marginal B/item", "build s", "recall@10", "HNSW ms", "load"], rows)
    targets = {}
    largest = ordered[-1]
    if largest["items"] >= 1_000_000:
        c4 = next(c for c in largest["cells"] if c["users"] == "cached" and c["concurrency"] == 4)
        targets["recall_at_10_1m_ge_0.95"] = {"value": largest["recall"]["recall_at_10"],
                                              "met": largest["recall"]["recall_at_10"] >= TARGET_RECALL_1M}
        targets["cached_p99_1m_c4_le_50ms"] = {"value": c4["p99_ms"], "met": c4["p99_ms"] <= TARGET_P99_1M_MS}
        for name, t in targets.items():
            print(f"  target {name}: {t['value']:.3f} {target(t['met'])}")
    merged["targets"] = targets
    ctx.write(path.stem, merged)
    return merged


def _options(parser) -> None:
    parser.add_argument("--sizes", default=None, help="comma-separated catalog sizes (default 10000,100000,1000000)")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the server this many seconds at concurrency 4")
    parser.add_argument("--reuse", type=Path, help="folder keeping each size's built model repository (vector cache and "
                        "saved graph) between runs: the first run builds and keeps it, later ones start from a copy")


def main(argv=None) -> None:
    common.main(__doc__, run, argv, options=_options)


if __name__ == "__main__":
    main()
