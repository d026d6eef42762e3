"""Domain types shared by master, worker, CLI and SDK.

Glossary (used everywhere in the code base):

- *Job*: what a client submitted and polls (``job_id`` on the wire).
- *Task*: the unit a worker runs (``task_id`` on the wire). One job is one task today, so a
  task id is its job id.
- *Attempt*: one try of a task on a node, numbered from 1. A retry is a new attempt.
- *Node*: a registered worker process, identified by its ``NodeId``.
- *Worker*: the program that a node runs.
- *Executor*: the plugin that runs a task of one type ("command", ...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import NewType

JobId = NewType("JobId", str)
NodeId = NewType("NodeId", str)

MIN_PRIORITY = 0
MAX_PRIORITY = 10


class JobStatus(enum.StrEnum):
    """A job's state. Terminal: COMPLETED, FAILED, CANCELLED, TIMEOUT."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.PENDING, JobStatus.RUNNING)


class ExecStatus(enum.StrEnum):
    """How one attempt ended on its worker."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"


class NodeStatus(enum.StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    SUSPECT = "SUSPECT"  # missed heartbeats, not yet declared dead: no new tasks
    DEGRADED = "DEGRADED"  # says it is unwell (Heartbeat.health): no new tasks


class Stream(enum.IntEnum):
    """Output stream of a task; the values are the wire's OutputType."""

    STDOUT = 0
    STDERR = 1


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """Resource limits of one task; 0 means "not set" (the worker's own limit applies)."""

    memory_bytes: int = 0
    cpu_time_s: float = 0.0
    max_procs: int = 0
    max_file_size_bytes: int = 0

    @property
    def any(self) -> bool:
        return bool(
            self.memory_bytes or self.cpu_time_s or self.max_procs or self.max_file_size_bytes
        )

    def within(self, ceiling: TaskLimits) -> bool:
        """No limit asked here is above the same limit of ``ceiling`` (0 there: no ceiling)."""
        pairs = (
            (self.memory_bytes, ceiling.memory_bytes),
            (self.cpu_time_s, ceiling.cpu_time_s),
            (self.max_procs, ceiling.max_procs),
            (self.max_file_size_bytes, ceiling.max_file_size_bytes),
        )
        return all(not most or asked <= most for asked, most in pairs)


NO_LIMITS = TaskLimits()


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a client asked to run."""

    task_type: str
    payload: bytes
    timeout_s: float
    priority: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    max_retries: int | None = None  # None: the master's default
    selector: dict[str, str] = field(default_factory=dict)  # labels a node must have
    node_id: str = ""  # pinned to this node (the per-node jobs of a broadcast)
    broadcast_id: str = ""
    idempotency_key: str = ""
    retry_on_failure: bool = False  # a failed command is retried too, not only a lost one
    queue_timeout_s: float = 0.0  # fail the job if it waits longer than this to start; 0: never
    owner: str = ""  # the identity that submitted it (set by the master, never by the client)
    limits: TaskLimits = field(default_factory=TaskLimits)


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Stream
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExecOutcome:
    """The result of one attempt, as its worker reports it."""

    status: ExecStatus
    exit_code: int | None = None
    error: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    duration_s: float = 0.0
    retryable: bool = False  # the worker gave up on it (shutdown): run it again elsewhere
    metadata: dict[str, str] = field(default_factory=dict)  # executor-specific (HTTP headers)


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended, as the job's history records it."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"  # its node died, was partitioned away or forgot the task
    LOST = "LOST"  # dispatching or following it failed
    RETURNED = "RETURNED"  # handed back (draining worker, refused): not counted as a retry
    RETRIED = "RETRIED"  # the command failed and the job asked for retries on failure
    NOT_STARTED = "NOT_STARTED"  # its start never reached the worker: not counted as a retry


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try of a job on a node."""

    attempt: int
    node_id: str
    started_at: datetime | None
    ended_at: datetime | None = None
    outcome: AttemptOutcome | None = None  # None while it runs
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the store records it."""

    id: JobId
    spec: TaskSpec
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    worker_id: str = ""
    attempt: int = 0
    retries: int = 0
    exit_code: int | None = None
    error: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    result_metadata: dict[str, str] = field(default_factory=dict)
    pending_reason: str = ""  # for a PENDING job: why it has not started
    attempts: tuple[AttemptRecord, ...] = ()  # oldest first; only where asked for
    worker_losses: int = 0  # attempts in a row whose worker was lost while running it


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """How the master reaches one registration of a node: its address, and the name the
    certificate there must carry (with TLS). The master keeps a channel per endpoint, so no
    registration changes how another node is dialled."""

    node_id: NodeId
    address: str
    tls_name: str = ""


@dataclass(slots=True)
class NodeInfo:
    """A registered worker as the master's registry tracks it (mutable bookkeeping)."""

    id: NodeId
    address: str
    capabilities: frozenset[str]
    max_tasks: int
    labels: dict[str, str]
    last_seen: float  # registry clock, seconds
    last_seen_wall: datetime
    status: NodeStatus = NodeStatus.HEALTHY
    active_tasks: int = 0  # slots the master has reserved on this node
    weight: int = 0  # share for weighted balancing; 0 means max_tasks
    task_limits: TaskLimits = field(default_factory=TaskLimits)  # most a task may have here
    registered_at: float = 0.0  # registry clock
    idle_since: float | None = None  # registry clock; None while a slot is reserved
    drain_requested: bool = False  # the auto scaler chose it for removal
    tls_name: str = ""  # the name its certificate must carry when the master dials it
    instance: str = ""  # new at each start of its process (empty: a worker that sends none)
    refused_until: float = 0.0  # registry clock: it refused a start (full, draining) just now

    @property
    def endpoint(self) -> NodeEndpoint:
        return NodeEndpoint(self.id, self.address, self.tls_name)

    @property
    def effective_weight(self) -> int:
        return self.weight if self.weight > 0 else self.max_tasks

    def matches(self, spec: TaskSpec) -> bool:
        """Runs this task type and carries every label of the task's selector."""
        return (
            spec.task_type in self.capabilities
            and spec.node_id in ("", self.id)
            and all(self.labels.get(k) == v for k, v in spec.selector.items())
            and spec.limits.within(self.task_limits)
        )

    @property
    def free_slots(self) -> int:
        return max(0, self.max_tasks - self.active_tasks)


@dataclass(frozen=True, slots=True)
class ScalerStatus:
    """What the master's auto scaler is doing, for ``dist-exec nodes``."""

    backend: str  # e.g. "kubernetes deployment default/dist-exec-worker"
    desired: int
    ready: int
    min_replicas: int
    max_replicas: int
    floor: int = 0  # an HPA's minReplicas, when one targets the same workers
    draining: tuple[str, ...] = ()  # workers chosen for removal, not gone yet
    last_decision: str = ""
    last_event: str = ""  # the last scale-up or scale-down, with its reason
    last_event_at: datetime | None = None
    error: str = ""  # the backend's last error; empty once a call succeeds again
