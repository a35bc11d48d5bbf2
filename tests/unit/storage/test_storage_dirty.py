"""Dirty tracker: only tracked blocks become dirty; no concurrent write is missed."""

from __future__ import annotations

import asyncio

import pytest

from ferry.errors import DeviceClosedError, DeviceRangeError
from ferry.storage import Geometry, MemoryDevice, dirty_tracker

from .storage_helpers import GatedDevice

BS = 4096
SIZE = 8 * BS + 100


async def test_untracked_writes_are_not_dirty() -> None:
    local, remote = dirty_tracker(MemoryDevice(SIZE), BS)
    await local.write_at(0, b"x" * (3 * BS))
    assert remote.dirty_count() == 0
    assert remote.take_dirty() == []


async def test_reading_starts_tracking_and_writes_then_dirty() -> None:
    local, remote = dirty_tracker(MemoryDevice(SIZE), BS)
    assert await remote.read_at(BS, 2 * BS) == bytes(2 * BS)
    assert [remote.is_tracked(b) for b in range(4)] == [False, True, True, False]
    await local.write_at(BS - 1, b"ab")  # touches blocks 0 (untracked) and 1
    await local.write_at(8 * BS + 50, b"tail")  # the short last block, untracked
    await local.write_at(2 * BS + 5, b"c")
    await local.write_at(2 * BS + 9, b"d")
    assert remote.dirty_count() == 2
    assert remote.take_dirty() == [1, 2]
    assert remote.take_dirty() == []  # taking clears
    await local.write_at(BS, b"e")
    assert remote.take_dirty() == [1]  # still tracked after a take


async def test_track_all() -> None:
    local, remote = dirty_tracker(MemoryDevice(SIZE), BS)
    remote.track_all()
    await local.write_at(8 * BS + 99, b"z")
    await local.write_at(3 * BS, b"z" * (BS + 1))
    assert remote.take_dirty() == [3, 4, 8]
    assert remote.geometry == Geometry(SIZE, BS)
    assert local.geometry.block_count == 9


async def test_failed_range_check_marks_nothing() -> None:
    local, remote = dirty_tracker(MemoryDevice(SIZE), BS)
    remote.track_all()
    with pytest.raises(DeviceRangeError):
        await local.write_at(SIZE - 1, b"zz")
    with pytest.raises(DeviceRangeError):
        await remote.read_at(-BS, BS)
    assert remote.dirty_count() == 0


async def test_a_write_in_flight_during_the_migrators_read_is_not_missed() -> None:
    """The write has landed but not returned when the migrator reads: it must be dirty."""
    gated = GatedDevice(MemoryDevice(SIZE), write_then_wait=True)
    local, remote = dirty_tracker(gated, BS)
    gated.gate.clear()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(local.write_at(2 * BS, b"new"))
        await gated.started.wait()
        gated.write_then_wait = False
        gated.gate.set()
        await remote.read_at(2 * BS, BS)  # tracks block 2 while the write is in flight
    assert remote.take_dirty() == [2]


async def test_a_cancelled_write_still_marks_its_blocks() -> None:
    gated = GatedDevice(MemoryDevice(SIZE), write_then_wait=True)
    local, remote = dirty_tracker(gated, BS)
    remote.track_all()
    gated.gate.clear()
    task = asyncio.create_task(local.write_at(5 * BS, b"half"))
    await gated.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert remote.take_dirty() == [5]


async def test_closing_either_handle_closes_the_device_once() -> None:
    gated = GatedDevice(MemoryDevice(SIZE))
    local, remote = dirty_tracker(gated, BS)
    await remote.close()
    await local.close()
    assert gated.closes == 1
    with pytest.raises(DeviceClosedError):
        await local.write_at(0, b"x")
