"""A device held entirely in memory: tests, scratch space, small caches."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from ferry.buffers import Buffer
from ferry.errors import DeviceClosedError
from ferry.storage.device import check_range


class MemoryDevice:
    """A :class:`~ferry.storage.device.Device` backed by a ``bytearray``.

    Starts all zero. Operations complete without yielding to the event loop,
    so each read or write is atomic with respect to other tasks.
    """

    def __init__(self, size_bytes: int, *, name: str = "memory") -> None:
        if size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        self.name = name
        self._size_bytes = size_bytes
        self._data: bytearray | None = bytearray(size_bytes)

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    def _buffer(self) -> bytearray:
        if self._data is None:
            raise DeviceClosedError("device is closed", device=self.name)
        return self._data

    async def read_at(self, offset: int, length: int) -> bytes:
        data = self._buffer()
        check_range(self._size_bytes, offset, length, self.name)
        # One copy straight out of a memoryview: slicing the bytearray first would
        # copy twice and, for large reads, churn fresh pages through mmap/munmap.
        return bytes(memoryview(data)[offset : offset + length])

    async def write_at(self, offset: int, data: Buffer) -> None:
        buf = self._buffer()
        view = memoryview(data).cast("B")
        check_range(self._size_bytes, offset, len(view), self.name)
        buf[offset : offset + len(view)] = view

    async def flush(self) -> None:
        self._buffer()

    async def close(self) -> None:
        self._data = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
