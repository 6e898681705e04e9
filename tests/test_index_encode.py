"""Indexing a catalog in length-sorted small runs gives each item the vector it gets encoded alone (fp32 exactly, int8 within rounding)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from chronorec.server.core.catalog import Item
from chronorec.server.core.encoder import EncoderSettings, OnnxEncoder
from chronorec.server.core.indexing import INDEX_SUB_BATCH, index_catalog, index_with
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.repository import ModelRepository
from tinybert import TOPIC_WORDS


@pytest.fixture(scope="module")
def tiny_int8_version(tmp_path_factory, tiny_bert_dir):
    from chronorec.trainer.export import publish_base_model

    root = tmp_path_factory.mktemp("tiny-int8")
    version = publish_base_model(tiny_bert_dir, root, activate=True, int8=True)
    return root, version


def _items(n: int = 70) -> list[Item]:
    rng = random.Random(5)
    # Lengths from one word to far over max_length, so runs hold very different paddings.
    return [Item(item_id=f"i{k}", title=" ".join(rng.choices(TOPIC_WORDS, k=1 + (k * 7) % 150)),
                 category=rng.choice(TOPIC_WORDS)) for k in range(n)]


def _alone(folder, items, int8: bool) -> np.ndarray:
    encoder = OnnxEncoder(folder, prefer_int8=int8, intra_op_threads=1, max_batch_size=1)
    try:
        return np.stack([encoder.encode([item_text(i)])[0] for i in items])
    finally:
        encoder.close()


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_index_vectors_equal_each_text_encoded_alone(tiny_int8_version, int8):
    root, version = tiny_int8_version
    folder = ModelRepository(root).version_dir(version)
    items = _items()
    reference = _alone(folder, items, int8)
    bulk = OnnxEncoder(folder, prefer_int8=int8, intra_op_threads=1, max_batch_size=INDEX_SUB_BATCH)
    try:
        for order in (items, list(reversed(items))):
            index = index_catalog(bulk.encode, order, bulk.dimension, workers=2)
            vectors, present = index.vectors_matrix_for([i.item_id for i in items])
            assert present.all()
            if int8:
                # Dynamic int8 quantises each run's activations with one scale: neighbours move a vector
                # only by that rounding.
                cosine = np.sum(vectors * reference, axis=1)
                assert cosine.min() >= 0.999, cosine.min()
            else:
                assert np.max(np.abs(vectors - reference)) <= 1e-5
    finally:
        bulk.close()


def test_index_with_uses_small_runs_on_every_worker(tiny_int8_version, monkeypatch):
    root, version = tiny_int8_version
    repo = ModelRepository(root)
    runs: list[int] = []
    original = OnnxEncoder._model_inputs

    def recording(self, encodings):
        runs.append(len(encodings))
        return original(self, encodings)

    serving = OnnxEncoder(repo.version_dir(version))
    monkeypatch.setattr(OnnxEncoder, "_model_inputs", recording)
    index = index_with(repo, version, serving, EncoderSettings(vector_cache=False), _items(), None, workers=2)
    serving.close()
    assert len(index) == 70
    assert max(runs) == INDEX_SUB_BATCH
