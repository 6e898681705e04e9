"""Faults: a SIGKILL mid-stream, a database locked by another process, a vanished or corrupt model repository."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from chronorec.client.client import ChronorecClient
from chronorec.server.core.repository import ModelRepository
from chronorec.server.service.errors import RETRY_PUSHBACK_KEY
from chronorec.v1 import common_pb2, encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR, free_port, wait_serving
from hardening import Stubs, seed_store, small_history, ts

SEEDED = len(small_history())


def _batch(tag: str, size: int) -> list[common_pb2.Event]:
    return [
        common_pb2.Event(event_id=f"{tag}-{i}", user_id=f"user-{tag}", item_id=f"i{i % 40}", action="view", timestamp=ts(ANCHOR - i))
        for i in range(size)
    ]


def _stored_ids(db) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}


# ---------------------------------------------------------------- SIGKILL


def test_sigkill_mid_feedback_stream_loses_no_acknowledged_event_and_no_batch_is_partial(start_server, tiny_repo, tmp_path):
    db = tmp_path / "kill.db"
    seed_store(db)
    port = free_port()
    command = [
        sys.executable, "-m", "chronorec.server.app", "--port", str(port), "--db", str(db), "--models", str(tiny_repo),
        "--no-demo", "--data-dir", str(tmp_path), "--cooccurrence-refresh", "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acknowledged: set[str] = set()
    unary_sent: list[list[str]] = []  # unary batches in order; all but maybe the last were acknowledged
    stream_sent: list[list[str]] = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        stubs = Stubs(channel)
        for s in range(3):
            batches = [_batch(f"s{s}-b{b}", 10) for b in range(4)]
            response = stubs.recommender.FeedbackStream(iter(recommender_pb2.FeedbackRequest(events=b) for b in batches), timeout=30)
            assert response.stored == 40
            acknowledged.update(e.event_id for b in batches for e in b)

        stop_unary = threading.Event()

        def unary_writer():
            # Larger batches beside the stream, so the kill may land inside a transaction too.
            n = 0
            while not stop_unary.is_set():
                batch = _batch(f"u{n}", 200)
                unary_sent.append([e.event_id for e in batch])
                try:
                    assert stubs.recommender.Feedback(recommender_pb2.FeedbackRequest(events=batch), timeout=30).stored == 200
                except grpc.RpcError:
                    return
                acknowledged.update(unary_sent[-1])
                n += 1

        writer = threading.Thread(target=unary_writer)
        writer.start()

        def interrupted_stream():
            for b in range(1000):
                batch = _batch(f"x-b{b}", 25)
                stream_sent.append([e.event_id for e in batch])
                yield recommender_pb2.FeedbackRequest(events=batch)
                if b == 8:
                    # Kill once the first batches are durable, while later ones are in flight.
                    _wait_for(lambda: set(stream_sent[0]) <= _stored_ids(db), timeout=20)
                    process.kill()
                    process.wait(10)

        with pytest.raises(grpc.RpcError) as info:
            stubs.recommender.FeedbackStream(interrupted_stream(), timeout=30)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
        stop_unary.set()
        writer.join(30)
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()

    stored = _stored_ids(db)
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged events were lost"
    for label, batches in (("stream", stream_sent), ("unary", unary_sent)):
        present = [len(set(batch) & stored) for batch in batches]
        for count, batch in zip(present, batches):
            assert count in (0, len(batch)), f"a {label} batch was stored in part ({count} of {len(batch)})"
        whole = [count > 0 for count in present]
        assert whole == sorted(whole, reverse=True), f"{label} batches were stored out of order"
    assert any(set(batch) <= stored for batch in stream_sent), "the kill came before any batch was stored"

    # A restarted server opens the file (WAL recovery) and counts exactly what is there.
    server = start_server(tiny_repo, db=db)
    assert server.engine.store.count_events() == len(stored) == server.engine.state.event_count
    assert len(stored) == SEEDED + len({e for e in stored if not e.startswith("seed-")})


# ---------------------------------------------------------------- a locked database


def test_database_locked_by_another_process_is_unavailable_with_a_retry_hint(start_server, tiny_repo, tmp_path):
    db = tmp_path / "locked.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db)
    holder = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    locker = subprocess.Popen([sys.executable, "-c", holder, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert locker.stdout.readline().strip() == b"locked"
        request = recommender_pb2.FeedbackRequest(events=_batch("locked", 3))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            server.recommender.Feedback(request, timeout=30)
        error = info.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "retry" in error.details()
        assert dict(error.trailing_metadata())[RETRY_PUSHBACK_KEY] == "500"
        assert time.monotonic() - started < 20  # the store's busy timeout, not the caller's deadline
        # Reads are served from memory meanwhile; the server is not wedged.
        assert server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), timeout=10).items
        assert server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["still here"]), timeout=10).embeddings

        # The client library retries UNAVAILABLE: once the lock goes, the same call succeeds.
        release = threading.Timer(1.0, locker.stdin.close)
        release.start()
        with ChronorecClient(server.target, timeout=30, max_retries=5) as client:
            result = client.feedback([{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "action": "view"} for e in request.events])
        release.join()
        assert result.stored == 3
    finally:
        if locker.poll() is None:
            locker.kill()
    assert server.engine.store.count_events() == SEEDED + 3


# ---------------------------------------------------------------- the model repository


class Traffic:
    """Recommend and Encode calls in a loop on another thread; every failure is kept."""

    def __init__(self, stubs: Stubs):
        self.stubs = stubs
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.stubs.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5), timeout=10)
                self.stubs.encoder.Encode(encoder_pb2.EncodeRequest(texts=["jazz tonight"]), timeout=10)
                self.calls += 2
            except grpc.RpcError as error:
                self.failures.append(f"{error.code()}: {error.details()}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def _wait_for(predicate, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _vector(stubs: Stubs, text: str) -> np.ndarray:
    return np.array(stubs.encoder.Encode(encoder_pb2.EncodeRequest(texts=[text]), timeout=10).embeddings[0].values)


def test_model_repository_vanishing_leaves_the_serving_model_running(start_server, tiny_repo, tmp_path):
    server = start_server(tiny_repo, db=tmp_path / "repo.db", watch_interval_s=0.05)
    serving = server.engine.serving_version()
    moved = tmp_path / "moved-away"
    with Traffic(server) as traffic:
        time.sleep(0.2)
        tiny_repo.rename(moved)
        time.sleep(0.5)  # many watcher ticks against a missing folder
        status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
        assert status.serving_version == serving
        assert list(server.models.ListVersions(models_pb2.ListVersionsRequest(), timeout=10).versions) == []
        with pytest.raises(grpc.RpcError) as info:
            server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=serving, wait=True), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        moved.rename(tiny_repo)
        time.sleep(0.3)
    assert traffic.calls > 10 and traffic.failures == []
    assert server.engine.serving_version() == serving


def test_corrupt_versions_leave_the_serving_model_running(start_server, tiny_repo, tmp_path):
    server = start_server(tiny_repo, db=tmp_path / "corrupt.db", watch_interval_s=0.05)
    repository = ModelRepository(tiny_repo)
    serving = server.engine.serving_version()
    before = _vector(server, "a quiet evening of jazz")
    with Traffic(server) as traffic:
        # 1. The serving version's files are overwritten on disk: the loaded session keeps serving.
        version_dir = repository.version_dir(serving)
        (version_dir / "model.onnx").write_bytes(b"\x00garbage" * 100)
        (version_dir / "tokenizer.json").write_text("{ not json")
        assert np.allclose(_vector(server, "a quiet evening of jazz"), before)

        # 2. A corrupt new version is named by the pointer (a trainer bug or a bad copy): refused.
        corrupt = "v-corrupt-onnx"
        shutil.copytree(repository.version_dir(serving), repository.version_dir(corrupt))
        repository.activate(corrupt)
        _wait_for(lambda: corrupt in server.engine.status().last_error)
        status = server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
        assert status.serving_version == serving and corrupt in status.last_error

        # 3. The same through the API: a clear error, not INTERNAL, and the old version serves on.
        with pytest.raises(grpc.RpcError) as info:
            server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=corrupt, wait=True), timeout=30)
        # FAILED_PRECONDITION when the pointer watcher is loading the same version at that moment.
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), info.value.details()

        # 4. A version whose manifest is truncated is not even listed.
        half = repository.version_dir("v-half-written")
        shutil.copytree(tiny_repo / "encoder" / corrupt, half)
        (half / "manifest.json").write_text('{"version": ')
        names = [v.version for v in server.models.ListVersions(models_pb2.ListVersionsRequest(), timeout=10).versions]
        assert "v-half-written" not in names
        with pytest.raises(grpc.RpcError) as info:
            server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version="v-half-written", wait=True), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(0.3)
    assert traffic.calls > 10 and traffic.failures == []
    assert server.engine.serving_version() == serving
    assert np.allclose(_vector(server, "a quiet evening of jazz"), before)


# ---------------------------------------------------------------- deadlines and cancellation


class _Aborted(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _EndedCall:
    """An asyncio servicer context whose caller has gone (deadline passed)."""

    def cancelled(self):
        return False

    def done(self):
        return False

    def time_remaining(self):
        return 0.0

    async def abort(self, code, details="", trailing_metadata=()):
        raise _Aborted(code)


class _UntouchableEngine:
    def __getattr__(self, name):
        raise AssertionError(f"the engine was asked for {name} by a call nobody waits for")


async def _requests(*messages):
    for message in messages:
        yield message


def test_calls_whose_caller_left_never_reach_the_engine():
    import asyncio

    from chronorec.server.config import Limits
    from chronorec.server.service.catalog import CatalogServicer
    from chronorec.server.service.encoder import EncoderServicer
    from chronorec.server.service.executors import Executors
    from chronorec.server.service.recommender import RecommenderServicer
    from chronorec.v1 import catalog_pb2

    engine, limits, context = _UntouchableEngine(), Limits(), _EndedCall()
    executors = Executors.create(1, 1, 4, "--max-queued-work=4")
    calls = [
        lambda: EncoderServicer(engine, limits, executors).Encode(encoder_pb2.EncodeRequest(texts=["late"]), context),
        lambda: RecommenderServicer(engine, limits, executors).Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), context),
        lambda: RecommenderServicer(engine, limits, executors).Feedback(recommender_pb2.FeedbackRequest(events=_batch("late", 2)), context),
        lambda: RecommenderServicer(engine, limits, executors).FeedbackStream(
            _requests(recommender_pb2.FeedbackRequest(events=_batch("late", 2))), context
        ),
        lambda: CatalogServicer(engine, limits, executors).UpsertItems(
            catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="late", title="late item")]), context
        ),
    ]
    try:
        for call in calls:
            with pytest.raises(_Aborted) as info:
                asyncio.run(call())
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        executors.shutdown()


def test_expired_encode_calls_drop_their_queued_work(start_server, tiny_repo, tmp_path):
    server = start_server(tiny_repo, db=tmp_path / "deadline.db")
    texts = [f"word{i} " * 200 for i in range(256)]  # ~1 s of tiny-BERT work per call
    codes: list[grpc.StatusCode] = []

    def late_call():
        try:
            server.encoder.Encode(encoder_pb2.EncodeRequest(texts=texts), timeout=0.3)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())

    callers = [threading.Thread(target=late_call) for _ in range(12)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 10, codes
    # Work nobody waits for is dropped: a fresh call is not stuck behind ~12 s of dead batches.
    started = time.monotonic()
    server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["a fresh call"]), timeout=10)
    assert time.monotonic() - started < 3.0
    encoded = server.running.metrics.registry.get_sample_value("chronorec_encoder_batch_size_sum")
    assert encoded < len(callers) * len(texts) / 2, f"{encoded:.0f} texts encoded for callers that had left"
