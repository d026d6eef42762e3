"""Ctrl-C, SIGTERM, SIGHUP and SIGQUIT in the client commands that start jobs (``run``,
``run --all``).

Each means "stop it", as it would for a local command run in the foreground (the user's Ctrl-C
or Ctrl-\\, a supervisor's or CI runner's SIGTERM, a closed terminal's SIGHUP), so the job is
cancelled and the command then dies of the signal, as the local one would (a shell loop around
it stops too). Cancelling needs the job's id, and a signal can come while the master is still
accepting the job: giving up then would leave a job running that nobody sees. So such a step
waits on (the master's answer takes milliseconds), and only a further Ctrl-C gives up waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Signals closer together than this are one burst (the terminal's Ctrl-C and a wrapper's copy
# of it); a person's second Ctrl-C comes later.
BURST_S = 0.3


class Interrupted(Exception):
    """A stop signal ended the step being awaited."""


class Interrupts:
    """Collects the stop signals received while the ``with`` block runs on the event loop;
    ``step`` awaits one step that they end."""

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []
        # Given back at the end of the block (asyncio would leave Python's own for SIGINT). One
        # the process ignores (nohup, a shell's background job) stays ignored, and one handled
        # outside Python is left to that handler.
        self._previous = {
            sig: handler
            for sig in STOP_SIGNALS
            if (handler := signal.getsignal(sig)) not in (signal.SIG_IGN, None)
        }
        self._step: asyncio.Future[Any] | None = None
        self._patient = False
        self._on_hold: Callable[[], None] | None = None
        self._stopped = False
        self._last = 0.0  # when the last signal was received (monotonic)

    def __enter__(self) -> Interrupts:
        loop = asyncio.get_running_loop()
        for sig in self._previous:
            loop.add_signal_handler(sig, self._receive, sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous)

    async def step(
        self,
        awaitable: Awaitable[T],
        patient: bool = False,
        on_hold: Callable[[], None] | None = None,
    ) -> T:
        """Await ``awaitable``; raises Interrupted when a signal ends it. A step ends at the first
        signal, even one received before it began. A patient one (waiting for the master: the
        job's id, the cancel's confirmation) ends only at a further Ctrl-C, received while it
        runs and at least BURST_S after the signal before it: one burst (a closed terminal's
        SIGHUP and SIGTERM, a Ctrl-C that a wrapper passes on as well) does not end it.
        ``on_hold`` is called for a signal that does not end it."""
        step: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        self._step, self._patient, self._on_hold, self._stopped = step, patient, on_hold, False
        if self.received and not patient:
            self._stop()
        try:
            return await step
        except asyncio.CancelledError:
            if not self._stopped:  # not by a signal: the caller itself is cancelled
                raise
            raise Interrupted from None
        finally:
            self._step = self._on_hold = None

    def _receive(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        further = bool(self.received) and now - self._last >= BURST_S
        self.received.append(sig)
        self._last = now
        if self._step is None:
            return
        if not self._patient or (sig == signal.SIGINT and further):
            self._stop()
        elif self._on_hold is not None:
            self._on_hold()

    def _stop(self) -> None:
        assert self._step is not None
        if self._step.cancel():  # (a later signal finds it done: it stays stopped)
            self._stopped = True


def die_of(sig: signal.Signals) -> NoReturn:
    """End the process as the signal ends a program that does not handle it, so that its
    parent sees it (a shell stops a loop, and shows 128 + the signal's number)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # its reader is gone
            stream.flush()
    if sig == signal.SIGQUIT:  # (its default also dumps core: nothing of ours is to debug)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(
                resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1])
            )
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig)  # (for the moment the kernel may take to end a process with threads)
