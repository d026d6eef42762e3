"""CtrlC with real SIGINTs sent to this process."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from dist_exec.ctrl_c import CtrlC, Interrupted


def press() -> None:
    os.kill(os.getpid(), signal.SIGINT)


async def until_pressed(ctrl_c: CtrlC) -> None:
    """Until the loop has run the handler of the press sent to this process."""
    async with asyncio.timeout(5):
        while not ctrl_c.presses:
            await asyncio.sleep(0.001)


async def test_a_press_stops_a_step() -> None:
    with CtrlC() as ctrl_c:
        asyncio.get_running_loop().call_soon(press)
        with pytest.raises(Interrupted):
            await ctrl_c.step(asyncio.sleep(30))
    assert ctrl_c.presses == 1


async def test_a_patient_step_goes_on_after_one_press_and_stops_at_the_second() -> None:
    held: list[int] = []
    release = asyncio.Event()

    async def accept() -> str:
        press()
        await release.wait()
        return "j1"

    with CtrlC() as ctrl_c:

        def on_hold() -> None:
            held.append(ctrl_c.presses)
            release.set()

        assert await ctrl_c.step(accept(), 2, on_hold) == "j1"
        assert held == [1]
        asyncio.get_running_loop().call_soon(press)
        with pytest.raises(Interrupted):
            await ctrl_c.step(asyncio.sleep(30), 2)
    assert ctrl_c.presses == 2


async def test_a_step_begun_after_enough_presses_is_stopped_at_once() -> None:
    ran: list[str] = []

    async def never() -> None:
        ran.append("ran")

    with CtrlC() as ctrl_c:
        press()
        await until_pressed(ctrl_c)
        with pytest.raises(Interrupted):
            await ctrl_c.step(never())
    assert ran == []


async def test_cancelling_the_caller_is_not_taken_for_a_press() -> None:
    with CtrlC() as ctrl_c:
        caller = asyncio.ensure_future(ctrl_c.step(asyncio.sleep(30)))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert ctrl_c.presses == 0


async def test_a_press_between_steps_is_counted_for_the_next() -> None:
    with CtrlC() as ctrl_c:
        assert await ctrl_c.step(asyncio.sleep(0, "done")) == "done"
        press()
        await until_pressed(ctrl_c)
        with pytest.raises(Interrupted):
            await ctrl_c.step(asyncio.sleep(30))


def test_leaving_the_block_gives_back_the_handler_it_found() -> None:
    """The command line kills itself on SIGINT outside the block (SIG_DFL), not asyncio's
    Python handler that removing a loop's handler leaves."""

    async def main() -> None:
        with CtrlC():
            assert signal.getsignal(signal.SIGINT) is not signal.SIG_DFL

    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
