"""Waiting cache: reads wait for absent blocks; local writes win over remote data."""

from __future__ import annotations

import asyncio

import pytest

from ferry.errors import BrokenResourceError, DeviceClosedError, DeviceRangeError
from ferry.storage import MemoryDevice, UnalignedWriteError, WaitingRemote, waiting_cache

from .storage_helpers import GatedDevice, pattern

BS = 4096
SIZE = 4 * BS + 100  # blocks 0..3 and a short block 4
SOURCE = pattern(SIZE, 9)


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


def block_data(block: int) -> bytes:
    return SOURCE[block * BS : min(SIZE, (block + 1) * BS)]


async def send(remote: WaitingRemote, block: int) -> None:
    await remote.write_at(block * BS, block_data(block))


async def test_all_blocks_start_absent() -> None:
    _local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    assert remote.present_count() == 0
    assert remote.missing() == [0, 1, 2, 3, 4]
    assert not remote.is_present(4)
    with pytest.raises(DeviceRangeError):
        remote.is_present(5)


async def test_one_need_per_block_however_many_readers_wait() -> None:
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    async with asyncio.TaskGroup() as tg:
        readers = [tg.create_task(local.read_at(BS + i, 2 * BS - 2 * i)) for i in range(5)]
        tail_reader = tg.create_task(local.read_at(SIZE - 1, 1))
        await settle()
        assert sorted(needs) == [1, 2, 4]
        assert not any(r.done() for r in readers)
        await send(remote, 1)
        await settle()
        assert not any(r.done() for r in readers)  # block 2 still missing
        await send(remote, 2)
        await send(remote, 4)
    for i, r in enumerate(readers):
        assert r.result() == SOURCE[BS + i : 3 * BS - i]
    assert tail_reader.result() == SOURCE[-1:]
    assert sorted(needs) == [1, 2, 4]


async def test_reads_of_present_blocks_do_not_wait() -> None:
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    await remote.write_at(0, SOURCE[: 2 * BS])
    assert await local.read_at(5, 2 * BS - 5) == SOURCE[5 : 2 * BS]
    assert needs == []
    assert remote.present_count() == 2


async def test_local_whole_block_write_survives_later_remote_data() -> None:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    await local.write_at(2 * BS, b"L" * BS)  # whole block: no waiting
    await local.write_at(4 * BS, b"T" * 100)  # the whole short last block
    assert remote.locally_written() == {2, 4}
    assert remote.is_present(2)
    await remote.write_at(0, SOURCE)  # the full source image arrives later
    remote.mark_absent([2, 4])  # and a dirty list names the blocks: still ours
    await send(remote, 2)
    assert remote.missing() == []
    assert await local.read_at(0, SIZE) == (
        SOURCE[: 2 * BS] + b"L" * BS + SOURCE[3 * BS : 4 * BS] + b"T" * 100
    )


async def test_partial_write_to_absent_block_waits_for_it() -> None:
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    write = asyncio.create_task(local.write_at(BS + 10, b"xy"))
    await settle()
    assert needs == [1]
    assert not write.done()
    assert not remote.is_present(1)
    await send(remote, 1)
    await write
    assert remote.locally_written() == {1}
    expected = SOURCE[BS : BS + 10] + b"xy" + SOURCE[BS + 12 : 2 * BS]
    assert await local.read_at(BS, BS) == expected
    await send(remote, 1)  # resent source data must not undo the local write
    assert await local.read_at(BS, BS) == expected


async def test_write_spanning_blocks_waits_only_for_partial_ones() -> None:
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    # Block 0 partly, block 1 wholly, block 2 partly.
    write = asyncio.create_task(local.write_at(BS - 1, b"w" * (BS + 2)))
    await settle()
    assert sorted(needs) == [0, 2]
    await send(remote, 0)
    await settle()
    assert not write.done()
    await send(remote, 2)
    await write
    assert remote.locally_written() == {0, 1, 2}
    assert (
        await local.read_at(0, 3 * BS)
        == SOURCE[: BS - 1] + b"w" * (BS + 2) + SOURCE[2 * BS + 1 : 3 * BS]
    )


