"""Benchmark 6: server RSS at 100k items and start-up time to SERVING, cold (encode every item) and warm (vector cache)."""

from __future__ import annotations

from . import common
from .common import Context, ServerProcess, log, print_table


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


def run(ctx: Context) -> dict:
    n = ctx.sizes.memory_size
    baseline = empty_server(ctx)
    setup = ctx.catalog(n)
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


def main(argv=None) -> None:
    common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
