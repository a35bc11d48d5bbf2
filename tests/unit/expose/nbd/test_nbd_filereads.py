"""Read replies served straight from a file (inline pread batches and sendfile).

The devices here count ``read_at`` calls, so a read answered with none proves
the file path served it; replies are parsed strictly, so bytes of one reply
inside another would break the parse or the data comparison.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.errors import DeviceRangeError
from ferry.expose.nbd.filereads import INLINE_READ_MAX_BYTES, file_extent_of
from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.modules.dirty import dirty_tracker
from ferry.storage.modules.lockable import Lockable, ReadOnlyGate
from ferry.storage.modules.metrics import MetricsDevice
from ferry.storage.modules.waiting import waiting_cache
from ferry.storage.providers.file import FileDevice
from ferry.storage.providers.memory import MemoryDevice

from .nbd_helpers import STRUCTURED_MAGIC, RawClient, request

SIZE = 8 << 20
READ, WRITE = 0, 1
EINVAL, EIO = 22, 5
LARGE = INLINE_READ_MAX_BYTES + 1


class FileOnlyDevice(FileDevice):
    """A FileDevice that counts ``read_at`` calls: zero means the file paths served."""

    read_at_calls = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.read_at_calls += 1
        return await super().read_at(offset, length)


@dataclass
class Served:
    sock: str
    path: Path
    image: bytes
    device: FileOnlyDevice


@pytest.fixture
async def served(sock_dir: Path) -> AsyncIterator[Served]:
    path = sock_dir / "disk.img"
    image = os.urandom(SIZE)
    path.write_bytes(image)
    device = FileOnlyDevice(path)
    try:
        async with NBDServer({"disk": Export(device)}).serve_unix(sock_dir / "s.sock") as sock:
            yield Served(sock, path, image, device)
    finally:
        await device.close()


async def read_reply(c: RawClient, structured: bool, lengths: dict[int, int]) -> tuple[int, bytes]:
    """One complete successful READ reply: (handle, data)."""
    if not structured:
        error, handle = await c.simple_reply()
        assert error == 0, f"error {error} for handle {handle}"
        return handle, await c.reader.readexactly(lengths[handle])
    magic, flags, rtype, handle, length = struct.unpack(">IHHQI", await c.reader.readexactly(20))
    assert magic == STRUCTURED_MAGIC
    assert flags & 1, "every chunk is the last (DONE)"
    assert rtype == 1, f"expected OFFSET_DATA, got {rtype}"
    await c.reader.readexactly(8)  # offset
    return handle, await c.reader.readexactly(length - 8)


async def connect(sock: str, structured: bool) -> RawClient:
    c = await RawClient.connect(sock)
    await c.go("disk", structured=structured)
    return c


@pytest.mark.parametrize("structured", [False, True])
async def test_small_and_large_reads_come_from_the_file(served: Served, structured: bool) -> None:
    c = await connect(served.sock, structured)
    cases = [(0, 1), (4095, 4097), (SIZE - 3, 3), (12345, INLINE_READ_MAX_BYTES), (777, LARGE)]
    cases += [(SIZE - (3 << 20), 3 << 20)]
    for handle, (offset, length) in enumerate(cases):
        c.writer.write(request(READ, handle, offset, length))
        got_handle, data = await read_reply(c, structured, {handle: length})
        assert got_handle == handle
        assert data == served.image[offset : offset + length]
    assert served.device.read_at_calls == 0
    await c.close()


@pytest.mark.parametrize("structured", [False, True])
async def test_pipelined_replies_never_interleave(served: Served, structured: bool) -> None:
    """Many small (batched) and large (sendfile) reads in flight at once, while
    the client reads nothing until all are sent, so the server's socket fills
    and sendfile has to wait for room between parts of one reply."""
    rng = random.Random(7)
    c = await connect(served.sock, structured)
    expected: dict[int, bytes] = {}
    for handle in range(200):
        length = rng.choice([1, 512, 4096, 65536, LARGE, 1 << 20, 3 << 20])
        offset = rng.randrange(0, SIZE - length + 1)
        c.writer.write(request(READ, handle, offset, length))
        expected[handle] = served.image[offset : offset + length]
    await c.writer.drain()
    await asyncio.sleep(0.05)  # let the server fill its socket before we read
    lengths = {h: len(d) for h, d in expected.items()}
    seen = set()
    for _ in expected:
        handle, data = await read_reply(c, structured, lengths)
        assert handle not in seen
        seen.add(handle)
        assert data == expected[handle], f"reply {handle} holds the wrong bytes"
    assert served.device.read_at_calls == 0
    await c.close()


async def test_reads_and_writes_mixed(served: Served) -> None:
    """Writes go through write_at, and reads after them see the new bytes."""
    c = await connect(served.sock, structured=False)
    new = os.urandom(LARGE)
    assert await c.write(1, 4096, new) == 0
    assert await c.read(2, 4096, LARGE) == (0, new)
    assert await c.read(3, 4096 + 10, 100) == (0, new[10:110])
    assert served.path.read_bytes()[4096 : 4096 + LARGE] == new
    await c.close()


async def test_truncated_file(served: Served) -> None:
    """A file shorter than the device: a small read falls back to read_at and
    gets EIO; a large one is cut off mid-reply, so the connection is dropped."""
    os.truncate(served.path, SIZE - (1 << 20))
    c = await connect(served.sock, structured=False)
    assert (await c.read(1, SIZE - 4096, 4096))[0] == EIO
    assert served.device.read_at_calls == 1
    c.writer.write(request(READ, 2, SIZE - (2 << 20), 2 << 20))
    assert await c.simple_reply() == (0, 2)
    received = await c.reader.read(4 << 20)
    while chunk := await c.reader.read(1 << 20):
        received += chunk
    assert len(received) < 2 << 20  # cut short, then closed
    await c.close()


async def test_closed_device_gets_eio(served: Served) -> None:
    c = await connect(served.sock, structured=False)
    await served.device.close()
    assert (await c.read(1, 0, 4096))[0] == EIO
    assert (await c.read(2, 0, LARGE))[0] == EIO
    await c.close()


async def test_file_extent_through_decorators(tmp_path: Path) -> None:
    """Modules that leave reads alone forward the capability; modules that
    change reads (or have no file below) do not offer it."""
    device = FileDevice(tmp_path / "d.img", size_bytes=1 << 20, create=True)
    fd = device.fileno()
    local, remote = dirty_tracker(device, 65536)
    assert local.file_extent(4096, 10) == (fd, 4096)
    assert ReadOnlyGate(local).file_extent(0, 1) == (fd, 0)
    with pytest.raises(DeviceRangeError):
        local.file_extent((1 << 20) - 1, 2)
    assert remote.file_extent(0, 1) is None  # its reads start tracking
    assert MetricsDevice(device, name="m").file_extent(0, 1) is None
    assert Lockable(device).file_extent(0, 1) is None
    waiting_local, _ = waiting_cache(device, 65536)
    assert waiting_local.file_extent(0, 1) is None
    assert file_extent_of(MemoryDevice(4096)) is None
    assert file_extent_of(ReadOnlyGate(MemoryDevice(4096))) is not None  # offered...
    assert ReadOnlyGate(MemoryDevice(4096)).file_extent(0, 1) is None  # ...but declined
    await device.close()


async def test_dirty_tracker_still_sees_writes_and_metrics_still_count_reads(
    sock_dir: Path,
) -> None:
    device = FileDevice(sock_dir / "d.img", size_bytes=1 << 20, create=True)
    local, remote = dirty_tracker(device, 65536)
    remote.track_all()
    metered = MetricsDevice(device, name="m")
    exports = {"fast": Export(local), "metered": Export(metered)}
    try:
        async with NBDServer(exports).serve_unix(sock_dir / "s.sock") as sock:
            c = await RawClient.connect(sock)
            await c.go("fast")
            assert await c.write(1, 65536 * 3 + 5, b"hello") == 0
            assert await c.read(2, 65536 * 3 + 5, 5) == (0, b"hello")
            assert await c.read(3, 0, LARGE) == (0, bytes(LARGE))
            assert remote.take_dirty() == [3]
            await c.close()
            m = await RawClient.connect(sock)
            await m.go("metered")
            assert await m.read(1, 65536 * 3 + 5, 5) == (0, b"hello")
            assert await m.read(2, 0, LARGE) == (0, bytes(LARGE))
            assert metered.stats().reads == 2
            await m.close()
    finally:
        await device.close()


async def test_waiting_cache_reads_still_wait(sock_dir: Path) -> None:
    """A read of an absent block must wait for the block, not read the file."""
    device = FileDevice(sock_dir / "d.img", size_bytes=1 << 20, create=True)
    needed: asyncio.Queue[int] = asyncio.Queue()
    local, remote = waiting_cache(device, 65536, on_need=needed.put_nowait)
    try:
        async with NBDServer({"d": Export(local)}).serve_unix(sock_dir / "s.sock") as sock:
            c = await RawClient.connect(sock)
            await c.go("d")
            c.writer.write(request(READ, 1, 65536 + 100, 4096))
            c.writer.write(request(READ, 2, 0, 65536 * 3))
            assert {await asyncio.wait_for(needed.get(), 10) for _ in range(3)} == {0, 1, 2}
            await remote.write_at(0, b"A" * 65536 * 3)
            replies = {}
            for _ in range(2):
                error, handle = await c.simple_reply()
                assert error == 0
                replies[handle] = await c.reader.readexactly(4096 if handle == 1 else 65536 * 3)
            assert replies == {1: b"A" * 4096, 2: b"A" * 65536 * 3}
            await c.close()
    finally:
        await device.close()


async def test_file_reads_over_tcp(served: Served) -> None:
    """sendfile and the inline batch work on TCP sockets as well as UNIX ones."""
    server = NBDServer({"disk": Export(served.device)})
    async with server.serve_tcp(insecure=True) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        c = RawClient(reader, writer)
        await c.go("disk")
        for handle, (offset, length) in enumerate([(5, 4096), (100, 3 << 20)]):
            assert await c.read(handle, offset, length) == (
                0,
                served.image[offset : offset + length],
            )
        await c.close()
    assert served.device.read_at_calls == 0
