import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from dist_exec.rpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("task_type", "payload", "timeout", "priority", "metadata", "max_retries", "selector", "idempotency_key", "retry_on_failure", "queue_timeout", "limits")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    task_type: str
    payload: bytes
    timeout: _duration_pb2.Duration
    priority: int
    metadata: _containers.ScalarMap[str, str]
    max_retries: int
    selector: _containers.ScalarMap[str, str]
    idempotency_key: str
    retry_on_failure: bool
    queue_timeout: _duration_pb2.Duration
    limits: _common_pb2.Limits
    def __init__(self, task_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., priority: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., max_retries: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., retry_on_failure: _Optional[bool] = ..., queue_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("job_id", "status", "output", "error", "exit_code", "created_at", "started_at", "completed_at", "worker_id", "stderr", "priority", "task_type", "payload", "metadata", "timeout", "retries", "max_retries", "stdout_bytes", "stderr_bytes", "output_truncated", "has_exit_code", "pending_reason", "selector", "result_metadata", "attempt", "broadcast_id", "node_id", "attempts", "retry_on_failure", "queue_timeout", "owner", "limits")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResultMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    PENDING_REASON_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RESULT_METADATA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: _common_pb2.JobStatus
    output: bytes
    error: str
    exit_code: int
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    worker_id: str
    stderr: bytes
    priority: int
    task_type: str
    payload: bytes
    metadata: _containers.ScalarMap[str, str]
    timeout: _duration_pb2.Duration
    retries: int
    max_retries: int
    stdout_bytes: int
    stderr_bytes: int
    output_truncated: bool
    has_exit_code: bool
    pending_reason: str
    selector: _containers.ScalarMap[str, str]
    result_metadata: _containers.ScalarMap[str, str]
    attempt: int
    broadcast_id: str
    node_id: str
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptInfo]
    retry_on_failure: bool
    queue_timeout: _duration_pb2.Duration
    owner: str
    limits: _common_pb2.Limits
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.JobStatus, str]] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ..., exit_code: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., worker_id: _Optional[str] = ..., stderr: _Optional[bytes] = ..., priority: _Optional[int] = ..., task_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retries: _Optional[int] = ..., max_retries: _Optional[int] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., output_truncated: _Optional[bool] = ..., has_exit_code: _Optional[bool] = ..., pending_reason: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., result_metadata: _Optional[_Mapping[str, str]] = ..., attempt: _Optional[int] = ..., broadcast_id: _Optional[str] = ..., node_id: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[AttemptInfo, _Mapping]]] = ..., retry_on_failure: _Optional[bool] = ..., queue_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ...) -> None: ...

