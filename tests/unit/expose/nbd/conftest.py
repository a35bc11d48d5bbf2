"""Fixtures for NBD server tests: short socket paths and recording devices."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.buffers import Buffer
from ferry.errors import DeviceError
from ferry.storage.device import check_range


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path is limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ferry-nbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class RecordingDevice:
    """A bytearray device that logs operations and can hold writes or fail reads."""

    def __init__(self, size_bytes: int) -> None:
        self.data = bytearray(size_bytes)
        self.log: list[str] = []
        self.write_gate: asyncio.Event | None = None
        self.write_started = asyncio.Event()
        self.fail_reads = False

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(len(self.data), offset, length)
        if self.fail_reads:
            raise DeviceError("media error", device="recording")
        return bytes(self.data[offset : offset + length])

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(len(self.data), offset, len(data))
        self.log.append(f"write-start {offset}")
        self.write_started.set()
        if self.write_gate is not None:
            await self.write_gate.wait()
        self.data[offset : offset + len(data)] = data
        self.log.append(f"write-end {offset}")

    async def flush(self) -> None:
        self.log.append("flush")

    async def close(self) -> None:
        pass
