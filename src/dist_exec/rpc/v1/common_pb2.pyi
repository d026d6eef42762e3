import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_PENDING: _ClassVar[JobStatus]
    JOB_STATUS_RUNNING: _ClassVar[JobStatus]
    JOB_STATUS_COMPLETED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
    JOB_STATUS_TIMEOUT: _ClassVar[JobStatus]

class OutputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_TYPE_STDOUT: _ClassVar[OutputType]
    OUTPUT_TYPE_STDERR: _ClassVar[OutputType]

class ExecutionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_STATUS_UNSPECIFIED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_SUCCESS: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_FAILURE: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_TIMEOUT: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_CANCELLED: _ClassVar[ExecutionStatus]

class StopSignal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_SIGNAL_UNSPECIFIED: _ClassVar[StopSignal]
    STOP_SIGNAL_TERM: _ClassVar[StopSignal]
    STOP_SIGNAL_INT: _ClassVar[StopSignal]
    STOP_SIGNAL_HUP: _ClassVar[StopSignal]
    STOP_SIGNAL_QUIT: _ClassVar[StopSignal]
    STOP_SIGNAL_KILL: _ClassVar[StopSignal]

class WorkerHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_HEALTH_UNKNOWN: _ClassVar[WorkerHealth]
    WORKER_HEALTH_HEALTHY: _ClassVar[WorkerHealth]
    WORKER_HEALTH_DEGRADED: _ClassVar[WorkerHealth]
    WORKER_HEALTH_UNHEALTHY: _ClassVar[WorkerHealth]

class NodeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATUS_UNSPECIFIED: _ClassVar[NodeStatus]
    NODE_STATUS_HEALTHY: _ClassVar[NodeStatus]
    NODE_STATUS_UNHEALTHY: _ClassVar[NodeStatus]
    NODE_STATUS_DRAINING: _ClassVar[NodeStatus]
    NODE_STATUS_SUSPECT: _ClassVar[NodeStatus]
    NODE_STATUS_DEGRADED: _ClassVar[NodeStatus]
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_PENDING: JobStatus
JOB_STATUS_RUNNING: JobStatus
JOB_STATUS_COMPLETED: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_CANCELLED: JobStatus
JOB_STATUS_TIMEOUT: JobStatus
OUTPUT_TYPE_STDOUT: OutputType
OUTPUT_TYPE_STDERR: OutputType
EXECUTION_STATUS_UNSPECIFIED: ExecutionStatus
EXECUTION_STATUS_SUCCESS: ExecutionStatus
EXECUTION_STATUS_FAILURE: ExecutionStatus
EXECUTION_STATUS_TIMEOUT: ExecutionStatus
EXECUTION_STATUS_CANCELLED: ExecutionStatus
STOP_SIGNAL_UNSPECIFIED: StopSignal
STOP_SIGNAL_TERM: StopSignal
STOP_SIGNAL_INT: StopSignal
STOP_SIGNAL_HUP: StopSignal
STOP_SIGNAL_QUIT: StopSignal
STOP_SIGNAL_KILL: StopSignal
WORKER_HEALTH_UNKNOWN: WorkerHealth
WORKER_HEALTH_HEALTHY: WorkerHealth
WORKER_HEALTH_DEGRADED: WorkerHealth
WORKER_HEALTH_UNHEALTHY: WorkerHealth
NODE_STATUS_UNSPECIFIED: NodeStatus
NODE_STATUS_HEALTHY: NodeStatus
NODE_STATUS_UNHEALTHY: NodeStatus
NODE_STATUS_DRAINING: NodeStatus
NODE_STATUS_SUSPECT: NodeStatus
NODE_STATUS_DEGRADED: NodeStatus

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "status", "capabilities", "max_tasks", "active_tasks", "labels", "last_seen", "weight", "task_limits")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TASK_LIMITS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    status: NodeStatus
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_tasks: int
    active_tasks: int
    labels: _containers.ScalarMap[str, str]
    last_seen: _timestamp_pb2.Timestamp
    weight: int
    task_limits: Limits
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[NodeStatus, str]] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_tasks: _Optional[int] = ..., active_tasks: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., weight: _Optional[int] = ..., task_limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("memory_bytes", "cpu_time", "max_procs", "max_file_size_bytes")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_PROCS_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    cpu_time: _duration_pb2.Duration
    max_procs: int
    max_file_size_bytes: int
    def __init__(self, memory_bytes: _Optional[int] = ..., cpu_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_procs: _Optional[int] = ..., max_file_size_bytes: _Optional[int] = ...) -> None: ...
