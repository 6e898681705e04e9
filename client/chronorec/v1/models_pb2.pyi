import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnlineMetrics(_message.Message):
    __slots__ = ("version", "window_seconds", "impressions", "clicks", "ctr", "conversions", "conversion_rate", "mrr", "clicks_with_position")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    MRR_FIELD_NUMBER: _ClassVar[int]
    CLICKS_WITH_POSITION_FIELD_NUMBER: _ClassVar[int]
    version: str
    window_seconds: float
    impressions: int
    clicks: int
    ctr: float
    conversions: int
    conversion_rate: float
    mrr: float
    clicks_with_position: int
    def __init__(self, version: _Optional[str] = ..., window_seconds: _Optional[float] = ..., impressions: _Optional[int] = ..., clicks: _Optional[int] = ..., ctr: _Optional[float] = ..., conversions: _Optional[int] = ..., conversion_rate: _Optional[float] = ..., mrr: _Optional[float] = ..., clicks_with_position: _Optional[int] = ...) -> None: ...

class CanaryPolicy(_message.Message):
    __slots__ = ("min_impressions", "max_ctr_drop")
    MIN_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CTR_DROP_FIELD_NUMBER: _ClassVar[int]
    min_impressions: int
    max_ctr_drop: float
    def __init__(self, min_impressions: _Optional[int] = ..., max_ctr_drop: _Optional[float] = ...) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("candidate_version", "percent", "started_at", "policy", "candidate", "current", "decision")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    candidate_version: str
    percent: float
    started_at: _timestamp_pb2.Timestamp
    policy: CanaryPolicy
    candidate: OnlineMetrics
    current: OnlineMetrics
    decision: str
    def __init__(self, candidate_version: _Optional[str] = ..., percent: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ..., candidate: _Optional[_Union[OnlineMetrics, _Mapping]] = ..., current: _Optional[_Union[OnlineMetrics, _Mapping]] = ..., decision: _Optional[str] = ...) -> None: ...

class LoadedVersion(_message.Message):
    __slots__ = ("version", "role", "memory_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    role: str
    memory_bytes: int
    def __init__(self, version: _Optional[str] = ..., role: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("serving_version", "manifest_json", "providers", "swap_in_progress", "swap_target", "last_error", "index_size", "loaded_at", "metrics", "swap_count", "canary", "online_metrics", "loaded_versions", "resident_memory_bytes", "unattributed_feedback", "last_canary_outcome", "replicas", "applied_seq")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SWAP_TARGET_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SWAP_COUNT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    ONLINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    LAST_CANARY_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    manifest_json: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    swap_in_progress: bool
    swap_target: str
    last_error: str
    index_size: int
    loaded_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    swap_count: int
    canary: CanaryStatus
    online_metrics: _containers.RepeatedCompositeFieldContainer[OnlineMetrics]
    loaded_versions: _containers.RepeatedCompositeFieldContainer[LoadedVersion]
    resident_memory_bytes: int
    unattributed_feedback: int
    last_canary_outcome: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    applied_seq: int
    def __init__(self, serving_version: _Optional[str] = ..., manifest_json: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., swap_in_progress: _Optional[bool] = ..., swap_target: _Optional[str] = ..., last_error: _Optional[str] = ..., index_size: _Optional[int] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., swap_count: _Optional[int] = ..., canary: _Optional[_Union[CanaryStatus, _Mapping]] = ..., online_metrics: _Optional[_Iterable[_Union[OnlineMetrics, _Mapping]]] = ..., loaded_versions: _Optional[_Iterable[_Union[LoadedVersion, _Mapping]]] = ..., resident_memory_bytes: _Optional[int] = ..., unattributed_feedback: _Optional[int] = ..., last_canary_outcome: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., applied_seq: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("name", "serving_version", "applied_seq", "heartbeat_age_seconds", "this_replica")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THIS_REPLICA_FIELD_NUMBER: _ClassVar[int]
    name: str
    serving_version: str
    applied_seq: int
    heartbeat_age_seconds: float
    this_replica: bool
    def __init__(self, name: _Optional[str] = ..., serving_version: _Optional[str] = ..., applied_seq: _Optional[int] = ..., heartbeat_age_seconds: _Optional[float] = ..., this_replica: _Optional[bool] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "parent_version", "created_at", "metrics", "serving", "active", "unusable_reason", "online", "canary")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    UNUSABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent_version: str
    created_at: str
    metrics: _containers.ScalarMap[str, float]
    serving: bool
    active: bool
    unusable_reason: str
    online: OnlineMetrics
    canary: bool
    def __init__(self, version: _Optional[str] = ..., parent_version: _Optional[str] = ..., created_at: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., serving: _Optional[bool] = ..., active: _Optional[bool] = ..., unusable_reason: _Optional[str] = ..., online: _Optional[_Union[OnlineMetrics, _Mapping]] = ..., canary: _Optional[bool] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ActivateVersionRequest(_message.Message):
    __slots__ = ("version", "wait", "canary_percent", "canary_policy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_POLICY_FIELD_NUMBER: _ClassVar[int]
    version: str
    wait: bool
    canary_percent: float
    canary_policy: CanaryPolicy
    def __init__(self, version: _Optional[str] = ..., wait: _Optional[bool] = ..., canary_percent: _Optional[float] = ..., canary_policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ...) -> None: ...

class ActivateVersionResponse(_message.Message):
    __slots__ = ("serving_version", "canary_version", "canary_percent")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    canary_version: str
    canary_percent: float
    def __init__(self, serving_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("active_version", "serving_version")
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    active_version: str
    serving_version: str
    def __init__(self, active_version: _Optional[str] = ..., serving_version: _Optional[str] = ...) -> None: ...

class PromoteCanaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PromoteCanaryResponse(_message.Message):
    __slots__ = ("serving_version",)
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    def __init__(self, serving_version: _Optional[str] = ...) -> None: ...

class AbortCanaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortCanaryResponse(_message.Message):
    __slots__ = ("serving_version", "aborted_version")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    ABORTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    aborted_version: str
    def __init__(self, serving_version: _Optional[str] = ..., aborted_version: _Optional[str] = ...) -> None: ...
