"""Holder.unless_stopped: a VM's user data does not hold up its stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.node.holder import Ending, Holder
from ferry.node.record import HolderRecord, HolderState
from ferry.vm.registry import VMPaths


def _holder(tmp_path: Path) -> Holder:
    record = HolderRecord.for_this_process("u1", HolderState.RUNNING)
    return Holder(VMPaths(tmp_path / "run", tmp_path / "state"), record)


async def test_the_work_finishes_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path)

    async def work() -> int:
        return 7

    assert await holder.unless_stopped(work()) == 7


async def test_a_stop_cancels_the_work(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    asyncio.get_running_loop().call_later(0.01, holder.request_stop, Ending.DISCARD)
    assert await holder.unless_stopped(work()) is None
    assert cancelled.is_set()


async def test_the_works_error_is_raised(tmp_path: Path) -> None:
    holder = _holder(tmp_path)

    async def work() -> int:
        raise RuntimeError("agent gone")

    with pytest.raises(RuntimeError, match="agent gone"):
        await holder.unless_stopped(work())
