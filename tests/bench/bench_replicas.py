"""Benchmark: two replicas over one PostgreSQL: propagation lag p50/p99, and Recommend calls/s on one replica vs two."""

from __future__ import annotations

import argparse
import os
import threading
import time

from . import common
from .common import ANCHOR, Context, ServerProcess, log, make_catalog, percentile_ms, print_table, run_concurrently, target

# The bound the replicas promise: p99 of the time from a write's acknowledgement on one replica
# to the change being visible through the other.
LAG_TARGET_S = 1.0
POLL_S = 0.001  # between visibility checks on the other replica
CLIENT_THREADS = 16  # callers sending Recommend through the client's round_robin


def _lag_samples(write, visible, n: int) -> list[float]:
    """Seconds from each write's acknowledgement to its visibility on the other replica."""
    lags = []
    for i in range(n):
        key = write(i)
        acknowledged = time.perf_counter()
        while not visible(key):
            if time.perf_counter() - acknowledged > 30:
                raise TimeoutError(f"change {key} not visible on the other replica after 30 s")
            time.sleep(POLL_S)
        lags.append(time.perf_counter() - acknowledged)
    return lags


def _background_writes(stubs: list, item_ids: list[str], stop: threading.Event, counts: list[int]) -> list[threading.Thread]:
    """Two writers per replica sending Feedback batches of 10 as fast as they are answered."""
    from chronorec.v1 import common_pb2, recommender_pb2

    def write(worker: int) -> None:
        stub = stubs[worker % len(stubs)]
        n = 0
        while not stop.is_set():
            events = []
            for k in range(10):
                event = common_pb2.Event(event_id=f"load-{worker}-{n}-{k}", user_id=f"load-user-{worker}-{n % 50}",
                                         item_id=item_ids[(n * 10 + k) % len(item_ids)], action="view")
                event.timestamp.FromSeconds(int(ANCHOR))
                events.append(event)
            stub.Feedback(recommender_pb2.FeedbackRequest(events=events), timeout=30)
            counts[worker] += len(events)
            n += 1

    threads = [threading.Thread(target=write, args=(w,), daemon=True) for w in range(2 * len(stubs))]
    for thread in threads:
        thread.start()
    return threads


