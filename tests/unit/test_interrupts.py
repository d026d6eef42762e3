"""Interrupts with real signals sent to this process."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from dist_exec import interrupts as interrupts_module
from dist_exec.interrupts import STOP_SIGNALS, Interrupted, Interrupts

INT, TERM, HUP = signal.SIGINT, signal.SIGTERM, signal.SIGHUP


def _stray(signum: int, frame: object) -> None:
    raise AssertionError(f"{signal.Signals(signum).name} was not taken by Interrupts")


@pytest.fixture(autouse=True)
def handlers() -> Iterator[None]:
    """Each stop signal handled while a test runs (whatever this process was started with:
    nohup, a background job), and put back after it. Not at its default action: a signal that
    Interrupts fails to take fails the test instead of killing the whole test run."""
    saved = {sig: signal.signal(sig, _stray) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def send(*signals: signal.Signals) -> None:
    for sig in signals:
        os.kill(os.getpid(), sig)


async def until_received(interrupts: Interrupts, count: int = 1) -> None:
    """Until the loop has run the handlers of the signals sent to this process."""
    async with asyncio.timeout(5):
        while len(interrupts.received) < count:
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_each_stop_signal_ends_a_step(sig: signal.Signals) -> None:
    with Interrupts() as interrupts:
        asyncio.get_running_loop().call_soon(send, sig)
        with pytest.raises(Interrupted):
            await interrupts.step(asyncio.sleep(30))
    assert interrupts.received == [sig]


async def test_a_step_begun_after_a_signal_is_ended_at_once() -> None:
    ran: list[str] = []

    async def never() -> None:
        ran.append("ran")

    with Interrupts() as interrupts:
        send(HUP)
        await until_received(interrupts)
        with pytest.raises(Interrupted):
            await interrupts.step(never())
    assert ran == []


async def test_a_patient_step_goes_on_after_a_first_signal_and_ends_at_a_further_ctrl_c(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(interrupts_module, "BURST_S", 0.0)
    held: list[list[signal.Signals]] = []
    release = asyncio.Event()

    async def accept() -> str:
        send(INT)
        await release.wait()
        return "j1"

    with Interrupts() as interrupts:

        def on_hold() -> None:
            held.append(list(interrupts.received))
            release.set()

        assert await interrupts.step(accept(), patient=True, on_hold=on_hold) == "j1"
        assert held == [[INT]]
        asyncio.get_running_loop().call_soon(send, INT)
        with pytest.raises(Interrupted):
            await interrupts.step(asyncio.sleep(30), patient=True)
    assert interrupts.received == [INT, INT]


async def test_sigterm_and_sighup_never_end_a_patient_step() -> None:
    """Whoever sends them wants the job stopped, and SIGKILL is there to stop waiting."""
    with Interrupts() as interrupts:

        async def accept() -> str:
            send(INT, TERM, HUP, TERM)
            await until_received(interrupts, 4)
            return "j1"

        assert await interrupts.step(accept(), patient=True) == "j1"


async def test_a_burst_received_before_a_patient_step_does_not_end_it() -> None:
    """Ctrl-C twice at once (a wrapper passes it on as well): the first stops the output, the
    second must not stop the cancel before it is sent."""
    with Interrupts() as interrupts:
        send(INT, INT)
        await until_received(interrupts, 2)
        assert await interrupts.step(asyncio.sleep(0, "cancelled"), patient=True) == "cancelled"


async def test_a_ctrl_c_in_the_same_burst_does_not_end_a_patient_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wrapper's copy of a Ctrl-C lands while the cancel is being sent."""
    monkeypatch.setattr(interrupts_module, "BURST_S", 30.0)
    with Interrupts() as interrupts:

        async def cancel() -> str:
            send(INT)
            await until_received(interrupts, 2)
            return "cancelled"

        send(INT)
        await until_received(interrupts)
        assert await interrupts.step(cancel(), patient=True) == "cancelled"


async def test_a_step_stays_stopped_when_a_later_signal_finds_it_done() -> None:
    """The first signal cancels the step; one more arrives before the caller resumes."""
    with Interrupts() as interrupts:

        async def slow() -> None:
            await asyncio.sleep(30)

        caller = asyncio.ensure_future(interrupts.step(slow()))
        await asyncio.sleep(0)
        interrupts._receive(INT)  # as the loop calls it: the step ends in the next iteration,
        # and this one comes after that but before the caller resumes
        asyncio.get_running_loop().call_soon(interrupts._receive, INT)
        with pytest.raises(Interrupted):
            await caller


async def test_cancelling_the_caller_is_not_taken_for_a_signal() -> None:
    with Interrupts() as interrupts:
        caller = asyncio.ensure_future(interrupts.step(asyncio.sleep(30)))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert interrupts.received == []


async def test_a_step_cancelled_by_something_else_is_not_taken_for_a_signal() -> None:
    with Interrupts() as interrupts:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        asyncio.get_running_loop().call_soon(inner.cancel)
        with pytest.raises(asyncio.CancelledError):
            await interrupts.step(inner)


def test_leaving_the_block_gives_back_the_handlers_it_found() -> None:
    """The command line dies of SIGINT outside the block (SIG_DFL), not of the Python handler
    that asyncio leaves when a loop's handler is removed."""

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    async def main() -> None:
        with Interrupts():
            assert all(signal.getsignal(s) not in (signal.SIG_DFL, mine) for s in STOP_SIGNALS)

    signal.signal(TERM, mine)
    signal.signal(INT, signal.SIG_DFL)  # (no signal is sent here)
    asyncio.run(main())
    assert signal.getsignal(INT) is signal.SIG_DFL
    assert signal.getsignal(TERM) is mine


def test_an_ignored_signal_stays_ignored() -> None:
    """nohup ignores SIGHUP: the job must survive the terminal closing."""

    async def main() -> list[signal.Signals]:
        with Interrupts() as interrupts:
            assert signal.getsignal(HUP) is signal.SIG_IGN
            # Were SIGHUP taken, it would reach the loop with SIGINT (in the same wake-up):
            send(HUP, INT)
            await until_received(interrupts)
            return interrupts.received

    signal.signal(HUP, signal.SIG_IGN)
    assert asyncio.run(main()) == [INT]
    assert signal.getsignal(HUP) is signal.SIG_IGN
