"""A device stored in a regular file (or a block device node).

I/O goes straight to a file descriptor with ``os.pread``/``os.pwrite``: a
read or write that hits the page cache costs microseconds, less than handing
it to a thread pool would, so the event loop calls them directly. A new file
is created *sparse* (``ftruncate``), so an empty 10 GiB disk costs no space;
:meth:`FileDevice.allocated_blocks` shows which blocks hold data.
"""

from __future__ import annotations

import errno
import os
import stat
from types import TracebackType
from typing import Self

from ferry.buffers import Buffer
from ferry.errors import ConfigError, DeviceClosedError, DeviceError, ReadOnlyError
from ferry.storage.device import Geometry, check_range


class DeviceFullError(DeviceError):
    """The storage under a device has no space left (ENOSPC or EDQUOT)."""


def translate_os_error(exc: OSError, action: str, device: str) -> DeviceError:
    """Turn an ``OSError`` from ``action`` into the matching :class:`DeviceError`."""
    detail = f"{action}: {exc.strerror or exc} (errno {exc.errno})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DeviceFullError(detail, device=device)
    if exc.errno == errno.EROFS:
        return ReadOnlyError(detail, device=device)
    return DeviceError(detail, device=device)


class FileDevice:
    """A :class:`~ferry.storage.device.Device` over a file.

    ``size_bytes`` defaults to the file's current size. With ``create=True``
    the file is created if missing and extended (sparsely) to ``size_bytes``
    if shorter; an existing longer file is never shrunk. Without ``create``,
    a file shorter than ``size_bytes`` is an error. ``read_only`` opens the
    file ``O_RDONLY`` and rejects writes with :class:`ReadOnlyError`.
    ``flush()`` is ``fsync``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size_bytes: int | None = None,
        create: bool = False,
        read_only: bool = False,
        name: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.name = name if name is not None else self.path
        self.read_only = read_only
        if create and read_only:
            raise ConfigError("create and read_only cannot both be set")
        if create and size_bytes is None:
            raise ConfigError("create=True needs size_bytes")
        if size_bytes is not None and size_bytes < 0:
            raise ConfigError("size_bytes must be >= 0")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise translate_os_error(exc, "open", self.name) from exc
        try:
            self._size_bytes = self._settle_size(fd, size_bytes, create)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def _settle_size(self, fd: int, size_bytes: int | None, create: bool) -> int:
        try:
            st = os.fstat(fd)
            # A block device node reports st_size 0; its real size is its end.
            is_block_device = stat.S_ISBLK(st.st_mode)
            file_size = os.lseek(fd, 0, os.SEEK_END) if is_block_device else st.st_size
            if size_bytes is None:
                return file_size
            if file_size < size_bytes:
                if not create:
                    raise DeviceError(
                        f"file holds {file_size} bytes, fewer than size_bytes={size_bytes}",
                        device=self.name,
                    )
                os.ftruncate(fd, size_bytes)
        except OSError as exc:
            raise translate_os_error(exc, "size the file", self.name) from exc
        return size_bytes

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    def fileno(self) -> int:
        """The open file descriptor (for callers that need to hand it on)."""
        return self._open_fd()

    def _open_fd(self) -> int:
        if self._fd is None:
            raise DeviceClosedError("device is closed", device=self.name)
        return self._fd

    def file_extent(self, offset: int, length: int) -> tuple[int, int]:
        """Where ``read_at(offset, length)`` would read from: ``(fd, file_offset)``.

        An optional capability for zero-copy readers (``os.sendfile``, a
        ``pread`` off the event loop) such as the NBD server: the bytes at
        ``file_offset`` of ``fd`` are the device's bytes at ``offset``.
        Range-checked like :meth:`read_at`; raises :class:`DeviceClosedError`
        once closed. The descriptor stays owned by the device: use it only
        until the device is closed.
        """
        fd = self._open_fd()
        check_range(self._size_bytes, offset, length, self.name)
        return fd, offset

    async def read_at(self, offset: int, length: int) -> bytes:
        return self.read_sync(offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        """:meth:`read_at` without the coroutine (it never waits on the loop)."""
        fd = self._open_fd()
        check_range(self._size_bytes, offset, length, self.name)
        try:
            data = os.pread(fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            done = len(data)
            while done < length:
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    raise DeviceError(
                        f"file ended at {offset + done}, inside the device's "
                        f"{self._size_bytes} bytes (was it truncated?)",
                        device=self.name,
                    )
                parts.append(chunk)
                done += len(chunk)
        except OSError as exc:
            raise translate_os_error(exc, f"read {length} bytes at {offset}", self.name) from exc
        return b"".join(parts)

    async def write_at(self, offset: int, data: Buffer) -> None:
        self.write_sync(offset, data)

    def write_sync(self, offset: int, data: Buffer) -> None:
        """:meth:`write_at` without the coroutine (it never waits on the loop)."""
        fd = self._open_fd()
        view = memoryview(data).cast("B")
        check_range(self._size_bytes, offset, len(view), self.name)
        if self.read_only:
            raise ReadOnlyError("device is read-only", device=self.name)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise translate_os_error(
                exc, f"write {len(view)} bytes at {offset}", self.name
            ) from exc

    async def flush(self) -> None:
        self.flush_sync()

    def flush_sync(self) -> None:
        """:meth:`flush` without the coroutine."""
        fd = self._open_fd()
        try:
            os.fsync(fd)
        except OSError as exc:
            raise translate_os_error(exc, "fsync", self.name) from exc

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        """:meth:`close` without the coroutine."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as exc:
            raise translate_os_error(exc, "close", self.name) from exc

    def allocated_blocks(self, block_size_bytes: int) -> set[int]:
        """Indices of the blocks that hold data in the (sparse) file.

        Found with ``SEEK_DATA``/``SEEK_HOLE``, so a large sparse file costs
        one pair of seeks per data extent. Blocks are reported at the
        filesystem's allocation granularity: a block is listed if any byte of
        it is allocated. On filesystems without hole support every block is
        reported.
        """
        fd = self._open_fd()
        geometry = Geometry(self._size_bytes, block_size_bytes)
        blocks: set[int] = set()
        pos = 0
        try:
            while pos < self._size_bytes:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data at or after pos
                        break
                    raise
                if data >= self._size_bytes:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), self._size_bytes)
                blocks.update(geometry.blocks_touching(data, hole - data))
                pos = hole
        except OSError as exc:
            raise translate_os_error(exc, "seek data/holes", self.name) from exc
        return blocks

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
