"""The text that represents an item to the encoder: one definition for indexing, history text and training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from chronorec.server.core.catalog import Item


def item_text(item: Item) -> str:
    """`Title | Category | extra text`, blank parts left out."""
    parts = [item.title.strip()]
    if item.category.strip():
        parts.append(item.category.strip())
    if item.text.strip():
        parts.append(item.text.strip())
    return " | ".join(parts)


def item_text_lookup(items: Mapping[str, Item]) -> Callable[[str], str]:
    """The item text by id over a live mapping; an item deleted since it was seen reads as its id."""

    def text_of(item_id: str) -> str:
        item = items.get(item_id)
        return item_id if item is None else item_text(item)

    return text_of
