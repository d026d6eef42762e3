"""Interrupts with real signals sent to this process."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from dist_exec.interrupts import STOP_SIGNALS, Interrupted, Interrupts


def send(sig: signal.Signals = signal.SIGINT) -> None:
    os.kill(os.getpid(), sig)


async def until_received(interrupts: Interrupts, count: int = 1) -> None:
    """Until the loop has run the handler of the signals sent to this process."""
    async with asyncio.timeout(5):
        while interrupts.received < count:
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_each_stop_signal_stops_a_step(sig: signal.Signals) -> None:
    with Interrupts() as interrupts:
        asyncio.get_running_loop().call_soon(send, sig)
        with pytest.raises(Interrupted):
            await interrupts.step(asyncio.sleep(30))
    assert interrupts.received == 1


async def test_a_patient_step_goes_on_after_one_signal_and_stops_at_the_second() -> None:
    held: list[int] = []
    release = asyncio.Event()

    async def accept() -> str:
        send()
        await release.wait()
        return "j1"

    with Interrupts() as interrupts:

        def on_hold() -> None:
            held.append(interrupts.received)
            release.set()

        assert await interrupts.step(accept(), 2, on_hold) == "j1"
        assert held == [1]
        asyncio.get_running_loop().call_soon(send, signal.SIGTERM)
        with pytest.raises(Interrupted):
            await interrupts.step(asyncio.sleep(30), 2)
    assert interrupts.received == 2


async def test_a_step_begun_after_enough_signals_is_stopped_at_once() -> None:
    ran: list[str] = []

    async def never() -> None:
        ran.append("ran")

    with Interrupts() as interrupts:
        send()
        await until_received(interrupts)
        with pytest.raises(Interrupted):
            await interrupts.step(never())
    assert ran == []


async def test_cancelling_the_caller_is_not_taken_for_a_signal() -> None:
    with Interrupts() as interrupts:
        caller = asyncio.ensure_future(interrupts.step(asyncio.sleep(30)))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert interrupts.received == 0


async def test_a_signal_between_steps_is_counted_for_the_next() -> None:
    with Interrupts() as interrupts:
        assert await interrupts.step(asyncio.sleep(0, "done")) == "done"
        send(signal.SIGHUP)
        await until_received(interrupts)
        with pytest.raises(Interrupted):
            await interrupts.step(asyncio.sleep(30))


@pytest.fixture
def handlers() -> Iterator[None]:
    """Puts back this process's handlers of the stop signals after the test."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("handlers")
def test_leaving_the_block_gives_back_the_handlers_it_found() -> None:
    """The command line dies of SIGINT outside the block (SIG_DFL), not of the Python handler
    that asyncio leaves when a loop's handler is removed."""

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    async def main() -> None:
        with Interrupts():
            assert all(signal.getsignal(s) not in (signal.SIG_DFL, mine) for s in STOP_SIGNALS)

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, mine)
    asyncio.run(main())
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is mine


@pytest.mark.usefixtures("handlers")
def test_an_ignored_signal_stays_ignored() -> None:
    """nohup ignores SIGHUP: the job must survive the terminal closing."""

    async def main() -> int:
        with Interrupts() as interrupts:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            # Were SIGHUP taken, it would reach the loop with SIGINT (in the same wake-up):
            send(signal.SIGHUP)
            send(signal.SIGINT)
            await until_received(interrupts)
            return interrupts.received

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    assert asyncio.run(main()) == 1
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
