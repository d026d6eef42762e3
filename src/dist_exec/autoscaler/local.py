"""LocalBackend: the scaled workers are ``dist-exec worker`` processes on this machine.

Like a ReplicaSet, a worker process that exits counts no more, so the policy starts another
when the group falls below its minimum. Removed workers get SIGTERM: they drain (finish what
runs, deliver results, deregister) and exit. ``close`` stops every worker this backend
started, and ``dist_exec.supervised`` stops them when the master dies without doing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from dist_exec import supervised
from dist_exec.autoscaler.backend import Scale, ScaleError
from dist_exec.models import NodeId
from dist_exec.security.private_files import open_private, private_dir

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 45.0  # a stopping worker drains running tasks first
EARLY_EXIT_S = 10.0  # a worker that exits this soon after it started could not start
RESTART_BACKOFF_S = (1.0, 60.0)  # the first and the longest wait before starting again then
ID_PREFIX = "auto-"


class LocalBackend:
    def __init__(
        self,
        master_address: str,
        log_dir: Path,
        max_concurrent_tasks: int,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.master_address = master_address
        self.log_dir = log_dir
        self.max_concurrent_tasks = max_concurrent_tasks
        self.extra_args = list(extra_args)
        self._procs: dict[NodeId, asyncio.subprocess.Process] = {}
        self._stopping: dict[NodeId, asyncio.Task[None]] = {}
        self._serial = itertools.count(1)
        self._started: dict[NodeId, float] = {}  # (monotonic)
        self._backoff_s = 0.0  # after workers that could not start: doubles each time
        self._retry_at = 0.0
        self._failure = ""

    @property
    def description(self) -> str:
        return "local worker processes"

    def owns(self, node_id: NodeId) -> bool:
        return node_id in self._procs or node_id in self._stopping

    async def current_scale(self) -> Scale:
        now = time.monotonic()
        for node_id, proc in list(self._procs.items()):
            lived = now - self._started.get(node_id, now)
            if proc.returncode is not None:
                log.warning("local worker %s exited with %s", node_id, proc.returncode)
                del self._procs[node_id]
                self._started.pop(node_id, None)
                if lived < EARLY_EXIT_S:  # it could not start: start others less and less often
                    first, longest = RESTART_BACKOFF_S
                    self._backoff_s = min(longest, max(first, 2 * self._backoff_s))
                    self._retry_at = now + self._backoff_s
                    self._failure = (
                        f"local worker {node_id} exited with status {proc.returncode} "
                        f"{lived:.1f}s after it started (see {self.log_dir / node_id}.log)"
                    )
            elif lived >= EARLY_EXIT_S:
                self._backoff_s = 0.0  # one started fine
        return Scale(desired=len(self._procs), ready=len(self._procs))

    async def scale_up(self, replicas: int) -> None:
        left = self._retry_at - time.monotonic()
        if left > 0:
            raise ScaleError(f"{self._failure}; the next start in {left:.0f}s")
        private_dir(self.log_dir)
        while len(self._procs) < replicas:
            node_id = NodeId(f"{ID_PREFIX}{next(self._serial)}")
            # Its own session: Ctrl-C on `up` reaches only the master, which drains these.
            log_path = self.log_dir / f"{node_id}.log"
            with os.fdopen(open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log_file:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *supervised.argv(["worker"]),
                        "--master", self.master_address, "--listen", "127.0.0.1:0",
                        "--worker-id", node_id,
                        "--max-concurrent-tasks", str(self.max_concurrent_tasks),
                        *self.extra_args,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=log_file,
                        start_new_session=True,
                    )  # fmt: skip
                except OSError as exc:
                    raise ScaleError(f"cannot start a local worker: {exc}") from exc
            self._started[node_id] = time.monotonic()
            self._procs[node_id] = proc
            log.info("started local worker %s (pid %d)", node_id, proc.pid)

    async def scale_down(self, victims: Sequence[NodeId]) -> list[NodeId]:
        removed = []
        for node_id in victims:
            proc = self._procs.pop(node_id, None)
            self._started.pop(node_id, None)
            if proc is None:
                continue
            self._stopping[node_id] = asyncio.create_task(self._stop(node_id, proc))
            removed.append(node_id)
        return removed

    async def _stop(self, node_id: NodeId, proc: asyncio.subprocess.Process) -> None:
        try:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.warning(
                    "local worker %s did not stop in %ss; killing it", node_id, STOP_TIMEOUT_S
                )
                proc.kill()
                await proc.wait()
            log.info("local worker %s stopped", node_id)
        finally:
            self._stopping.pop(node_id, None)

    async def close(self) -> None:
        """Stop every worker (they drain first)."""
        await self.scale_down(list(self._procs))
        stopping = list(self._stopping.values())
        if stopping:
            with contextlib.suppress(Exception):
                await asyncio.gather(*stopping)
