"""Containment of commands: resource limits through cgroups or rlimits, and the user they run as.

The worker picks a mode once, at start-up. With **cgroups** (v1 or v2, detected) each limited
task gets its own cgroup below a parent the worker owns (``dist-exec-<pid>`` inside the worker's
own cgroup), joined by the child itself between fork and exec, so nothing it starts can escape:
memory and processes are the kernel's limits on the whole tree, CPU time is the tree's total
(read from the cgroup while the task runs). Without cgroups, **rlimits** apply to each process:
RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (counted per user, so it needs a dedicated user) and
a count of the task's processes. RLIMIT_FSIZE (largest file) and RLIMIT_CPU apply in both modes.

When a limit is reached the task is killed and the limit named (see ``limits.Exceeded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import grp
import logging
import os
import pwd
import resource
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from dist_exec import procfs
from dist_exec.executors.limits import Exceeded, LimitKind
from dist_exec.executors.spawner import (
    POOL_UMASK,
    Spawner,
    SpawnerError,
    no_new_privileges,
)
from dist_exec.models import TaskLimits
from dist_exec.security.private_files import open_private, private_dir

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")
POLL_S = 0.05  # how often a running task's usage is read
EMPTY_WAIT_S = 5.0  # how long to wait for a task's cgroup to empty after killing it
SPAWNER_RESTART_S = 10.0  # a command spawner that ended is replaced at most this often


class Mode(enum.StrEnum):
    AUTO = "auto"  # cgroups when this host lets the worker use them, else rlimits
    CGROUP = "cgroup"
    RLIMIT = "rlimit"


class ContainmentError(Exception):
    """The requested containment cannot be set up on this host (said at start-up)."""


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user commands run as: uid and gid set, supplementary groups dropped."""

    name: str
    uid: int
    gid: int
    home: str


def resolve_run_as(name: str | None) -> RunAs | None:
    """The user commands run as; None: the worker's own. A worker running as root runs commands
    as ``nobody`` unless told otherwise (``--run-as root`` keeps root)."""
    euid = os.geteuid()
    if name is None:
        if euid != 0:
            return None
        name = "nobody"
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise ContainmentError(f"--run-as: no user {name!r} on this host") from None
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise ContainmentError(
            f"--run-as {name}: the worker must run as root to run commands as another user"
        )
    home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


MIN_POOL_UID = 1000  # below: system users
POOL_CLAIMS = Path("/run/dist-exec/uid-pools.lock")  # (see UidPool)
KILL_ROUNDS = 50  # a task's uid is given back once a scan finds none of its processes


def parse_uid_pool(text: str) -> range:
    """--run-as-pool FIRST-LAST: uids no user of this host has, and that no process runs as
    (each task's processes are killed by uid when it ends). ContainmentError if not."""
    first, dash, last = text.partition("-")
    try:
        pool = range(int(first), int(last) + 1)
    except ValueError:
        raise ContainmentError(
            f"--run-as-pool {text!r}: expected FIRST-LAST, e.g. 61000-61999"
        ) from None
    if not dash or not MIN_POOL_UID <= pool.start < pool.stop <= 2**31 - 1:
        raise ContainmentError(
            f"--run-as-pool {text!r}: expected FIRST-LAST with {MIN_POOL_UID} <= FIRST <= LAST"
        )
    if os.geteuid() != 0:
        raise ContainmentError("--run-as-pool: the worker must run as root")
    # Asked of each uid (NSS: LDAP or sssd users too, which a listing may not show); and a
    # task's gid is its uid's number: one that is a group's would give tasks its files.
    for number in pool:
        with contextlib.suppress(KeyError):
            user = pwd.getpwuid(number).pw_name
            raise ContainmentError(f"--run-as-pool {text}: uid {number} belongs to user {user}")
        with contextlib.suppress(KeyError):
            group = grp.getgrgid(number).gr_name
            raise ContainmentError(f"--run-as-pool {text}: gid {number} is group {group}")
    running = {uid for pid in procfs.pids() for uid in _ids_of(pid) & set(pool) if _live(pid)}
    if running:
        raise ContainmentError(f"--run-as-pool {text}: processes run as uid {min(running)}")
    return pool


