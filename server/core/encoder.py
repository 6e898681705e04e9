"""ONNX Runtime sentence encoder for a model version, and a micro-batcher that coalesces concurrent encode calls."""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.metadata
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from chronorec.server.core import errors
from chronorec.server.core.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M
from chronorec.server.core.manifest import TOKENIZER_FILE, load_manifest, load_tokenizer
from chronorec.server.core.repository import ModelRepository, ServingSettings

log = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# Distributions that all install into the one `onnxruntime` import folder.
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")

_SMOKE_TEXTS = [
    "smoke check",
    "2 days ago, rated 5: Toy Story (1995) | Animation, Children's, Comedy ; just now, viewed: Heat (1995) | Action",
]
_NORM_TOLERANCE = 1e-3
# Batches smaller than this are tokenized on the calling thread.
SMALL_BATCH = 8
# A text longer than this many characters per token of max_length is tokenized from a prefix
# first. Tokenizing costs per character, and a history text may be cut only at the exact bound
# of ~100 characters a token (short_term_cache.encoder_char_budget): 6,464 characters at 64
# tokens, ~2 ms to tokenize, where ~300 characters hold the 64 tokens the encoder reads.
PREFIX_CHARS_PER_TOKEN = 8
# Pre-tokenizers that split at whitespace and never join across it: a prefix cut at a space
# tokenizes exactly as the same words of the whole text do.
_WHITESPACE_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def check_onnxruntime_install() -> str:
    """Name of the installed onnxruntime distribution; RuntimeError when two of them clash."""
    installed = []
    for name in _ORT_DISTRIBUTIONS:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(installed) > 1:
        raise RuntimeError(
            f"{' and '.join(installed)} are installed together; they overwrite one shared 'onnxruntime' "
            "folder and break each other. Uninstall all of them, then install exactly one: "
            f"pip uninstall -y {' '.join(_ORT_DISTRIBUTIONS[:2])} && pip install 'chronorec[cpu]' (or 'chronorec[gpu]')"
        )
    if not installed:
        raise RuntimeError("onnxruntime is not installed: pip install 'chronorec[cpu]' (or 'chronorec[gpu]')")
    return installed[0].split(" ")[0]


