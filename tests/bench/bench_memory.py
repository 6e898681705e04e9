"""Benchmark 6: server RSS at 100k items and start-up time to SERVING, cold (encode every item) and warm (vector cache)."""

from __future__ import annotations

import re

from . import common
from .common import CatalogSetup, Context, ServerProcess, log, print_table

# The server's own progress line while it encodes a catalog (chronorec.indexing, every 30 s).
_PROGRESS = re.compile(r"encoded (\d+) of (\d+) items \((\d+)/s")


def empty_server(ctx: Context) -> dict:
    """The baseline: the same server over an empty catalog."""
    from chronorec.server.core.store import EventStore

    folder = ctx.work / "memory-empty"
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "chronorec.db"
    EventStore(db).close()
    server = ServerProcess(db, ctx.fresh_repo("memory-empty"), folder / "server.log", int8=ctx.int8)
    try:
        seconds = server.wait_serving()
        return {"label": "empty catalog", "seconds_to_serving": seconds, "rss_mb": server.rss_mb(), "peak_rss_mb": server.peak_rss_mb()}
    finally:
        server.stop()


def limited_cold_start(setup: CatalogSetup, limit_s: float) -> dict:
    """A cold start given at most `limit_s` seconds (a 100k catalog on two busy cores needs longer than
    one turn of a shared machine): how far the encode got by then, at what rate, on how much CPU, from
    the server's own progress lines. A start that reaches SERVING in time is timed like any other."""
    log_path = setup.folder / "server.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    server = ServerProcess(setup.db, setup.models, log_path, int8=setup.ctx.int8)
    try:
        try:
            seconds = server.wait_serving(timeout=limit_s)
        except TimeoutError:
            seconds = None
        figures = {"label": "cold", "vector_cache": "cold", "limit_s": limit_s, "seconds_to_serving": seconds,
                   "server_cpu_s": server.cpu_seconds(), "rss_mb": server.rss_mb(), "peak_rss_mb": server.peak_rss_mb()}
    finally:
        server.stop()
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode("utf-8", "replace").splitlines()
    progress = [tuple(int(g) for g in m.groups()) for m in map(_PROGRESS.search, lines) if m]
    if progress:
        done, total, rate = progress[-1]
        figures.update(encoded=done, of=total, items_per_s=rate, encode_s=done / max(rate, 1))
    indexed = [line for line in lines if "indexed " in line]
    figures["indexing_log"] = indexed[-1].split(": ", 1)[-1] if indexed else ""
    return figures


def run(ctx: Context, cold_limit: float | None = None) -> dict:
    n = ctx.sizes.memory_size
    baseline = empty_server(ctx)
    setup = ctx.catalog(n)
    if cold_limit is not None and not any(s["vector_cache"] == "cold" for s in setup.starts):
        cold = limited_cold_start(setup, cold_limit)
        if cold["seconds_to_serving"] is None:
            if cold.get("encoded"):
                print(f"  cold start at {n} items not SERVING within {cold_limit:.0f} s: {cold['encoded']} items encoded "
                      f"at {cold['items_per_s']}/s, server CPU {cold['server_cpu_s']:.0f} s "
                      f"({1000 * cold['server_cpu_s'] / cold['encoded']:.1f} ms per item encoded, start-up included)")
            else:
                print(f"  cold start at {n} items not SERVING within {cold_limit:.0f} s, before its first progress line")
            result = {"items": n, "empty": baseline, "cold": cold, "warm": None}
            ctx.write("memory", result)
            return result
        setup.starts.append(cold)
    if not any(s["vector_cache"] == "cold" for s in setup.starts):
        setup.start()  # cold: nothing cached for the serving version yet
    cold = next(s for s in setup.starts if s["vector_cache"] == "cold")
    setup.stop()
    warm = setup.start()
    log(f"memory {n}: warm restart SERVING after {warm['seconds_to_serving']:.1f} s")
    setup.stop()
    per_item_kb = (warm["rss_mb"] - baseline["rss_mb"]) * 1024 / n
    rows = [
        ["empty catalog", 0, baseline["seconds_to_serving"], None, baseline["rss_mb"], baseline["peak_rss_mb"]],
        [f"cold start (encode all){'' if cold is setup.starts[0] else ' after a swap'}", n, cold["seconds_to_serving"],
         cold["seconds_to_serving"] / warm["seconds_to_serving"], cold["rss_mb"], cold["peak_rss_mb"]],
        ["warm start (vector cache)", n, warm["seconds_to_serving"], 1.0, warm["rss_mb"], warm["peak_rss_mb"]],
    ]
    print_table(
        f"Server memory and start-up to SERVING ({'int8' if ctx.int8 else 'fp32'} graph)",
        ["start", "items", "s to SERVING", "x warm", "RSS MB", "peak RSS MB"],
        rows,
    )
    print(f"  RSS above the empty server: {warm['rss_mb'] - baseline['rss_mb']:.0f} MB, {per_item_kb:.2f} KB per item")
    print(f"  cold start, server log: {cold.get('indexing_log', '')}")
    print(f"  warm start, server log: {warm.get('indexing_log', '')}")
    other = {str(s.n_items): s.starts for s in ctx._catalogs.values() if s.n_items != n}
    result = {"items": n, "empty": baseline, "cold": cold, "warm": warm, "kb_per_item": per_item_kb, "other_catalog_starts": other}
    ctx.write("memory", result)
    return result


def _options(parser) -> None:
    parser.add_argument("--cold-limit", type=float, metavar="SECONDS",
                        help="give the cold start this long; if it is not SERVING by then, report how many items "
                             "it encoded, at what rate and CPU (the server's progress log), and skip the warm start")


def main(argv=None) -> None:
    common.main(__doc__, run, argv, options=_options)


if __name__ == "__main__":
    main()
