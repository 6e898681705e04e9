"""Conversions between protobuf messages and the core's plain Python objects."""

from __future__ import annotations

import math
import time

from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.client import rules
from chronorec.server.core.catalog import Event, Impression, Item
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.timetext import KNOWN_ACTIONS, HistoryEntry
from chronorec.v1 import common_pb2


def check_id(value: str, what: str, *, required: bool = True) -> str:
    """`value` as an id (user, item, event) under the shared rules; InvalidArgument naming `what`."""
    if not value and not required:
        return value
    problem = rules.id_problem(value)
    if problem:
        raise InvalidArgument(f"{what} {problem}")
    return value


def check_action(action: str, where: str) -> str:
    if action not in KNOWN_ACTIONS:
        raise InvalidArgument(f"{where}: action {action[:64]!r} is not one of {', '.join(KNOWN_ACTIONS)}")
    return action


def to_seconds(ts: Timestamp, what: str) -> float:
    problem = rules.timestamp_problem(ts.seconds, ts.nanos)
    if problem:
        raise InvalidArgument(f"{what} {problem}")
    return ts.seconds + ts.nanos / rules.NANOS_PER_SECOND


def optional_seconds(message, name: str, what: str) -> float | None:
    return to_seconds(getattr(message, name), what) if message.HasField(name) else None


def to_timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds = int(whole)
    ts.nanos = int(round((seconds - whole) * 1e9)) % 1_000_000_000
    return ts


def item_from_proto(message: common_pb2.Item, index: int) -> Item:
    where = f"item {index} (id {message.item_id[:64]!r})"
    return Item(
        item_id=check_id(message.item_id, f"item {index}: item_id"),
        title=message.title,
        text=message.text,
        category=message.category,
        published_at=optional_seconds(message, "published_at", f"{where}: published_at"),
        expires_at=optional_seconds(message, "expires_at", f"{where}: expires_at"),
        attributes=dict(message.attributes),
    )


def item_to_proto(item: Item) -> common_pb2.Item:
    message = common_pb2.Item(
        item_id=item.item_id,
        title=item.title,
        text=item.text,
        category=item.category,
        attributes=item.attributes,
    )
    if item.published_at is not None:
        message.published_at.CopyFrom(to_timestamp(item.published_at))
    if item.expires_at is not None:
        message.expires_at.CopyFrom(to_timestamp(item.expires_at))
    return message


def _value(message, where: str) -> float | None:
    if not message.HasField("value"):
        return None
    if not math.isfinite(message.value):
        raise InvalidArgument(f"{where}: value must be a finite number")
    return float(message.value)


def event_from_proto(message: common_pb2.Event, index: int, received_at: float | None = None) -> Event:
    where = f"event {index} (id {message.event_id[:64]!r})"
    timestamp = optional_seconds(message, "timestamp", f"{where}: timestamp")
    return Event(
        event_id=check_id(message.event_id, f"event {index}: event_id"),
        user_id=check_id(message.user_id, f"{where}: user_id"),
        item_id=check_id(message.item_id, f"{where}: item_id"),
        action=check_action(message.action, where),
        timestamp=timestamp if timestamp is not None else (received_at or time.time()),
        value=_value(message, where),
    )


def position_from_proto(message: common_pb2.Event, where: str) -> int | None:
    """The event's 1-based position, None when unset; InvalidArgument when out of range."""
    if not message.HasField("position"):
        return None
    problem = rules.position_problem(message.position)
    if problem:
        raise InvalidArgument(f"{where}: position {problem}")
    return int(message.position)


def impression_from_proto(message: common_pb2.Event, index: int, received_at: float | None = None) -> Impression:
    """An Event message of action "impression": it must name its recommendation and position."""
    where = f"event {index} (id {message.event_id[:64]!r})"
    if not message.recommendation_id:
        raise InvalidArgument(f"{where}: an impression needs the recommendation_id it was shown for")
    position = position_from_proto(message, where)
    if position is None:
        raise InvalidArgument(f"{where}: an impression needs the position it was shown at (1 = first)")
    timestamp = optional_seconds(message, "timestamp", f"{where}: timestamp")
    return Impression(
        event_id=check_id(message.event_id, f"event {index}: event_id"),
        user_id=check_id(message.user_id, f"{where}: user_id"),
        item_id=check_id(message.item_id, f"{where}: item_id"),
        recommendation_id=check_id(message.recommendation_id, f"{where}: recommendation_id"),
        position=position,
        timestamp=timestamp if timestamp is not None else (received_at or time.time()),
    )


def history_from_proto(message: common_pb2.HistoryEvent, index: int) -> HistoryEntry:
    where = f"history event {index}"
    if not message.HasField("timestamp"):
        raise InvalidArgument(f"{where}: timestamp is required")
    return HistoryEntry(
        item_id=check_id(message.item_id, f"{where}: item_id"),
        action=check_action(message.action or "view", where),
        timestamp=to_seconds(message.timestamp, f"{where}: timestamp"),
        value=_value(message, where),
    )