class UidPool:
    """A uid for each task; given back once every process of the task's uid is gone.

    ``claims``: a file every worker of this host locks its range in (a write lock on bytes
    FIRST..LAST, released however the worker ends), so that two workers never hand out the
    same uid: each would kill the other's task at its own task's end. None: not claimed."""

    def __init__(self, uids: range, claims: Path | None = POOL_CLAIMS) -> None:
        self.uids = uids
        self._free = deque(uids)
        self._claim = _claim(uids, claims) if claims is not None else -1
        # What tasks of a worker that died (or was killed) before it could give their uids
        # back left in the shared directories: not for the next task of the same uid.
        _put_aside(uids)

    def close(self) -> None:
        """Give the range up (the worker ends). (Closing a descriptor of the claims file drops
        every lock this process holds in it: one pool to a process.)"""
        if self._claim >= 0:
            os.close(self._claim)
            self._claim = -1

    def take(self) -> RunAs:
        if not self._free:
            raise OSError(errno.EAGAIN, "no free uid in --run-as-pool (processes left running)")
        uid = self._free.popleft()
        return RunAs(f"uid{uid}", uid, uid, "/")

    def give_back(self, uid: int) -> None:
        """Kill every process of ``uid`` (the task's, wherever they went; also one that has
        it, or its gid, only as its effective or saved id), put the files it left in the
        shared temporary directories out of any later task's reach, then free it; one that
        cannot be killed keeps it out of the pool. Those files are removed after, in a thread
        of their own: however many or deep they are, the task's end does not wait for that."""
        for _ in range(KILL_ROUNDS):
            _kill_all_of(uid)
            left = [pid for pid in procfs.pids() if _runs_as(pid, uid)]
            if not left:
                _put_aside(range(uid, uid + 1))
                self._free.append(uid)
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(POLL_S)
        log.error("processes of uid %d outlive SIGKILL; the uid is not used again", uid)


def _put_aside(owners: range) -> None:
    """Put what ``owners`` left in TEMP_DIRS out of reach at once (set_aside), and remove it
    in a thread of its own: however much or deep it is, nobody waits for that."""
    moved = [found for d in TEMP_DIRS if (found := set_aside(owners, d)) is not None]
    if moved:
        name = f"remove-{owners.start}" + (f"-{owners.stop - 1}" if len(owners) > 1 else "")
        threading.Thread(target=_remove, args=(moved,), name=name, daemon=True).start()


def _claim(uids: range, path: Path) -> int:
    """Lock ``uids`` on this host for this process (see UidPool): the descriptor that holds
    the lock; ContainmentError when another process holds any of them."""
    text = f"{uids.start}-{uids.stop - 1}"
    try:
        private_dir(path.parent)
        fd = open_private(path, os.O_RDWR)
    except OSError as exc:
        raise ContainmentError(
            f"--run-as-pool {text}: cannot claim the uids in {path}: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, len(uids), uids.start, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise ContainmentError(
                f"--run-as-pool {text}: cannot claim the uids in {path}: {exc.strerror}"
            ) from None
        raise ContainmentError(
            f"--run-as-pool {text}: another worker on this host has uids of this range in its "
            "pool; give each worker a range of its own"
        ) from None
    return fd