def validate_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list; InvalidArgument naming the first text that is not a non-blank string."""
    if isinstance(texts, str):
        raise errors.InvalidArgument("texts must be a list of strings, not one string")
    out = list(texts)
    for index, text in enumerate(out):
        if not isinstance(text, str):
            raise errors.InvalidArgument(f"text {index} is not a string")
        if not text.strip():
            raise errors.InvalidArgument(f"text {index} is empty")
    return out


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ([CUDA_PROVIDER] if CUDA_PROVIDER in available else []) + [CPU_PROVIDER]


class OnnxEncoder:
    """Encodes texts with one model version's ONNX graph; vectors are L2-normalised by the graph."""

    def __init__(
        self,
        version_dir: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        prefer_int8: bool = False,
        max_batch_size: int = 64,
    ):
        check_onnxruntime_install()
        import onnxruntime as ort

        self.version_dir = Path(version_dir)
        try:
            self.manifest = load_manifest(self.version_dir)
            self._tokenizer = load_tokenizer(self.version_dir / TOKENIZER_FILE, self.manifest.max_length)
        except Exception as exc:
            raise errors.Unavailable(f"model version {self.version_dir.name} cannot be loaded: {exc}") from exc
        self.version = self.manifest.version or self.version_dir.name
        self.dimension = int(self.manifest.dimension)
        self.max_length = int(self.manifest.max_length)
        self.max_batch_size = max(1, int(max_batch_size))

        # Padding is done per length-sorted sub-batch below, so the tokenizer only truncates.
        padding = self._tokenizer.padding or {}
        self._pad_id = int(padding.get("pad_id", 0))
        self._pad_type_id = int(padding.get("pad_type_id", 0))
        self._tokenizer.no_padding()
        splits = type(self._tokenizer.pre_tokenizer).__name__ in _WHITESPACE_PRE_TOKENIZERS
        self._prefix_chars = PREFIX_CHARS_PER_TOKEN * self.max_length if splits else None

        requested = list(providers) if providers else default_providers()
        model_file = self.manifest.onnx_file
        if prefer_int8 and self.manifest.int8_file:
            if requested[0] == CUDA_PROVIDER:
                # Dynamic int8 MatMulInteger has no CUDA kernels; it would run on the CPU anyway.
                log.warning("model %s: int8 graph ignored because CUDA is requested; using fp32", self.version)
            elif (self.version_dir / self.manifest.int8_file).is_file():
                model_file = self.manifest.int8_file
        self.model_file = model_file
        graph_path = self.version_dir / model_file
        if not graph_path.resolve().is_relative_to(self.version_dir.resolve()):
            # A link out of the folder: the server reads no file outside the version it loads.
            raise errors.Unavailable(f"model version {self.version}: {model_file} points outside the version folder")

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        # Idle intra-op threads otherwise spin for CPU that the gRPC threads, the ranking and
        # other processes need: on 2 busy cores spinning made encoding ~2x slower (tests/bench).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(graph_path), sess_options=options, providers=requested)
        except Exception as exc:
            raise errors.Unavailable(f"model version {self.version} cannot be loaded: {exc}") from exc
        # What really runs: onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing.
        self.providers = list(self._session.get_providers())
        self._input_names = {i.name for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        self._output_name = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        log.info(
            "encoder %s loaded from %s: providers %s (requested %s), dimension %d, max_length %d",
            self.version, model_file, self.providers, requested, self.dimension, self.max_length,
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 (n, dimension) vectors in input order; texts over max_length are truncated."""
        texts = validate_texts(texts)
        result = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return result
        encodings = self._tokenize(texts)
        # Sorting by token length keeps similar lengths together, so sub-batches carry little padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            vectors = self._session.run([self._output_name], self._model_inputs([encodings[i] for i in rows]))[0]
            if vectors.shape[1] != self.dimension:
                raise errors.Unavailable(
                    f"model {self.version} returns dimension {vectors.shape[1]}, manifest says {self.dimension}"
                )
            result[rows] = vectors
        return result

    def _tokenize(self, texts: list[str]) -> list:
        """Each text's encoding, truncated to max_length exactly as the whole text's would be.

        A long text is first tokenized up to a space near PREFIX_CHARS_PER_TOKEN * max_length
        characters: when that prefix alone overflows max_length, every token kept comes from its
        complete words, so it is the whole text's encoding; otherwise the whole text is tokenized.
        """
        limit = self._prefix_chars
        cut = list(texts)
        if limit is not None:
            for i, text in enumerate(texts):
                space = text.rfind(" ", 0, limit) if len(text) > limit else -1
                if space > 0:
                    cut[i] = text[:space]
        encodings = self._tokenize_all(cut)
        again = [i for i, (text, part, encoding) in enumerate(zip(texts, cut, encodings))
                 if part is not text and not encoding.overflowing]
        if again:
            for i, encoding in zip(again, self._tokenize_all([texts[i] for i in again])):
                encodings[i] = encoding
        return encodings

    def _tokenize_all(self, texts: list[str]) -> list:
        # encode_batch hands the texts to the tokenizer's thread pool; for the few texts of a
        # serving batch (a cold user's one history text) waiting on that pool costs more than
        # tokenizing them here.
        if len(texts) < SMALL_BATCH:
            return [self._tokenizer.encode(text) for text in texts]
        return self._tokenizer.encode_batch(texts)

    def _model_inputs(self, encodings) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        types = np.full((len(encodings), width), self._pad_type_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            types[row, :n] = encoding.type_ids
            mask[row, :n] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: value for name, value in inputs.items() if name in self._input_names}

    def smoke_check(self) -> dict[str, float]:
        """Run the graph at the shapes serving will use; errors.Unavailable when any fails.

        Fixed texts, then one text of exactly the manifest's max_length tokens (a graph whose
        position embeddings stop short of it fails here, not on the first long Recommend), then
        a batch of max_batch_size texts. Each run must give the manifest's dimension, finite
        values and unit norms (a provider that does not raise on an out-of-range index must
        still not pass garbage).
        """
        started = time.perf_counter()
        longest = " ".join(["smoke"] * self.max_length)  # one token a word at least: truncated to max_length
        runs = [
            (_SMOKE_TEXTS, "fixed texts"),
            ([longest], f"its max_length {self.max_length} (batch of 1)"),
            ([_SMOKE_TEXTS[0]] * self.max_batch_size, f"a batch of {self.max_batch_size}"),
        ]
        for texts, shape in runs:
            self._check_values(self._checked_run(texts, shape), shape)
        return {"seconds": time.perf_counter() - started, "dimension": float(self.dimension)}

    def _checked_run(self, texts: list[str], shape: str) -> np.ndarray:
        try:
            return self.encode(texts)
        except errors.Unavailable:
            raise
        except Exception as exc:  # onnxruntime raises its own types (a Gather out of range, ...)
            raise errors.Unavailable(f"model {self.version} fails its load check at {shape}: {exc}") from exc

    def _check_values(self, vectors: np.ndarray, shape: str) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise errors.Unavailable(
                f"model {self.version} returns shape {vectors.shape} at {shape}, manifest says dimension {self.dimension}"
            )
        if not np.all(np.isfinite(vectors)):
            raise errors.Unavailable(f"model {self.version} returns NaN or infinite values at {shape}")
        norms = np.linalg.norm(vectors, axis=1)
        if np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
            shown = sorted(set(np.round(norms, 4).tolist()))[:4]
            raise errors.Unavailable(f"model {self.version} returns vectors with norms {shown}, not 1, at {shape}")

    def close(self) -> None:
        """Drop the ONNX Runtime session so its memory is released once callers are done."""
        self._session = None  # type: ignore[assignment]


@dataclass
class EncoderSettings:
    """How the server runs a version: its session, its micro-batcher, the vector cache and the graph."""

    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 4096
    intra_op_threads: int | None = None
    # As the server's --int8 default: what a publisher prepares without recorded settings matches it.
    prefer_int8: bool = True
    providers: list[str] | None = None
    on_batch: Callable[[int], None] | None = None
    # Keep item vectors on disk so a restart (or a rollback) indexes without re-encoding.
    vector_cache: bool = True
    vector_cache_dir: Path | None = None  # default: <model repository>/vector-cache
    hnsw_m: int = HNSW_M
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION
    hnsw_ef_search: int = HNSW_EF_SEARCH

    def run_threads(self) -> int:
        """ONNX Runtime threads per serving run: 1 unless set. A cold Recommend encodes one short
        text; spread over 2 cores its small matrices cost ~25 % more CPU (13.5 against 17-18 ms,
        MiniLM int8 at 64 tokens) for ~1 ms less latency, so each core runs its own batch instead."""
        return int(self.intra_op_threads or 1)

    def batch_workers(self) -> int:
        """Micro-batcher workers on CPU: enough runs of `run_threads()` threads to use every core."""
        return max(1, (os.cpu_count() or 1) // self.run_threads())

    def serving_settings(self) -> ServingSettings:
        """What a publisher preparing a version for this server must match."""
        return ServingSettings(
            vector_cache=self.vector_cache,
            vector_cache_dir=str(Path(self.vector_cache_dir).resolve()) if self.vector_cache_dir else None,
            prefer_int8=self.prefer_int8,
            hnsw_m=self.hnsw_m,
            hnsw_ef_construction=self.hnsw_ef_construction,
            hnsw_ef_search=self.hnsw_ef_search,
        )

    @classmethod
    def from_serving_settings(cls, settings: ServingSettings | None, **overrides) -> "EncoderSettings":
        """The settings a server recorded (`ModelRepository.read_serving_settings`), or the defaults."""
        if settings is None:
            return cls(**overrides)
        values = dict(
            vector_cache=settings.vector_cache,
            vector_cache_dir=Path(settings.vector_cache_dir) if settings.vector_cache_dir else None,
            prefer_int8=settings.prefer_int8,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            hnsw_ef_search=settings.hnsw_ef_search,
        )
        values.update(overrides)
        return cls(**values)


def load_encoder(
    repository: ModelRepository, version: str, settings: EncoderSettings, *, intra_op_threads: int | None = None
) -> OnnxEncoder:
    """A version's encoder, loaded and checked at the shapes serving uses.

    errors.FailedPrecondition when the version's manifest breaks the schema (it can never
    serve), errors.Unavailable when it is missing or its graph fails to load or to run.
    Messages name the version, never a server path.
    """
    info = repository.describe(version)
    if info is None:
        raise errors.Unavailable(f"model version {version!r} is missing or incomplete")
    if not info.usable:
        raise errors.FailedPrecondition(f"model version {version!r} is unusable: {info.problem}")
    roots = [repository.root]
    try:
        encoder = OnnxEncoder(
            repository.version_dir(version),
            providers=settings.providers,
            intra_op_threads=intra_op_threads or settings.run_threads(),
            prefer_int8=settings.prefer_int8,
            max_batch_size=settings.max_batch,
        )
    except errors.ChronorecError as exc:
        raise type(exc)(errors.redact_paths(exc.message, roots)) from exc
    except Exception as exc:  # a corrupt file surfaces as many different exception types
        raise errors.Unavailable(errors.redact_paths(f"model version {version!r} failed to load: {exc}", roots)) from exc
    try:
        encoder.smoke_check()
    except errors.ChronorecError as exc:
        encoder.close()
        raise type(exc)(errors.redact_paths(exc.message, roots)) from exc
    return encoder


class EncodeDeadlineExceeded(errors.Unavailable):
    """The caller's deadline passed before its texts were encoded (maps to DEADLINE_EXCEEDED where told apart)."""


