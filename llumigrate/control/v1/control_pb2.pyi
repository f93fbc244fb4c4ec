from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "num_instances", "num_instances_up", "version", "detail")
    class DetailEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_UP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: str
    num_instances: int
    num_instances_up: int
    version: str
    detail: _containers.ScalarMap[str, str]
    def __init__(self, status: _Optional[str] = ..., num_instances: _Optional[int] = ..., num_instances_up: _Optional[int] = ..., version: _Optional[str] = ..., detail: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("id", "address", "up", "draining", "num_blocks", "free_blocks", "block_size", "num_running", "num_waiting", "kv_cache_usage", "freeness", "num_migrations_in", "num_migrations_out")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    FREENESS_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_IN_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_OUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    up: bool
    draining: bool
    num_blocks: int
    free_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    freeness: float
    num_migrations_in: int
    num_migrations_out: int
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., up: _Optional[bool] = ..., draining: _Optional[bool] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., freeness: _Optional[float] = ..., num_migrations_in: _Optional[int] = ..., num_migrations_out: _Optional[int] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class GetInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("id", "instance_id", "priority", "num_prompt_tokens", "num_output_tokens", "state", "num_migrations", "migration_refusal")
    ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_REFUSAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    instance_id: str
    priority: int
    num_prompt_tokens: int
    num_output_tokens: int
    state: str
    num_migrations: int
    migration_refusal: str
    def __init__(self, id: _Optional[str] = ..., instance_id: _Optional[str] = ..., priority: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., state: _Optional[str] = ..., num_migrations: _Optional[int] = ..., migration_refusal: _Optional[str] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("instance_id", "include_finished")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    include_finished: bool
    def __init__(self, instance_id: _Optional[str] = ..., include_finished: _Optional[bool] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[Request]
    def __init__(self, requests: _Optional[_Iterable[_Union[Request, _Mapping]]] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "destination")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    destination: str
    def __init__(self, request_id: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("request_id", "source", "destination", "state", "committed", "reason", "abort_stage", "stages", "blocks_per_stage", "blocks_hit_at_commit", "blocks_loaded_at_commit", "context_tokens", "downtime_ms", "total_ms", "phase_ms", "history")
    class PhaseMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ABORT_STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_HIT_AT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_LOADED_AT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PHASE_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source: str
    destination: str
    state: str
    committed: bool
    reason: str
    abort_stage: str
    stages: int
    blocks_per_stage: _containers.RepeatedScalarFieldContainer[int]
    blocks_hit_at_commit: int
    blocks_loaded_at_commit: int
    context_tokens: int
    downtime_ms: float
    total_ms: float
    phase_ms: _containers.ScalarMap[str, float]
    history: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., state: _Optional[str] = ..., committed: _Optional[bool] = ..., reason: _Optional[str] = ..., abort_stage: _Optional[str] = ..., stages: _Optional[int] = ..., blocks_per_stage: _Optional[_Iterable[int]] = ..., blocks_hit_at_commit: _Optional[int] = ..., blocks_loaded_at_commit: _Optional[int] = ..., context_tokens: _Optional[int] = ..., downtime_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., phase_ms: _Optional[_Mapping[str, float]] = ..., history: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("dispatch", "migration", "thresholds", "available_dispatch", "available_migration")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DISPATCH_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_DISPATCH_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MIGRATION_FIELD_NUMBER: _ClassVar[int]
    dispatch: str
    migration: _containers.RepeatedScalarFieldContainer[str]
    thresholds: _containers.ScalarMap[str, float]
    available_dispatch: _containers.RepeatedScalarFieldContainer[str]
    available_migration: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dispatch: _Optional[str] = ..., migration: _Optional[_Iterable[str]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., available_dispatch: _Optional[_Iterable[str]] = ..., available_migration: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NameList(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("dispatch", "migration", "thresholds")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DISPATCH_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    dispatch: str
    migration: NameList
    thresholds: _containers.ScalarMap[str, float]
    def __init__(self, dispatch: _Optional[str] = ..., migration: _Optional[_Union[NameList, _Mapping]] = ..., thresholds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RegisterInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "host", "port")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    host: str
    port: int
    def __init__(self, instance_id: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class DeregisterInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_s")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_s: float
    def __init__(self, instance_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "seq", "timestamp", "request_id", "instance_id", "destination_id", "detail", "dropped")
    class DetailEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    seq: int
    timestamp: float
    request_id: str
    instance_id: str
    destination_id: str
    detail: _containers.ScalarMap[str, str]
    dropped: int
    def __init__(self, kind: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp: _Optional[float] = ..., request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., destination_id: _Optional[str] = ..., detail: _Optional[_Mapping[str, str]] = ..., dropped: _Optional[int] = ...) -> None: ...
