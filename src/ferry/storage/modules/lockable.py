"""Gates in front of a device: a pause lock and a read-only switch.

:class:`Lockable` freezes a device at the migration hand-off: ``lock()``
returns once every read and write already in flight has finished, and holds
new ones until ``unlock()``. ``flush()`` and ``close()`` are never held (they
do not change contents, and closing must always work); closing releases the
held operations, which then fail with ``DeviceClosedError``.

:class:`ReadOnlyGate` rejects writes while switched to read-only, for
example on a source after hand-off so a stray writer fails loudly.
"""

from __future__ import annotations

import asyncio

from ferry.buffers import Buffer
from ferry.errors import ReadOnlyError
from ferry.storage.device import Device
from ferry.storage.modules._forward import ForwardingDevice


class Lockable(ForwardingDevice):
    """A device whose reads and writes can be paused."""

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self._open = asyncio.Event()  # set while unlocked
        self._open.set()
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        self._in_flight = 0

    @property
    def locked(self) -> bool:
        return not self._open.is_set()

    async def lock(self) -> None:
        """Hold new reads/writes, then wait for those in flight to finish.

        If cancelled while waiting, the device is unlocked again, so a
        cancelled ``lock()`` leaves no one held.
        """
        self._open.clear()
        try:
            await self._idle.wait()
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        """Let held and new reads/writes proceed."""
        self._open.set()

    async def _enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def read_at(self, offset: int, length: int) -> bytes:
        await self._enter()
        try:
            return await self._inner.read_at(offset, length)
        finally:
            self._leave()

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self._enter()
        try:
            await self._inner.write_at(offset, data)
        finally:
            self._leave()

    async def close(self) -> None:
        self._open.set()  # release held operations; the closed device fails them
        await self._inner.close()


class ReadOnlyGate(ForwardingDevice):
    """A device that refuses writes with :class:`ReadOnlyError` while read-only."""

    def __init__(self, device: Device, *, read_only: bool = False) -> None:
        super().__init__(device)
        self._read_only = read_only

    @property
    def read_only(self) -> bool:
        return self._read_only

    def set_read_only(self, read_only: bool) -> None:
        self._read_only = read_only

    async def write_at(self, offset: int, data: Buffer) -> None:
        if self._read_only:
            raise ReadOnlyError("writes are switched off", device=self.name)
        await self._inner.write_at(offset, data)
