"""The candidate path's snapshot rows and rate-limited re-alignment give exactly the per-item lookups' results."""

from __future__ import annotations

import pytest

from chronorec.server.core import catalog_columns
from chronorec.server.core.catalog import Event, Item
from test_ranking import DAY, NOW, TOPICS, make_ranker, query


def _ranked(result) -> list[tuple[str, float]]:
    return [(r.item_id, round(r.score, 6)) for r in result.items]


def _per_item(ranker, q):
    """The same request through the per-item lookups (no snapshot)."""
    original = ranker._candidate_snapshot
    ranker._candidate_snapshot = lambda: None
    try:
        return ranker.recommend(q)
    finally:
        ranker._candidate_snapshot = original


@pytest.mark.parametrize("refresh_s", [0.0, 3600.0])
def test_snapshot_candidates_match_per_item_lookups_across_writes(monkeypatch, refresh_s):
    # 0 s: every stale alignment is rebuilt at once; 3600 s: stale ones fall back per item.
    monkeypatch.setattr(catalog_columns, "ALIGNMENT_REFRESH_S", refresh_s)
    ranker = make_ranker()
    users = ["alice"] + [f"bg{u}" for u in range(0, 40, 7)]

    def check() -> None:
        for user in users:
            for at in (NOW, NOW - 50 * DAY):
                q = query(user_id=user, k=6, at=at)
                assert _ranked(ranker.recommend(q)) == _ranked(_per_item(ranker, q))

    ranker.recommend(query())  # builds the snapshot and its alignments
    check()
    # A first event on an item no one had touched: state positions go stale.
    ranker.state.add([Event("new-1", "alice", f"{TOPICS[0]}-11", "like", NOW - DAY, None)])
    check()
    # A catalog edit: snapshot and index labels go stale.
    added = Item(item_id="jazz-new", title="Jazz story new", category="jazz", published_at=NOW - 5 * DAY)
    ranker.catalog.upsert([added])
    ranker.index.upsert([added.item_id], ranker.encode([ranker.item_text_of(added.item_id)]))
    check()
    ranker.catalog.delete(["jazz-01"])
    ranker.index.delete(["jazz-01"])
    check()
    assert all("jazz-01" != r.item_id for r in ranker.recommend(query(user_id="alice", k=20)).items)
