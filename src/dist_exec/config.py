"""Configuration of master and worker, and the small parsers flags and env values share."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from dist_exec.models import TaskLimits

if TYPE_CHECKING:
    from dist_exec.security.tls import TlsFiles

DEFAULT_MASTER_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024  # of a job's payload (a command's: with its stdin)
MAX_METADATA_BYTES = 64 * 1024  # of a job's metadata, and of its selector
MIN_TIMEOUT_S = 0.001  # the shortest timeout a job may have
RUNS_PER_SESSION = 1024  # runs followed at once on one RunSession stream
# A server raises its soft limit of open descriptors to the hard one, up to this (the commands
# a worker starts inherit it: a program that closes every descriptor up to the limit stays fast).
OPEN_FILES_WANTED = 65_536
# Of its descriptor limit, a server keeps this share for itself (database, logs, channels to
# workers, pipes) and accepts connections with the rest: a peer that opens connections and
# sends nothing (gRPC keeps those for ever) cannot take the master's last descriptor.
CONNECTIONS_SHARE = 0.75


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open descriptors towards the hard limit (at most
    OPEN_FILES_WANTED); the soft limit now."""
    import resource  # (Unix only, as the servers are)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):
            pass  # (kept as it was)
    return soft


def server_options(open_files: int) -> list[tuple[str, int]]:
    """gRPC server options of master and worker, for a process allowed ``open_files``
    descriptors. No SO_REUSEPORT: a second server on a port already in use must fail to start,
    not silently share the port (and the clients) with the first."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),  # find dead peers of long streams
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        # Connections beyond this are closed at once (new clients then cannot connect until
        # some go; those connected keep working).
        ("grpc.max_allowed_incoming_connections", max(16, int(open_files * CONNECTIONS_SHARE))),
    ]


MASTER_ENV = "DIST_EXEC_MASTER"

_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ms|s|m|h|d)", re.ASCII)
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+", re.ASCII)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


MAX_INT32 = 2**31 - 1  # the most an int32 field of the protocol holds
MAX_LIST_JOBS = 1000  # jobs per ListJobs answer


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '1h', '1h30m' or a bare number of seconds -> seconds."""
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    if _NUMBER.fullmatch(s):
        value = float(s)
    else:
        pos, value = 0, 0.0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos != len(s):
            raise ValueError(
                f"invalid duration {text!r}: use a number with a unit, e.g. 500ms, 30s, 5m, 1h"
            )
    return value


_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b?)")
_SIZE_UNIT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


# The most of a stream a master keeps (--max-output plus --output-tail): a job's status carries
# both streams' in one message of at most 64 MiB.
MAX_KEPT_OUTPUT = 30 * 1024**2


def parse_size(text: str) -> int:
    """'1048576', '512k', '4M', '4MiB', '1G' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(f"invalid size {text!r}: use bytes or a unit, e.g. 512k, 4M, 1G")
    return int(m.group(1)) * _SIZE_UNIT[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:g}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 86400:g}d"


def split_address(address: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port). An empty host stays empty."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isascii() or not port_s.isdigit():
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    port = int(port_s)
    if port > 65535:
        raise ValueError(f"invalid address {address!r}: port must be 0-65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"invalid address {address!r}: unbalanced [ ]")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid address {address!r}: write an IPv6 host in brackets, [::1]:PORT")
    return host, port


MAX_NODE_ID_CHARS = 253  # (a DNS name's length: a pod's or host's name fits)
MAX_NODE_SLOTS = 100_000
MAX_NODE_ATTRIBUTES = 256  # labels, and capabilities, each
MAX_NODE_ATTRIBUTE_BYTES = 64 * 1024  # all labels and capabilities together
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def node_problem(
    node_id: str,
    address: str,
    capabilities: Sequence[str],
    labels: Mapping[str, str],
    max_tasks: int = 1,
    weight: int = 0,
) -> str | None:
    """What is wrong with a worker's registration, in words, or None."""
    if not node_id:
        return "worker_id is empty"
    if (
        len(node_id) > MAX_NODE_ID_CHARS
        or not node_id.isprintable()
        or any(c.isspace() for c in node_id)
    ):
        return (
            f"worker_id {node_id[:60]!r} is not an id: up to {MAX_NODE_ID_CHARS} characters, "
            "no spaces or control characters"
        )
    if problem := _dialable_problem(address):
        return f"address {address[:80]!r} cannot be dialled: {problem}"
    if not 0 < max_tasks <= MAX_NODE_SLOTS:
        return f"max_concurrent_tasks must be 1-{MAX_NODE_SLOTS}, got {max_tasks}"
    if not 0 <= weight <= MAX_NODE_SLOTS:
        return f"weight must be 0-{MAX_NODE_SLOTS} (0: max_concurrent_tasks), got {weight}"
    return _attributes_problem(capabilities, labels)


