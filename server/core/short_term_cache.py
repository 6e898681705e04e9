"""The ranker's short-term vector cache: history-text vectors, bounded in bytes and keyed by a digest of the text."""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict

import numpy as np

# WordPiece (BERT, MiniLM: max_input_chars_per_word = 100) turns a longer word into one [UNK]
# token, so no token covers more than 100 characters, plus the separator before it.
MAX_CHARS_PER_TOKEN = 100
# ~9,700 MiniLM vectors (384 floats); the entry count bound it replaces allowed 10,000
# entries of any key length, i.e. gigabytes with long history texts.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# A 128-bit digest: collisions are out of reach (2^64 texts for an even chance), and a key
# costs the same 16 bytes whatever the text's length.
KEY_BYTES = 16
# An OrderedDict's own memory per entry beyond its key and value (measured ~75 bytes, CPython 3.11).
_SLOT_BYTES = 80


def encoder_char_budget(max_length: int) -> int:
    """Characters of a text that can reach an encoder reading `max_length` tokens of it.

    Each of the max_length - 2 text tokens (the other two are [CLS] and [SEP]) covers at most
    MAX_CHARS_PER_TOKEN + 1 characters, so the word cut at this budget starts after the last of
    them: a text cut here encodes exactly as the whole text does. The exception is a run of
    over 100 characters that the tokenizer drops (whitespace, control or combining characters),
    which only shifts what a cut keeps, never what it costs.
    """
    return (MAX_CHARS_PER_TOKEN + 1) * int(max_length)


def text_key(text: str) -> bytes:
    """The cache key of a history text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


class ShortTermCache:
    """Least-recently-used history vectors, at most `max_bytes` of keys, vectors and bookkeeping."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now (never above max_bytes)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, vector: np.ndarray) -> None:
        if vector.base is not None:
            vector = vector.copy()  # a view would keep its whole base array alive, uncounted
        # getsizeof of an array that owns its data includes the data.
        size = sys.getsizeof(key) + sys.getsizeof(vector) + _SLOT_BYTES
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (vector, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


__all__ = ["DEFAULT_MAX_BYTES", "ShortTermCache", "encoder_char_budget", "text_key"]
