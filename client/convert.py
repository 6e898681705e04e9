"""Conversions between google.protobuf.Timestamp, UTC datetimes, unix seconds and ISO 8601 text."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Union

from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.client.rules import NANOS_PER_SECOND

TimeLike = Union[datetime, float, int, str]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)


def to_unix(value: TimeLike) -> float:
    """Unix seconds of a datetime (naive means UTC), a number of unix seconds or an ISO 8601 string."""
    if isinstance(value, bool):
        # bool is an int subclass; True as "1970-01-01T00:00:01" is never what a caller meant.
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, datetime):
        return _as_utc(value).timestamp()
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"time must be finite, got {value!r}")
        return seconds
    if isinstance(value, str):
        return parse_iso(value).timestamp()
    raise ValueError(f"not a time (datetime, unix seconds or ISO 8601 string): {value!r}")


def to_datetime(value: TimeLike) -> datetime:
    """The aware UTC datetime of any accepted time value."""
    if isinstance(value, datetime):
        return _as_utc(value)
    return unix_to_datetime(to_unix(value))


def unix_to_datetime(seconds: float) -> datetime:
    """The aware UTC datetime of unix seconds."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def parse_iso(text: str) -> datetime:
    """An ISO 8601 string (a trailing 'Z' allowed; no offset means UTC) as an aware UTC datetime."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty time string")
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return _as_utc(parsed)


def format_iso(value: TimeLike) -> str:
    """ISO 8601 text in UTC with a 'Z' suffix, e.g. 2026-11-28T08:15:00Z."""
    moment = to_datetime(value)
    text = moment.replace(tzinfo=None).isoformat()
    return text + "Z"


def to_timestamp(value: TimeLike) -> Timestamp:
    """A protobuf Timestamp of any accepted time value, exact to the microsecond."""
    if isinstance(value, datetime):
        # Whole seconds and the remainder in integer arithmetic, so large dates keep microsecond precision.
        seconds, rest = divmod(_as_utc(value) - _EPOCH, _ONE_SECOND)
        return Timestamp(seconds=seconds, nanos=rest.microseconds * 1000)
    unix = to_unix(value)
    seconds = math.floor(unix)
    nanos = int(round((unix - seconds) * NANOS_PER_SECOND))
    if nanos >= NANOS_PER_SECOND:
        seconds, nanos = seconds + 1, nanos - NANOS_PER_SECOND
    return Timestamp(seconds=int(seconds), nanos=nanos)


def timestamp_to_unix(timestamp: Timestamp) -> float:
    """Unix seconds of a protobuf Timestamp."""
    return timestamp.seconds + timestamp.nanos / NANOS_PER_SECOND


def timestamp_to_datetime(timestamp: Timestamp) -> datetime:
    """The aware UTC datetime of a protobuf Timestamp (nanoseconds truncated to microseconds)."""
    return timestamp.ToDatetime(tzinfo=timezone.utc)


def optional_timestamp(message, field: str) -> datetime | None:
    """The datetime of a message's Timestamp field, or None when the field is unset."""
    if not message.HasField(field):
        return None
    return timestamp_to_datetime(getattr(message, field))


def _as_utc(moment: datetime) -> datetime:
    # Naive datetimes are taken as UTC, the one time zone the server works in.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
