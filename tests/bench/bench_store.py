"""Benchmark: durable Feedback events/s at the store, PostgreSQL against SQLite, batches of 1, 100 and 1000, one run."""

from __future__ import annotations

import argparse
import threading
import time

from .bench_feedback import EventSource, fsync_rate
from . import common
from .common import Context, log, make_catalog, print_table

BATCHES = (1, 100, 1000)
# (writers, batch): sequential calls from one client, then concurrent writers taking turns on
# the write lock (SQLite's file lock, PostgreSQL's change counter row).
RUNS = [(1, b) for b in BATCHES] + [(4, 1), (4, 100)]


def _rate(store, sources: list[EventSource], batch: int, calls_per_writer: int) -> float:
    """Durable events/s with len(sources) threads each making `calls_per_writer` add_events calls."""
    batches = [[source.events(batch) for _ in range(calls_per_writer)] for source in sources]
    failures: list[BaseException] = []

    def write(mine: list) -> None:
        try:
            for events in mine:
                store.add_events(events)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(mine,)) for mine in batches]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return len(sources) * calls_per_writer * batch / elapsed


def run(ctx: Context, postgres_url: str | None = None) -> dict:
    from chronorec.server.core.pg_store import PostgresEventStore
    from chronorec.server.core.store import EventStore
    from pgcluster import PostgresCluster

    folder = ctx.work / "store"
    folder.mkdir(parents=True, exist_ok=True)
    cluster = None
    if postgres_url is None:
        # Beside the SQLite file, so both sync to the same disk.
        cluster = PostgresCluster(parent=folder)
        cluster.start()
        postgres_url = cluster.create_database()
        log(f"throwaway PostgreSQL on port {cluster.port} in {cluster.root}")
    items, _ = make_catalog(1000, 0)
    item_ids = [i.item_id for i in items]
    total, singles = ctx.sizes.feedback_events, ctx.sizes.feedback_single
    rows, figures = [], {}
    sqlite = EventStore(folder / "chronorec.db")
    postgres = PostgresEventStore(postgres_url)
    try:
        for store in (sqlite, postgres):
            store.bulk_import(items, [])
            store.add_events(EventSource(item_ids, "warm-up").events(10))
        for writers, batch in RUNS:
            events = singles if batch == 1 else total
            calls = max(1, events // (batch * writers))
            disk = fsync_rate(folder, 0.5)
            # Alternate which backend goes first so a drift in the disk's speed favours neither.
            rates = {}
            order = ("sqlite", "postgres") if len(rows) % 2 == 0 else ("postgres", "sqlite")
            for name in order:
                store = sqlite if name == "sqlite" else postgres
                sources = [EventSource(item_ids, f"{name}-{writers}-{batch}-{w}") for w in range(writers)]
                rates[name] = _rate(store, sources, batch, calls)
            key = f"writers_{writers}_batch_{batch}"
            figures[key] = {"sqlite_events_per_s": rates["sqlite"], "postgres_events_per_s": rates["postgres"],
                            "events": writers * calls * batch, "disk_syncs_per_s": disk}
            rows.append([writers, batch, writers * calls * batch, disk, rates["sqlite"], rates["postgres"],
                         rates["postgres"] / rates["sqlite"]])
            log(f"store writers {writers} batch {batch}: SQLite {rates['sqlite']:.0f}, "
                f"PostgreSQL {rates['postgres']:.0f} events/s (disk {disk:.0f} syncs/s)")
        counts = {"sqlite": sqlite.count_events(), "postgres": postgres.count_events()}
    finally:
        sqlite.close()
        postgres.close()
        if cluster is not None:
            cluster.destroy()

    print_table(
        "Store: durable events/s (add_events returns after the commit's fsync), PostgreSQL on loopback vs SQLite",
        ["writers", "batch", "events", "disk syncs/s", "SQLite events/s", "PostgreSQL events/s", "PG / SQLite"],
        rows,
    )
    assert counts["sqlite"] == counts["postgres"], f"the backends stored different counts: {counts}"
    result = {"figures": figures, "targets": {}}
    ctx.write("store", result)
    return result


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres-url", help="an existing, empty PostgreSQL database to use instead of a "
                                               "throwaway server (which needs the binaries in /usr/lib/postgresql)")


def main(argv=None) -> None:
    common.main(__doc__, run, argv, options=_options)


if __name__ == "__main__":
    main()
