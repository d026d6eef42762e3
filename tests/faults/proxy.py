"""A TCP proxy on 127.0.0.1 that can be cut: the partition for machines without namespaces.

``cut()`` stops moving bytes in both directions and holds new connections unanswered; what was
sent waits in socket buffers, as packets a partition drops are retransmitted by TCP after it
heals. ``heal()`` resumes. Nothing is reset or closed by a cut, as in a real partition.
``delay_s`` holds back what it moves, each way: a peer far away.

It runs its own event loop in a thread: the test's loop blocks while it starts processes (which
must get through the proxy to become ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from dist_exec.config import join_address


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s  # each way, for everything it moves: a distant peer
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted so far (each one a client's connect attempt)
        self.refusing = False

    @property
    def address(self) -> str:
        return join_address("127.0.0.1", self.port)

    def start(self) -> CuttableProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)
        self.refusing = False

    def refuse(self) -> None:
        """Close every new connection at once, as a host whose server is down (until heal)."""
        self.refusing = True

    def drop(self) -> None:
        """Close every connection open now (new ones go through): a dropped connection."""

        async def close_all() -> None:
            for task in list(self._tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            if self.refusing:
                return
            await self._open.wait()  # a connection made during a cut waits for the heal
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            # Refused upstream, reset, or close() cancelling it: the connection just ends (a
            # connection task of asyncio.start_server must not end cancelled: it logs an error).
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self._open.wait()
            data = await reader.read(65536)
            if not data:
                break
            await self._open.wait()  # read just as the cut came: it waits for the heal too
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()
