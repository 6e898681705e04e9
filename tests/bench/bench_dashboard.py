"""Benchmark: gRPC Recommend latency with and without a client polling the web dashboard's pages, in one server run."""

# Usage: python -m tests.bench.bench_dashboard [--quick] [--seconds 20]
# One server (the demo catalog, the bench model) serves Recommend to CALLERS closed-loop clients.
# Rounds alternate three phases: dashboard closed; open as a browser tab on the Status page leaves
# it (one fetch every 5 s); and open under a client fetching the Status, User preview and Item
# pages back to back on one connection, with no pause (far more than any person clicks).
# Latency percentiles are over all calls of each phase.

from __future__ import annotations

import http.client
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from . import common
from .common import Context, ServerProcess, free_port, log, load_note, percentile_ms, print_table, timestamp

CALLERS = 4
ROUNDS = 3
DEMO_USERS = [f"demo-user-{n:03d}" for n in range(1, 61)]


def _recommend_load(recommender, at, stop: threading.Event, latencies: list[float], seed: int) -> None:
    from chronorec.v1 import recommender_pb2

    rng = random.Random(seed)
    while not stop.is_set():
        request = recommender_pb2.RecommendRequest(user_id=rng.choice(DEMO_USERS), k=10, at=at)
        started = time.perf_counter()
        recommender.Recommend(request, timeout=60)
        latencies.append(time.perf_counter() - started)


STATUS_REFRESH_S = 5.0


def _dashboard_pages(port: int, at: int, items: list[str], stop: threading.Event, pages: list[float],
                     status_only: bool) -> None:
    """Fetch the dashboard's pages until `stop`, each page's seconds into `pages`: the Status page
    every STATUS_REFRESH_S (`status_only`), else Status, User preview and Item back to back."""
    rng = random.Random(5)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    cookie = ""
    try:
        while not stop.is_set():
            paths = ["/"] if status_only else [
                "/", "/preview?" + urlencode({"user": rng.choice(DEMO_USERS), "k": 10, "at": at}),
                f"/items/{rng.choice(items)}?at={at}"]
            for path in paths:
                started = time.perf_counter()
                connection.request("GET", path, headers={"Cookie": cookie} if cookie else {})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"dashboard {path}: HTTP {response.status}")
                cookie = (response.getheader("Set-Cookie") or cookie).split(";", 1)[0]
                pages.append(time.perf_counter() - started)
            if status_only:
                stop.wait(STATUS_REFRESH_S)
    finally:
        connection.close()


def _phase(recommender, at, seconds: float, dashboard: tuple[int, int, list[str], bool] | None) -> dict:
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(CALLERS)]
    pages: list[float] = []
    threads = [threading.Thread(target=_recommend_load, args=(recommender, at, stop, latencies[i], i), daemon=True)
               for i in range(CALLERS)]
    if dashboard is not None:
        threads.append(threading.Thread(target=_dashboard_pages, args=(*dashboard[:3], stop, pages, dashboard[3]), daemon=True))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    calls = [x for part in latencies for x in part]
    return {"calls": calls, "pages": pages, "wall_s": wall}


def run(ctx: Context, seconds: float | None = None, rounds: int = ROUNDS) -> dict:
    from chronorec.server.core.demo import today_utc_midnight

    seconds = seconds or (2.0 if ctx.quick else 20.0)
    rounds = 1 if ctx.quick else rounds
    folder = ctx.work / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = _server_with_demo(folder, ctx, port)
    try:
        server.wait_serving()
        _, recommender, _ = server.stubs()
        at_seconds = int(today_utc_midnight())
        at = timestamp(at_seconds)
        items = [f"demo-{n:04d}" for n in range(1, 361, 7)]
        _phase(recommender, at, min(2.0, seconds), (port, at_seconds, items, False))  # warm both paths
        phases = {name: {"calls": [], "pages": [], "wall_s": 0.0} for name in ("closed", "status_tab", "back_to_back")}
        settings = {"closed": None, "status_tab": (port, at_seconds, items, True),
                    "back_to_back": (port, at_seconds, items, False)}
        load_before = load_note()
        for n in range(rounds):
            for name, target in phases.items():
                dashboard = settings[name]
                figures = _phase(recommender, at, seconds, dashboard)
                for key in ("calls", "pages"):
                    target[key] += figures[key]
                target["wall_s"] += figures["wall_s"]
            log(f"round {n + 1}/{rounds} done")
        load_after = load_note()
    finally:
        server.stop()

    def summary(phase: dict) -> dict:
        calls = phase["calls"]
        return {
            "recommend_calls": len(calls),
            "recommend_per_s": len(calls) / phase["wall_s"],
            "p50_ms": percentile_ms(calls, 50),
            "p99_ms": percentile_ms(calls, 99),
            "pages": len(phase["pages"]),
            "pages_per_s": len(phase["pages"]) / phase["wall_s"],
            "page_p50_ms": percentile_ms(phase["pages"], 50) if phase["pages"] else None,
            "page_p99_ms": percentile_ms(phase["pages"], 99) if phase["pages"] else None,
        }

    result = {name: summary(phase) for name, phase in phases.items()}
    result.update({"callers": CALLERS, "rounds": rounds, "seconds_per_phase": seconds,
                   "load_before": load_before, "load_after": load_after})
    labels = {"closed": "dashboard closed", "status_tab": "Status tab open (every 5 s)",
              "back_to_back": "pages back to back"}
    rows = [[labels[name], result[name]["recommend_per_s"], result[name]["p50_ms"], result[name]["p99_ms"],
             result[name]["pages_per_s"], result[name]["page_p50_ms"] or "–"] for name in phases]
    print_table(f"Recommend over gRPC, {CALLERS} callers, {rounds} x {seconds:g} s per phase",
                ["phase", "calls/s", "p50 ms", "p99 ms", "pages/s", "page p50 ms"], rows)
    print(f"load: {load_before} before, {load_after} after")
    ctx.write("dashboard", result)
    return result


def _server_with_demo(folder: Path, ctx: Context, port: int) -> ServerProcess:
    """The server over the demo catalog (360 items, 60 users; ServerProcess passes --no-demo, so
    the database is loaded here first), with the dashboard on `port`."""
    from chronorec.server.core.demo import ensure_demo
    from chronorec.server.core.store import EventStore

    with EventStore(folder / "chronorec.db") as store:
        ensure_demo(store)
    return ServerProcess(folder / "chronorec.db", ctx.fresh_repo("dashboard"), folder / "server.log", int8=ctx.int8,
                         extra=["--dashboard-port", str(port)])


def main(argv=None) -> int:
    def options(parser) -> None:
        parser.add_argument("--seconds", type=float, default=None, help="seconds per phase (default 20; 2 with --quick)")
        parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"closed/open rounds (default {ROUNDS})")

    common.main(__doc__, run, argv, options=options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
