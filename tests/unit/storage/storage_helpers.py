"""Test helpers shared by the storage tests: devices that let a test step in."""

from __future__ import annotations

import asyncio

from ferry.buffers import Buffer
from ferry.storage.device import Device
from ferry.storage.modules._forward import ForwardingDevice


class GatedDevice(ForwardingDevice):
    """Forwards to ``inner``; while ``gate`` is clear, operations wait at it.

    A write is applied to ``inner`` *before* waiting at the gate when
    ``write_then_wait`` is set, so a test can hold a write that has landed
    but not returned. ``started`` is set whenever an operation reaches the gate.
    """

    def __init__(self, inner: Device, *, write_then_wait: bool = False) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.write_then_wait = write_then_wait
        self.closes = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.started.set()
        await self.gate.wait()
        return await self._inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        if self.write_then_wait:
            await self._inner.write_at(offset, data)
            self.started.set()
            await self.gate.wait()
            return
        self.started.set()
        await self.gate.wait()
        await self._inner.write_at(offset, data)

    async def close(self) -> None:
        self.closes += 1
        await self._inner.close()


def pattern(length: int, seed: int) -> bytes:
    """Deterministic, non-repeating-looking bytes (so misplaced data shows)."""
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(length))
