"""DeviceFS handlers called directly (no mount): errno translation, bounds, abort."""

from __future__ import annotations

import asyncio
import errno
import os

import pyfuse3
import pytest

from ferry.buffers import Buffer
from ferry.errors import DeviceClosedError, DeviceError, ReadOnlyError
from ferry.expose.fuse.filesystem import DeviceFS
from ferry.storage.providers.memory import MemoryDevice

FIRST = pyfuse3.ROOT_INODE + 1


class RaisingDevice(MemoryDevice):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(8192, name="raising")
        self.exc = exc

    async def read_at(self, offset: int, length: int) -> bytes:
        raise self.exc

    async def write_at(self, offset: int, data: Buffer) -> None:
        raise self.exc

    async def flush(self) -> None:
        raise self.exc


def full_disk() -> DeviceError:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        try:
            raise DeviceError("write", device="d") from exc
        except DeviceError as wrapped:
            return wrapped


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DeviceError("media error"), errno.EIO),
        (ReadOnlyError("read only"), errno.EROFS),
        (DeviceClosedError("closed"), errno.EIO),
        (full_disk(), errno.ENOSPC),
        (RuntimeError("a bug"), errno.EIO),
    ],
)
async def test_device_errors_become_errnos(exc: BaseException, expected: int) -> None:
    fs = DeviceFS({"d": RaisingDevice(exc)})
    for call in (fs.read(FIRST, 0, 4096), fs.write(FIRST, 0, b"x"), fs.fsync(FIRST, False)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert info.value.errno == expected


async def test_inodes_follow_sorted_names_and_sizes_are_device_sizes() -> None:
    fs = DeviceFS({"b": MemoryDevice(3000), "a": MemoryDevice(5000)})
    assert fs.names == ["a", "b"]
    ctx = pyfuse3.RequestContext()
    a = await fs.lookup(pyfuse3.ROOT_INODE, b"a", ctx)
    b = await fs.lookup(pyfuse3.ROOT_INODE, b"b", ctx)
    assert (a.st_ino, a.st_size) == (FIRST, 5000)
    assert (b.st_ino, b.st_size) == (FIRST + 1, 3000)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.lookup(pyfuse3.ROOT_INODE, b"c", ctx)
    assert info.value.errno == errno.ENOENT
    st = await fs.statfs(ctx)
    assert st.f_blocks * st.f_frsize >= 8000


async def test_reads_clamp_at_the_end_and_writes_cannot_grow() -> None:
    dev = MemoryDevice(10_000)
    await dev.write_at(9_990, b"0123456789")
    fs = DeviceFS({"d": dev})
    assert await fs.read(FIRST, 9_995, 4096) == b"56789"
    assert await fs.read(FIRST, 10_000, 4096) == b""
    assert await fs.write(FIRST, 0, b"abc") == 3
    assert await dev.read_at(0, 3) == b"abc"
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.write(FIRST, 9_999, b"ab")
    assert info.value.errno == errno.EFBIG
    counters = fs.counters("d")
    assert (counters.bytes_read, counters.bytes_written, counters.largest_write_bytes) == (5, 3, 3)


async def test_open_with_truncate_is_refused() -> None:
    fs = DeviceFS({"d": MemoryDevice(4096)})
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.open(FIRST, os.O_RDWR | os.O_TRUNC, pyfuse3.RequestContext())
    assert info.value.errno == errno.EPERM
    fi = await fs.open(FIRST, os.O_RDWR, pyfuse3.RequestContext())
    assert fi.keep_cache


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0"])
def test_invalid_file_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        DeviceFS({name: MemoryDevice(1)})


class Stuck(MemoryDevice):
    async def read_at(self, offset: int, length: int) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_abort_requests_fails_a_stuck_read_with_eio() -> None:
    fs = DeviceFS({"d": Stuck(4096)})
    reader = asyncio.create_task(fs.read(FIRST, 0, 4096))
    await asyncio.sleep(0)
    assert not reader.done()
    fs.abort_requests()
    with pytest.raises(pyfuse3.FUSEError) as info:
        await reader
    assert info.value.errno == errno.EIO
    assert not reader.cancelled()
    with pytest.raises(pyfuse3.FUSEError):  # later requests fail at once
        await fs.read(FIRST, 0, 1)


async def test_an_outside_cancellation_still_propagates() -> None:
    fs = DeviceFS({"d": Stuck(4096)})
    reader = asyncio.create_task(fs.read(FIRST, 0, 4096))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
