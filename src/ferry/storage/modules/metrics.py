"""Operation counters and timings for one device."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ferry.buffers import Buffer
from ferry.storage.device import Device
from ferry.storage.modules._forward import ForwardingDevice


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Completed operations on a device since it was wrapped.

    Only operations that succeeded are counted; the seconds are wall-clock
    time spent awaiting the wrapped device.
    """

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0


class MetricsDevice(ForwardingDevice):
    """A device that counts and times the reads, writes and flushes it forwards."""

    def __init__(self, device: Device, *, name: str) -> None:
        super().__init__(device)
        self._name = name
        self._reads = self._writes = self._flushes = 0
        self._read_bytes = self._write_bytes = 0
        self._read_seconds = self._write_seconds = 0.0

    @property
    def name(self) -> str:
        return self._name

    async def read_at(self, offset: int, length: int) -> bytes:
        start = time.perf_counter()
        data = await self._inner.read_at(offset, length)
        self._read_seconds += time.perf_counter() - start
        self._reads += 1
        self._read_bytes += len(data)
        return data

    async def write_at(self, offset: int, data: Buffer) -> None:
        start = time.perf_counter()
        await self._inner.write_at(offset, data)
        self._write_seconds += time.perf_counter() - start
        self._writes += 1
        self._write_bytes += memoryview(data).nbytes

    async def flush(self) -> None:
        await self._inner.flush()
        self._flushes += 1

    def stats(self) -> DeviceStats:
        """A snapshot of the counters."""
        return DeviceStats(
            reads=self._reads,
            writes=self._writes,
            flushes=self._flushes,
            read_bytes=self._read_bytes,
            write_bytes=self._write_bytes,
            read_seconds=self._read_seconds,
            write_seconds=self._write_seconds,
        )
