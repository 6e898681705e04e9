"""Benchmark: server memory with one version and with a canary beside it, and the canary's split over 10,000 users under load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from . import common
from .common import ANCHOR, Context, log, print_table, publish_copy, timestamp

USERS = 10_000
SHARE = 10.0
CALLERS = 8


def _warm(recommender, users: list[str]) -> None:
    """Traffic that fills what a serving version holds (short-term cache, index pages) before RSS is read."""
    from chronorec.v1 import recommender_pb2

    for user in users:
        recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10, at=timestamp(ANCHOR)), timeout=60)


def _loaded(models_stub) -> list[dict]:
    from chronorec.v1 import models_pb2

    status = models_stub.GetStatus(models_pb2.GetStatusRequest(), timeout=30)
    return [{"version": v.version, "role": v.role, "estimated_mb": v.memory_bytes / 2**20} for v in status.loaded_versions]


def run(ctx: Context, users: int | None = None, share: float = SHARE) -> dict:
    from chronorec.v1 import models_pb2, recommender_pb2

    users = users or (2000 if ctx.quick else USERS)
    n_items = min(ctx.sizes.catalogs)
    setup = ctx.catalog(n_items)
    setup.stop()  # a fresh process: its memory is this benchmark's alone
    setup.start("canary benchmark")
    server = setup.server
    _, recommender, models = server.stubs()
    warm_users = setup.users[:200]
    _warm(recommender, warm_users)
    one = {"rss_mb": server.rss_mb(), "loaded": _loaded(models)}
    log(f"one version: RSS {one['rss_mb']:.0f} MB")

    # The candidate's encoder files are byte-identical, so it loads the catalog's vectors from the
    # vector cache (what a retuned version costs); a retrained one holds the same once encoded.
    candidate = publish_copy(setup.models, distinct=False)
    started = time.perf_counter()
    response = models.ActivateVersion(models_pb2.ActivateVersionRequest(version=candidate, canary_percent=share),
                                      timeout=1800)
    load_s = time.perf_counter() - started
    assert response.canary_version == candidate
    _warm(recommender, warm_users)  # now both versions serve some of them
    two = {"rss_mb": server.rss_mb(), "peak_rss_mb": server.peak_rss_mb(), "loaded": _loaded(models)}
    log(f"two versions: RSS {two['rss_mb']:.0f} MB (canary loaded in {load_s:.1f} s)")

    def version_of(user: str) -> str:
        request = recommender_pb2.RecommendRequest(user_id=user, k=5, at=timestamp(ANCHOR))
        return recommender.Recommend(request, timeout=60).model_version

    names = [f"split-user-{n}" for n in range(users)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CALLERS) as pool:
        served = dict(zip(names, pool.map(version_of, names)))
    wall = time.perf_counter() - started
    measured = 100.0 * sum(v == candidate for v in served.values()) / users
    again = names[: users // 5]
    with ThreadPoolExecutor(CALLERS) as pool:
        repeat = dict(zip(again, pool.map(version_of, again)))
    moved = sum(repeat[u] != served[u] for u in again)
    models.AbortCanary(models_pb2.AbortCanaryRequest(), timeout=60)
    time.sleep(1.0)
    after_abort = {"rss_mb": server.rss_mb(), "loaded": _loaded(models)}
    setup.stop()

    rows = [["one version", one["rss_mb"], sum(v["estimated_mb"] for v in one["loaded"])],
            [f"current + canary ({share:g}%)", two["rss_mb"], sum(v["estimated_mb"] for v in two["loaded"])],
            ["after the abort", after_abort["rss_mb"], sum(v["estimated_mb"] for v in after_abort["loaded"])]]
    print_table(f"Server memory, {n_items} items", ["versions loaded", "RSS MB", "GetStatus estimate MB"], rows)
    print_table(f"Canary split over {users} users, {CALLERS} callers at once",
                ["requested %", "served %", "off by (points)", "calls/s", "users moved on a second call"],
                [[share, measured, measured - share, users / wall, f"{moved} of {len(again)}"]])
    result = {"items": n_items, "one_version": one, "two_versions": two, "after_abort": after_abort,
              "canary_load_seconds": load_s, "split": {"users": users, "requested_percent": share,
                                                       "served_percent": measured, "calls_per_second": users / wall,
                                                       "moved_on_second_call": moved, "checked_again": len(again)}}
    ctx.write("canary", result)
    return result


def main(argv=None) -> None:
    def options(parser) -> None:
        parser.add_argument("--users", type=int, default=None, help=f"users asked for in the split (default {USERS}; 2000 with --quick)")
        parser.add_argument("--share", type=float, default=SHARE, help=f"canary percentage (default {SHARE:g})")

    common.main(__doc__, run, argv, options=options)


if __name__ == "__main__":
    main()
