"""Lockable and ReadOnlyGate; MetricsDevice counters."""

from __future__ import annotations

import asyncio

import pytest

from ferry.errors import DeviceClosedError, ReadOnlyError
from ferry.storage import DeviceStats, Lockable, MemoryDevice, MetricsDevice, ReadOnlyGate

from .storage_helpers import GatedDevice

SIZE = 8192


async def test_lock_waits_for_in_flight_operations() -> None:
    gated = GatedDevice(MemoryDevice(SIZE))
    dev = Lockable(gated)
    gated.gate.clear()
    async with asyncio.TaskGroup() as tg:
        write = tg.create_task(dev.write_at(0, b"first"))
        await gated.started.wait()
        lock = tg.create_task(dev.lock())
        await asyncio.sleep(0)
        assert dev.locked
        assert not lock.done()  # the write is still in flight
        gated.gate.set()
        await lock
        assert write.done()
    assert await gated.read_at(0, 5) == b"first"
    dev.unlock()
    await dev.close()


async def test_locked_device_holds_new_operations_until_unlock() -> None:
    mem = MemoryDevice(SIZE)
    dev = Lockable(mem)
    await dev.lock()
    async with asyncio.TaskGroup() as tg:
        write = tg.create_task(dev.write_at(0, b"held"))
        read = tg.create_task(dev.read_at(0, 4))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not write.done()
        assert not read.done()
        assert await mem.read_at(0, 4) == bytes(4)
        await dev.flush()  # flush is never held
        dev.unlock()
    assert not dev.locked
    assert await dev.read_at(0, 4) == b"held"
    await dev.close()


async def test_cancelled_lock_unlocks() -> None:
    gated = GatedDevice(MemoryDevice(SIZE))
    dev = Lockable(gated)
    gated.gate.clear()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(dev.write_at(0, b"x"))
        await gated.started.wait()
        lock = tg.create_task(dev.lock())
        await asyncio.sleep(0)
        lock.cancel()
        await asyncio.sleep(0)
        assert not dev.locked
        gated.gate.set()
    await dev.close()


async def test_close_releases_held_operations() -> None:
    dev = Lockable(MemoryDevice(SIZE))
    await dev.lock()
    read = asyncio.create_task(dev.read_at(0, 1))
    await asyncio.sleep(0)
    await dev.close()
    with pytest.raises(DeviceClosedError):
        await read


async def test_read_only_gate() -> None:
    mem = MemoryDevice(SIZE)
    gate = ReadOnlyGate(mem)
    assert not gate.read_only
    await gate.write_at(0, b"ok")
    gate.set_read_only(True)
    with pytest.raises(ReadOnlyError, match="memory"):
        await gate.write_at(0, b"no")
    assert await gate.read_at(0, 2) == b"ok"
    gate.set_read_only(False)
    await gate.write_at(0, b"ye")
    assert await mem.read_at(0, 2) == b"ye"
    await gate.close()


async def test_metrics_count_successful_operations() -> None:
    dev = MetricsDevice(MemoryDevice(SIZE), name="disk0")
    assert dev.name == "disk0"
    assert dev.stats() == DeviceStats()
    await dev.write_at(0, b"abc")
    await dev.write_at(100, memoryview(b"defg"))
    await dev.read_at(0, 10)
    await dev.flush()
    with pytest.raises(Exception, match="outside"):
        await dev.read_at(SIZE, 1)
    stats = dev.stats()
    assert (stats.reads, stats.writes, stats.flushes) == (1, 2, 1)
    assert (stats.read_bytes, stats.write_bytes) == (10, 7)
    assert stats.read_seconds >= 0.0
    assert stats.write_seconds >= 0.0
    await dev.close()
