"""The short-term vector cache: bounded in bytes, history texts cut to what the encoder reads, encodings unchanged."""

from __future__ import annotations

import gc
import hashlib
import random
import threading
import tracemalloc

import numpy as np
import pytest

from chronorec.server.core.catalog import Item
from chronorec.server.core.catalog_state import CatalogState
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.manifest import TimeModelParams, load_tokenizer
from chronorec.server.core.ranking import RecommendQuery, TimeAwareRanker
from chronorec.server.core.short_term_cache import ShortTermCache, encoder_char_budget, text_key
from chronorec.server.core.timetext import HistoryEntry, history_text
from conftest import ANCHOR

DIM = 32


def _vector(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode()).digest()
    vector = np.frombuffer(digest, dtype=np.uint8)[:DIM].astype(np.float32) - 127.5
    return vector / np.linalg.norm(vector)


class RecordingEncoder:
    """Deterministic unit vectors; remembers the length of every text it is handed."""

    def __init__(self):
        self.lengths: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, texts, timeout=None):
        with self.lock:
            self.lengths.extend(len(t) for t in texts)
        return np.stack([_vector(t) for t in texts])


# -- the cache ------------------------------------------------------------------------


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    cache = ShortTermCache(max_bytes=4096)
    vectors = {f"history {i}": _vector(f"history {i}") for i in range(100)}
    for text, vector in vectors.items():
        cache.put(text_key(text), vector)
        assert cache.nbytes <= 4096
    assert 0 < len(cache) < 100
    newest = list(vectors)[-len(cache):]
    assert all(cache.get(text_key(t)) is not None for t in newest)
    assert cache.get(text_key("history 0")) is None
    # A hit counts as a use: the entry read last survives the next eviction.
    cache.get(text_key(newest[0]))
    cache.put(text_key("one more"), _vector("one more"))
    assert cache.get(text_key(newest[0])) is not None and cache.get(text_key(newest[1])) is None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_cache_counts_a_view_as_the_copy_it_keeps():
    cache = ShortTermCache(max_bytes=1 << 20)
    matrix = np.ones((1000, DIM), dtype=np.float32)
    cache.put(text_key("row"), matrix[3])  # a view: keeping it would pin the whole matrix
    stored = cache.get(text_key("row"))
    assert stored.base is None and cache.nbytes < 1000
    assert ShortTermCache(max_bytes=0).put(text_key("x"), _vector("x")) is None


def test_key_is_fixed_size_whatever_the_text():
    assert len(text_key("a")) == len(text_key("a" * 1_000_000)) == 16
    assert text_key("a" * 1_000_000) != text_key("a" * 999_999)


# -- the character budget --------------------------------------------------------------


def _words(rng: random.Random, chars: int) -> str:
    """Text of words up to 100 characters (WordPiece's per-word limit), some punctuation and non-ASCII."""
    vocabulary = ["jazz", "saxophone", "Toy", "Story", "(1995)", "|", "Animation,", "crème", "東京", "naïve",
                  "x" * 100, "supercalifragilisticexpialidocious", "3.14", "don't", "—"]
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(vocabulary)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


@pytest.fixture(scope="module")
def tokenizers(tiny_repo_template):
    from chronorec.server.core.repository import ModelRepository
    from chronorec.trainer.base_model import packaged_minilm

    repository = ModelRepository(tiny_repo_template)
    tiny = repository.version_dir(repository.current()) / "tokenizer.json"
    try:
        return [tiny, packaged_minilm() / "tokenizer.json"]
    except FileNotFoundError:  # a client-and-server install without the trainer's packaged model
        return [tiny]


@pytest.mark.parametrize("max_length", [32, 64, 128])
def test_cut_text_encodes_exactly_as_the_whole_text(tokenizers, max_length):
    """The cut changes no token the encoder reads: evaluation numbers cannot move."""
    rng = random.Random(max_length)
    budget = encoder_char_budget(max_length)
    for path in tokenizers:
        tokenizer = load_tokenizer(path, max_length)
        items = {f"i{n}": _words(rng, rng.choice([30, 800, 5000])) for n in range(40)}
        items["i0"] = _words(rng, 19_800)
        for _ in range(8):
            history = [HistoryEntry(f"i{rng.randrange(40)}", "view", ANCHOR - rng.uniform(0, 90 * 86400))
                       for _ in range(rng.randrange(1, 12))]
            text = history_text(history, ANCHOR, items.__getitem__, 200)
            whole = tokenizer.encode(text)
            cut = tokenizer.encode(text[:budget])
            assert cut.ids == whole.ids and cut.attention_mask == whole.attention_mask, path