def _kill_all_of(uid: int) -> None:
    """SIGKILL every process of ``uid`` at once: kill(-1) from a process of that uid reaches
    all of them in one pass of the kernel, also one that forks and exits faster than a scan of
    /proc can find it (a fork under way fails once its parent has the signal)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["/bin/sh", "-c", "kill -9 -1"],  # (the shell's own kill: all but itself)
            user=uid, group=uid, extra_groups=[], cwd="/", env={},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=10, check=False,
        )  # fmt: skip


def _runs_as(pid: int, uid: int) -> bool:
    """Whether a live process (not a zombie) has ``uid`` as one of its user ids, or as one
    of its group ids (a pool's gid is its uid's number)."""
    return uid in _ids_of(pid) and _live(pid)


def _ids_of(pid: int) -> set[int]:
    """The user and group ids of a process (none once gone)."""
    ids = procfs.ids(pid)
    return set() if ids is None else {*ids[0], *ids[1]}


def _live(pid: int) -> bool:
    return procfs.live(pid) is not None  # (a zombie holds nothing, and waits to be reaped)


# Where any user may leave files: what a task's uid left there goes with the uid (the next task
# to get it must not read, or run, what an earlier one left: the uids are used again).
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
SET_ASIDE = ".dist-exec-left-"  # (+ a random name: a directory of root's only, mode 0700)
# World-writable directories looked into for a uid's files, below a temporary directory.
SEARCH_DEPTH = 16
SEARCH_DIRS = 10_000


def set_aside(owners: Container[int], directory: str) -> Path | None:
    """Move what a uid of ``owners`` owns in ``directory`` (and in the world-writable
    directories under it, on its file system) into a new directory there that only root may
    enter; that
    directory, if anything was moved. A rename each, whatever it holds. Through directory
    descriptors, never following a symbolic link (a link is moved, not what it names)."""
    try:
        top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    opened = [top]
    try:
        device = os.fstat(top).st_dev
        found: list[tuple[int, str]] = []  # (directory fd, name)
        pending = [(top, 0)]
        while pending:
            dir_fd, depth = pending.pop()
            with contextlib.suppress(OSError):
                for name in os.listdir(dir_fd):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                        if st.st_dev != device:
                            continue
                        if st.st_uid in owners:
                            found.append((dir_fd, name))
                        elif (
                            stat.S_ISDIR(st.st_mode)
                            and st.st_mode & stat.S_IWOTH
                            and depth < SEARCH_DEPTH
                            and len(opened) < SEARCH_DIRS
                        ):
                            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                            sub = os.open(name, flags, dir_fd=dir_fd)
                            opened.append(sub)
                            # (not one put there since it was looked at)
                            if os.path.samestat(os.fstat(sub), st):
                                pending.append((sub, depth + 1))
        if not found:
            return None
        aside = f"{SET_ASIDE}{uuid.uuid4().hex}"
        os.mkdir(aside, 0o700, dir_fd=top)
        target = os.open(aside, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
        opened.append(target)
        for number, (dir_fd, name) in enumerate(found):
            with contextlib.suppress(OSError):
                os.rename(name, str(number), src_dir_fd=dir_fd, dst_dir_fd=target)
        return Path(directory) / aside
    except OSError as exc:
        log.error("cannot set aside what uids %s left in %s: %s", owners, directory, exc)
        return None
    finally:
        for fd in opened:
            os.close(fd)


def _remove(paths: list[Path]) -> None:
    """Remove set-aside trees (rm: no depth limit, nothing followed, one file system)."""
    for path in paths:
        done = subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            log.error("cannot remove %s: %s", path, done.stderr.decode(errors="replace").strip())


# ---- cgroups ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Files:
    """Where one cgroup version keeps what we use."""

    memory_max: str
    swap_max: str
    pids_max: str
    pids_events: str
    oom_events: str
    oom_key: str


_V1 = _Files(
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "pids.max",
    "pids.events",
    "memory.oom_control",
    "oom_kill",
)
_V2 = _Files(
    "memory.max", "memory.swap.max", "pids.max", "pids.events", "memory.events", "oom_kill"
)


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _counter(path: Path, key: str) -> int:
    """A 'key N' line of a cgroup events file; 0 when absent."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class Cgroups:
    """The worker's parent cgroups and the per-task cgroups below them."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        self.parents = parents  # controller ("memory", "pids", "cpuacct"; "" for v2) -> dir
        self.files = _V1 if version == 1 else _V2

    @classmethod
    def create(cls, root: Path = CGROUP_ROOT) -> Cgroups:
        """Make this worker's parent cgroups; ContainmentError says why it cannot."""
        try:
            own = _own_cgroups()
        except OSError as exc:
            raise ContainmentError(f"cannot read /proc/self/cgroup: {exc}") from None
        name = f"dist-exec-{os.getpid()}"
        if set(own) == {""}:  # a pure v2 host: one hierarchy
            return cls(2, {"": _v2_parent(root / own[""].lstrip("/"), name)})
        parents: dict[str, Path] = {}
        for controller in ("memory", "pids", "cpuacct"):
            if controller not in own or not (root / controller).is_dir():
                raise ContainmentError(f"cgroup v1 controller {controller} is not mounted")
            base = root / controller / own[controller].lstrip("/")
            _sweep(base)
            try:
                (base / name).mkdir(exist_ok=True)
            except OSError as exc:
                raise ContainmentError(f"cannot create a cgroup in {base}: {exc}") from None
            parents[controller] = base / name
        return cls(1, parents)

    def task(self, name: str, limits: TaskLimits) -> TaskCgroup:
        """A new cgroup for one task with ``limits`` written to it."""
        dirs: dict[str, Path] = {}
        try:
            for controller, parent in self.parents.items():
                if self.version == 1 and not _wants(controller, limits):
                    continue
                path = parent / name
                path.mkdir()
                dirs[controller] = path
            group = TaskCgroup(self, dirs, limits)
            group.apply()
        except OSError:
            for path in dirs.values():
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return group

    def close(self) -> None:
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()


