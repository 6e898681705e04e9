"""SimilarItems: an item's neighbours as of a time, blending the index's semantic neighbours with co-occurrence ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from chronorec.server.core.catalog import Item
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.manifest import TimeModelParams

# Neighbours fetched from each source per item asked for: filters (availability, categories,
# exclusions) may drop many of them.
OVERSAMPLE = 4


@dataclass(frozen=True)
class SimilarQuery:
    """What to find neighbours of (an item id, or a text for an item not in the catalog yet), how
    many, and as of when (`at`, unix seconds)."""

    k: int
    at: float
    item_id: str | None = None
    text: str | None = None
    exclude: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    semantic_weight: float | None = None


@dataclass(frozen=True)
class SimilarItem:
    """One neighbour: its score and the two parts it blends."""

    item_id: str
    title: str
    category: str
    score: float
    semantic: float
    cooccurrence: float


def default_semantic_weight(params: TimeModelParams) -> float:
    """The version's own balance of the two signals: w_semantic / (w_semantic + w_cooccurrence)."""
    total = params.w_semantic + params.w_cooccurrence
    return params.w_semantic / total if total > 0 else 0.5


def check_semantic_weight(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise InvalidArgument(f"semantic_weight must be in [0, 1], got {weight!r}")
    return float(weight)


def similar_items(
    query: SimilarQuery,
    vector: np.ndarray,
    catalog: Mapping[str, Item],
    index: ItemIndex,
    cooccurrence: CooccurrenceModel | None,
    semantic_weight: float,
) -> list[SimilarItem]:
    """The k items most like the query's (its unit `vector`, and for a catalog item its
    co-occurrence row), available at `query.at`: an item not yet published, expired or deleted is
    never returned, and neither is the query item.

    Candidates are the index's nearest neighbours and the item's co-occurrence neighbours; when
    the filters leave fewer than k of them, every catalog item is a candidate (exact, and about
    as slow as a Python pass over the catalog).
    """
    if query.k <= 0:
        raise InvalidArgument("k must be positive")
    banned = set(query.exclude)
    if query.item_id is not None:
        banned.add(query.item_id)
    fetch = (query.k * OVERSAMPLE + len(banned)) * (4 if query.categories else 1)
    use_cooccurrence = query.item_id is not None and cooccurrence is not None and query.item_id in cooccurrence
    candidates: dict[str, None] = {item_id: None for item_id, _ in index.search(vector, fetch)}
    if use_cooccurrence:
        for item_id, _ in cooccurrence.neighbours([query.item_id], fetch).get(query.item_id, []):
            candidates[item_id] = None
    kept = _available(candidates, catalog, query, banned)
    if len(kept) < query.k and len(kept) < len(catalog) - len(banned):
        kept = _available(dict.fromkeys(catalog), catalog, query, banned)
    if not kept:
        return []
    ids = [item.item_id for item in kept]
    semantic, _ = index.similarities(vector, ids)
    semantic = semantic.astype(np.float64)
    cooc = np.zeros(len(ids), dtype=np.float64)
    if use_cooccurrence:
        raw = cooccurrence.pair_similarities([query.item_id], ids)[0].astype(np.float64)
        peak = float(raw.max())
        if peak > 0:
            cooc = raw / peak
    score = semantic_weight * semantic + (1.0 - semantic_weight) * cooc
    order = np.lexsort((np.asarray(ids), -score))[: query.k]
    return [
        SimilarItem(ids[i], kept[i].title, kept[i].category, float(score[i]), float(semantic[i]), float(cooc[i]))
        for i in order
    ]


def _available(candidates: Mapping[str, None], catalog: Mapping[str, Item], query: SimilarQuery,
               banned: set[str]) -> list[Item]:
    out = []
    for item_id in candidates:
        if item_id in banned:
            continue
        item = catalog.get(item_id)
        if item is None or not item.available_at(query.at):
            continue
        if query.categories and item.category not in query.categories:
            continue
        out.append(item)
    return out


__all__ = ["SimilarItem", "SimilarQuery", "check_semantic_weight", "default_semantic_weight", "similar_items"]
