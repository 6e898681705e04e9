"""Denial of service: calls held open cost no thread, health stays answerable, and every bound answers RESOURCE_EXHAUSTED with pushback."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chronorec.server.config import Limits
from chronorec.server.service.errors import RETRY_PUSHBACK_KEY
from chronorec.server.service.interceptors import CallKind
from chronorec.v1 import catalog_pb2, common_pb2, encoder_pb2, recommender_pb2, recommender_pb2_grpc
from conftest import ANCHOR
from hardening import make_ca, make_cert, seed_store, ts

RECOMMEND = "/chronorec.v1.RecommenderService/Recommend"
FEEDBACK_STREAM = "/chronorec.v1.RecommenderService/FeedbackStream"
READ_TOKEN = "read-token-for-dos-tests-0123"
WRITE_TOKEN = "write-token-for-dos-tests-0123"


def _auth(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


def _pushback(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)


def _feedback(tag: str) -> recommender_pb2.FeedbackRequest:
    return recommender_pb2.FeedbackRequest(
        events=[common_pb2.Event(event_id=f"{tag}-{uuid.uuid4()}", user_id="u1", item_id="i1", action="view", timestamp=ts(ANCHOR))]
    )


def _wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


async def _connected(call) -> None:
    """Wait until the call's headers are out (a call refused at once ends here too)."""
    try:
        await call.wait_for_connection()
    except grpc.aio.AioRpcError:
        pass


class HeldCalls:
    """Calls opened and held by an asyncio client on its own event loop thread.

    Each `connection()` is a channel with its own TCP connection (a local subchannel pool), as
    separate clients would have. Holding hundreds of calls costs the test no thread.
    """

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None):
        self.target = target
        self.credentials = credentials
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="held-calls", daemon=True)
        self._thread.start()
        self._never = self.run(self._event())
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list = []

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    def run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def connection(self) -> grpc.aio.Channel:
        async def make():
            options = [("grpc.use_local_subchannel_pool", 1)]
            if self.credentials is None:
                return grpc.aio.insecure_channel(self.target, options=options)
            return grpc.aio.secure_channel(self.target, self.credentials, options=options)

        channel = self.run(make())
        self.channels.append(channel)
        return channel

    async def _requests(self, *first):
        """Sends `first`, then nothing more: the call stays open, waiting for its client."""
        for message in first:
            yield message
        await self._never.wait()

    def watch(self, channel, count: int) -> list:
        """`count` Health/Watch calls, each past its first answer (so open on the server)."""

        async def open_all():
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(count)]
            for call in calls:
                await call.read()
            return calls

        calls = self.run(open_all())
        self.calls += calls
        return calls

    def without_body(self, channel, count: int, method: str = RECOMMEND, token: str | None = None) -> list:
        """`count` calls that send their headers and never their request message."""

        async def open_all():
            multi = channel.stream_unary(method)
            calls = [multi(self._requests(), metadata=_auth(token)) for _ in range(count)]
            for call in calls:
                await _connected(call)
            return calls

        calls = self.run(open_all())
        self.calls += calls
        return calls

    def idle_feedback_streams(self, channel, count: int, token: str | None = None) -> list:
        """`count` FeedbackStreams that send one batch, then idle."""

        async def open_all():
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            calls = [stub.FeedbackStream(self._requests(_feedback("idle")), metadata=_auth(token)) for _ in range(count)]
            for call in calls:
                await _connected(call)
            return calls

        calls = self.run(open_all())
        self.calls += calls
        return calls

    def outcome(self, call, timeout: float = 30.0) -> tuple[grpc.StatusCode, str, dict]:
        """(code, details, trailing metadata) once the call ends."""

        async def wait():
            code = await asyncio.wait_for(call.code(), timeout)
            return code, await call.details(), dict(await call.trailing_metadata() or ())

        return self.run(wait(), timeout + 5)

    def open_calls(self) -> int:
        return sum(1 for call in self.calls if not call.done())

    def close(self) -> None:
        async def close_all():
            for call in self.calls:
                call.cancel()
            for channel in self.channels:
                await channel.close()

        try:
            self.run(close_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def held():
    holders: list[HeldCalls] = []

    def make(target: str, credentials: grpc.ChannelCredentials | None = None) -> HeldCalls:
        holder = HeldCalls(target, credentials)
        holders.append(holder)
        return holder

    yield make
    for holder in holders:
        holder.close()


def _latencies(channel: grpc.Channel, seconds: float, token: str | None = None) -> dict[str, list[float]]:
    """Health/Check and Recommend called in turn for `seconds`; each call's latency."""
    health = health_pb2_grpc.HealthStub(channel)
    recommender = recommender_pb2_grpc.RecommenderServiceStub(channel)
    out: dict[str, list[float]] = {"Check": [], "Recommend": []}
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        out["Check"].append(time.perf_counter() - started)
        started = time.perf_counter()
        assert recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5), metadata=_auth(token), timeout=10).items
        out["Recommend"].append(time.perf_counter() - started)
    return out


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HELD = 200 + 200 + 64 + 20


