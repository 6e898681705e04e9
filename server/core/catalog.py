"""Plain data types of the catalog and the event log, shared by the store, ranking and trainer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    """A recommendable item. Times are unix seconds (UTC); None means unbounded."""

    item_id: str
    title: str
    text: str = ""
    category: str = ""
    published_at: float | None = None
    expires_at: float | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def available_at(self, at: float) -> bool:
        """True when the item is published and not yet expired at time `at`."""
        if self.published_at is not None and self.published_at > at:
            return False
        if self.expires_at is not None and self.expires_at <= at:
            return False
        return True


@dataclass(frozen=True)
class Event:
    """One feedback event of a user on an item at a time (unix seconds)."""

    event_id: str
    user_id: str
    item_id: str
    action: str
    timestamp: float
    value: float | None = None


@dataclass(frozen=True)
class Impression:
    """An item shown to a user at a 1-based `position` of the recommendation `recommendation_id`
    (a Feedback event of action "impression"). Kept apart from the events: what a user was shown
    is not what they did, so it is in no history, co-occurrence or trend count."""

    event_id: str
    user_id: str
    item_id: str
    recommendation_id: str
    position: int
    timestamp: float
