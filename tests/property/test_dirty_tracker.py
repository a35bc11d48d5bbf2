"""Property: a dirty tracker never misses a write, however writes and copies interleave.

A writer task writes random data through the local handle while a migrator
task copies every block through the remote handle, then repeatedly takes
the dirty list and copies those blocks again. The inner device yields to the
event loop before and after applying each write, and both tasks yield a
hypothesis-chosen number of times between steps, so a write can be in
flight while the migrator reads. Once the writer stops, one last round of
take_dirty + copy must leave the copy equal to the source.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.buffers import Buffer
from ferry.storage import Device, MemoryDevice, dirty_tracker
from ferry.storage.modules._forward import ForwardingDevice

BS = 512
SIZE = 6 * BS + 100
BLOCKS = -(-SIZE // BS)


class YieldingDevice(ForwardingDevice):
    """Suspends before and after each write and before each read, like real I/O.

    How often it yields each time comes from ``pauses`` (cycled), so the
    order in which concurrent operations land varies from run to run.
    """

    def __init__(self, inner: Device, pauses: list[int]) -> None:
        super().__init__(inner)
        self._pauses = itertools.cycle(pauses)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await yields(next(self._pauses))
        await self._inner.write_at(offset, data)
        await yields(next(self._pauses))

    async def read_at(self, offset: int, length: int) -> bytes:
        await yields(next(self._pauses))
        return await self._inner.read_at(offset, length)


writes = st.lists(
    st.tuples(
        st.integers(0, SIZE - 1),  # offset
        st.integers(1, 2 * BS),  # length (clipped to the device)
        st.integers(0, 255),  # fill byte
        st.integers(0, 3),  # yields before the next write
    ),
    max_size=30,
)


async def yields(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def scenario(
    ops: list[tuple[int, int, int, int]],
    copy_yields: list[int],
    device_pauses: list[int],
    track_all_first: bool,
) -> None:
    source = MemoryDevice(SIZE)
    local, remote = dirty_tracker(YieldingDevice(source, device_pauses), BS)
    if track_all_first:
        remote.track_all()
    copy = bytearray(SIZE)
    writer_done = asyncio.Event()

    async def copy_block(block: int) -> None:
        start = block * BS
        length = min(BS, SIZE - start)
        copy[start : start + length] = await remote.read_at(start, length)

    async def writer() -> None:
        for offset, length, fill, pause in ops:
            length = min(length, SIZE - offset)
            await local.write_at(offset, bytes([fill]) * length)
            await yields(pause)
        writer_done.set()

    async def migrator() -> None:
        step = 0
        for block in range(BLOCKS):
            await copy_block(block)
            await yields(copy_yields[step % len(copy_yields)])
            step += 1
        while not writer_done.is_set():
            for block in remote.take_dirty():
                await copy_block(block)
            await yields(1 + copy_yields[step % len(copy_yields)])
            step += 1
        for block in remote.take_dirty():  # the hand-off: the writer has stopped
            await copy_block(block)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        tg.create_task(migrator())
    assert remote.dirty_count() == 0
    assert bytes(copy) == await source.read_at(0, SIZE)
    await local.close()


@settings(max_examples=200, deadline=None)
@given(
    ops=writes,
    copy_yields=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    device_pauses=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    track_all_first=st.booleans(),
)
def test_copy_equals_source_after_the_last_dirty_round(
    ops: list[tuple[int, int, int, int]],
    copy_yields: list[int],
    device_pauses: list[int],
    track_all_first: bool,
) -> None:
    asyncio.run(scenario(ops, copy_yields, device_pauses, track_all_first))