def _hold_the_f1_load(running, held_calls: HeldCalls, read_token: str | None, write_token: str | None) -> None:
    """200 idle Watch calls (no token), 200 calls without a body, 64 idle FeedbackStreams and
    20 idle reflection streams, over connections that each stay within --max-streams-per-connection."""
    for _ in range(4):
        held_calls.watch(held_calls.connection(), 50)
    for _ in range(4):
        held_calls.without_body(held_calls.connection(), 50, token=read_token)
    for _ in range(2):
        held_calls.idle_feedback_streams(held_calls.connection(), 32, token=write_token)
    held_calls.without_body(held_calls.connection(), 20, method=REFLECTION, token=read_token)
    admission = running.admission
    _wait_until(
        lambda: admission.open_by_kind[CallKind.HEALTH_WATCH] == 200
        and admission.open_by_kind[CallKind.SERVICE] == 264
        and admission.open_by_kind[CallKind.REFLECTION] == 20
    )


def _assert_responsive(latencies: dict[str, list[float]]) -> None:
    for name, values in latencies.items():
        assert len(values) >= 20, (name, len(values))
        p99 = float(np.percentile(values, 99))
        assert p99 < 1.0, f"{name} p99 {p99 * 1000:.0f} ms over {len(values)} calls"


def test_f1_held_calls_do_not_starve_health_or_recommend(start_server, tiny_repo, tmp_path, held):
    db = tmp_path / "dos.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db)
    held_calls = held(server.target)
    _hold_the_f1_load(server.running, held_calls, None, None)
    latencies = _latencies(server.channel, 5.0)
    # Every held call is still open: the server answered the others beside them.
    assert held_calls.open_calls() == HELD
    _assert_responsive(latencies)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("dos-pki")
    ca = make_ca(folder, "ca")
    return {"ca": ca, "server": make_cert(folder, "server", ca, server=True)}


def test_f1_on_the_tls_and_token_server(start_server, tiny_repo, tmp_path, held, pki):
    db = tmp_path / "dos-tls.db"
    seed_store(db)
    cert, key = pki["server"]
    server = start_server(
        tiny_repo, db=db, tls_cert=cert, tls_key=key, inline_tokens=f"read {READ_TOKEN}; write {WRITE_TOKEN}"
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"][0].read_bytes())
    held_calls = held(server.target, credentials)
    # Watch needs no token; a call without a body or a reflection stream holds a read token, a
    # FeedbackStream a write token.
    _hold_the_f1_load(server.running, held_calls, READ_TOKEN, WRITE_TOKEN)
    # Without a token, a call is refused at its headers: it cannot be held open at all.
    anonymous = held_calls.without_body(held_calls.connection(), 20)
    for call in anonymous:
        code, details, _ = held_calls.outcome(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.secure_channel(server.target, credentials) as channel:
        latencies = _latencies(channel, 5.0, READ_TOKEN)
    assert held_calls.open_calls() == HELD
    _assert_responsive(latencies)


# ---------------------------------------------------------------- each bound


def _refused(error: grpc.RpcError, flag: str) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    assert flag in error.details(), error.details()
    assert _pushback(error) is not None and int(_pushback(error)) > 0


def _recommend(channel, token: str | None = None):
    stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
    return stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), metadata=_auth(token), timeout=10)


def test_streams_per_connection_are_bounded(start_server, tiny_repo, tmp_path, held):
    db = tmp_path / "per-connection.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db, limits=Limits(max_streams_per_connection=4))
    held_calls = held(server.target)
    crowded = held_calls.connection()
    held_calls.without_body(crowded, 4)
    _wait_until(lambda: server.running.admission.open_by_kind[CallKind.SERVICE] == 4)

    async def one_more():
        stub = recommender_pb2_grpc.RecommenderServiceStub(crowded)
        try:
            await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
        raise AssertionError("the call over the bound was admitted")

    error = held_calls.run(one_more())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-streams-per-connection=4" in error.details()
    assert int(dict(error.trailing_metadata())[RETRY_PUSHBACK_KEY]) > 0
    # The crowded connection still passes its health checks; other connections are not affected.
    async def health_check():
        return await health_pb2_grpc.HealthStub(crowded).Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert held_calls.run(health_check()).status == health_pb2.HealthCheckResponse.SERVING
    assert _recommend(server.channel).items
    assert held_calls.open_calls() == 4
    # Health calls are bounded per connection by HTTP/2 instead, at twice the bound (8 streams
    # here): the ones past it wait in the client, and the server never sees them.
    async def watches():
        stub = health_pb2_grpc.HealthStub(crowded)
        return [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(6)]

    held_calls.calls += held_calls.run(watches())
    admission = server.running.admission
    _wait_until(lambda: admission.open_by_kind[CallKind.HEALTH_WATCH] == 4)
    time.sleep(0.5)
    assert admission.open_by_kind[CallKind.HEALTH_WATCH] == 4