def _attributes_problem(capabilities: Sequence[str], labels: Mapping[str, str]) -> str | None:
    """Labels and capabilities are matched as given, so little is refused: nothing empty
    where a name is needed, no control characters (they would split log lines), and not
    more than a worker could mean."""
    for kind, values in (("capabilities", list(capabilities)), ("labels", list(labels))):
        if len(values) > MAX_NODE_ATTRIBUTES:
            return f"more than {MAX_NODE_ATTRIBUTES} {kind} ({len(values)})"
    size = sum(map(len, capabilities)) + sum(len(k) + len(v) for k, v in labels.items())
    if size > MAX_NODE_ATTRIBUTE_BYTES:
        return f"labels and capabilities are larger than {MAX_NODE_ATTRIBUTE_BYTES} bytes"
    for name in capabilities:
        if not name or not name.isprintable():
            return f"capability {name[:60]!r} is empty or has control characters"
    for key, value in labels.items():
        if not key or not key.isprintable():
            return f"label key {key[:60]!r} is empty or has control characters"
        if not value.isprintable():
            return f"label {key}={value[:60]!r}: the value has control characters"
    return None


def _dialable_problem(address: str) -> str | None:
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return str(exc).partition(": ")[2]
    if not port > 0:
        return "its port is 0"
    if not host:
        return "it names no host"
    if address.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    elif len(host) > 253 or not _HOST_NAME.fullmatch(host):
        return f"{host[:60]!r} is not a host name or an IP address"
    return None


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial_address(address: str) -> str:
    """An address to connect to: ':50051', or a wildcard one ('0.0.0.0:50051', '[::]:50051':
    a server's listening on every interface), means this machine: its loopback address, which
    a server's TLS certificate names (0.0.0.0 it cannot)."""
    host, port = split_address(address)
    return join_address("127.0.0.1" if host in ("", "0.0.0.0", "::") else host, port)


def listen_address(address: str) -> str:
    """An address to bind: ':50051' means every interface."""
    host, port = split_address(address)
    return join_address(host or "0.0.0.0", port)


def check_bindable(address: str) -> None:
    """Raise OSError if nothing could listen on ``address`` now (in use, or not ours)."""
    host, port = split_address(listen_address(address))
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        probe.bind((host, port))


def advertised_address(listen: str, bound_port: int) -> str:
    """The address others should dial: the bound port on the host we listen on."""
    host, _ = split_address(listen)
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostbyname(socket.gethostname())
    return join_address(host, bound_port)


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("dist-exec"))


