"""Typed gRPC client of the chronorec services: deadlines, bearer token, TLS and retries on UNAVAILABLE."""

from __future__ import annotations

import ipaddress
import json
import math
import numbers
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from chronorec.client import rules
from chronorec.client.convert import (
    TimeLike,
    optional_timestamp,
    timestamp_to_datetime,
    timestamp_to_unix,
    to_timestamp,
)
from chronorec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC caps a retry policy at 5 attempts, so at most 4 retries.
MAX_ATTEMPTS = 5
# The shortest backoff asked of gRPC. With grpcio 1.85 an initial backoff of 1 ms sometimes never
# sent the retry (17 of 40 calls waited out their deadline); 2 ms and more never did (150 of 150
# at 10 ms).
MIN_BACKOFF = 0.01

# Calls that are safe to repeat, so gRPC retries them on UNAVAILABLE: the reads, and the writes
# idempotent by id (events by event id, items by item id). DeleteItems (a repeat finds nothing
# and fails NOT_FOUND), ActivateVersion (a repeat adds to the activation history) and Rollback
# (a repeat rolls back twice) are never retried.
RETRYABLE_METHODS: tuple[tuple[str, str], ...] = (
    ("EncoderService", "Encode"),
    ("RecommenderService", "Recommend"),
    ("RecommenderService", "Feedback"),
    ("RecommenderService", "SimilarItems"),
    ("RecommenderService", "RecommendBatch"),
    # A repeated erasure finds nothing left to delete and succeeds again.
    ("RecommenderService", "DeleteUser"),
    ("CatalogService", "GetItem"),
    ("CatalogService", "UpsertItems"),
    ("ModelService", "GetStatus"),
    ("ModelService", "ListVersions"),
)
# FeedbackStream is idempotent too (events by id), but the client resends a failed stream itself
# (ChronorecClient.feedback_stream): with gRPC's own retry of a client stream, a batch taken from
# the request iterator around the failure was now and then never sent, and the call still succeeded.
# The most bytes of a stream's requests kept for resending it (gRPC's per-call retry buffer
# is 256 KiB); a longer stream that fails raises, and can be sent again whole.
STREAM_REPLAY_BYTES = 4 * 1024 * 1024

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ChronorecClientError(Exception):
    """A call failed with a gRPC status; `code` is the grpc.StatusCode, `message` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ChronorecClientError:
        """The client error of a failed grpc call."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


# --------------------------------------------------------------------------------------------
# Plain data types (what callers pass and get back; never protobuf)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeResult:
    """Sentence vectors, one per input text, and the model version that produced them.

    The vectors are plain lists of floats (float32 values, L2-normalised), so a client needs no
    numpy; `array()` gives them as one float32 matrix where numpy is installed.
    """

    vectors: list[list[float]]
    model_version: str
    dimension: int

    def array(self):
        """The vectors as a numpy float32 array of shape (n, dimension)."""
        import numpy as np

        return np.asarray(self.vectors, dtype=np.float32).reshape(len(self.vectors), self.dimension)


@dataclass(frozen=True)
class HistoryItem:
    """One event of an inline (anonymous or not yet ingested) history."""

    item_id: str
    action: str
    timestamp: TimeLike
    value: float | None = None


class FeatureReason(NamedTuple):
    """A feature of the learned ranker that moved a recommendation's score, and by how much."""

    name: str
    contribution: float


class HistoryReason(NamedTuple):
    """A history item behind a recommendation and its share of the score."""

    item_id: str
    title: str
    contribution: float


@dataclass(frozen=True)
class Recommendation:
    """One recommended item with the parts of its score."""

    item_id: str
    title: str
    category: str
    score: float
    semantic: float
    cooccurrence: float
    freshness: float
    trend: float
    history: list[HistoryReason] = field(default_factory=list)
    # With a learned ranker: the features that moved the score most, largest first.
    features: list[FeatureReason] = field(default_factory=list)


@dataclass(frozen=True)
class RecommendResult:
    """Recommendations (best first) as of `at`. Send `recommendation_id` with the impressions and
    clicks they lead to (FeedbackEvent), so the online metrics credit `model_version`."""

    items: list[Recommendation]
    model_version: str
    at: datetime
    history_length: int
    recommendation_id: str = ""


@dataclass(frozen=True)
class BatchEntry:
    """One user's answer in a batch: `result` when `ok`, else the status `code` and `message` a
    single recommend() with that request would have failed with."""

    code: grpc.StatusCode
    message: str = ""
    result: RecommendResult | None = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


@dataclass(frozen=True)
class BatchResult:
    """One entry per request, in order, and how many history texts the server encoded together."""

    entries: list[BatchEntry]
    encoded_texts: int


@dataclass(frozen=True)
class SimilarItem:
    """A neighbour of the query item: `score` blends `semantic` (cosine) and `cooccurrence` ([0, 1])."""

    item_id: str
    title: str
    category: str
    score: float
    semantic: float
    cooccurrence: float


@dataclass(frozen=True)
class SimilarResult:
    """Neighbours (most similar first) available at `at`, and the semantic weight that blended them."""

    items: list[SimilarItem]
    model_version: str
    at: datetime
    semantic_weight: float


