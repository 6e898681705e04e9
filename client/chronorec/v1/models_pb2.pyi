import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("serving_version", "manifest_json", "providers", "swap_in_progress", "swap_target", "last_error", "index_size", "loaded_at", "metrics", "swap_count")
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
    def __init__(self, serving_version: _Optional[str] = ..., manifest_json: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., swap_in_progress: _Optional[bool] = ..., swap_target: _Optional[str] = ..., last_error: _Optional[str] = ..., index_size: _Optional[int] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., swap_count: _Optional[int] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "parent_version", "created_at", "metrics", "serving", "active", "unusable_reason")
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
    version: str
    parent_version: str
    created_at: str
    metrics: _containers.ScalarMap[str, float]
    serving: bool
    active: bool
    unusable_reason: str
    def __init__(self, version: _Optional[str] = ..., parent_version: _Optional[str] = ..., created_at: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., serving: _Optional[bool] = ..., active: _Optional[bool] = ..., unusable_reason: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ActivateVersionRequest(_message.Message):
    __slots__ = ("version", "wait")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    version: str
    wait: bool
    def __init__(self, version: _Optional[str] = ..., wait: _Optional[bool] = ...) -> None: ...

class ActivateVersionResponse(_message.Message):
    __slots__ = ("serving_version",)
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    def __init__(self, serving_version: _Optional[str] = ...) -> None: ...

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
