import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from chronorec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimeModelOverrides(_message.Message):
    __slots__ = ("alpha", "long_term_half_life_days", "cooccurrence_half_life_days", "freshness_half_life_days", "trend_window_days", "w_semantic", "w_cooccurrence", "w_freshness", "w_trend", "history_max_events", "personal_half_life_days")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    LONG_TERM_HALF_LIFE_DAYS_FIELD_NUMBER: _ClassVar[int]
    COOCCURRENCE_HALF_LIFE_DAYS_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_HALF_LIFE_DAYS_FIELD_NUMBER: _ClassVar[int]
    TREND_WINDOW_DAYS_FIELD_NUMBER: _ClassVar[int]
    W_SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    W_COOCCURRENCE_FIELD_NUMBER: _ClassVar[int]
    W_FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    W_TREND_FIELD_NUMBER: _ClassVar[int]
    HISTORY_MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_HALF_LIFE_DAYS_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    long_term_half_life_days: float
    cooccurrence_half_life_days: float
    freshness_half_life_days: float
    trend_window_days: float
    w_semantic: float
    w_cooccurrence: float
    w_freshness: float
    w_trend: float
    history_max_events: int
    personal_half_life_days: float
    def __init__(self, alpha: _Optional[float] = ..., long_term_half_life_days: _Optional[float] = ..., cooccurrence_half_life_days: _Optional[float] = ..., freshness_half_life_days: _Optional[float] = ..., trend_window_days: _Optional[float] = ..., w_semantic: _Optional[float] = ..., w_cooccurrence: _Optional[float] = ..., w_freshness: _Optional[float] = ..., w_trend: _Optional[float] = ..., history_max_events: _Optional[int] = ..., personal_half_life_days: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "at", "history", "exclude_item_ids", "categories", "allow_repeats", "overrides")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_REPEATS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    at: _timestamp_pb2.Timestamp
    history: _containers.RepeatedCompositeFieldContainer[_common_pb2.HistoryEvent]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    allow_repeats: bool
    overrides: TimeModelOverrides
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., history: _Optional[_Iterable[_Union[_common_pb2.HistoryEvent, _Mapping]]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., allow_repeats: _Optional[bool] = ..., overrides: _Optional[_Union[TimeModelOverrides, _Mapping]] = ...) -> None: ...

class HistoryContribution(_message.Message):
    __slots__ = ("item_id", "title", "contribution")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    contribution: float
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("name", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    contribution: float
    def __init__(self, name: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...

class Reasons(_message.Message):
    __slots__ = ("semantic", "cooccurrence", "freshness", "trend", "history", "features")
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    COOCCURRENCE_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    TREND_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    semantic: float
    cooccurrence: float
    freshness: float
    trend: float
    history: _containers.RepeatedCompositeFieldContainer[HistoryContribution]
    features: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    def __init__(self, semantic: _Optional[float] = ..., cooccurrence: _Optional[float] = ..., freshness: _Optional[float] = ..., trend: _Optional[float] = ..., history: _Optional[_Iterable[_Union[HistoryContribution, _Mapping]]] = ..., features: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "title", "category", "score", "reasons")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    category: str
    score: float
    reasons: Reasons
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., reasons: _Optional[_Union[Reasons, _Mapping]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "at", "history_length", "recommendation_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    at: _timestamp_pb2.Timestamp
    history_length: int
    recommendation_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., history_length: _Optional[int] = ..., recommendation_id: _Optional[str] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_common_pb2.Event, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("stored", "duplicates")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "text", "k", "at", "exclude_item_ids", "categories", "semantic_weight")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    k: int
    at: _timestamp_pb2.Timestamp
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    semantic_weight: float
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., k: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., semantic_weight: _Optional[float] = ...) -> None: ...

class SimilarItem(_message.Message):
    __slots__ = ("item_id", "title", "category", "score", "semantic", "cooccurrence")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    COOCCURRENCE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    category: str
    score: float
    semantic: float
    cooccurrence: float
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., semantic: _Optional[float] = ..., cooccurrence: _Optional[float] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "model_version", "at", "semantic_weight")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SimilarItem]
    model_version: str
    at: _timestamp_pb2.Timestamp
    semantic_weight: float
    def __init__(self, items: _Optional[_Iterable[_Union[SimilarItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., semantic_weight: _Optional[float] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class RecommendBatchEntry(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: RecommendResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[RecommendResponse, _Mapping]] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("results", "encoded_texts")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_TEXTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecommendBatchEntry]
    encoded_texts: int
    def __init__(self, results: _Optional[_Iterable[_Union[RecommendBatchEntry, _Mapping]]] = ..., encoded_texts: _Optional[int] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("events_deleted", "impressions_deleted")
    EVENTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    events_deleted: int
    impressions_deleted: int
    def __init__(self, events_deleted: _Optional[int] = ..., impressions_deleted: _Optional[int] = ...) -> None: ...
