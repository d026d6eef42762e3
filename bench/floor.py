"""The floor under dist-exec's single-job latency: the same shape of job with none of its logic.

Three processes, as in ``bench_throughput.py``'s latency phase: a client, a "master" and a
"worker", joined by one long-lived gRPC stream each (bytes, no protobuf), with the same process
settings as dist-exec's servers (``dist_exec.tuning``). For each of ``--jobs`` sequential
jobs the client sends one message; the master writes a record and fdatasyncs it (in a writer
thread, as the store does), sends the start to the worker and "accepted" to the client; the
worker spawns ``echo N`` (its own session, pipes, exit seen by a pidfd) and sends the output
back; the master passes it to the client. It prints the p50 and p99 and the CPU each process
used per job. What dist-exec takes beyond these numbers is its own code.

    python bench/floor.py [--jobs 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import grpc.aio

from dist_exec.tuning import tune_gc, tune_grpc

RECORD = b"x" * 3000  # about what the store writes to accept a job
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _same(data: bytes) -> bytes:
    return data


def _handler(service: str, method: str, behaviour: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=_same, response_serializer=_same
            )
        },
    )


async def _serve(handler: grpc.GenericRpcHandler) -> None:
    tune_gc()  # as dist-exec's servers do
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _spawn(number: bytes) -> subprocess.Popen[bytes]:
    """``echo number``, started as the command executor starts a command (vfork, own session)."""
    return subprocess.Popen(
        ["echo", number.decode()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def _echo(number: bytes) -> bytes:
    """Its stdout, read as the executor reads it (the exit seen by a pidfd)."""
    loop = asyncio.get_running_loop()
    proc = _spawn(number)
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.fileno()
    pidfd = os.pidfd_open(proc.pid)
    output = bytearray()
    drained: asyncio.Future[None] = loop.create_future()
    exited: asyncio.Future[None] = loop.create_future()

    def read() -> None:
        data = os.read(out, 65536)
        if data:
            output.extend(data)
        else:
            loop.remove_reader(out)
            drained.set_result(None)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc.wait()
        exited.set_result(None)

    loop.add_reader(out, read)
    loop.add_reader(pidfd, reap)
    await asyncio.gather(drained, exited)
    proc.stdout.close()
    proc.stderr.close()
    return bytes(output)


Send = Callable[[bytes], None]


def _each_in_a_task(
    handle: Callable[[bytes, Send], Coroutine[Any, Any, None]],
) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
    """A stream handler that runs ``handle(request, send)`` in a task of its own for each
    request and sends back what they send, as they send it."""

    async def serve(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        out: asyncio.Queue[bytes] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def read() -> None:
            async for request in requests:
                task = asyncio.create_task(handle(request, out.put_nowait))
                running.add(task)
                task.add_done_callback(running.discard)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()

    return serve


async def worker() -> None:
    async def run(number: bytes, send: Send) -> None:
        send(number + b" " + await _echo(number))

    await _serve(_handler("floor.Worker", "Dispatch", _each_in_a_task(run)))


async def master(worker_port: int) -> None:
    loop = asyncio.get_running_loop()
    fd, path = tempfile.mkstemp(prefix="floor-")
    os.unlink(path)
    os.pwrite(fd, b"\0" * (1 << 20), 0)
    os.fsync(fd)
    writes: queue.SimpleQueue[asyncio.Future[None]] = queue.SimpleQueue()

    def writer() -> None:
        offset = 0
        while True:
            done = writes.get()
            os.pwrite(fd, RECORD, offset)
            os.fdatasync(fd)
            offset = (offset + len(RECORD)) % (1 << 20)
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=writer, daemon=True).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}")
    starts = channel.stream_stream(
        "/floor.Worker/Dispatch", request_serializer=_same, response_deserializer=_same
    )()
    waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def results() -> None:
        async for message in starts:
            waiting.pop(message.split(b" ", 1)[0]).set_result(message)

    collector = asyncio.create_task(results())

    async def job(number: bytes, send: Send) -> None:
        durable = loop.create_future()
        writes.put(durable)
        await durable
        result = waiting[number] = loop.create_future()
        await starts.write(number)
        send(b"accepted " + number)
        send(await result)

    try:
        await _serve(_handler("floor.Master", "Session", _each_in_a_task(job)))
    finally:
        collector.cancel()


def _cpu_ns(pid: int) -> int:
    """CPU time of all of a process's threads so far."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # the thread ended
    return total


async def client(master_port: int, jobs: int, warmup: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{master_port}") as channel:
        call = channel.stream_stream(
            "/floor.Master/Session", request_serializer=_same, response_deserializer=_same
        )()
        took = []
        for i in range(warmup + jobs):
            started = time.perf_counter()
            await call.write(str(i).encode())
            accepted, result = await call.read(), await call.read()
            if accepted != b"accepted %d" % i or result != b"%d %d\n" % (i, i):
                raise SystemExit(f"wrong answer for job {i}: {accepted!r}, {result!r}")
            if i >= warmup:
                took.append((time.perf_counter() - started) * 1e3)
        call.cancel()
        return took


def _start(*args: str) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)  # with GRPC_ENABLE_FORK_SUPPORT=0, set by importing dist_exec
    tune_grpc(env)  # as the dist-exec command does for its servers
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _die_with_parent() -> None:
    """A server of this benchmark is killed with the process that started it."""
    with contextlib.suppress(OSError, AttributeError):  # (not Linux)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # (it died before that was set)
        sys.exit(1)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="sequential jobs measured")
    parser.add_argument("--warmup", type=int, default=50, help="jobs run first, not measured")
    parser.add_argument("role", nargs="?", default="client", help=argparse.SUPPRESS)
    parser.add_argument("port", nargs="?", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role in ("worker", "master"):
        _die_with_parent()
        asyncio.run(worker() if args.role == "worker" else master(args.port))
        return
    signal.signal(signal.SIGTERM, _terminate)
    worker_proc, worker_port = _start("worker")
    master_proc, master_port = _start("master", str(worker_port))
    try:
        pids = {"master": master_proc.pid, "worker": worker_proc.pid, "client": os.getpid()}
        before = {name: _cpu_ns(pid) for name, pid in pids.items()}
        took = asyncio.run(client(master_port, args.jobs, args.warmup))
        cpu = {name: (_cpu_ns(pid) - before[name]) / (args.jobs + args.warmup) / 1e3
               for name, pid in pids.items()}  # fmt: skip
    finally:
        for proc in (master_proc, worker_proc):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    took.sort()
    print(f"floor: {args.jobs} sequential jobs, p50 {statistics.median(took):.2f} ms, "
          f"p99 {took[int(len(took) * 0.99)]:.2f} ms")  # fmt: skip
    print("CPU per job: " + ", ".join(f"{name} {us:.0f} us" for name, us in cpu.items()))


if __name__ == "__main__":
    main()
