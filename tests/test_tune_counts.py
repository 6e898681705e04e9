"""The tuning's batched rank counts against combine()'s scores counted directly, on components built to tie."""

import numpy as np
import pytest

from chronorec.server.core.scoring import combine, scaled_weights
from chronorec.trainer.tune import TuningGrid, _collect, _signs, _WeightProduct


def _instances(rng, count):
    out = []
    for _ in range(count):
        n = int(rng.integers(1, 400))
        values = (3, 2, 2, 4)
        # Few distinct levels and many zeros: exact ties and sign-decided candidates both occur.
        blocks = [np.round(rng.random((v, n)) * 4).astype(np.float32) / np.float32(4) * (rng.random((v, n)) < 0.6)
                  for v in values]
        if rng.random() < 0.2:
            blocks[2][:] = np.float32(0.5)  # a component flat over the candidates
        target = int(rng.integers(n))
        parts = _collect(blocks, target)
        parts.signs = [_signs(block, parts.target) for block in parts.blocks]
        kept = (list(parts.blocks), parts.target)  # before folding: what the counts must cover
        if rng.random() < 0.7:
            parts.fold()
        out.append((parts, kept))
    return out


def _direct_counts(rows, scale, blocks, target):
    """Per weight row, the candidates combine() scores strictly above the target, and tied with it."""
    scores = combine(scaled_weights(rows, scale), *blocks)
    reference = scores[:, target:target + 1]
    return (scores > reference).sum(axis=1), (scores == reference).sum(axis=1) - 1


@pytest.mark.parametrize("alone", [1 << 20, 40])
@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0 ** -90])
def test_rank_counts_many_are_the_per_instance_counts(scale, alone, monkeypatch):
    """Each instance at its own personal scale (around `scale`, sharing its scale_key); `alone`:
    the size from which an instance is counted on its own."""
    import chronorec.trainer.tune as tune

    monkeypatch.setattr(tune, "_MANY_ALONE", alone)
    rng = np.random.default_rng(7)
    rows = TuningGrid().weights().astype(np.float32)
    product = _WeightProduct(rows)
    present = _instances(rng, 60)
    for _ in range(3):
        choice = [int(rng.integers(len(parts_block))) for parts_block in present[0][0].blocks]
        inputs, expected, scales = [], [], []
        for parts, (kept, kept_target) in present:
            mine = scale if scale == 1.0 else scale * float(rng.uniform(0.5, 1.0))
            if product.scale_key(mine) != product.scale_key(scale):
                continue
            pick = [min(c, len(b) - 1) for c, b in zip(choice, parts.blocks)]
            folded = ([parts.folded_signs[k][v] for k, v in enumerate(pick)], parts.folded_counts
                      ) if len(parts.folded_counts) else None
            if folded is not None and scale == 2.0 ** -90:
                continue  # folding is only done for scales the sign argument covers
            blocks = [parts.blocks[k][v] for k, v in enumerate(pick)]
            signs = [parts.signs[k][v] for k, v in enumerate(pick)]
            inputs.append((blocks, signs, parts.target, folded))
            expected.append(_direct_counts(rows, mine, [kept[k][v] for k, v in enumerate(pick)], kept_target))
            scales.append(mine)
        assert inputs
        # A small slice bound splits the instances over several passes.
        for bound in (64, 1 << 20):
            better, tied = product.rank_counts_many(inputs, scales, max_scored=bound)
            np.testing.assert_array_equal(better, np.stack([b for b, _ in expected], axis=1))
            np.testing.assert_array_equal(tied, np.stack([t for _, t in expected], axis=1))


def test_rank_counts_many_refuses_scales_it_cannot_share():
    product = _WeightProduct(TuningGrid().weights().astype(np.float32))
    parts = _instances(np.random.default_rng(1), 1)[0][0]
    one = ([b[0] for b in parts.blocks], [s[0] for s in parts.signs], parts.target, None)
    with pytest.raises(ValueError):
        product.rank_counts_many([one, one], [1.0, 2.0 ** -90])


def test_release_free_heap_returns_worker_threads_free_memory():
    """Large temporaries freed in worker threads stay in their malloc arenas until trimmed."""
    from concurrent.futures import ThreadPoolExecutor

    from chronorec.trainer.resources import current_rss_mb, release_free_heap

    def work(k: int) -> float:
        held = [np.full((252, 16384), k + i, dtype=np.float32) for i in range(10)]
        return float(sum(h[0, 0] for h in held))

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(work, range(16)))
    before = current_rss_mb()
    if not release_free_heap():
        pytest.skip("no malloc_trim here")
    after = current_rss_mb()
    assert before is not None and after is not None and after < before  # it released something