class AttemptInfo(_message.Message):
    __slots__ = ("attempt", "node_id", "started_at", "ended_at", "outcome", "detail")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    node_id: str
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    outcome: str
    detail: str
    def __init__(self, attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id", "signal")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    signal: _common_pb2.StopSignal
    def __init__(self, job_id: _Optional[str] = ..., signal: _Optional[_Union[_common_pb2.StopSignal, str]] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled", "message")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    message: str
    def __init__(self, cancelled: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "offset", "status_filter", "broadcast_id", "owner")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FILTER_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    offset: int
    status_filter: _common_pb2.JobStatus
    broadcast_id: str
    owner: str
    def __init__(self, limit: _Optional[int] = ..., offset: _Optional[int] = ..., status_filter: _Optional[_Union[_common_pb2.JobStatus, str]] = ..., broadcast_id: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("job_id", "task_type", "status", "created_at", "exit_code", "has_exit_code", "worker_id", "priority", "started_at", "completed_at", "error", "summary", "broadcast_id", "owner")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_type: str
    status: _common_pb2.JobStatus
    created_at: _timestamp_pb2.Timestamp
    exit_code: int
    has_exit_code: bool
    worker_id: str
    priority: int
    started_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    error: str
    summary: str
    broadcast_id: str
    owner: str
    def __init__(self, job_id: _Optional[str] = ..., task_type: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.JobStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., has_exit_code: _Optional[bool] = ..., worker_id: _Optional[str] = ..., priority: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., summary: _Optional[str] = ..., broadcast_id: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "total")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSummary]
    total: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSummary, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class StreamOutputRequest(_message.Message):
    __slots__ = ("job_id", "no_follow", "stdout_offset", "stderr_offset", "include_result", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NO_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    STDOUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STDERR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    no_follow: bool
    stdout_offset: int
    stderr_offset: int
    include_result: bool
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., no_follow: _Optional[bool] = ..., stdout_offset: _Optional[int] = ..., stderr_offset: _Optional[int] = ..., include_result: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("data", "type", "offset", "attempt", "result")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    type: _common_pb2.OutputType
    offset: int
    attempt: int
    result: GetStatusResponse
    def __init__(self, data: _Optional[bytes] = ..., type: _Optional[_Union[_common_pb2.OutputType, str]] = ..., offset: _Optional[int] = ..., attempt: _Optional[int] = ..., result: _Optional[_Union[GetStatusResponse, _Mapping]] = ...) -> None: ...

class SubmitBroadcastRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: SubmitRequest
    def __init__(self, job: _Optional[_Union[SubmitRequest, _Mapping]] = ...) -> None: ...

class BroadcastTask(_message.Message):
    __slots__ = ("job_id", "node_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class SubmitBroadcastResponse(_message.Message):
    __slots__ = ("broadcast_id", "tasks")
    BROADCAST_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    broadcast_id: str
    tasks: _containers.RepeatedCompositeFieldContainer[BroadcastTask]
    def __init__(self, broadcast_id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[BroadcastTask, _Mapping]]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[SubmitRequest]
    def __init__(self, jobs: _Optional[_Iterable[_Union[SubmitRequest, _Mapping]]] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("job_ids",)
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchJobsRequest(_message.Message):
    __slots__ = ("job_ids", "no_output")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    NO_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    no_output: bool
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ..., no_output: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "output", "result", "accepted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    output: OutputChunk
    result: GetStatusResponse
    accepted: bool
    def __init__(self, job_id: _Optional[str] = ..., output: _Optional[_Union[OutputChunk, _Mapping]] = ..., result: _Optional[_Union[GetStatusResponse, _Mapping]] = ..., accepted: _Optional[bool] = ...) -> None: ...

class RunJobsRequest(_message.Message):
    __slots__ = ("jobs", "no_output")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NO_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[SubmitRequest]
    no_output: bool
    def __init__(self, jobs: _Optional[_Iterable[_Union[SubmitRequest, _Mapping]]] = ..., no_output: _Optional[bool] = ...) -> None: ...

class RunSessionRequests(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RunSessionRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RunSessionRequest, _Mapping]]] = ...) -> None: ...

class RunSessionRequest(_message.Message):
    __slots__ = ("tag", "run", "stop", "pause", "resume")
    TAG_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    tag: int
    run: RunJobsRequest
    stop: bool
    pause: bool
    resume: bool
    def __init__(self, tag: _Optional[int] = ..., run: _Optional[_Union[RunJobsRequest, _Mapping]] = ..., stop: _Optional[bool] = ..., pause: _Optional[bool] = ..., resume: _Optional[bool] = ...) -> None: ...

class RunSessionEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RunSessionEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RunSessionEvent, _Mapping]]] = ...) -> None: ...

class RunSessionEvent(_message.Message):
    __slots__ = ("tag", "event", "error_code", "error", "error_metadata")
    class ErrorMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TAG_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_METADATA_FIELD_NUMBER: _ClassVar[int]
    tag: int
    event: JobEvent
    error_code: int
    error: str
    error_metadata: _containers.ScalarMap[str, str]
    def __init__(self, tag: _Optional[int] = ..., event: _Optional[_Union[JobEvent, _Mapping]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ..., error_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "scaler")
    NODES_FIELD_NUMBER: _ClassVar[int]
    SCALER_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeInfo]
    scaler: ScalerStatus
    def __init__(self, nodes: _Optional[_Iterable[_Union[_common_pb2.NodeInfo, _Mapping]]] = ..., scaler: _Optional[_Union[ScalerStatus, _Mapping]] = ...) -> None: ...

class ScalerStatus(_message.Message):
    __slots__ = ("backend", "desired_replicas", "ready_replicas", "min_replicas", "max_replicas", "floor", "draining", "last_decision", "last_event", "last_event_at", "error")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    backend: str
    desired_replicas: int
    ready_replicas: int
    min_replicas: int
    max_replicas: int
    floor: int
    draining: _containers.RepeatedScalarFieldContainer[str]
    last_decision: str
    last_event: str
    last_event_at: _timestamp_pb2.Timestamp
    error: str
    def __init__(self, backend: _Optional[str] = ..., desired_replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., floor: _Optional[int] = ..., draining: _Optional[_Iterable[str]] = ..., last_decision: _Optional[str] = ..., last_event: _Optional[str] = ..., last_event_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class AuthDrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "undo")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    undo: bool
    def __init__(self, node_id: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class AuthDrainNodeResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class AuthWhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuthWhoAmIResponse(_message.Message):
    __slots__ = ("name", "role", "auth")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    auth: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., auth: _Optional[str] = ...) -> None: ...
