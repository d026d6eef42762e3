"""A test that plays kubelet for the worker Deployment (there is no kubelet or scheduler here).

It watches the Deployment's pods and, for each pod, starts one real local worker process whose
worker id is the pod name, as the downward API would give it. Like the readiness probe in
deploy/kubernetes/worker.yaml, it polls the worker's gRPC health service and reports the pod
Ready or NotReady (the pod's status subresource). When a pod is deleted it stops the process
with SIGTERM, as a kubelet would: the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

PROBE_PERIOD_S = 0.1
STOP_TIMEOUT_S = 60.0


@dataclass
class _Worker:
    name: str
    proc: asyncio.subprocess.Process | None = None
    address: str = ""
    channel: grpc.aio.Channel | None = None
    reported_ready: bool | None = None
    stopping: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)


class PlayKubelet:
    def __init__(
        self,
        admin_kubeconfig: Path,
        namespace: str,
        selector: dict[str, str],
        master_address: str,
        log_dir: Path,
        max_tasks: int,
    ) -> None:
        self.client = AsyncClient(KubeConfig.from_file(admin_kubeconfig))
        self.namespace = namespace
        self.selector = selector
        self.master_address = master_address
        self.log_dir = log_dir
        self.max_tasks = max_tasks
        self.workers: dict[str, _Worker] = {}
        self.deleted: list[str] = []  # pods deleted while it watched (their workers stopped)
        self.stopped: list[str] = []  # workers it stopped, those of deleted pods or at close()
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Until cancelled."""
        self._spawn(self._probe_forever())
        labels: dict[str, Any] = dict(self.selector)
        async for kind, pod in self.client.watch(Pod, namespace=self.namespace, labels=labels):
            assert pod.metadata is not None
            assert pod.metadata.name is not None
            name = pod.metadata.name
            worker = self.workers.get(name)
            if kind == "DELETED" or pod.metadata.deletionTimestamp is not None:
                if worker is not None and not worker.stopping:
                    self.deleted.append(name)
                    worker.stopping = True
                    self._spawn(self._stop(worker))
            elif worker is None:
                worker = self.workers[name] = _Worker(name)
                self._spawn(self._start(worker))

    async def _start(self, worker: _Worker) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{worker.name}.log").open("ab") as log:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dist_exec", "worker", "--master", self.master_address,
                "--listen", "127.0.0.1:0", "--worker-id", worker.name,
                "--max-concurrent-tasks", str(self.max_tasks),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert worker.proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await worker.proc.stdout.readline()).decode()
        assert " listening on " in line, f"worker {worker.name} did not start: {line!r}"
        worker.address = line.rsplit(" listening on ", 1)[1].strip()
        worker.channel = grpc.aio.insecure_channel(worker.address)
        worker.started.set()

    async def _probe_forever(self) -> None:
        while True:
            for worker in list(self.workers.values()):
                if worker.channel is None or worker.stopping:
                    continue
                serving = await self._serving(worker.channel)
                if serving != worker.reported_ready:
                    await self._report(worker.name, serving)
                    worker.reported_ready = serving
            await asyncio.sleep(PROBE_PERIOD_S)

    @staticmethod
    async def _serving(channel: grpc.aio.Channel) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _report(self, pod: str, ready: bool) -> None:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        with contextlib.suppress(ApiError):  # the pod may be gone already
            await self.client.patch(
                Pod.Status,
                pod,
                {"status": {"phase": "Running", "conditions": [condition]}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )

    async def _stop(self, worker: _Worker) -> None:
        await worker.started.wait()
        proc = worker.proc
        assert proc is not None
        assert proc.stdout is not None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await proc.stdout.read()
        if worker.channel is not None:
            await worker.channel.close()
        self.stopped.append(worker.name)

    async def close(self) -> None:
        """Stop every worker process this kubelet started."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers.values():
            if worker.proc is not None and worker.name not in self.stopped:
                worker.started.set()
                await self._stop(worker)
        await self.client.close()