def test_open_calls_are_bounded_in_total_per_kind(start_server, tiny_repo, tmp_path, held):
    db = tmp_path / "total.db"
    seed_store(db)
    limits = Limits(max_streams=3, max_health_watches=2, max_reflection_streams=1)
    server = start_server(tiny_repo, db=db, limits=limits)
    held_calls = held(server.target)
    for _ in range(3):
        held_calls.without_body(held_calls.connection(), 1)
    held_calls.watch(held_calls.connection(), 2)
    held_calls.without_body(held_calls.connection(), 1, method=REFLECTION)
    admission = server.running.admission
    _wait_until(lambda: admission.open_by_kind[CallKind.REFLECTION] == 1)

    with pytest.raises(grpc.RpcError) as info:
        _recommend(server.channel)
    _refused(info.value, "--max-streams=3")
    with pytest.raises(grpc.RpcError) as info:
        next(health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
    _refused(info.value, "--max-health-watches=2")
    with pytest.raises(grpc.RpcError) as info:
        reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
        list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    _refused(info.value, "--max-reflection-streams=1")
    # Each kind has its own total: health checks are never counted, so a full server still answers them.
    status = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert held_calls.open_calls() == 6


def test_idle_request_streams_are_closed_and_watches_are_not(start_server, tiny_repo, tmp_path, held):
    db = tmp_path / "idle.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db, stream_idle_timeout_s=0.5)
    held_calls = held(server.target)
    channel = held_calls.connection()
    without_body = held_calls.without_body(channel, 1)[0]
    idle_stream = held_calls.idle_feedback_streams(channel, 1)[0]
    watch = held_calls.watch(channel, 1)[0]
    stored_before = server.engine.store.count_events()
    started = time.monotonic()
    for call in (without_body, idle_stream):
        code, details, trailers = held_calls.outcome(call)
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "--stream-idle-timeout=0.5" in details
        assert int(trailers[RETRY_PUSHBACK_KEY]) > 0
    assert time.monotonic() - started < 5.0
    # The stream's one batch had been stored before it went idle.
    assert server.engine.store.count_events() >= stored_before
    # A Watch waits on the server, not on its client: the idle timeout does not end it.
    time.sleep(1.0)
    assert not watch.done()
    admission = server.running.admission
    _wait_until(lambda: admission.open_by_kind[CallKind.SERVICE] == 0)
    assert admission.open_by_kind[CallKind.HEALTH_WATCH] == 1
    # A stream whose client keeps sending lives as long as it needs to.
    stub = recommender_pb2_grpc.RecommenderServiceStub(server.channel)

    def steady():
        for i in range(8):
            yield _feedback(f"steady-{i}")
            time.sleep(0.2)

    assert stub.FeedbackStream(steady(), timeout=30).stored == 8


def test_concurrency_bound_counts_work_not_open_calls(start_server, tiny_repo, tmp_path, held):
    db = tmp_path / "concurrency.db"
    seed_store(db)
    # Large Encode calls keep the server busy for seconds, long enough to be seen at work.
    server = start_server(tiny_repo, db=db, limits=Limits(max_concurrent_rpcs=2, max_texts_per_encode=BUSY_TEXTS))
    held_calls = held(server.target)
    channel = held_calls.connection()
    admission = server.running.admission
    # Calls waiting for their client (no body yet, or an idle stream) are open but not work.
    held_calls.without_body(channel, 5)
    for opened in range(1, 6):  # one at a time: five first messages at once would be five calls at work
        held_calls.idle_feedback_streams(channel, 1)
        _wait_until(lambda: admission.open_by_kind[CallKind.SERVICE] == 5 + opened and admission.working == 0)
    assert _recommend(server.channel).items

    async def busy():
        stub = encoder_pb2_grpc_stub(channel)
        return [stub.Encode(encoder_pb2.EncodeRequest(texts=_busy_texts()), timeout=120) for _ in range(2)]

    calls = held_calls.run(busy())
    held_calls.calls += calls
    _wait_until(lambda: admission.working == 2)
    # Waiting for the encoder's micro-batcher holds no thread of the pools.
    assert server.running.executors.compute.pending == 0
    with pytest.raises(grpc.RpcError) as info:
        _recommend(server.channel)
    _refused(info.value, "--max-concurrent-rpcs=2")
    # Health is never counted as work, so a busy server still answers it.
    status = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    for call in calls:
        assert held_calls.outcome(call, 120)[0] == grpc.StatusCode.OK
    assert _recommend(server.channel).items


BUSY_TEXTS = 2048


def _busy_texts() -> list[str]:
    """Texts at tiny-BERT's full length: seconds of encoding in one call."""
    return [f"word{i} " * 200 for i in range(BUSY_TEXTS)]


def encoder_pb2_grpc_stub(channel):
    from chronorec.v1 import encoder_pb2_grpc

    return encoder_pb2_grpc.EncoderServiceStub(channel)


def test_work_pool_bound_names_its_flag(start_server, tiny_repo, tmp_path):
    db = tmp_path / "pool.db"
    seed_store(db)
    server = start_server(tiny_repo, db=db, workers=1, limits=Limits(max_queued_work=1))
    # An upsert encodes its items on a compute thread: with one thread and room for one item of
    # work, the pool is full while it runs.
    items = [common_pb2.Item(item_id=f"busy-{i}", title=f"busy item {i}", text=text) for i, text in enumerate(_busy_texts())]
    upsert = server.catalog.UpsertItems.future(catalog_pb2.UpsertItemsRequest(items=items), timeout=120)
    _wait_until(lambda: server.running.executors.compute.pending == 1)
    with pytest.raises(grpc.RpcError) as info:
        _recommend(server.channel)
    _refused(info.value, "--max-queued-work=1")
    assert upsert.result().upserted == BUSY_TEXTS


def test_encoder_queue_bound_names_its_flag(start_server, tiny_repo, tmp_path):
    server = start_server(
        tiny_repo, db=tmp_path / "queue.db", encoder_max_batch=8, encoder_max_queue=8, limits=Limits(max_texts_per_encode=8)
    )
    # An upsert larger than the queue is fed in as the worker makes room: the queue stays full.
    items = [common_pb2.Item(item_id=f"busy-{i}", title=f"busy item {i}", text=text) for i, text in enumerate(_busy_texts())]
    upsert = server.catalog.UpsertItems.future(catalog_pb2.UpsertItemsRequest(items=items), timeout=120)
    _wait_until(lambda: server.engine.status().encoder_queue_depth > 0)
    # Between two batches the worker has taken one and the upsert not yet fed the next: a call
    # landing there fits. While the upsert runs, a call finds the queue full within a few tries.
    refused = None
    while refused is None and not upsert.done():
        try:
            server.encoder.Encode(encoder_pb2.EncodeRequest(texts=["a", "b", "c"]), timeout=30)
        except grpc.RpcError as error:
            refused = error
    assert refused is not None, "every Encode call fitted in the queue while the upsert ran"
    _refused(refused, "--encoder-max-queue")
    assert upsert.result().upserted == BUSY_TEXTS


def test_an_encode_request_must_fit_in_the_encoder_queue():
    from chronorec.server.config import ServerConfig

    with pytest.raises(ValueError, match="--max-texts-per-encode=256 exceeds --encoder-max-queue=100"):
        ServerConfig(encoder_max_queue=100)


def test_bounds_and_timeouts_are_flags_with_environment_fallbacks(monkeypatch):
    from chronorec.server.app import channel_options
    from chronorec.server.config import config_from_args

    monkeypatch.setenv("CHRONOREC_STREAM_IDLE_TIMEOUT", "7.5")
    monkeypatch.setenv("CHRONOREC_MAX_STREAMS", "70")
    config = config_from_args([
        "--max-streams-per-connection", "9", "--keepalive-time", "30", "--keepalive-timeout", "5",
        "--max-connection-idle", "120", "--max-connection-age", "600", "--max-connection-age-grace", "15",
        "--max-health-watches", "11", "--max-reflection-streams", "3", "--max-queued-work", "40", "--store-workers", "2",
    ])
    assert config.stream_idle_timeout_s == 7.5 and config.limits.max_streams == 70
    assert config.limits.flag("max_streams_per_connection") == "--max-streams-per-connection=9"
    assert (config.limits.max_health_watches, config.limits.max_reflection_streams, config.limits.max_queued_work) == (11, 3, 40)
    assert config.store_workers == 2
    options = dict(channel_options(config))
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.max_connection_idle_ms"] == 120_000
    assert options["grpc.max_connection_age_ms"] == 600_000 and options["grpc.max_connection_age_grace_ms"] == 15_000
    assert options["grpc.max_concurrent_streams"] == 18
    # 0 turns connection idle and age limits off; the idle timeout must be positive.
    assert "grpc.max_connection_age_ms" not in dict(channel_options(config_from_args(["--max-connection-age", "0"])))
    with pytest.raises(ValueError, match="--stream-idle-timeout"):
        config_from_args(["--stream-idle-timeout", "0"])
