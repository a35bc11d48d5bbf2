"""cancel_and_wait swallows the child's cancellation, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from ferry.aio import cancel_and_wait, wait_briefly


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