@dataclass(frozen=True)
class DeleteUserResult:
    """What an erasure removed (zeros for a user already erased or never seen)."""

    events_deleted: int
    impressions_deleted: int


@dataclass(frozen=True)
class FeedbackEvent:
    """A feedback event to store; a missing event id is generated, a missing timestamp means now.

    Action "impression" logs that the item was shown, at `position` (1 = first) of the
    recommendation `recommendation_id`; both are required for it. A click, like or purchase
    carrying `recommendation_id` (and, for a click, optionally its `position`) is credited to
    the model version that recommended.
    """

    user_id: str
    item_id: str
    action: str
    timestamp: TimeLike | None = None
    value: float | None = None
    event_id: str | None = None
    recommendation_id: str | None = None
    position: int | None = None


@dataclass(frozen=True)
class FeedbackResult:
    """How many events were newly stored and how many were already stored (same event id)."""

    stored: int
    duplicates: int

    def __add__(self, other: FeedbackResult) -> FeedbackResult:
        return FeedbackResult(self.stored + other.stored, self.duplicates + other.duplicates)


@dataclass(frozen=True)
class CatalogItem:
    """A catalog item; times are aware UTC datetimes, None means unbounded."""

    item_id: str
    title: str
    text: str = ""
    category: str = ""
    published_at: datetime | None = None
    expires_at: datetime | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UpsertResult:
    """Items inserted or replaced, and live items in the index afterwards."""

    upserted: int
    index_size: int


@dataclass(frozen=True)
class DeleteResult:
    """Items deleted, and live items in the index afterwards."""

    deleted: int
    index_size: int


@dataclass(frozen=True)
class OnlineFigures:
    """A version's online metrics over `window_seconds` (for a canary: since it began)."""

    version: str
    window_seconds: float
    impressions: int
    clicks: int
    ctr: float
    conversions: int
    conversion_rate: float
    mrr: float
    clicks_with_position: int


@dataclass(frozen=True)
class CanaryInfo:
    """A canary in progress: the candidate, its share of users, its rule and both versions' figures."""

    candidate_version: str
    percent: float
    started_at: datetime | None
    min_impressions: int
    max_ctr_drop: float
    candidate: OnlineFigures
    current: OnlineFigures
    decision: str


@dataclass(frozen=True)
class LoadedVersionInfo:
    """A version in the server's memory, its role ("current" or "canary") and its estimated bytes."""

    version: str
    role: str
    memory_bytes: int


@dataclass(frozen=True)
class ReplicaInfo:
    """One server replica of the service, as its last heartbeat described it."""

    name: str
    serving_version: str
    applied_seq: int
    heartbeat_age_seconds: float
    this_replica: bool  # the replica that answered


@dataclass(frozen=True)
class ModelStatus:
    """The server's model state."""

    serving_version: str
    manifest: dict[str, Any]
    providers: list[str]
    swap_in_progress: bool
    swap_target: str
    last_error: str
    index_size: int
    loaded_at: datetime | None
    metrics: dict[str, float]
    swap_count: int
    canary: CanaryInfo | None = None
    online_metrics: dict[str, OnlineFigures] = field(default_factory=dict)
    loaded_versions: list[LoadedVersionInfo] = field(default_factory=list)
    resident_memory_bytes: int = 0
    unattributed_feedback: int = 0
    last_canary_outcome: str = ""
    # Every replica sharing the event store, by name (the answering server alone over SQLite).
    replicas: list[ReplicaInfo] = field(default_factory=list)
    applied_seq: int = 0  # how far the answering replica has applied the shared change log


@dataclass(frozen=True)
class ModelVersionInfo:
    """One model version in the repository."""

    version: str
    parent_version: str
    created_at: str
    metrics: dict[str, float]
    serving: bool
    active: bool
    unusable_reason: str = ""  # why it cannot serve (an invalid manifest, say); empty when it can
    online: OnlineFigures | None = None  # over the server's sliding window, when it served attributed feedback
    canary: bool = False  # serving a canary share now


@dataclass(frozen=True)
class ActivateResult:
    """The version serving when the activation call returned (the current one, for a canary),
    and the canary started, if any."""

    serving_version: str
    canary_version: str = ""
    canary_percent: float = 0.0


@dataclass(frozen=True)
class CanaryResult:
    """After a promote or an abort: the version serving everyone, and the dropped candidate (abort)."""

    serving_version: str
    aborted_version: str = ""


@dataclass(frozen=True)
class RollbackResult:
    """The version the repository pointer names now and the one serving when the call returned."""

    active_version: str
    serving_version: str


# --------------------------------------------------------------------------------------------
# Request building: every check runs here, so invalid input fails with ValueError before a call
# --------------------------------------------------------------------------------------------

_EVENT_FIELDS = ("event_id", "user_id", "item_id", "action", "timestamp", "value", "recommendation_id", "position")
_HISTORY_FIELDS = ("item_id", "action", "timestamp", "value")
_ITEM_FIELDS = ("item_id", "title", "text", "category", "published_at", "expires_at", "attributes")
OVERRIDE_FIELDS = tuple(f.name for f in recommender_pb2.TimeModelOverrides.DESCRIPTOR.fields)


