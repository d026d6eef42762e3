"""Ctrl-C, SIGTERM and SIGHUP in the client commands that start jobs (``run``, ``run --all``).

Each means "stop it", as it would for a local command run in the foreground (the user's Ctrl-C,
a supervisor's or CI runner's SIGTERM, a closed terminal's SIGHUP), so the job is cancelled.
That needs the job's id, and a signal can come while the master is still accepting the job:
giving up then would leave a job running that nobody sees. So a step like that waits on after
the first signal (the master's answer takes milliseconds) and only a second one gives up.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal ended the step being awaited."""


class Interrupts:
    """Counts the stop signals received while the ``with`` block runs on the event loop;
    ``step`` awaits one step that a given number of them ends."""

    def __init__(self) -> None:
        self.received = 0
        # Given back at the end of the block (asyncio would leave Python's own for SIGINT). One
        # the process ignores (nohup, a shell's background job) stays ignored.
        self._previous = {
            sig: handler
            for sig in STOP_SIGNALS
            if (handler := signal.getsignal(sig)) is not signal.SIG_IGN
        }
        self._step: asyncio.Future[Any] | None = None
        self._stop_at = 1
        self._on_hold: Callable[[], None] | None = None

    def __enter__(self) -> Interrupts:
        loop = asyncio.get_running_loop()
        for sig in self._previous:
            loop.add_signal_handler(sig, self._receive)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous)

    async def step(
        self,
        awaitable: Awaitable[T],
        stop_at: int = 1,
        on_hold: Callable[[], None] | None = None,
    ) -> T:
        """Await ``awaitable``; raises Interrupted once the block has received ``stop_at``
        signals (at once when it has already). ``on_hold`` is called on one that does not
        stop it."""
        step: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        self._step, self._stop_at, self._on_hold = step, stop_at, on_hold
        if self.received >= stop_at:
            step.cancel()
        try:
            return await step
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # the caller itself is cancelled
                raise
            raise Interrupted from None
        finally:
            self._step = self._on_hold = None

    def _receive(self) -> None:
        self.received += 1
        if self._step is None:
            return
        if self.received >= self._stop_at:
            self._step.cancel()
        elif self._on_hold is not None:
            self._on_hold()
