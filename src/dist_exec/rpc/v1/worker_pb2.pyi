import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from dist_exec.rpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProgressType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROGRESS_STARTED: _ClassVar[ProgressType]
    PROGRESS_OUTPUT: _ClassVar[ProgressType]
    PROGRESS_COMPLETED: _ClassVar[ProgressType]
    PROGRESS_ERROR: _ClassVar[ProgressType]

class HeartbeatAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEARTBEAT_ACTION_NONE: _ClassVar[HeartbeatAction]
    HEARTBEAT_ACTION_DRAIN: _ClassVar[HeartbeatAction]
    HEARTBEAT_ACTION_SHUTDOWN: _ClassVar[HeartbeatAction]
    HEARTBEAT_ACTION_RESUME: _ClassVar[HeartbeatAction]
PROGRESS_STARTED: ProgressType
PROGRESS_OUTPUT: ProgressType
PROGRESS_COMPLETED: ProgressType
PROGRESS_ERROR: ProgressType
HEARTBEAT_ACTION_NONE: HeartbeatAction
HEARTBEAT_ACTION_DRAIN: HeartbeatAction
HEARTBEAT_ACTION_SHUTDOWN: HeartbeatAction
HEARTBEAT_ACTION_RESUME: HeartbeatAction

class ExecuteRequest(_message.Message):
    __slots__ = ("task_id", "task_type", "payload", "timeout", "metadata", "attempt", "attach", "stdout_offset", "stderr_offset", "limits", "start_by")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    STDOUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STDERR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    START_BY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_type: str
    payload: bytes
    timeout: _duration_pb2.Duration
    metadata: _containers.ScalarMap[str, str]
    attempt: int
    attach: bool
    stdout_offset: int
    stderr_offset: int
    limits: _common_pb2.Limits
    start_by: _duration_pb2.Duration
    def __init__(self, task_id: _Optional[str] = ..., task_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., attempt: _Optional[int] = ..., attach: _Optional[bool] = ..., stdout_offset: _Optional[int] = ..., stderr_offset: _Optional[int] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ..., start_by: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("task_id", "status", "output", "error", "exit_code", "duration", "stderr", "stdout_bytes", "stderr_bytes", "output_truncated", "has_exit_code", "attempt", "retryable", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: _common_pb2.ExecutionStatus
    output: bytes
    error: str
    exit_code: int
    duration: _duration_pb2.Duration
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    output_truncated: bool
    has_exit_code: bool
    attempt: int
    retryable: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ExecutionStatus, str]] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ..., exit_code: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., stderr: _Optional[bytes] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., output_truncated: _Optional[bool] = ..., has_exit_code: _Optional[bool] = ..., attempt: _Optional[int] = ..., retryable: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExecuteProgress(_message.Message):
    __slots__ = ("type", "data", "final_result", "output_type", "offset", "task_id", "attempt", "error_code")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    type: ProgressType
    data: bytes
    final_result: ExecuteResponse
    output_type: _common_pb2.OutputType
    offset: int
    task_id: str
    attempt: int
    error_code: int
    def __init__(self, type: _Optional[_Union[ProgressType, str]] = ..., data: _Optional[bytes] = ..., final_result: _Optional[_Union[ExecuteResponse, _Mapping]] = ..., output_type: _Optional[_Union[_common_pb2.OutputType, str]] = ..., offset: _Optional[int] = ..., task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., error_code: _Optional[int] = ...) -> None: ...

class AttemptRef(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("start", "delivered")
    START_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    start: _containers.RepeatedCompositeFieldContainer[ExecuteRequest]
    delivered: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    def __init__(self, start: _Optional[_Iterable[_Union[ExecuteRequest, _Mapping]]] = ..., delivered: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ...) -> None: ...

class DispatchEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ExecuteProgress]
    def __init__(self, events: _Optional[_Iterable[_Union[ExecuteProgress, _Mapping]]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "attempt", "signal")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    signal: _common_pb2.StopSignal
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., signal: _Optional[_Union[_common_pb2.StopSignal, str]] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class GetWorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkerStatusResponse(_message.Message):
    __slots__ = ("worker_id", "capabilities", "max_concurrent_tasks", "active_tasks", "health", "running_task_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_TASKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_tasks: int
    active_tasks: int
    health: _common_pb2.WorkerHealth
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_concurrent_tasks: _Optional[int] = ..., active_tasks: _Optional[int] = ..., health: _Optional[_Union[_common_pb2.WorkerHealth, str]] = ..., running_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeldAttempt(_message.Message):
    __slots__ = ("task_id", "attempt", "finished")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    finished: bool
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "address", "capabilities", "max_concurrent_tasks", "labels", "held_attempts", "weight", "drain_requested", "task_limits", "dispatch_stream", "call_token", "instance", "call_proof")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_TASKS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HELD_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    TASK_LIMITS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_STREAM_FIELD_NUMBER: _ClassVar[int]
    CALL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CALL_PROOF_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_tasks: int
    labels: _containers.ScalarMap[str, str]
    held_attempts: _containers.RepeatedCompositeFieldContainer[HeldAttempt]
    weight: int
    drain_requested: bool
    task_limits: _common_pb2.Limits
    dispatch_stream: bool
    call_token: str
    instance: str
    call_proof: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_concurrent_tasks: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., held_attempts: _Optional[_Iterable[_Union[HeldAttempt, _Mapping]]] = ..., weight: _Optional[int] = ..., drain_requested: _Optional[bool] = ..., task_limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ..., dispatch_stream: _Optional[bool] = ..., call_token: _Optional[str] = ..., instance: _Optional[str] = ..., call_proof: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("accepted", "message", "heartbeat_interval", "master_clock")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MASTER_CLOCK_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    heartbeat_interval: _duration_pb2.Duration
    master_clock: _duration_pb2.Duration
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., master_clock: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id", "instance")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    instance: str
    def __init__(self, worker_id: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("acknowledged",)
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    acknowledged: bool
    def __init__(self, acknowledged: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "active_tasks", "health", "metrics", "draining", "instance")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    active_tasks: int
    health: _common_pb2.WorkerHealth
    metrics: _containers.ScalarMap[str, str]
    draining: bool
    instance: str
    def __init__(self, worker_id: _Optional[str] = ..., active_tasks: _Optional[int] = ..., health: _Optional[_Union[_common_pb2.WorkerHealth, str]] = ..., metrics: _Optional[_Mapping[str, str]] = ..., draining: _Optional[bool] = ..., instance: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("acknowledged", "action", "master_clock")
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MASTER_CLOCK_FIELD_NUMBER: _ClassVar[int]
    acknowledged: bool
    action: HeartbeatAction
    master_clock: _duration_pb2.Duration
    def __init__(self, acknowledged: _Optional[bool] = ..., action: _Optional[_Union[HeartbeatAction, str]] = ..., master_clock: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