class _Request:
    """One caller's texts; its chunks fill `result` rows at their offsets."""

    __slots__ = ("size", "result", "error", "pending", "done", "future")

    def __init__(self, size: int, chunks: int, future: concurrent.futures.Future | None = None):
        self.size = size
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.pending = chunks
        self.done = threading.Event()
        self.future = future  # set for submit(): resolved when the request ends

    def finish(self) -> None:
        self.done.set()
        future = self.future
        # set_running_or_notify_cancel() is False for a future its caller cancelled meanwhile.
        if future is not None and not future.done() and future.set_running_or_notify_cancel():
            if self.error is not None:
                future.set_exception(self.error)
            else:
                future.set_result(self.result)


@dataclass
class _Chunk:
    request: _Request
    offset: int
    texts: list[str]


class MicroBatcher:
    """Coalesces concurrent callers' texts into batches for `workers` threads running `encode_fn`.

    A worker takes up to `max_batch_size` texts, waiting at most `max_wait_ms` for a batch to
    fill; with several workers, `encode_fn` must be thread-safe (ONNX Runtime's run is), and a
    batch arriving while one worker encodes goes to the next. Requests larger than a batch are split; each caller gets back exactly its own rows in
    order. At most `max_queue_texts` texts wait: a request whose first `max_queue_texts` texts do
    not fit gets errors.Overloaded, and the rest of a request larger than the whole queue (an
    UpsertItems of 5000 items under the default 4096) is fed in as the worker makes room.
    `on_batch(texts_in_batch)` is called after each batch (for a batch-size histogram).
    """

    def __init__(
        self,
        encode_fn: Callable[[list[str]], np.ndarray],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 2.0,
        max_queue_texts: int = 4096,
        on_batch: Callable[[int], None] | None = None,
        validate_fn: Callable[[Sequence[str]], list[str]] | None = validate_texts,
        name: str = "encoder-batcher",
        workers: int = 1,
    ):
        if max_batch_size < 1 or max_queue_texts < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue_texts and workers must be positive, max_wait_ms non-negative")
        self._encode_fn = encode_fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue_texts = int(max_queue_texts)
        self._on_batch = on_batch
        self._validate = validate_fn
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._closed = False
        # Workers deliver chunks of one request concurrently: its rows and pending count are shared.
        self._deliver_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._run, name=name if workers == 1 else f"{name}-{i}", daemon=True)
            for i in range(int(workers))
        ]
        for worker in self._workers:
            worker.start()

    @property
    def queue_depth(self) -> int:
        """Texts waiting for the worker (not counting the batch being encoded)."""
        return self._queued_texts

    @property
    def closed(self) -> bool:
        """True once close() was called; new work is refused."""
        return self._closed

    def encode(self, texts: Sequence[str], timeout: float | None = None) -> np.ndarray:
        """This caller's vectors in input order; blocks until they are done or `timeout` seconds pass."""
        texts = self._validate(texts) if self._validate is not None else list(texts)
        if not texts:
            return self._encode_fn([])
        deadline = None if timeout is None else time.monotonic() + timeout
        # A chunk must fit in the queue on its own, or a request larger than the queue could never be fed.
        size = min(self._chunk_size(len(texts)), self.max_queue_texts)
        request = _Request(len(texts), -(-len(texts) // size))
        chunks = [_Chunk(request, start, texts[start : start + size]) for start in range(0, len(texts), size)]
        with self._cond:
            if self._closed:
                raise errors.Unavailable("encoder is shutting down")
            if self._queued_texts + min(len(texts), self.max_queue_texts) > self.max_queue_texts:
                raise errors.Overloaded(
                    f"encoder queue is full ({self._queued_texts} texts waiting, at most {self.max_queue_texts} "
                    "set by --encoder-max-queue); retry later"
                )
            fed = self._feed(chunks, 0)
            while fed < len(chunks) and not request.done.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._closed or (remaining is not None and remaining <= 0):
                    break
                self._cond.wait(remaining)
                fed = self._feed(chunks, fed)
        if fed < len(chunks) and not request.done.is_set():
            # Shut down, or out of time, before all of it was queued: it can no longer complete.
            self._abandon(request, chunks[:fed])
            if self._closed:
                raise errors.Unavailable("encoder is shutting down")
            raise EncodeDeadlineExceeded(f"encoding {len(texts)} texts did not finish within {timeout:.3g} s")
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not request.done.wait(remaining):
            self._abandon(request, chunks)
            if not request.done.is_set():
                raise EncodeDeadlineExceeded(f"encoding {len(texts)} texts did not finish within {timeout:.3g} s")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future:
        """Queue `texts` without waiting: a Future of their vectors in input order.

        For callers that must not hold a thread while the worker gets to them (the asyncio
        server). All the texts are queued at once, so a request must fit in the queue:
        errors.Overloaded when it lacks room now, InvalidArgument when it could never fit
        (encode() feeds such a request in as the worker makes room, holding its thread).
        Cancelling the Future drops the texts the worker has not started.
        """
        texts = self._validate(texts) if self._validate is not None else list(texts)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not texts:
            future.set_result(self._encode_fn([]))
            return future
        if len(texts) > self.max_queue_texts:
            raise errors.InvalidArgument(
                f"{len(texts)} texts do not fit in the encoder queue (at most {self.max_queue_texts}, "
                "set by --encoder-max-queue)"
            )
        size = self._chunk_size(len(texts))
        request = _Request(len(texts), -(-len(texts) // size), future)
        chunks = [_Chunk(request, start, texts[start : start + size]) for start in range(0, len(texts), size)]
        with self._cond:
            if self._closed:
                raise errors.Unavailable("encoder is shutting down")
            if self._queued_texts + len(texts) > self.max_queue_texts:
                raise errors.Overloaded(
                    f"encoder queue is full ({self._queued_texts} texts waiting, at most {self.max_queue_texts} "
                    "set by --encoder-max-queue); retry later"
                )
            self._feed(chunks, 0)
        future.add_done_callback(lambda done: self._abandon(request, chunks) if done.cancelled() else None)
        return future

    def _chunk_size(self, n_texts: int) -> int:
        """Texts per chunk of an n-text request: a batch at most, and a share for each worker, so one
        request of 32 texts keeps two workers busy instead of one."""
        return max(1, min(self.max_batch_size, -(-n_texts // len(self._workers))))

    def _feed(self, chunks: list[_Chunk], fed: int) -> int:
        """Queue `chunks[fed:]` while they fit (the caller holds the lock); returns how many are queued now."""
        start = fed
        while fed < len(chunks) and self._queued_texts + len(chunks[fed].texts) <= self.max_queue_texts:
            self._queue.append(chunks[fed])
            self._queued_texts += len(chunks[fed].texts)
            fed += 1
        if fed > start:
            self._cond.notify_all()
        return fed

    def _abandon(self, request: _Request, chunks: list[_Chunk]) -> None:
        """Drop the caller's chunks that have not started; started ones finish and are discarded."""
        with self._cond:
            for chunk in chunks:
                try:
                    self._queue.remove(chunk)
                except ValueError:
                    continue  # already taken by the worker
                self._queued_texts -= len(chunk.texts)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting work, finish what is queued, and stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _next_batch(self) -> list[_Chunk] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            fill_deadline = time.monotonic() + self.max_wait
            while self._queued_texts < self.max_batch_size and not self._closed:
                remaining = fill_deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Chunk] = []
            size = 0
            # A worker takes its share of what waits (at least one chunk): the others take the rest.
            limit = min(self.max_batch_size, -(-self._queued_texts // len(self._workers)))
            while self._queue and (not batch or size + len(self._queue[0].texts) <= limit):
                chunk = self._queue.popleft()
                self._queued_texts -= len(chunk.texts)
                batch.append(chunk)
                size += len(chunk.texts)
            if batch:
                self._cond.notify_all()  # room in the queue: wake callers feeding a large request
            return batch

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._encode_batch(batch)
        except BaseException as exc:  # pragma: no cover - a worker death must not hang callers
            log.exception("encoder batcher worker stopped")
            self._fail_all(errors.Unavailable(f"encoder worker stopped: {exc}"))
            raise

    def _encode_batch(self, batch: list[_Chunk]) -> None:
        texts = [text for chunk in batch for text in chunk.texts]
        try:
            vectors = self._encode_fn(texts)
        except errors.InvalidArgument:
            # One caller's bad text must not fail the others: encode each chunk on its own.
            for chunk in batch:
                self._encode_alone(chunk)
        except Exception as exc:
            for chunk in batch:
                self._deliver_error(chunk.request, exc)
        else:
            row = 0
            for chunk in batch:
                self._deliver(chunk, vectors[row : row + len(chunk.texts)])
                row += len(chunk.texts)
        if self._on_batch is not None:
            try:
                self._on_batch(len(texts))
            except Exception:
                log.exception("on_batch callback failed")

    def _encode_alone(self, chunk: _Chunk) -> None:
        try:
            vectors = self._encode_fn(chunk.texts)
        except Exception as exc:
            self._deliver_error(chunk.request, exc)
        else:
            self._deliver(chunk, vectors)

    def _deliver(self, chunk: _Chunk, vectors: np.ndarray) -> None:
        request = chunk.request
        with self._deliver_lock:
            if request.error is not None:
                return
            if request.result is None:
                request.result = np.empty((request.size,) + vectors.shape[1:], dtype=vectors.dtype)
            request.result[chunk.offset : chunk.offset + len(chunk.texts)] = vectors
            request.pending -= 1
            done = request.pending == 0
        if done:
            request.finish()

    def _deliver_error(self, request: _Request, exc: BaseException) -> None:
        with self._deliver_lock:
            if request.error is None:
                request.error = exc
        request.finish()
        if request.pending > 1:
            # Its other chunks would be wasted work now.
            with self._cond:
                for chunk in [c for c in self._queue if c.request is request]:
                    self._queue.remove(chunk)
                    self._queued_texts -= len(chunk.texts)
                self._cond.notify_all()  # a caller still feeding this request stops

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._closed = True
            while self._queue:
                chunk = self._queue.popleft()
                self._queued_texts -= len(chunk.texts)
                if chunk.request.error is None:
                    chunk.request.error = exc
                chunk.request.finish()


__all__ = [
    "EncodeDeadlineExceeded",
    "EncoderSettings",
    "MicroBatcher",
    "OnnxEncoder",
    "check_onnxruntime_install",
    "default_providers",
    "load_encoder",
    "validate_texts",
]
