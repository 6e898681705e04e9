"""History as text with relative-time phrases: the one home shared by the server and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from chronorec.client.rules import SECONDS_PER_DAY as _DAY

KNOWN_ACTIONS = (
    "view",
    "click",
    "like",
    "purchase",
    "rating",
    "skip",
    "share",
    "add_to_cart",
    "dislike",
)

# Weight of an event in the long-term interest mean. Negative feedback carries no weight
# there (it still marks the item as seen and appears in the history text).
_ACTION_STRENGTH = {
    "view": 1.0,
    "click": 1.0,
    "like": 2.0,
    "share": 2.0,
    "add_to_cart": 2.0,
    "purchase": 3.0,
    "rating": 1.0,
    "skip": 0.0,
    "dislike": 0.0,
}

_ACTION_VERB = {
    "view": "viewed",
    "click": "clicked",
    "like": "liked",
    "purchase": "bought",
    "skip": "skipped",
    "share": "shared",
    "add_to_cart": "added to cart",
    "dislike": "disliked",
}

HISTORY_SEPARATOR = " ; "

_MINUTE = 60.0
_HOUR = 3600.0


@dataclass(frozen=True)
class HistoryEntry:
    """One event of a user's history as the ranking and the trainer see it."""

    item_id: str
    action: str
    timestamp: float
    value: float | None = None


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'} ago"


def relative_time_phrase(seconds: float) -> str:
    """A coarse English phrase for how long ago something happened (`seconds` ≥ 0)."""
    s = max(0.0, float(seconds))
    if s < 2 * _MINUTE:
        return "just now"
    if s < _HOUR:
        return _plural(int(s // _MINUTE), "minute")
    if s < _DAY:
        return _plural(int(s // _HOUR), "hour")
    days = int(s // _DAY)
    if days == 1:
        return "yesterday"
    if days < 14:
        return _plural(days, "day")
    if days < 60:
        return _plural(days // 7, "week")
    if days < 730:
        return _plural(days // 30, "month")
    return _plural(days // 365, "year")


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def action_phrase(action: str, value: float | None) -> str:
    """`rated 5`, `liked`, `viewed` … — the verb for one event."""
    if action == "rating":
        return f"rated {_format_value(value)}" if value is not None else "rated"
    return _ACTION_VERB.get(action, action.replace("_", " "))


def action_strength(action: str, value: float | None = None) -> float:
    """Weight of one event in the long-term interest (0 for negative feedback)."""
    if action == "rating" and value is not None:
        # Ratings on a 1–5 scale: a low rating is weak evidence of interest, not none.
        return max(0.0, min(float(value), 5.0)) / 5.0 + 0.5
    return _ACTION_STRENGTH.get(action, 1.0)


def event_text(entry: HistoryEntry, at: float, item_text_of: Callable[[str], str]) -> str:
    """`2 days ago, rated 5: Toy Story (1995) | Animation` for one history entry as of `at`."""
    when = relative_time_phrase(at - entry.timestamp)
    return f"{when}, {action_phrase(entry.action, entry.value)}: {item_text_of(entry.item_id)}"


def history_text(
    entries: Iterable[HistoryEntry],
    at: float,
    item_text_of: Callable[[str], str],
    max_events: int = 20,
    max_chars: int | None = None,
) -> str:
    """The user's most recent events as of `at`, newest first, as one text for the encoder.

    Only entries with timestamp ≤ `at` are written; ties in time keep their given order
    (the later-given one counts as newer). With `max_chars`, the text's first max_chars
    characters, built without writing the events past them.
    """
    visible = [(e.timestamp, i, e) for i, e in enumerate(entries) if e.timestamp <= at]
    visible.sort(key=lambda t: (t[0], t[1]), reverse=True)
    parts: list[str] = []
    length = 0
    for _, _, e in visible[: max(0, max_events)]:
        if max_chars is not None and length >= max_chars:
            break
        parts.append(event_text(e, at, item_text_of))
        length += len(parts[-1]) + len(HISTORY_SEPARATOR)
    text = HISTORY_SEPARATOR.join(parts)
    return text if max_chars is None else text[:max_chars]