def _wants(controller: str, limits: TaskLimits) -> bool:
    return {
        "memory": bool(limits.memory_bytes),
        "pids": bool(limits.max_procs),
        "cpuacct": bool(limits.cpu_time_s),
    }[controller]


def _v2_parent(own: Path, name: str) -> Path:
    """On v2, controllers can be delegated only from a cgroup without processes: move the worker
    into a leaf of its own cgroup first, then enable memory, pids and cpu below it."""
    try:
        _sweep(own)
        available = (own / "cgroup.controllers").read_text().split()
        missing = {"memory", "pids", "cpu"} - set(available)
        if missing:
            raise ContainmentError(f"cgroup v2 controllers unavailable: {', '.join(missing)}")
        leaf = own / "dist-exec-worker"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(own / "cgroup.subtree_control", "+memory +pids +cpu")
        parent = own / name
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
    except OSError as exc:
        raise ContainmentError(f"cannot delegate cgroup v2 controllers in {own}: {exc}") from None
    return parent


def _sweep(base: Path) -> None:
    """Remove what workers that died without cleaning up left in ``base`` (empty cgroups)."""
    with contextlib.suppress(OSError):
        for stale in base.glob("dist-exec-[0-9]*"):
            pid = int(stale.name.rsplit("-", 1)[1])
            if pid == os.getpid() or Path(f"/proc/{pid}").exists():
                continue
            for task in stale.iterdir():
                if task.is_dir():
                    with contextlib.suppress(OSError):
                        task.rmdir()
            with contextlib.suppress(OSError):
                stale.rmdir()