def default_worker_id() -> str:
    return os.environ.get("WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


SCALER_BACKENDS = ("none", "local", "kubernetes")


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    """The master's auto scaler: which backend, and the policy's bounds and timings."""

    backend: str = "none"  # none | local | kubernetes
    min_replicas: int = 1
    max_replicas: int = 20
    tasks_per_worker: int = (
        10  # slots a new worker brings (and --max-concurrent-tasks of local ones)
    )
    scale_up_threshold: int = 2  # backlog above workers x this adds one worker
    scale_down_delay_s: float = 120.0  # a worker idle this long may be removed
    scale_up_cooldown_s: float = 15.0  # between two scale-ups
    scale_down_cooldown_s: float = 60.0  # after any scale event, before a scale-down
    min_worker_lifetime_s: float = 60.0  # a worker younger than this is never removed
    scale_down_utilization: float = 0.5  # remove only while running <= this share of what stays
    interval_s: float = 1.0  # how often the scaler looks
    namespace: str = ""  # kubernetes: empty = the service account's (or the kubeconfig's)
    deployment: str = "dist-exec-worker"
    kubeconfig: str = ""  # empty: in-cluster service account, else $KUBECONFIG, ~/.kube/config
    local_worker_args: tuple[str, ...] = ()  # more `dist-exec worker` arguments (TLS files)

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


@dataclass(frozen=True, slots=True)
class MasterConfig:
    listen: str = DEFAULT_MASTER_ADDRESS
    data_dir: Path = field(default_factory=default_data_dir)
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 15.0  # no heartbeat for this long -> UNHEALTHY
    node_removal_s: float = 30.0  # -> forgotten; it must register again
    default_timeout_s: float = 3600.0
    max_timeout_s: float = 7 * 86400.0
    default_max_retries: int = 3
    retry_backoff_s: float = 1.0  # first retry waits about this long, doubling each time
    retry_backoff_max_s: float = 60.0
    poison_threshold: int = 3  # a task whose workers died this many times in a row is failed
    max_output_bytes: int = 4 * 1024 * 1024  # head kept per stream per job
    output_tail_bytes: int = 1024 * 1024  # and the last bytes, when a stream is longer
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    dispatch_grace_s: float = 30.0  # master RPC deadline = task timeout + this
    rpc_timeout_s: float = 10.0  # unary calls to workers
    balancer: str = "round-robin"
    rate_limit_per_s: float = 1000.0  # jobs per second per client; 0 turns it off
    rate_burst: int = 2000
    max_queued: int = 100_000  # jobs waiting; more are refused, nothing accepted is dropped
    # What the payloads of jobs waiting or running may hold (the master keeps them in memory);
    # one identity's at most half of it.
    max_payload_memory: int = 1024**3
    idempotency_retention_s: float = 86400.0  # how long a submit's idempotency key is honoured
    job_retention_s: float = 7 * 86400.0  # ended jobs are deleted this long after; 0: never
    priority_aging_s: float = 60.0  # a waiting job gains a priority level this often; 0: never
    allowed_commands: tuple[str, ...] = ()  # globs; empty: any command
    allowed_env: tuple[str, ...] = ()  # globs: what a job may set under allowed_commands
    blocked_commands: tuple[str, ...] = ()
    tls: TlsFiles | None = None  # mutual TLS on every connection (clients and workers)
    tokens_file: Path | None = None  # None: DATA_DIR/tokens.json; auth is required if it exists
    audit_log: Path | None = None  # None: DATA_DIR/audit.log
    audit_max_bytes: int = 100 * 1024 * 1024  # rotated past this; 0: never
    audit_keep: int = 10  # rotated files kept (audit.log.1 ... .N)
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    master: str = DEFAULT_MASTER_ADDRESS
    listen: str = "127.0.0.1:0"
    advertise: str = ""  # empty: derived from listen and the bound port
    worker_id: str = field(default_factory=default_worker_id)
    max_concurrent_tasks: int = 10
    weight: int = 0  # share under weighted balancing; 0 = max_concurrent_tasks
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_s: float = 5.0  # until the master says otherwise
    drain_timeout_s: float = 30.0
    max_output_bytes: int = 4 * 1024 * 1024  # kept per stream per attempt
    result_retention_s: float = 600.0  # undelivered results are held this long
    kill_grace_s: float = 5.0  # TERM, then KILL after this long
    inherit_env: bool = False  # pass the worker's own environment to commands
    allowed_commands: tuple[str, ...] = ()  # checked again here: a forged request is refused
    allowed_env: tuple[str, ...] = ()
    blocked_commands: tuple[str, ...] = ()
    rpc_timeout_s: float = 10.0
    tls: TlsFiles | None = None  # serve mutual TLS (only the master's certificate may call)
    token: str = ""  # sent to the master when it authenticates by tokens (no TLS)
    # What a caller of this worker must send (given to the master at registration); empty: a
    # new random one at each start.
    call_token: str = ""
    task_limits: TaskLimits = field(default_factory=TaskLimits)  # default and ceiling per task
    containment: str = "auto"  # auto | cgroup | rlimit: how task limits are enforced
    task_types: tuple[str, ...] = ()  # executors this worker runs (empty: every installed one)
    run_as: str | None = None  # None: "nobody" when the worker runs as root, else its own user
    run_as_pool: str = ""  # FIRST-LAST: each task runs as a uid of its own from this range
    http_timeout_s: float = 30.0  # an HTTP job's limit unless its payload sets timeout_seconds
    http_max_body_bytes: int = 4 * 1024 * 1024  # of an HTTP job's response body, kept