def _recommend_rate(target_address: str, users: list[str], seconds: float, servers: list[ServerProcess]) -> dict:
    """Recommend calls/s from CLIENT_THREADS callers through one ChronorecClient on `target_address`,
    cycling through `users` (a user's history text is encoded unless a recent call cached it)."""
    from chronorec.client.client import ChronorecClient

    latencies: list[float] = []
    lock = threading.Lock()
    with ChronorecClient(target_address, timeout=60) as client:
        client.wait_ready(60)
        for user in users[:CLIENT_THREADS]:
            client.recommend(user, k=10, at=ANCHOR)  # warm every connection and cache
        deadline = time.perf_counter() + seconds
        cpu_before = sum(s.cpu_seconds() for s in servers)

        def work(worker: int) -> None:
            local, n = [], worker
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                client.recommend(users[n % len(users)], k=10, at=ANCHOR)
                local.append(time.perf_counter() - started)
                n += CLIENT_THREADS
            with lock:
                latencies.extend(local)

        wall = run_concurrently(CLIENT_THREADS, work)
        cpu = sum(s.cpu_seconds() for s in servers) - cpu_before
    return {"calls": len(latencies), "calls_per_s": len(latencies) / wall, "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99), "server_cpu_ms_per_call": cpu * 1000 / max(1, len(latencies))}


def run(ctx: Context, postgres_url: str | None = None) -> dict:
    from chronorec.server.core.pg_store import PostgresEventStore
    from chronorec.v1 import catalog_pb2, common_pb2, recommender_pb2
    from pgcluster import PostgresCluster

    folder = ctx.work / "replicas"
    folder.mkdir(parents=True, exist_ok=True)
    cluster = None
    if postgres_url is None:
        cluster = PostgresCluster(parent=folder)
        cluster.start()
        postgres_url = cluster.create_database()
        log(f"throwaway PostgreSQL on port {cluster.port} in {cluster.root}")
    n_items = ctx.sizes.catalogs[0]
    samples = 30 if ctx.quick else 300
    seconds = ctx.sizes.recommend_seconds
    items, events = make_catalog(n_items, ctx.sizes.recommend_users)
    users = sorted({e.user_id for e in events})
    item_ids = [i.item_id for i in items]
    servers: list[ServerProcess] = []
    try:
        with PostgresEventStore(postgres_url) as store:
            store.bulk_import(items, events)
        models = ctx.fresh_repo("replicas")
        starts = {}
        for name in ("a", "b"):
            server = ServerProcess(postgres_url, models, folder / f"replica-{name}.log", int8=ctx.int8,
                                   extra=["--replica-name", name], data_dir=folder / name)
            starts[name] = server.wait_serving()
            servers.append(server)
            log(f"replica {name} SERVING after {starts[name]:.1f} s ({'cold' if name == 'a' else 'warm'} vector cache), "
                f"RSS {server.rss_mb():.0f} MB")
        (_, rec_a, _), (_, rec_b, _) = servers[0].stubs(), servers[1].stubs()
        catalog_a = catalog_pb2_grpc_stub(servers[0])
        catalog_b = catalog_pb2_grpc_stub(servers[1])

        def feedback_on_a(i: int, tag: str) -> str:
            user = f"lag-{tag}-{i}"
            event = common_pb2.Event(event_id=f"lag-{tag}-{i}", user_id=user, item_id=item_ids[i % len(item_ids)],
                                     action="click")
            event.timestamp.FromSeconds(int(ANCHOR))
            rec_a.Feedback(recommender_pb2.FeedbackRequest(events=[event]), timeout=30)
            return user

        def seen_on_b(user: str) -> bool:
            request = recommender_pb2.RecommendRequest(user_id=user, k=1, at=common.timestamp(ANCHOR + 1))
            return rec_b.Recommend(request, timeout=30).history_length > 0

        def upsert_on_a(i: int) -> str:
            item_id = f"lag-item-{i}"
            item = common_pb2.Item(item_id=item_id, title=f"A fresh item number {i}", text="replication lag probe",
                                   category="probe")
            catalog_a.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30)
            return item_id

        def item_on_b(item_id: str) -> bool:
            try:
                catalog_b.GetItem(catalog_pb2.GetItemRequest(item_id=item_id), timeout=30)
                return True
            except Exception:  # NOT_FOUND until it arrives
                return False

        lags = {"feedback_idle": _lag_samples(lambda i: feedback_on_a(i, "idle"), seen_on_b, samples),
                "upsert_idle": _lag_samples(upsert_on_a, item_on_b, max(10, samples // 5))}
        stop, counts = threading.Event(), [0] * 4
        writers = _background_writes([rec_a, rec_b], item_ids, stop, counts)
        began = time.perf_counter()
        try:
            time.sleep(0.5)
            lags["feedback_under_write_load"] = _lag_samples(lambda i: feedback_on_a(i, "load"), seen_on_b, samples)
        finally:
            stop.set()
            for thread in writers:
                thread.join()
        load_rate = sum(counts) / (time.perf_counter() - began)

        rates = {"one_replica": _recommend_rate(servers[0].target, users, seconds, servers[:1]),
                 "two_replicas": _recommend_rate(",".join(s.target for s in servers), users, seconds, servers)}
        rss = {name: server.rss_mb() for name, server in zip(("a", "b"), servers)}
    finally:
        for server in servers:
            server.stop()
        if cluster is not None:
            cluster.destroy()

    figures = {name: {"samples": len(values), "p50_ms": percentile_ms(values, 50), "p99_ms": percentile_ms(values, 99),
                      "max_ms": percentile_ms(values, 100)} for name, values in lags.items()}
    figures["feedback_under_write_load"]["background_events_per_s"] = load_rate
    p99 = figures["feedback_under_write_load"]["p99_ms"] / 1000
    print_table(
        f"Propagation: a write acknowledged by replica A, until replica B shows it (polled every {POLL_S * 1000:g} ms; "
        f"{n_items} items)",
        ["change", "samples", "p50 ms", "p99 ms", "max ms"],
        [[name.replace("_", " "), f["samples"], f["p50_ms"], f["p99_ms"], f["max_ms"]] for name, f in figures.items()],
    )
    log(f"background load during the last row: {load_rate:.0f} events/s written through both replicas")
    ratio = rates["two_replicas"]["calls_per_s"] / rates["one_replica"]["calls_per_s"]
    cpus = os.cpu_count()
    print_table(
        f"Recommend through ChronorecClient (round_robin), {CLIENT_THREADS} callers, {len(users)} users in turn (most "
        f"calls encode a history text), {n_items} items; "
        f"{cpus} CPUs shared by the client, both replicas and PostgreSQL",
        ["replicas", "calls", "calls/s", "p50 ms", "p99 ms", "server CPU ms/call"],
        [[name.replace("_", " "), r["calls"], r["calls_per_s"], r["p50_ms"], r["p99_ms"], r["server_cpu_ms_per_call"]]
         for name, r in rates.items()],
    )
    log(f"two replicas / one: {ratio:.2f}x on {cpus} CPUs (the ceiling is the cores, not the replicas)")
    result = {
        "figures": {"propagation": figures, "recommend": rates, "two_over_one": ratio, "cpus": cpus,
                    "items": n_items, "start_seconds": starts, "rss_mb": rss},
        "targets": {"propagation_p99_s": {"value": p99, "met": bool(p99 <= LAG_TARGET_S)}},
    }
    log(f"propagation p99 under write load {p99 * 1000:.0f} ms: {target(p99 <= LAG_TARGET_S)} (<= {LAG_TARGET_S:g} s)")
    ctx.write("replicas", result)
    return result


def catalog_pb2_grpc_stub(server: ServerProcess):
    from chronorec.v1 import catalog_pb2_grpc

    return catalog_pb2_grpc.CatalogServiceStub(server.channel)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres-url", help="an existing, empty PostgreSQL database to use instead of a "
                                               "throwaway server (which needs the binaries in /usr/lib/postgresql)")


def main(argv=None) -> None:
    common.main(__doc__, run, argv, options=_options)


if __name__ == "__main__":
    main()
