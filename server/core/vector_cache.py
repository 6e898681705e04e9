"""On-disk cache of item vectors keyed by (encoder content, item-text hash), so restarts and swaps skip re-encoding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

KEY_BYTES = 16
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".npy"
# Past this many segment files a store rewrites them as one, keeping only the rows asked for
# since the cache was opened (the live catalog), so churn cannot grow the folder without bound.
MAX_SEGMENTS = 8
GRAPH_PREFIX = "hnsw-"
KEYS_FILE = "encoder-keys.json"


def text_key(text: str) -> bytes:
    """The cache key of one text: a 128-bit BLAKE2b digest (collisions are negligible)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=KEY_BYTES).digest()


def encoder_key(root: str | os.PathLike, version_dir: str | os.PathLike, model_file: str, settings: object) -> str:
    """A digest of what decides a version's vectors: its graph file, its tokenizer and `settings`
    (max length, pooling...). Versions with byte-identical encoders (say, one republished with
    only its time model retuned) share one cache; any retrained weights get their own.

    Published files never change, so digests are remembered per (file, size, mtime) in
    `<root>/encoder-keys.json` and a large graph is hashed once, not on every start.
    """
    root, version_dir = Path(root), Path(version_dir)
    files = [version_dir / model_file, version_dir / "tokenizer.json"]
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
    memo_key = f"{version_dir.name}/{model_file}"
    memo_path = root / KEYS_FILE
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(memo_key) if isinstance(memo, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("settings") == repr(settings):
        return str(entry["key"])
    digest = hashlib.blake2b(repr(settings).encode("utf-8"), digest_size=16)
    for path in files:
        if path.exists():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    key = digest.hexdigest()
    memo = memo if isinstance(memo, dict) else {}
    memo[memo_key] = {"stamp": stamp, "settings": repr(settings), "key": key}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{secrets.token_hex(4)}-{KEYS_FILE}"
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
        os.replace(tmp, memo_path)
    except OSError as exc:
        log.warning("could not remember encoder digests in %s: %s", memo_path, exc)
    return key


def graph_fingerprint(ids: Sequence[str], keys: Sequence[bytes], *params: object) -> str:
    """Names one catalog (its ids and item-text keys, in any order) indexed with `params`."""
    digest = hashlib.blake2b(repr(params).encode(), digest_size=16)
    for item_id, key in sorted(zip(ids, keys)):
        digest.update(item_id.encode("utf-8") + b"\0" + key)
    return digest.hexdigest()


def _record_dtype(dimension: int) -> np.dtype:
    return np.dtype([("key", f"V{KEY_BYTES}"), ("vector", "<f4", (dimension,))])


def _split_keys(keys: np.ndarray) -> list[bytes]:
    raw = keys.tobytes()
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


class VectorCache:
    """The vectors one encoder gave for item texts, in append-only segment files.

    Layout: `<root>/<encoder key>/seg-<random>.npy`, each a structured array of
    (text key, vector) written to a temporary name and renamed into place, so a reader
    (another server process too) never sees a half-written segment. The encoder key names
    the exact encoder files, so entries never go stale; a segment that fails to load is
    deleted and its texts are simply encoded again. Every failure here is logged and
    ignored: the cache may only save time, never fail a start or a swap.
    """

    def __init__(self, root: str | os.PathLike, key: str, dimension: int):
        self.root = Path(root)
        self.key = key
        self.folder = self.root / key
        self.dimension = int(dimension)
        self._dtype = _record_dtype(self.dimension)
        self._vectors = np.zeros((0, self.dimension), dtype=np.float32)
        self._row_of: dict[bytes, int] = {}
        self._used: set[int] = set()
        self._segments: list[Path] = []
        self._load()

    def __len__(self) -> int:
        return len(self._row_of)

    def _load(self) -> None:
        try:
            paths = sorted(self.folder.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))
        except OSError:
            return
        parts: list[np.ndarray] = []
        for path in paths:
            try:
                records = np.load(path, allow_pickle=False)
                if records.dtype != self._dtype or records.ndim != 1:
                    raise ValueError(f"dtype {records.dtype}, shape {records.shape}")
                if not np.all(np.isfinite(records["vector"])):
                    raise ValueError("non-finite vectors")
            except FileNotFoundError:
                continue  # compacted away by another process between listing and reading
            except Exception as exc:
                log.warning("vector cache segment %s is unreadable (%s); deleting it", path, exc)
                path.unlink(missing_ok=True)
                continue
            parts.append(records)
            self._segments.append(path)
        if not parts:
            return
        records = np.concatenate(parts)
        self._vectors = np.ascontiguousarray(records["vector"], dtype=np.float32)
        # Later segments win on a repeated key (they can only hold the same vector anyway).
        self._row_of = {key: row for row, key in enumerate(_split_keys(records["key"]))}

    def get(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found): one row per key, zeros where `found` is False."""
        rows = np.fromiter((self._row_of.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        found = rows >= 0
        self._used.update(rows[found].tolist())
        out = np.zeros((len(keys), self.dimension), dtype=np.float32)
        out[found] = self._vectors[rows[found]]
        return out, found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store new entries as one segment (best effort), then compact if segments piled up."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if not len(keys) or vectors.shape != (len(keys), self.dimension):
            return
        records = np.empty(len(keys), dtype=self._dtype)
        records["key"] = np.frombuffer(b"".join(keys), dtype=f"V{KEY_BYTES}")
        records["vector"] = vectors
        path = self._write(records)
        if path is None:
            return
        start = len(self._vectors)
        self._vectors = np.concatenate([self._vectors, vectors])
        for offset, key in enumerate(keys):
            self._row_of[key] = start + offset
            self._used.add(start + offset)
        self._segments.append(path)
        if len(self._segments) > MAX_SEGMENTS:
            self._compact()

    def _write(self, records: np.ndarray) -> Path | None:
        name = f"{SEGMENT_PREFIX}{secrets.token_hex(8)}{SEGMENT_SUFFIX}"
        tmp = self.folder / f".tmp-{name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, records, allow_pickle=False)
            os.replace(tmp, self.folder / name)
            return self.folder / name
        except OSError as exc:
            log.warning("vector cache %s is not writable (%s); continuing without saving", self.folder, exc)
            tmp.unlink(missing_ok=True)
            return None

    def _compact(self) -> None:
        rows = np.array(sorted(self._used), dtype=np.int64)
        key_of_row = {row: key for key, row in self._row_of.items()}
        keys = [key_of_row[int(r)] for r in rows]
        records = np.empty(len(rows), dtype=self._dtype)
        records["key"] = np.frombuffer(b"".join(keys), dtype=f"V{KEY_BYTES}") if keys else records["key"]
        records["vector"] = self._vectors[rows]
        path = self._write(records)
        if path is None:
            return
        for old in self._segments:
            old.unlink(missing_ok=True)
        self._segments = [path]
        self._vectors = np.ascontiguousarray(records["vector"])
        self._row_of = {key: row for row, key in enumerate(keys)}
        self._used = set(range(len(keys)))
        log.info("vector cache %s compacted to %d entries", self.folder, len(keys))


    # HNSW graphs ------------------------------------------------------------------------
    # A saved graph spares a restart the graph build too (about a minute at 100k items on
    # two cores); it is only reused for exactly the catalog it was built from.

    def _graph_paths(self, fingerprint: str) -> tuple[Path, Path]:
        stem = self.folder / f"{GRAPH_PREFIX}{fingerprint}"
        return stem.with_suffix(".bin"), stem.with_suffix(".ids.json")

    def saved_graph(self, fingerprint: str) -> tuple[Path, list[str]] | None:
        """(graph file, ids in label order) saved for this catalog, or None."""
        graph, ids_path = self._graph_paths(fingerprint)
        try:
            if not graph.is_file():
                return None
            ids = json.loads(ids_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("saved graph %s is unreadable (%s); rebuilding", graph, exc)
            return None
        return graph, [str(i) for i in ids]

    def save_graph(self, fingerprint: str, write: Callable[[Path], list[str]]) -> None:
        """Save a graph via `write(path) -> ids in label order`; older graphs of this folder go."""
        graph, ids_path = self._graph_paths(fingerprint)
        token = secrets.token_hex(4)
        tmp_graph = self.folder / f".tmp-{token}-{graph.name}"
        tmp_ids = self.folder / f".tmp-{token}-{ids_path.name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            ids = write(tmp_graph)
            tmp_ids.write_text(json.dumps(ids), encoding="utf-8")
            # The ids land first: a graph file present means its ids are too.
            os.replace(tmp_ids, ids_path)
            os.replace(tmp_graph, graph)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("could not save the HNSW graph in %s: %s", self.folder, exc)
            for path in (tmp_graph, tmp_ids):
                path.unlink(missing_ok=True)
            return
        for old in self.folder.glob(f"{GRAPH_PREFIX}*"):
            if old not in (graph, ids_path):
                old.unlink(missing_ok=True)

    def drop_graph(self, fingerprint: str) -> None:
        for path in self._graph_paths(fingerprint):
            path.unlink(missing_ok=True)


def prune(root: str | os.PathLike, keep_keys: Iterable[str]) -> int:
    """Delete the cache folders of encoders not in `keep_keys` (no published version uses them)."""
    root = Path(root)
    keep = set(keep_keys)
    removed = 0
    try:
        children = list(root.iterdir())
    except OSError:
        return 0
    for child in children:
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
    return removed


__all__ = ["VectorCache", "encoder_key", "graph_fingerprint", "prune", "text_key"]