async def test_mark_absent_makes_readers_wait_again() -> None:
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    remote.mark_all_present()
    assert await local.read_at(3 * BS, 4) == bytes(4)
    remote.mark_absent([3])
    reader = asyncio.create_task(local.read_at(3 * BS, 4))
    await settle()
    assert needs == [3]
    assert not reader.done()
    await send(remote, 3)
    assert await reader == SOURCE[3 * BS : 3 * BS + 4]
    remote.mark_absent([3])  # a second absence is a new episode: a new need
    reader = asyncio.create_task(local.read_at(3 * BS, 4))
    await settle()
    assert needs == [3, 3]
    remote.mark_present([3])  # e.g. the block turned out unchanged
    assert await reader == SOURCE[3 * BS : 3 * BS + 4]


async def test_fail_wakes_current_and_future_waiters() -> None:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    await send(remote, 0)
    error = BrokenResourceError("source vanished", peer="src")
    reader = asyncio.create_task(local.read_at(BS, 1))
    writer = asyncio.create_task(local.write_at(2 * BS + 1, b"p"))
    all_present = asyncio.create_task(remote.wait_all_present())
    await settle()
    remote.fail(error)
    for task in (reader, writer, all_present):
        with pytest.raises(BrokenResourceError):
            await task
    with pytest.raises(BrokenResourceError):
        await local.read_at(3 * BS, 1)
    assert await local.read_at(0, 4) == SOURCE[:4]  # present data stays readable


async def test_wait_all_present() -> None:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    done = asyncio.create_task(remote.wait_all_present())
    remote.mark_present([0, 1])
    await local.write_at(2 * BS, b"x" * BS)
    await settle()
    assert not done.done()
    await remote.write_at(3 * BS, SOURCE[3 * BS :])
    await done
    assert remote.present_count() == 5


async def test_set_on_need_reports_blocks_already_waited_for() -> None:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    reader = asyncio.create_task(local.read_at(2 * BS, 1))
    await settle()
    needs: list[int] = []
    remote.set_on_need(needs.append)
    assert needs == [2]
    await send(remote, 2)
    assert await reader == SOURCE[2 * BS : 2 * BS + 1]


async def test_remote_writes_must_be_whole_blocks() -> None:
    _local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    with pytest.raises(UnalignedWriteError):
        await remote.write_at(1, b"x" * BS)
    with pytest.raises(UnalignedWriteError):
        await remote.write_at(0, b"x" * (BS - 1))
    await remote.write_at(4 * BS, b"x" * 100)  # the short last block is whole
    assert remote.missing() == [0, 1, 2, 3]
    assert await remote.read_at(0, 4) == bytes(4)  # remote reads never wait


async def test_remote_write_cannot_land_on_a_local_write() -> None:
    """A remote write in flight delays a local write to the same block, not vice versa."""
    gated = GatedDevice(MemoryDevice(SIZE))
    local, remote = waiting_cache(gated, BS)
    gated.gate.clear()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(send(remote, 1))
        await gated.started.wait()
        tg.create_task(local.write_at(BS, b"L" * BS))
        await settle()
        gated.gate.set()
    assert await local.read_at(BS, BS) == b"L" * BS


async def test_close_wakes_waiters_and_closes_once() -> None:
    gated = GatedDevice(MemoryDevice(SIZE))
    local, remote = waiting_cache(gated, BS)
    reader = asyncio.create_task(local.read_at(0, 1))
    await settle()
    await remote.close()
    await local.close()
    with pytest.raises(DeviceClosedError):
        await reader
    assert gated.closes == 1


async def test_block_made_absent_again_while_waiting_on_another_is_asked_for_again() -> None:
    """Found by the property test: a reader waiting on block 0 must re-ask for block 1."""
    needs: list[int] = []
    local, remote = waiting_cache(MemoryDevice(SIZE), BS, on_need=needs.append)
    reader = asyncio.create_task(local.read_at(0, BS + 1))
    await settle()
    assert needs == [0, 1]
    await send(remote, 1)
    remote.mark_absent([1])
    await send(remote, 0)
    await settle()
    assert needs == [0, 1, 1]
    assert not reader.done()
    await send(remote, 1)
    assert await reader == SOURCE[: BS + 1]
