"""The base every decorator module builds on: a device that forwards to another.

A module overrides only the methods whose behaviour it changes; everything
else reaches the wrapped device unchanged, so modules stack in any order
(Silo's ``modules/`` pattern).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from ferry.buffers import Buffer
from ferry.storage.device import Device


def device_name(device: Device) -> str | None:
    """The human-readable name of ``device`` for errors and logs, if it has one."""
    name = getattr(device, "name", None)
    return name if isinstance(name, str) else None


class ForwardingDevice:
    """A :class:`Device` that passes every call to ``inner``.

    Closing it closes ``inner`` (the device contract: closing a decorator
    closes what it wraps).
    """

    def __init__(self, inner: Device) -> None:
        self._inner = inner

    @property
    def inner(self) -> Device:
        """The wrapped device."""
        return self._inner

    @property
    def name(self) -> str | None:
        return device_name(self._inner)

    @property
    def size_bytes(self) -> int:
        return self._inner.size_bytes

    async def read_at(self, offset: int, length: int) -> bytes:
        return await self._inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self._inner.write_at(offset, data)

    def file_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """The inner device's ``file_extent``, if reads pass through unchanged.

        An optional capability (see ``FileDevice.file_extent``): a reader
        that uses it bypasses ``read_at``. That is only safe while this
        module leaves reads alone, so a module that overrides ``read_at``
        (a waiting cache, a lock, read tracking, metrics) answers ``None``
        here unless it overrides this method too; ``None`` also means the
        inner device has no file behind it. Writes never take this path,
        so modules that only watch writes (dirty tracking) keep working.
        """
        if type(self).read_at is not ForwardingDevice.read_at:
            return None
        extent = getattr(self._inner, "file_extent", None)
        if extent is None:
            return None
        result: tuple[int, int] | None = extent(offset, length)
        return result

    async def flush(self) -> None:
        await self._inner.flush()

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