def test_history_text_stops_writing_at_its_budget():
    """The cut text is the whole text's prefix, written without the events past it."""
    rng = random.Random(3)
    items = {f"i{n}": _words(rng, rng.choice([5, 60, 900])) for n in range(30)}
    written: list[str] = []

    def text_of(item_id: str) -> str:
        written.append(item_id)
        return items[item_id]

    history = [HistoryEntry(f"i{n}", "view", ANCHOR - 3600.0 * n) for n in range(30)]
    whole = history_text(history, ANCHOR, items.__getitem__, 30)
    for max_chars in [0, 1, 2, 50, 61, 62, 63, 64, 900, 5000, len(whole) - 1, len(whole), len(whole) + 10]:
        written.clear()
        assert history_text(history, ANCHOR, text_of, 30, max_chars) == whole[:max_chars]
        if max_chars <= 5000:  # well short of the whole text (~15k): the oldest events are never written
            assert len(written) < 30
    assert history_text(history, ANCHOR, items.__getitem__, 30, None) == whole


# -- the finding, at small scale ----------------------------------------------------------


def _catalog(n: int = 200, chars: int = 19_800) -> list[Item]:
    rng = random.Random(7)
    return [Item(f"long-{i}", f"Long story {i}", text=_words(rng, chars)[:chars], category="jazz",
                 published_at=ANCHOR - 400 * 86400) for i in range(n)]


def test_long_inline_histories_keep_the_cache_and_the_encoder_bounded():
    """F6: items of ~19,800 characters and Recommend calls with 200-event inline histories.
    Each history text was ~4 MB and the cache kept every one as its key (RSS 747 MB -> 1,253 MB
    after 46 calls, 2.3 s of CPU each, mostly tokenizing). Now the encoder gets at most its
    character budget, and the cache holds at most its byte cap."""
    items = _catalog(300)
    catalog = CatalogState(items)
    index = ItemIndex(DIM, initial_capacity=256)
    index.upsert([i.item_id for i in items], np.stack([_vector(i.item_id) for i in items]))
    encoder = RecordingEncoder()
    cap = 8 * 1024
    ranker = TimeAwareRanker(catalog, index, InteractionState(), None, encoder,
                             short_term_cache_bytes=cap, encoder_max_length=128)
    params = TimeModelParams(history_max_events=200)
    rng = random.Random(11)
    newest: set[str] = set()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for call in range(46):
            order = rng.sample(items, 200)  # a distinct history, hence a distinct text, per call; 100 items left to rank
            history = tuple(HistoryEntry(item.item_id, "view", ANCHOR - 3600.0 * (n + 1)) for n, item in enumerate(order))
            newest.add(order[0].item_id)
            result = ranker.recommend(RecommendQuery(user_id=None, k=10, at=ANCHOR, inline_history=history, params=params))
            assert len(result.items) == 10
            assert ranker._short_term_cache.nbytes <= cap
        del result, history, order
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The budget (12,928 characters at max_length 128) ends inside the newest item's text, so
    # what the encoder reads, and the cache key, depend on the newest event only.
    assert len(encoder.lengths) == len(newest) > 40
    assert max(encoder.lengths) <= encoder_char_budget(128) < 20_000
    # 46 texts of ~4 MB were kept before; now the cache's few kilobytes and small change.
    assert retained < 2 * 1024 * 1024, retained


def test_repeated_history_hits_the_cache():
    items = _catalog(20, 19_800)
    catalog = CatalogState(items)
    index = ItemIndex(DIM, initial_capacity=32)
    index.upsert([i.item_id for i in items], np.stack([_vector(i.item_id) for i in items]))
    encoder = RecordingEncoder()
    ranker = TimeAwareRanker(catalog, index, InteractionState(), None, encoder, encoder_max_length=64)
    history = tuple(HistoryEntry(item.item_id, "like", ANCHOR - 86400.0 * (n + 1)) for n, item in enumerate(items))
    query = RecommendQuery(user_id=None, k=3, at=ANCHOR, inline_history=history, params=TimeModelParams(history_max_events=20))
    first = ranker.recommend(query)
    second = ranker.recommend(query)
    assert not first.used_cache and second.used_cache
    assert encoder.lengths == [encoder_char_budget(64)]  # cut, and encoded once
    assert [r.item_id for r in first.items] == [r.item_id for r in second.items]
