"""Validation rules and limits shared by the server and the client (standard library only)."""

from __future__ import annotations

import math
import re

# Longest id (user, item, event) in characters; SQLite stores ids as TEXT, the limit keeps
# index pages and log lines bounded.
MAX_ID_CHARS = 256
# Unix seconds accepted anywhere a time is stored or asked about: [1970, 2100). The upper
# bound catches milliseconds passed as seconds and other unit slips.
MIN_TIME = 0.0
MAX_TIME = 4102444800.0  # 2100-01-01T00:00:00Z
SECONDS_PER_DAY = 86400.0
# google.protobuf.Timestamp: nanos must lie in [0, NANOS_PER_SECOND).
NANOS_PER_SECOND = 1_000_000_000

# The Feedback action that logs what a user was shown (with a recommendation id and a position)
# rather than what they did: it feeds the online metrics and no history.
IMPRESSION_ACTION = "impression"
# The 1-based rank a recommendation showed an item at: at least 1, at most the largest k asked for.
MAX_POSITION = 1_000_000

# C0 controls, DEL and C1 controls (U+0080..U+009F, e.g. NEL U+0085). Never intended in an id;
# they break log lines and terminals, and SQLite's length() stops at NUL, which would turn a
# NUL-prefixed id into a constraint failure instead of a clear error.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def id_problem(value: object) -> str | None:
    """What is wrong with `value` as an id, as a phrase to follow the field's name, or None."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if _CONTROL.search(value):
        return "contains control characters"
    return None


def check_id(value: object, what: str) -> str:
    """`value` when it is a valid id; ValueError naming `what` otherwise."""
    problem = id_problem(value)
    if problem:
        raise ValueError(f"{what} {problem}")
    return value  # type: ignore[return-value]


def time_problem(seconds: object) -> str | None:
    """What is wrong with `seconds` as a stored or queried time (unix seconds), or None."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return f"must be a number of unix seconds, got {seconds!r}"
    if not math.isfinite(seconds) or not MIN_TIME <= seconds < MAX_TIME:
        return f"must be unix seconds between 1970 and 2100, got {seconds!r}"
    return None


def timestamp_problem(seconds: int, nanos: int) -> str | None:
    """What is wrong with a protobuf Timestamp's (seconds, nanos) as a time, or None."""
    if not 0 <= nanos < NANOS_PER_SECOND:
        return f"nanos must be between 0 and {NANOS_PER_SECOND - 1}, got {nanos}"
    return time_problem(seconds + nanos / NANOS_PER_SECOND)


def check_time(seconds: float, what: str) -> float:
    """`seconds` as a float when it is a valid time; ValueError naming `what` otherwise."""
    problem = time_problem(seconds)
    if problem:
        raise ValueError(f"{what} {problem}")
    return float(seconds)


def position_problem(position: object) -> str | None:
    """What is wrong with `position` as the 1-based rank an item was shown at, or None."""
    if isinstance(position, bool) or not isinstance(position, int):
        return f"must be a whole number, got {position!r}"
    if not 1 <= position <= MAX_POSITION:
        return f"must be between 1 and {MAX_POSITION}, got {position}"
    return None