class TaskCgroup:
    """One task's cgroup (one directory per controller on v1)."""

    def __init__(self, cgroups: Cgroups, dirs: dict[str, Path], limits: TaskLimits) -> None:
        self.cgroups = cgroups
        self.dirs = dirs
        self.limits = limits
        self.procs_files = tuple(str(d / "cgroup.procs") for d in dirs.values())

    def _dir(self, controller: str) -> Path | None:
        return self.dirs.get("" if self.cgroups.version == 2 else controller)

    def apply(self) -> None:
        files, limits = self.cgroups.files, self.limits
        memory = self._dir("memory")
        if limits.memory_bytes and memory is not None:
            _write(memory / files.memory_max, str(limits.memory_bytes))
            swap = memory / files.swap_max
            if swap.exists():  # no swapping past the limit
                _write(swap, "0" if self.cgroups.version == 2 else str(limits.memory_bytes))
        pids = self._dir("pids")
        if limits.max_procs and pids is not None:
            _write(pids / files.pids_max, str(limits.max_procs))

    def cpu_time_s(self) -> float:
        if self.cgroups.version == 2:
            return _counter(self.dirs[""] / "cpu.stat", "usage_usec") / 1e6
        cpuacct = self._dir("cpuacct")
        if cpuacct is None:
            return 0.0
        with contextlib.suppress(OSError, ValueError):
            return int((cpuacct / "cpuacct.usage").read_text()) / 1e9
        return 0.0

    def exceeded(self) -> LimitKind | None:
        files, limits = self.cgroups.files, self.limits
        memory = self._dir("memory")
        if (
            limits.memory_bytes
            and memory is not None
            and _counter(memory / files.oom_events, files.oom_key)
        ):
            return LimitKind.MEMORY
        pids = self._dir("pids")
        if limits.max_procs and pids is not None and _counter(pids / files.pids_events, "max"):
            return LimitKind.PROCS
        if limits.cpu_time_s and self.cpu_time_s() >= limits.cpu_time_s:
            return LimitKind.CPU_TIME
        return None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in Path(procs).read_text().split())
        return found

    def kill_all(self) -> None:
        """SIGKILL everything in the cgroup, also what left the task's process group."""
        if self.cgroups.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs[""] / "cgroup.kill", "1")
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (it may take a moment to empty)."""
        deadline = time.monotonic() + EMPTY_WAIT_S
        while self.pids() and time.monotonic() < deadline:
            self.kill_all()
            time.sleep(0.01)
        for path in self.dirs.values():
            try:
                path.rmdir()
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", path, exc)


# ---- what a task runs under ------------------------------------------------------------------


def _rlimits(limits: TaskLimits, cgroup: bool) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the child. CPU: SIGXCPU at the limit, SIGKILL a second later."""
    out = []
    if limits.cpu_time_s:
        seconds = max(1, int(-(-limits.cpu_time_s // 1)))  # whole seconds, rounded up
        out.append((resource.RLIMIT_CPU, seconds, seconds + 1))
    if limits.max_file_size_bytes:
        size = limits.max_file_size_bytes
        out.append((resource.RLIMIT_FSIZE, size, size))
    if not cgroup:
        if limits.memory_bytes:
            out.append((resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))
        if limits.max_procs:
            out.append((resource.RLIMIT_NPROC, limits.max_procs, limits.max_procs))
    return out


class Jail:
    """What one task runs under: its cgroup (if any), rlimits and user. Cleaned by ``close``."""

    def __init__(
        self,
        limits: TaskLimits,
        cgroup: TaskCgroup | None,
        run_as: RunAs | None,
        spawner: Spawner | None = None,
        pool: UidPool | None = None,
    ) -> None:
        """``pool``: ``run_as`` was taken from it for this task alone (given back by close)."""
        self.limits = limits
        self.cgroup = cgroup
        self.run_as = run_as
        self.pool = pool
        self._rlimits = _rlimits(limits, cgroup is not None)
        self._spawner = spawner

    @property
    def needs_close(self) -> bool:
        return self.cgroup is not None or self.pool is not None

    @property
    def spawner(self) -> Spawner | None:
        """The process that starts this task as its user without a fork of the worker, when
        one runs and the task needs no step between fork and exec (limits)."""
        spawner = self._spawner
        if spawner is None or not spawner.alive or self._rlimits or self.cgroup is not None:
            return None
        return spawner

    @property
    def watched(self) -> bool:
        """Whether the task's usage must be read while it runs (see ``exceeded_now``)."""
        return self.cgroup is not None or bool(self.limits.max_procs)

    def spawn_options(self, cwd: str | None) -> tuple[str | None, dict[str, object]]:
        """subprocess's working directory and other keyword arguments: the user switch, and a
        pre-exec step when limits apply (it joins the cgroup and sets rlimits as root, then
        drops to the user). Under another user the working directory is entered as that user
        (subprocess's own ``cwd`` is entered before the switch: as root, into a directory the
        user could not reach), so a pre-exec step does it, after the switch."""
        run_as = self.run_as
        if run_as is None and not self._rlimits and self.cgroup is None:
            return cwd, {}
        procs_files, rlimits = self.cgroup.procs_files if self.cgroup else (), self._rlimits
        # (A pool of one uid is one user's, as --run-as: nothing for a copy to give another.)
        pooled = self.pool is not None and len(self.pool.uids) > 1
        refuse_privileges = no_new_privileges() if pooled else None
        # Runs in the forked child before exec: syscalls only, nothing that takes a lock.
        setrlimit, getpid, os_open, os_write, os_close, chdir, umask = (
            resource.setrlimit,
            os.getpid,
            os.open,
            os.write,
            os.close,
            os.chdir,
            os.umask,
        )

        def enter() -> None:
            pid = str(getpid()).encode()
            for procs in procs_files:
                fd = os_open(procs, os.O_WRONLY)
                try:
                    os_write(fd, pid)
                finally:
                    os_close(fd)
            for which, soft, hard in rlimits:
                setrlimit(which, (soft, hard))
            if run_as is not None:
                os.setgroups([])
                os.setgid(run_as.gid)
                os.setuid(run_as.uid)
            if refuse_privileges is not None:
                refuse_privileges()  # (see no_new_privileges)
                umask(POOL_UMASK)
            if cwd is not None:
                chdir(cwd)

        return (None if run_as is not None else cwd), {"preexec_fn": enter}

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """The identity variables of the user the command runs as."""
        if self.run_as is None:
            return env
        return {
            **env,
            "HOME": self.run_as.home,
            "USER": self.run_as.name,
            "LOGNAME": self.run_as.name,
        }

    def exceeded_now(self, session: int, stderr_tail: bytes) -> Exceeded | None:
        """While the task runs: a limit it has reached (the caller then kills it). Under rlimits a
        refused fork shows only in what the task prints (RLIMIT_NPROC counts the whole user)."""
        if self.cgroup is not None:
            return self._exceeded(self.cgroup.exceeded())
        if self.limits.max_procs and (
            _count_session(session) >= self.limits.max_procs
            or _rlimit_failure(self.limits, stderr_tail) == LimitKind.PROCS
        ):
            return self._exceeded(LimitKind.PROCS)
        return None

    def verdict(self, returncode: int, stderr_tail: bytes) -> Exceeded | None:
        """After the task's main process ended: the limit that ended it, if one did."""
        kind = self.cgroup.exceeded() if self.cgroup is not None else None
        signalled = -returncode if returncode < 0 else returncode - 128
        if kind is None and self.limits.cpu_time_s and signalled == signal.SIGXCPU:
            kind = LimitKind.CPU_TIME
        if kind is None and self.limits.max_file_size_bytes and signalled == signal.SIGXFSZ:
            kind = LimitKind.FILE_SIZE
        if kind is None and self.cgroup is None:
            kind = _rlimit_failure(self.limits, stderr_tail)
            if kind == LimitKind.MEMORY and returncode == 0:
                kind = None  # it printed about memory, but coped
        return self._exceeded(kind)

    def spawn_failure(self, exc: OSError) -> Exceeded | None:
        """exec refused because the user already runs RLIMIT_NPROC processes."""
        if exc.errno == errno.EAGAIN and self.cgroup is None and self.limits.max_procs:
            return self._exceeded(LimitKind.PROCS)
        return None

    def _exceeded(self, kind: LimitKind | None) -> Exceeded | None:
        if kind is None:
            return None
        value = {
            LimitKind.MEMORY: self.limits.memory_bytes,
            LimitKind.CPU_TIME: self.limits.cpu_time_s,
            LimitKind.PROCS: self.limits.max_procs,
            LimitKind.FILE_SIZE: self.limits.max_file_size_bytes,
        }[kind]
        return Exceeded(kind, value)

    def kill_all(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def close(self) -> None:
        """Blocking: run it in a thread."""
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.pool is not None and self.run_as is not None:
            self.pool.give_back(self.run_as.uid)  # (kills what is left of the task first)


# What a program prints when an allocation or a fork fails: with rlimits the kernel refuses the
# request (ENOMEM, EAGAIN) instead of killing, so this is how the limit shows.
_MEMORY_FAILURES = (b"MemoryError", b"Cannot allocate memory", b"out of memory", b"bad_alloc")
_FORK_FAILURES = (
    b"cannot fork",  # dash
    b"can't fork",
    b"fork: ",  # bash: "fork: retry: Resource temporarily unavailable"
    b"fork failed",
    b"[errno 11] resource temporarily unavailable",  # Python's os.fork
)


def _rlimit_failure(limits: TaskLimits, stderr_tail: bytes) -> LimitKind | None:
    lower = stderr_tail.lower()
    if limits.memory_bytes and any(m.lower() in lower for m in _MEMORY_FAILURES):
        return LimitKind.MEMORY
    if limits.max_procs and any(m in lower for m in _FORK_FAILURES):
        return LimitKind.PROCS
    return None


def _count_session(session: int) -> int:
    """Processes of a session (the task's, led by its first process), zombies excluded."""
    return sum(
        1 for pid in procfs.pids() if (f := procfs.live(pid)) is not None and int(f[3]) == session
    )


class Containment:
    """A worker's means of containing commands, chosen once at start-up."""

    def __init__(
        self,
        limits: TaskLimits | None = None,
        cgroups: Cgroups | None = None,
        run_as: RunAs | None = None,
        spawner: Spawner | None = None,
        pool: UidPool | None = None,
    ) -> None:
        self.limits = limits or TaskLimits()  # the worker's: default and ceiling
        self.cgroups = cgroups
        self.run_as = run_as
        self.pool = pool  # a uid per task instead of ``run_as``
        self.spawner = spawner  # starts commands as ``run_as`` (see spawner.py)
        self._starting: _SpawnerStart | None = None  # a new spawner being started
        self._next_start = 0.0  # monotonic time before which no spawner is started again
        self._closed = False

    @classmethod
    def start(
        cls,
        mode: Mode,
        limits: TaskLimits,
        run_as: str | None,
        create_cgroups: Callable[[], Cgroups] = Cgroups.create,
        uid_pool: range | None = None,
    ) -> Containment:
        """``uid_pool`` (parse_uid_pool): each task runs as a uid of its own from it."""
        user = resolve_run_as(run_as) if uid_pool is None else None
        cgroups = None
        if mode != Mode.RLIMIT:
            try:
                cgroups = create_cgroups()
            except ContainmentError as exc:
                if mode == Mode.CGROUP:
                    raise
                log.info("no cgroups for task limits (%s); using rlimits", exc)
        pool = UidPool(uid_pool) if uid_pool is not None else None
        spawner = None
        ids = _spawner_ids(user, pool)
        if ids is not None:
            try:
                spawner = Spawner(*ids)
            except SpawnerError as exc:
                log.warning("%s; the worker forks to start each command", exc)
            else:
                with contextlib.suppress(RuntimeError):  # (no event loop: at its first start)
                    spawner.attach()
        return cls(limits, cgroups, user, spawner, pool)

    @property
    def mode(self) -> str:
        return f"cgroup-v{self.cgroups.version}" if self.cgroups else Mode.RLIMIT.value

    def jail(self, name: str, limits: TaskLimits) -> Jail:
        """Everything a task with ``limits`` runs under; ``close`` it when the task is over."""
        cgroup = None
        wants_cgroup = limits.memory_bytes or limits.max_procs or limits.cpu_time_s
        if self.cgroups is not None and wants_cgroup:
            cgroup = self.cgroups.task(name, limits)
        if self.pool is None:
            return Jail(limits, cgroup, self.run_as, self._live_spawner())
        try:
            user = self.pool.take()
        except OSError:
            if cgroup is not None:
                cgroup.remove()
            raise
        return Jail(limits, cgroup, user, self._live_spawner(), self.pool)

    def _live_spawner(self) -> Spawner | None:
        """The spawner, if it runs. One that ended is replaced in the background (at most once
        per SPAWNER_RESTART_S); meanwhile the worker forks commands itself."""
        spawner = self.spawner
        ids = _spawner_ids(self.run_as, self.pool)
        if spawner is None or spawner.alive or ids is None:
            return spawner
        now = time.monotonic()
        if self._starting is None and now >= self._next_start and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            self._next_start = now + SPAWNER_RESTART_S
            self._starting = _SpawnerStart(ids, lambda: loop.call_soon_threadsafe(self._started))
            self._starting.start()
        return None

    def _started(self) -> None:
        starting, self._starting = self._starting, None
        if starting is None:  # closed meanwhile (the new spawner with it)
            return
        new = starting.result
        if isinstance(new, SpawnerError):
            log.error("%s; the worker goes on forking commands", new)
            return
        assert new is not None
        old, self.spawner = self.spawner, new
        new.attach()
        if old is not None:
            old.close()  # (it ended: only reaped)
        log.info("command spawner %d started", new.pid)

    def close(self) -> None:
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.abandon()  # not waited for: a slow start must not hold up the worker's end
        if self.spawner is not None:
            self.spawner.close()
        if self.cgroups is not None:
            self.cgroups.close()
        if self.pool is not None:
            self.pool.close()


class _SpawnerStart(threading.Thread):
    """Starts a command spawner without holding up the event loop (a Python start-up)."""

    def __init__(self, ids: tuple[int, int, int], done: Callable[[], object]) -> None:
        super().__init__(name="spawner-start", daemon=True)
        self.ids = ids
        self.result: Spawner | SpawnerError | None = None
        self._done = done
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        try:
            result: Spawner | SpawnerError = Spawner(*self.ids)
        except SpawnerError as exc:
            result = exc
        with self._lock:
            abandoned = self._abandoned
            self.result = result
        if abandoned:
            if isinstance(result, Spawner):
                result.close()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._done()

    def abandon(self) -> None:
        """Nobody wants the new spawner any more: it is closed, now or once it has started.
        (If the worker exits first, the spawner ends with it: its socket closes.)"""
        with self._lock:
            self._abandoned = True
            result = self.result
        if isinstance(result, Spawner):
            result.close()


def _spawner_ids(user: RunAs | None, pool: UidPool | None) -> tuple[int, int, int] | None:
    """What a spawner is started with: (uid, gid, last uid) of the users it starts commands
    as; None when commands run as the worker's own user."""
    if pool is not None:
        return pool.uids.start, pool.uids.start, pool.uids.stop - 1
    if user is not None:
        return user.uid, user.gid, user.uid
    return None


def may_enter(path: str, uid: int, gid: int) -> bool:
    """Whether a user (``uid``, ``gid``, no other groups, no capabilities) may enter ``path``
    by the modes of the directories on the way (not their ACLs): each must let it search. A
    path that is not there, or not a directory, is left to the start to report."""
    try:
        real = Path(os.path.realpath(path))
        for directory in (*reversed(real.parents), real):
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode):
                return True
            shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
            if not st.st_mode >> shift & stat.S_IXOTH:
                return False
    except OSError:
        return True
    return True
