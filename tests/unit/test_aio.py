"""cancel_and_wait swallows the child's cancellation, never the caller's."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from ferry.aio import cancel_and_wait, log_task_stacks, wait_briefly


async def test_child_cancellation_is_swallowed() -> None:
    child = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await cancel_and_wait(child)
    assert child.cancelled()


async def test_caller_cancellation_propagates() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # slow to stop: the caller is cancelled meanwhile

    async def caller(child: asyncio.Task[None]) -> str:
        await cancel_and_wait(child)
        return "ran on after being cancelled"

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    outer = asyncio.create_task(caller(child))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    child.cancel()


async def test_errors_raise_unless_swallowed() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("on the way out")

    child = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await cancel_and_wait(child)
    child = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(child, swallow_errors=True)


async def test_wait_briefly_does_not_cancel() -> None:
    child = asyncio.create_task(asyncio.sleep(3600))
    await wait_briefly(child, 0.05)
    assert not child.done()
    await cancel_and_wait(child)


_SPIN_CASE = '''
import asyncio, contextlib
from ferry.aio import StackSafe

class RaisesCancelled:
    """A teardown that awaits and is cancelled: raises a fresh CancelledError."""
    async def __aenter__(self): return self
    async def __aexit__(self, *exc):
        raise asyncio.CancelledError()

@contextlib.asynccontextmanager
async def incoming():
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(StackSafe(asyncio.TaskGroup()))
        await stack.enter_async_context(RaisesCancelled())
        yield

async def main():
    try:
        async with contextlib.AsyncExitStack() as outer:
            outer.push_async_callback(asyncio.sleep, 0)
            await outer.enter_async_context(incoming())
            raise asyncio.CancelledError()
    except asyncio.CancelledError:
        print("ended")

asyncio.run(main())
'''


def test_a_task_group_in_an_exit_stack_cannot_spin_a_cancelled_teardown() -> None:
    """The shape of IncomingVM's teardown under Ctrl-C/SIGTERM. Without StackSafe,
    Python 3.11's AsyncExitStack links the TaskGroup's re-raised CancelledError into
    its own context chain and the outer stack then walks that cycle forever at 100 %
    CPU (a received VM's holder did). Run in a subprocess: a spin cannot be timed out
    from inside the loop it occupies."""
    out = subprocess.run([sys.executable, "-c", _SPIN_CASE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ended"


async def test_log_task_stacks_names_each_task_and_where_it_waits(
        caplog: pytest.LogCaptureFixture) -> None:
    async def parked_on_an_event() -> None:
        await asyncio.Event().wait()

    async def outer_layer() -> None:
        await parked_on_an_event()

    task = asyncio.create_task(outer_layer(), name="stuck-one")
    await asyncio.sleep(0)
    try:
        with caplog.at_level(logging.WARNING):
            log_task_stacks(logging.getLogger("test"))
    finally:
        await cancel_and_wait(task)
    text = caplog.text
    assert "task stuck-one" in text
    # Every coroutine of the chain, outermost first, down to the event it waits on.
    assert text.index("in outer_layer") < text.index("in parked_on_an_event") < \
        text.index("in wait") < text.index("awaiting")
    assert "thread " in text
