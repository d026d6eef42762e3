"""Ctrl-C in the client commands that start jobs (``run``, ``run --broadcast``).

A press means "stop it", as it would for a local command, so the job is cancelled. That needs
the job's id, and a press can come while the master is still accepting the job: giving up then
would leave a job running that nobody sees. So a step like that waits on after the first press
(the master's answer takes milliseconds) and only a second press gives up.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C stopped the step being awaited."""


class CtrlC:
    """Counts SIGINT presses while the ``with`` block runs on the event loop; ``step`` awaits
    one step that a given number of presses stops."""

    def __init__(self) -> None:
        self.presses = 0
        self._previous = signal.getsignal(signal.SIGINT)  # given back at the end of the block
        self._step: asyncio.Future[Any] | None = None
        self._stop_at = 1
        self._on_hold: Callable[[], None] | None = None

    def __enter__(self) -> CtrlC:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)  # (sets Python's own)
        signal.signal(signal.SIGINT, self._previous)

    async def step(
        self,
        awaitable: Awaitable[T],
        stop_at: int = 1,
        on_hold: Callable[[], None] | None = None,
    ) -> T:
        """Await ``awaitable``; raises Interrupted once the block has seen ``stop_at`` presses
        (at once when it has already). ``on_hold`` is called on a press that does not stop it."""
        step: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        self._step, self._stop_at, self._on_hold = step, stop_at, on_hold
        if self.presses >= stop_at:
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

    def _press(self) -> None:
        self.presses += 1
        if self._step is None:
            return
        if self.presses >= self._stop_at:
            self._step.cancel()
        elif self._on_hold is not None:
            self._on_hold()
