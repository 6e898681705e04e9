"""Benchmark 4: durable Feedback events/s in batches of 1, 100 and 1000 and through FeedbackStream, against the disk's fsync rate."""

from __future__ import annotations

import os
import random
import time

from . import common
from .common import ANCHOR, DAY, Context, ServerProcess, log, make_catalog, print_table, target

BATCHES = (1, 100, 1000)
STREAM_MESSAGE = 100


class EventSource:
    """Fresh, valid events (unique ids) over the catalog's items."""

    def __init__(self, item_ids: list[str], prefix: str):
        self.item_ids = item_ids
        self.prefix = prefix
        self.count = 0
        self.rng = random.Random(5)

    def protos(self, n: int):
        from .common import timestamp
        from chronorec.v1 import common_pb2

        out = []
        for _ in range(n):
            self.count += 1
            out.append(
                common_pb2.Event(
                    event_id=f"{self.prefix}-{self.count}",
                    user_id=f"fb-user-{self.rng.randrange(500)}",
                    item_id=self.rng.choice(self.item_ids),
                    action="view",
                    timestamp=timestamp(ANCHOR - self.rng.uniform(0, 30 * DAY)),
                )
            )
        return out

    def events(self, n: int):
        from chronorec.server.core.catalog import Event

        out = []
        for _ in range(n):
            self.count += 1
            out.append(Event(f"{self.prefix}-{self.count}", f"fb-user-{self.rng.randrange(500)}",
                             self.rng.choice(self.item_ids), "view", ANCHOR - self.rng.uniform(0, 30 * DAY), None))
        return out


def fsync_rate(folder, seconds: float = 1.0) -> float:
    """Small overwrites + fdatasync per second (how SQLite syncs its WAL): the ceiling for one-event commits."""
    path = folder / "fsync-probe"
    count = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\0" * (1 << 20), 0)
        os.fsync(fd)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.pwrite(fd, b"x" * 4096, (count % 256) * 4096)
            os.fdatasync(fd)
            count += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return count / elapsed


def run(ctx: Context) -> dict:
    from chronorec.server.core.store import EventStore
    from chronorec.v1 import recommender_pb2

    folder = ctx.work / "feedback"
    folder.mkdir(parents=True, exist_ok=True)
    items, _ = make_catalog(1000, 0)
    item_ids = [i.item_id for i in items]
    total, singles = ctx.sizes.feedback_events, ctx.sizes.feedback_single
    rows = []
    figures: dict[str, dict] = {}
    db = folder / "chronorec.db"
    with EventStore(db) as store:
        store.bulk_import(items, [])
    server = ServerProcess(db, ctx.fresh_repo("feedback"), folder / "server.log", int8=ctx.int8)
    inprocess = EventStore(folder / "inprocess.db")
    try:
        inprocess.bulk_import(items, [])
        server.wait_serving()
        _, recommender, _ = server.stubs()
        local, remote = EventSource(item_ids, "inproc"), EventSource(item_ids, "grpc")
        recommender.Feedback(recommender_pb2.FeedbackRequest(events=remote.protos(10)), timeout=30)  # warm-up
        # Each gRPC figure comes right after its baselines (the disk's sync rate and the store
        # called in-process): this disk's fsync rate swings with other processes' writes.
        for form, batch in [("unary", b) for b in BATCHES] + [("stream", 1), ("stream", STREAM_MESSAGE)]:
            n = singles if batch == 1 else total
            calls = max(1, n // batch)
            disk = fsync_rate(folder, 0.5)
            started = time.perf_counter()
            for _ in range(calls):
                inprocess.add_events(local.events(batch))
            inproc = calls * batch / (time.perf_counter() - started)
            requests = [recommender_pb2.FeedbackRequest(events=remote.protos(batch)) for _ in range(calls)]
            started = time.perf_counter()
            if form == "unary":
                stored = sum(recommender.Feedback(request, timeout=60).stored for request in requests)
            else:
                stored = recommender.FeedbackStream(iter(requests), timeout=120).stored
            rate = stored / (time.perf_counter() - started)
            key = f"grpc_batch_{batch}" if form == "unary" else f"stream_message_{batch}"
            figures[key] = {"events_per_s": rate, "sent": calls * batch, "stored": stored,
                            "inprocess_events_per_s": inproc, "disk_syncs_per_s": disk}
            label = "Feedback over gRPC" if form == "unary" else f"FeedbackStream, {batch}/message"
            rows.append([label, batch, calls * batch, disk, inproc, rate, rate / inproc])
            log(f"feedback {form} batch {batch}: {rate:.0f} events/s (in-process {inproc:.0f}, disk {disk:.0f} syncs/s)")
    finally:
        inprocess.close()
        server.stop()

    print_table(
        "Feedback: durable events/s (acknowledged after the WAL fsync), one client, sequential calls",
        ["path", "batch", "events", "disk syncs/s", "in-process events/s", "gRPC events/s", "x in-process"],
        rows,
    )
    lost = [k for k, v in figures.items() if "sent" in v and v["stored"] != v["sent"]]
    value = figures["grpc_batch_100"]["events_per_s"]
    met = value >= 10_000 and not lost
    print(f"  target >= 10,000 durable events/s in batches of 100: {value:,.0f} {target(met)}"
          + (f"; NOT all stored: {lost}" if lost else ""))
    result = {"figures": figures, "targets": {"batch100_ge_10000_per_s": {"value": value, "met": met}}}
    ctx.write("feedback", result)
    return result


def main(argv=None) -> None:
    common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