def _fields(kind: str, value: Any, names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of a mapping or of any object with those attributes (dataclasses included)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            # Strict on keys: a misspelt "timestmp" would otherwise silently mean "now".
            raise ValueError(f"{kind}: unknown field(s) {unknown}; expected some of {list(names)}")
        fields = {name: value.get(name) for name in names}
    else:
        if not all(hasattr(value, name) for name in required):
            raise ValueError(f"{kind}: expected a mapping or an object with {list(required)}, got {value!r}")
        fields = {name: getattr(value, name, None) for name in names}
    missing = [name for name in required if fields[name] is None]
    if missing:
        raise ValueError(f"{kind}: missing {missing}")
    return fields


def _text(kind: str, name: str, value: Any, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{kind}: {name} must be a string, got {value!r}")
    if required and not value.strip():
        raise ValueError(f"{kind}: {name} must not be empty")
    return value


def _id(kind: str, name: str, value: Any) -> str:
    """An id under the server's own rules (chronorec.client.rules), so a bad one fails before the call."""
    return rules.check_id(_text(kind, name, value), f"{kind}: {name}")


def _number(kind: str, name: str, value: Any) -> float:
    # numbers.Real also admits numpy's scalars without importing numpy.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{kind}: {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{kind}: {name} must be finite, got {value!r}")
    return number


def _timestamp(kind: str, name: str, value: Any):
    try:
        timestamp = to_timestamp(value)
    except ValueError as error:
        raise ValueError(f"{kind}: {name}: {error}") from None
    rules.check_time(timestamp_to_unix(timestamp), f"{kind}: {name}")
    return timestamp


def _strings(name: str, values: Iterable[str] | str | None) -> list[str]:
    """A list of non-empty strings; one bare string counts as a list of one (never as characters)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    result = list(values)
    for value in result:
        _text(name, "entry", value)
    return result


def event_to_proto(event: FeedbackEvent | Mapping[str, Any] | Any) -> common_pb2.Event:
    """The Event message of a FeedbackEvent, a dict or any object with the event's fields."""
    fields = _fields("event", event, _EVENT_FIELDS, ("user_id", "item_id", "action"))
    message = common_pb2.Event(
        # Generated once here, so every retry of this request carries the same id (stored once).
        event_id=_id("event", "event_id", fields["event_id"]) if fields["event_id"] is not None else str(uuid.uuid4()),
        user_id=_id("event", "user_id", fields["user_id"]),
        item_id=_id("event", "item_id", fields["item_id"]),
        action=_text("event", "action", fields["action"]),
    )
    if fields["timestamp"] is not None:
        message.timestamp.CopyFrom(_timestamp("event", "timestamp", fields["timestamp"]))
    if fields["value"] is not None:
        message.value = _number("event", "value", fields["value"])
    if fields["recommendation_id"] is not None:
        message.recommendation_id = _id("event", "recommendation_id", fields["recommendation_id"])
    if fields["position"] is not None:
        position = fields["position"]
        problem = rules.position_problem(position)
        if problem:
            raise ValueError(f"event: position {problem}")
        message.position = position
    if message.action == rules.IMPRESSION_ACTION and (not message.recommendation_id or not message.HasField("position")):
        raise ValueError("event: an impression needs its recommendation_id and position")
    return message


def history_to_proto(entry: HistoryItem | Mapping[str, Any] | Any) -> common_pb2.HistoryEvent:
    """The HistoryEvent message of a HistoryItem, a dict or any object with those fields."""
    fields = _fields("history", entry, _HISTORY_FIELDS, ("item_id", "action", "timestamp"))
    message = common_pb2.HistoryEvent(
        item_id=_id("history", "item_id", fields["item_id"]),
        action=_text("history", "action", fields["action"]),
        timestamp=_timestamp("history", "timestamp", fields["timestamp"]),
    )
    if fields["value"] is not None:
        message.value = _number("history", "value", fields["value"])
    return message


def item_to_proto(item: CatalogItem | Mapping[str, Any] | Any) -> common_pb2.Item:
    """The Item message of a CatalogItem, a dict or any object with the item's fields."""
    fields = _fields("item", item, _ITEM_FIELDS, ("item_id", "title"))
    attributes = fields["attributes"] or {}
    if not isinstance(attributes, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in attributes.items()
    ):
        raise ValueError(f"item {fields['item_id']!r}: attributes must map strings to strings")
    message = common_pb2.Item(
        item_id=_id("item", "item_id", fields["item_id"]),
        title=_text("item", "title", fields["title"]),
        text=_text("item", "text", fields["text"], required=False),
        category=_text("item", "category", fields["category"], required=False),
        attributes=dict(attributes),
    )
    for name in ("published_at", "expires_at"):
        if fields[name] is not None:
            getattr(message, name).CopyFrom(_timestamp("item", name, fields[name]))
    return message


def overrides_to_proto(overrides: Mapping[str, Any] | None) -> recommender_pb2.TimeModelOverrides | None:
    """TimeModelOverrides from a dict of field name to value; None values keep the manifest's value."""
    if not overrides:
        return None
    message = recommender_pb2.TimeModelOverrides()
    descriptor = recommender_pb2.TimeModelOverrides.DESCRIPTOR
    for name, value in overrides.items():
        if name not in descriptor.fields_by_name:
            raise ValueError(f"overrides: unknown parameter {name!r}; known: {list(OVERRIDE_FIELDS)}")
        if value is None:
            continue
        number = _number("overrides", name, value)
        if descriptor.fields_by_name[name].cpp_type == descriptor.fields_by_name[name].CPPTYPE_INT32:
            if not number.is_integer():
                raise ValueError(f"overrides: {name} must be an integer, got {value!r}")
            setattr(message, name, int(number))
        else:
            setattr(message, name, number)
    return message


def build_recommend_request(
    user_id: str | None = None,
    k: int = 10,
    at: TimeLike | None = None,
    history: Iterable[HistoryItem | Mapping[str, Any]] = (),
    exclude: Iterable[str] = (),
    categories: Iterable[str] = (),
    allow_repeats: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> recommender_pb2.RecommendRequest:
    """The RecommendRequest of recommend()'s arguments."""
    if user_id is not None and not isinstance(user_id, str):
        raise ValueError(f"recommend: user_id must be a string, got {user_id!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"recommend: k must be a positive integer, got {k!r}")
    request = recommender_pb2.RecommendRequest(
        user_id=user_id or "",
        k=int(k),
        history=[history_to_proto(entry) for entry in history],
        exclude_item_ids=_strings("exclude", exclude),
        categories=_strings("categories", categories),
        allow_repeats=bool(allow_repeats),
    )
    if at is not None:
        request.at.CopyFrom(_timestamp("recommend", "at", at))
    override_message = overrides_to_proto(overrides)
    if override_message is not None:
        request.overrides.CopyFrom(override_message)
    return request


def build_similar_request(
    item_id: str | None = None,
    *,
    text: str | None = None,
    k: int = 10,
    at: TimeLike | None = None,
    exclude: Iterable[str] = (),
    categories: Iterable[str] = (),
    semantic_weight: float | None = None,
) -> recommender_pb2.SimilarItemsRequest:
    """The SimilarItemsRequest of similar_items()'s arguments."""
    if (item_id is None) == (text is None):
        raise ValueError("similar_items: give an item_id or a text (one of them)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"similar_items: k must be a positive integer, got {k!r}")
    request = recommender_pb2.SimilarItemsRequest(
        k=int(k), exclude_item_ids=_strings("exclude", exclude), categories=_strings("categories", categories)
    )
    if item_id is not None:
        request.item_id = _id("similar_items", "item_id", item_id)
    else:
        request.text = _text("similar_items", "text", text)
    if at is not None:
        request.at.CopyFrom(_timestamp("similar_items", "at", at))
    if semantic_weight is not None:
        weight = _number("similar_items", "semantic_weight", semantic_weight)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"similar_items: semantic_weight must be in [0, 1], got {semantic_weight!r}")
        request.semantic_weight = weight
    return request


def feedback_request(events: Iterable[Any]) -> recommender_pb2.FeedbackRequest:
    """A FeedbackRequest of one non-empty batch of events."""
    messages = [event_to_proto(event) for event in events]
    if not messages:
        raise ValueError("feedback: no events")
    return recommender_pb2.FeedbackRequest(events=messages)


# --------------------------------------------------------------------------------------------
# Response conversion
# --------------------------------------------------------------------------------------------


def _recommendation(item: recommender_pb2.ScoredItem) -> Recommendation:
    reasons = item.reasons
    return Recommendation(
        item_id=item.item_id,
        title=item.title,
        category=item.category,
        score=item.score,
        semantic=reasons.semantic,
        cooccurrence=reasons.cooccurrence,
        freshness=reasons.freshness,
        trend=reasons.trend,
        history=[HistoryReason(h.item_id, h.title, h.contribution) for h in reasons.history],
        features=[FeatureReason(f.name, f.contribution) for f in reasons.features],
    )


def _recommend_result(response: recommender_pb2.RecommendResponse) -> RecommendResult:
    return RecommendResult(
        items=[_recommendation(item) for item in response.items],
        model_version=response.model_version,
        at=timestamp_to_datetime(response.at),
        history_length=response.history_length,
        recommendation_id=response.recommendation_id,
    )


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _online(message: models_pb2.OnlineMetrics) -> OnlineFigures:
    return OnlineFigures(
        version=message.version,
        window_seconds=message.window_seconds,
        impressions=message.impressions,
        clicks=message.clicks,
        ctr=message.ctr,
        conversions=message.conversions,
        conversion_rate=message.conversion_rate,
        mrr=message.mrr,
        clicks_with_position=message.clicks_with_position,
    )


def _canary(message: models_pb2.CanaryStatus) -> CanaryInfo:
    return CanaryInfo(
        candidate_version=message.candidate_version,
        percent=message.percent,
        started_at=optional_timestamp(message, "started_at"),
        min_impressions=message.policy.min_impressions,
        max_ctr_drop=message.policy.max_ctr_drop,
        candidate=_online(message.candidate),
        current=_online(message.current),
        decision=message.decision,
    )


def catalog_item(message: common_pb2.Item) -> CatalogItem:
    """The CatalogItem of an Item message."""
    return CatalogItem(
        item_id=message.item_id,
        title=message.title,
        text=message.text,
        category=message.category,
        published_at=optional_timestamp(message, "published_at"),
        expires_at=optional_timestamp(message, "expires_at"),
        attributes=dict(message.attributes),
    )


def _manifest(text: str) -> dict[str, Any]:
    # The manifest is informational here; a server sending something unparsable must not break status().
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return {"raw": text}
    return parsed if isinstance(parsed, dict) else {"raw": parsed}


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """A service-config duration ("0.05s")."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(max_retries: int, backoff_base: float, backoff_max: float) -> dict[str, Any]:
    """The channel's service config: balancing over every address of the target, and a retry
    policy on UNAVAILABLE for RETRYABLE_METHODS.

    Balancing is gRPC's `round_robin` with client-side health checking: each replica's standard
    health service (grpc.health.v1, watched over one stream per replica) takes it out of the
    rotation while it reports NOT_SERVING (loading a model, stopping) and puts it back once it
    serves; a replica that cannot be reached is skipped until it reconnects.

    gRPC runs the retries itself: exponential backoff with jitter (about `backoff_base` ·
    2^retry, capped at `backoff_max`), a server's `grpc-retry-pushback-ms` honoured in place of
    the backoff (a negative one: no retry), and every attempt inside the call's one deadline. A
    retry is a new pick of the balancer, so it goes to a healthy replica when there is one.
    """
    balancing: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    if max_retries <= 0:
        return balancing
    names = [{"service": f"chronorec.v1.{service}", "method": method} for service, method in RETRYABLE_METHODS]
    policy = {
        "maxAttempts": min(MAX_ATTEMPTS, max_retries + 1),
        "initialBackoff": _duration(backoff_base),
        "maxBackoff": _duration(backoff_max),
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return {**balancing, "methodConfig": [{"name": names, "retryPolicy": policy}]}


_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def channel_target(target: str) -> str:
    """The gRPC target of a --target value.

    One address (`HOST:PORT`) or any gRPC target URI (`dns:///NAME:PORT`, `ipv4:A:P,B:P`, ...)
    is taken as it is; a DNS name resolving to several addresses is balanced over all of them.
    Several addresses separated by commas (`127.0.0.1:5001,127.0.0.1:5002`, IPv6 as `[::1]:5001`)
    become gRPC's static list (`ipv4:` or `ipv6:`), which takes IP addresses only.
    """
    target = target.strip()
    if not target:
        raise ValueError("target is empty")
    if "," not in target or target.lower().startswith(_TARGET_SCHEMES):
        return target
    families = set()
    for address in (part.strip() for part in target.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"target {address!r} in a list of addresses is not HOST:PORT")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"a list of addresses takes IP addresses, and {host!r} is not one: "
                             "name one DNS name instead (dns:///NAME:PORT), every address it resolves to is used") from None
    if len(families) > 1:
        raise ValueError("a list of addresses is either all IPv4 or all IPv6 (gRPC's ipv4: and ipv6: targets)")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:" + ",".join(part.strip() for part in target.split(","))


class _Converted:
    """The requests of a stream, converted as gRPC reads them; a ValueError is kept for the caller
    (gRPC reports a failing request iterator as a cancelled call).

    Each request taken from the source is also kept (up to `replay_bytes` in all), so that a
    failed stream can be sent again from its first request: every iteration reads the kept
    requests first, then takes new ones from the source. The source is read under a lock, as
    the consumer thread of a failed attempt may still be reading it while the next attempt
    starts; whatever either takes is kept for the other.
    """

    def __init__(self, source: Iterable[Any], convert: Callable[[Any], Any], replay_bytes: int | None = None):
        self._source = iter(source)
        self._convert = convert
        self._lock = threading.Lock()
        self._kept: list[Any] = []
        self._kept_bytes = 0
        self._taken = 0
        self._replay_bytes = STREAM_REPLAY_BYTES if replay_bytes is None else replay_bytes
        self._exhausted = False
        self.replayable = True  # False once the kept requests passed replay_bytes
        self.error: ValueError | None = None

    def _take(self, position: int) -> tuple[bool, Any]:
        """(True, request number `position`), or (False, None) after the last one."""
        with self._lock:
            if position < self._taken:
                # A resent stream reads the kept requests (a stream past the limit is never resent).
                return (True, self._kept[position]) if self.replayable else (False, None)
            if self._exhausted:
                return False, None
            try:
                value = next(self._source)
            except StopIteration:
                self._exhausted = True
                return False, None
            try:
                request = self._convert(value)
            except ValueError as error:
                self.error = error
                self._exhausted = True
                raise
            self._taken += 1
            if self.replayable:
                self._kept.append(request)
                self._kept_bytes += request.ByteSize()
                if self._kept_bytes > self._replay_bytes:
                    self.replayable = False
                    self._kept = []
            return True, request

    def __iter__(self) -> Iterator[Any]:
        position = 0
        while True:
            more, request = self._take(position)
            if not more:
                return
            position += 1
            yield request


class ChronorecClient:
    """A client of the Encoder, Recommender, Catalog and Model services of a chronorec service:
    one server, or replicas that gRPC balances (`target` lists several addresses or names a DNS
    name with several; see channel_target and service_config).

    Every call has a deadline (`timeout` seconds, overridable per call) that also bounds its
    retries. The calls that are safe to repeat (RETRYABLE_METHODS) are retried on UNAVAILABLE up
    to `max_retries` times (at most 4) by gRPC's retry policy (`service_config`), which backs off
    exponentially with jitter and waits as long as a server's `grpc-retry-pushback-ms` asks. Any
    other status, or any status of another call, fails at once as ChronorecClientError.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        server_name_override: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 4,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if not backoff_base > 0 or not backoff_max > 0:
            raise ValueError(f"backoff_base and backoff_max must be positive, got {backoff_base!r}, {backoff_max!r}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("mutual TLS needs both tls_cert and tls_key")
        secure = any(path is not None for path in (tls_ca, tls_cert, tls_key))
        if server_name_override and not secure:
            raise ValueError("server_name_override needs TLS (tls_ca, or tls_cert and tls_key)")
        if token is not None and ("\n" in token or "\r" in token):
            raise ValueError("token must be a single line")

        self.target = target
        self.timeout = float(timeout)
        self.max_retries = min(int(max_retries), MAX_ATTEMPTS - 1)
        self.backoff_base = max(float(backoff_base), MIN_BACKOFF)
        self.backoff_max = max(float(backoff_max), self.backoff_base)
        self.secure = secure
        # Kept private and out of repr so the bearer token never lands in a log line.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token and token.strip() else ()
        )

        config = service_config(self.max_retries, self.backoff_base, self.backoff_max)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.primary_user_agent", "chronorec-client"),
            # Explicit, as the retry policy depends on it; off with max_retries=0 (no retry at all).
            ("grpc.enable_retries", 1 if "methodConfig" in config else 0),
            ("grpc.service_config", json.dumps(config)),
        ]
        if secure:
            if server_name_override:
                options.append(("grpc.ssl_target_name_override", server_name_override))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self._channel = grpc.secure_channel(channel_target(target), credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(channel_target(target), options=options)

        self._encoder = encoder_pb2_grpc.EncoderServiceStub(self._channel)
        self._recommender = recommender_pb2_grpc.RecommenderServiceStub(self._channel)
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)

    def __repr__(self) -> str:
        return (
            f"ChronorecClient(target={self.target!r}, secure={self.secure}, "
            f"token={'set' if self._metadata else 'none'}, timeout={self.timeout})"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> ChronorecClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until the channel is connected; UNAVAILABLE ChronorecClientError when it is not in time."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.timeout if timeout is None else timeout)
        except grpc.FutureTimeoutError:
            raise ChronorecClientError(grpc.StatusCode.UNAVAILABLE, f"{self.target} not reachable") from None

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, texts: Iterable[str] | str, *, timeout: float | None = None) -> EncodeResult:
        """L2-normalised sentence vectors of `texts` (one bare string counts as one text)."""
        request = encoder_pb2.EncodeRequest(texts=_strings("encode", texts))
        if not request.texts:
            raise ValueError("encode: no texts")
        response = self._call(self._encoder.Encode, request, timeout)
        dimension = response.dimension or (len(response.embeddings[0].values) if response.embeddings else 0)
        vectors = []
        for row, embedding in enumerate(response.embeddings):
            if len(embedding.values) != dimension:
                raise ChronorecClientError(
                    grpc.StatusCode.INTERNAL, f"embedding {row} has {len(embedding.values)} values, expected {dimension}"
                )
            vectors.append(list(embedding.values))
        return EncodeResult(vectors=vectors, model_version=response.model_version, dimension=dimension)

    # -- recommender ---------------------------------------------------------------------------

    def recommend(
        self,
        user_id: str | None = None,
        k: int = 10,
        at: TimeLike | None = None,
        history: Iterable[HistoryItem | Mapping[str, Any]] = (),
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        allow_repeats: bool = False,
        overrides: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> RecommendResult:
        """The top-k items for a user (or an anonymous inline history) as of `at` (default: now)."""
        request = build_recommend_request(user_id, k, at, history, exclude, categories, allow_repeats, overrides)
        return _recommend_result(self._call(self._recommender.Recommend, request, timeout))

    def recommend_batch(
        self,
        users: Iterable[str | Mapping[str, Any]],
        k: int = 10,
        at: TimeLike | None = None,
        *,
        timeout: float | None = None,
        **defaults: Any,
    ) -> BatchResult:
        """Recommendations for many users in one call (at most the server's --max-batch-users).

        Each entry is a user id, or a dict of recommend()'s arguments (user_id, k, at, history,
        exclude, categories, allow_repeats, overrides) that override `k`, `at` and `defaults`.
        Entries are answered in order; a bad one fails alone (its BatchEntry carries the status),
        whether the server or this client finds it bad.
        """
        requests, local_errors = [], {}
        for n, user in enumerate(users):
            arguments = {"k": k, "at": at, **defaults, **({"user_id": user} if isinstance(user, str) else dict(user))}
            try:
                requests.append(build_recommend_request(**arguments))
            except (TypeError, ValueError) as error:
                # A request the server rejects as INVALID_ARGUMENT keeps the entries aligned.
                requests.append(recommender_pb2.RecommendRequest())
                local_errors[n] = str(error)
        if not requests:
            raise ValueError("recommend_batch: no users")
        response = self._call(
            self._recommender.RecommendBatch, recommender_pb2.RecommendBatchRequest(requests=requests), timeout
        )
        entries = []
        for n, entry in enumerate(response.results):
            if n in local_errors:
                entries.append(BatchEntry(grpc.StatusCode.INVALID_ARGUMENT, local_errors[n]))
            elif entry.code == 0:
                entries.append(BatchEntry(grpc.StatusCode.OK, result=_recommend_result(entry.response)))
            else:
                entries.append(BatchEntry(_CODES.get(entry.code, grpc.StatusCode.UNKNOWN), entry.message))
        return BatchResult(entries, response.encoded_texts)

    def similar_items(
        self,
        item_id: str | None = None,
        *,
        text: str | None = None,
        k: int = 10,
        at: TimeLike | None = None,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        semantic_weight: float | None = None,
        timeout: float | None = None,
    ) -> SimilarResult:
        """The k items most like `item_id` (or like `text`, for an item not in the catalog yet) that
        are available at `at` (default now); NOT_FOUND for an unknown item."""
        request = build_similar_request(item_id, text=text, k=k, at=at, exclude=exclude, categories=categories,
                                        semantic_weight=semantic_weight)
        response = self._call(self._recommender.SimilarItems, request, timeout)
        return SimilarResult(
            items=[SimilarItem(i.item_id, i.title, i.category, i.score, i.semantic, i.cooccurrence) for i in response.items],
            model_version=response.model_version,
            at=timestamp_to_datetime(response.at),
            semantic_weight=response.semantic_weight,
        )

    def delete_user(self, user_id: str, *, timeout: float | None = None) -> DeleteUserResult:
        """Erase a user's events and impressions everywhere (admin token); safe to repeat."""
        request = recommender_pb2.DeleteUserRequest(user_id=_id("delete_user", "user_id", user_id))
        response = self._call(self._recommender.DeleteUser, request, timeout)
        return DeleteUserResult(response.events_deleted, response.impressions_deleted)

    def feedback(self, events: Iterable[Any], *, timeout: float | None = None) -> FeedbackResult:
        """Stores one batch of events atomically; retrying is safe because events are idempotent by id."""
        request = feedback_request(events)
        response = self._call(self._recommender.Feedback, request, timeout)
        return FeedbackResult(stored=response.stored, duplicates=response.duplicates)

    def feedback_stream(self, batches: Iterable[Iterable[Any]], *, timeout: float | None = None) -> FeedbackResult:
        """Streams batches of events, each stored atomically as it arrives; `timeout` bounds the whole stream.

        Batches are converted as they are sent, so an invalid event raises ValueError after the
        batches before it were stored. On UNAVAILABLE the stream is sent again from its first
        batch (up to `max_retries` times, with gRPC's backoff rules, inside the one deadline) while
        what it sent fits STREAM_REPLAY_BYTES; events stored by the failed attempt then count as
        duplicates. A longer stream that fails raises, and can be sent again whole: events are
        stored once by id.
        """
        requests = _Converted(batches, feedback_request)
        budget = self.timeout if timeout is None else float(timeout)
        if not budget > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        deadline = time.monotonic() + budget
        retry = 0
        while True:
            try:
                response = self._call(self._recommender.FeedbackStream, iter(requests),
                                      max(deadline - time.monotonic(), 1e-3))
                return FeedbackResult(stored=response.stored, duplicates=response.duplicates)
            except ChronorecClientError as error:
                if requests.error is not None:
                    raise requests.error from None
                wait = self._stream_backoff(error, retry)
                if (wait is None or not requests.replayable or retry >= self.max_retries
                        or time.monotonic() + wait >= deadline):
                    raise
            time.sleep(wait)
            retry += 1

    def _stream_backoff(self, error: "ChronorecClientError", retry: int) -> float | None:
        """Seconds to wait before resending a failed stream (None: do not resend), as gRPC's
        retry policy would: only on UNAVAILABLE, a server's grpc-retry-pushback-ms first (a
        negative one forbids the retry), else exponential backoff with full jitter."""
        if error.code != grpc.StatusCode.UNAVAILABLE:
            return None
        cause = error.__cause__
        trailers = cause.trailing_metadata() if isinstance(cause, grpc.Call) else None
        for key, value in trailers or ():
            if key == "grpc-retry-pushback-ms":
                try:
                    pushback = int(value)
                except (TypeError, ValueError):
                    return None
                return None if pushback < 0 else pushback / 1000.0
        return random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** retry))

    # -- catalog -------------------------------------------------------------------------------

    def upsert_items(self, items: Iterable[Any], *, timeout: float | None = None) -> UpsertResult:
        """Inserts or replaces items (CatalogItem, dicts or objects with the item fields) in one call."""
        request = catalog_pb2.UpsertItemsRequest(items=[item_to_proto(item) for item in items])
        if not request.items:
            raise ValueError("upsert_items: no items")
        response = self._call(self._catalog.UpsertItems, request, timeout)
        return UpsertResult(upserted=response.upserted, index_size=response.index_size)

    def delete_items(self, item_ids: Iterable[str] | str, *, timeout: float | None = None) -> DeleteResult:
        """Deletes items by id; an unknown id fails the whole call with NOT_FOUND."""
        ids = _strings("delete_items", item_ids)
        if not ids:
            raise ValueError("delete_items: no item ids")
        response = self._call(self._catalog.DeleteItems, catalog_pb2.DeleteItemsRequest(item_ids=ids), timeout)
        return DeleteResult(deleted=response.deleted, index_size=response.index_size)

    def get_item(self, item_id: str, *, timeout: float | None = None) -> CatalogItem:
        """One stored item; NOT_FOUND when it does not exist."""
        request = catalog_pb2.GetItemRequest(item_id=_id("get_item", "item_id", item_id))
        return catalog_item(self._call(self._catalog.GetItem, request, timeout).item)

    # -- models --------------------------------------------------------------------------------

    def status(self, *, timeout: float | None = None) -> ModelStatus:
        """The serving version, its manifest, providers in use, index size and swap state."""
        response = self._call(self._models.GetStatus, models_pb2.GetStatusRequest(), timeout)
        return ModelStatus(
            serving_version=response.serving_version,
            manifest=_manifest(response.manifest_json),
            providers=list(response.providers),
            swap_in_progress=response.swap_in_progress,
            swap_target=response.swap_target,
            last_error=response.last_error,
            index_size=response.index_size,
            loaded_at=optional_timestamp(response, "loaded_at"),
            metrics=dict(response.metrics),
            swap_count=response.swap_count,
            canary=_canary(response.canary) if response.HasField("canary") else None,
            online_metrics={m.version: _online(m) for m in response.online_metrics},
            loaded_versions=[LoadedVersionInfo(v.version, v.role, v.memory_bytes) for v in response.loaded_versions],
            resident_memory_bytes=response.resident_memory_bytes,
            unattributed_feedback=response.unattributed_feedback,
            last_canary_outcome=response.last_canary_outcome,
            replicas=[ReplicaInfo(r.name, r.serving_version, r.applied_seq, r.heartbeat_age_seconds, r.this_replica)
                      for r in response.replicas],
            applied_seq=response.applied_seq,
        )

    def list_versions(self, *, timeout: float | None = None) -> list[ModelVersionInfo]:
        """Every version in the repository, oldest first; those that cannot serve say why."""
        response = self._call(self._models.ListVersions, models_pb2.ListVersionsRequest(), timeout)
        return [
            ModelVersionInfo(
                version=v.version,
                parent_version=v.parent_version,
                created_at=v.created_at,
                metrics=dict(v.metrics),
                serving=v.serving,
                active=v.active,
                unusable_reason=v.unusable_reason,
                online=_online(v.online) if v.HasField("online") else None,
                canary=v.canary,
            )
            for v in response.versions
        ]

    def activate(
        self,
        version: str,
        wait: bool = True,
        *,
        canary_percent: float | None = None,
        min_impressions: int = 0,
        max_ctr_drop: float = 0.0,
        timeout: float | None = None,
    ) -> ActivateResult:
        """Makes `version` the serving one; with `wait`, returns after the hot swap completes or fails.

        With `canary_percent`, `version` serves that share of users (a stable hash of the user id)
        beside the current one instead, once loaded. With `min_impressions`, the canary decides by
        itself once both versions logged that many impressions: promoted when its CTR is at least
        the current's minus `max_ctr_drop`, else aborted.
        """
        request = models_pb2.ActivateVersionRequest(version=_text("activate", "version", version), wait=wait)
        if canary_percent is not None:
            request.canary_percent = _number("activate", "canary_percent", canary_percent)
            if min_impressions:
                request.canary_policy.min_impressions = int(min_impressions)
                request.canary_policy.max_ctr_drop = _number("activate", "max_ctr_drop", max_ctr_drop)
        elif min_impressions or max_ctr_drop:
            raise ValueError("activate: min_impressions and max_ctr_drop need canary_percent")
        response = self._call(self._models.ActivateVersion, request, timeout)
        return ActivateResult(response.serving_version, response.canary_version, response.canary_percent)

    def promote_canary(self, *, timeout: float | None = None) -> CanaryResult:
        """Makes the canary serve everyone (it is loaded already: no swap)."""
        response = self._call(self._models.PromoteCanary, models_pb2.PromoteCanaryRequest(), timeout)
        return CanaryResult(serving_version=response.serving_version)

    def abort_canary(self, *, timeout: float | None = None) -> CanaryResult:
        """Ends the canary: every user is served by the current version again, no call failing."""
        response = self._call(self._models.AbortCanary, models_pb2.AbortCanaryRequest(), timeout)
        return CanaryResult(serving_version=response.serving_version, aborted_version=response.aborted_version)

    def rollback(self, wait: bool = True, *, timeout: float | None = None) -> RollbackResult:
        """Re-activates the previously serving version. Never retried: a repeat would roll back twice."""
        response = self._call(self._models.Rollback, models_pb2.RollbackRequest(wait=wait), timeout)
        return RollbackResult(active_version=response.active_version, serving_version=response.serving_version)

    # -- transport -----------------------------------------------------------------------------

    def _call(self, method, request, timeout: float | None):
        """One call under one deadline; gRPC's retry policy retries it inside that deadline."""
        budget = self.timeout if timeout is None else float(timeout)
        if not budget > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        try:
            return method(request, timeout=budget, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ChronorecClientError.from_rpc_error(error) from error


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
