"""The conformance suite every Device implementation runs.

Each factory builds a fresh, all-zero device of SIZE bytes (deliberately not
a multiple of the block size) over real providers; every test then checks
one clause of the contract in ``ferry.storage.device``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import pytest

from ferry.errors import DeviceClosedError, DeviceRangeError
from ferry.storage import (
    Device,
    FileDevice,
    Lockable,
    MemoryDevice,
    MetricsDevice,
    OverlayDevice,
    ReadOnlyGate,
    VolatilityMonitor,
    dirty_tracker,
    waiting_cache,
)

from .storage_helpers import pattern

BS = 4096
SIZE = 5 * BS + 1000  # the last block is short on purpose


class ManagedDevice(Device, Protocol):
    """A device that is also an async context manager (every ferry device is)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


Factory = Callable[[Path], ManagedDevice]


def _dirty_local(_: Path) -> ManagedDevice:
    return dirty_tracker(MemoryDevice(SIZE), BS)[0]


def _dirty_remote(_: Path) -> ManagedDevice:
    _local, remote = dirty_tracker(MemoryDevice(SIZE), BS)
    remote.track_all()
    return remote


def _waiting_local(_: Path) -> ManagedDevice:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    remote.mark_all_present()
    return local


FACTORIES: dict[str, Factory] = {
    "memory": lambda _: MemoryDevice(SIZE),
    "file": lambda p: FileDevice(p / "disk.img", size_bytes=SIZE, create=True),
    "overlay": lambda p: OverlayDevice(
        MemoryDevice(SIZE), p / "overlay.img", block_size_bytes=BS, base_id=b"zero"
    ),
    "dirty-local": _dirty_local,
    "dirty-remote": _dirty_remote,
    "volatility": lambda _: VolatilityMonitor(MemoryDevice(SIZE), BS),
    "lockable": lambda _: Lockable(MemoryDevice(SIZE)),
    "read-only-gate": lambda _: ReadOnlyGate(MemoryDevice(SIZE)),
    "metrics": lambda _: MetricsDevice(MemoryDevice(SIZE), name="m"),
    "waiting-local": _waiting_local,
}


@pytest.fixture(params=sorted(FACTORIES))
async def device(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Device]:
    dev = FACTORIES[request.param](tmp_path)
    try:
        yield dev
    finally:
        await dev.close()


async def test_is_a_device_of_the_right_size(device: Device) -> None:
    assert isinstance(device, Device)
    assert device.size_bytes == SIZE


async def test_starts_zeroed(device: Device) -> None:
    assert await device.read_at(0, SIZE) == bytes(SIZE)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (1, 7), (BS - 3, 10), (BS, BS), (2 * BS + 17, 2 * BS + 5), (SIZE - 7, 7), (0, SIZE)],
)
async def test_round_trip_at_odd_offsets(device: Device, offset: int, length: int) -> None:
    data = pattern(length, offset)
    await device.write_at(offset, data)
    assert await device.read_at(offset, length) == data
    expected = bytearray(SIZE)
    expected[offset : offset + length] = data
    assert await device.read_at(0, SIZE) == expected


async def test_accepts_any_buffer(device: Device) -> None:
    await device.write_at(10, bytearray(b"abc"))
    await device.write_at(13, memoryview(b"xdefx")[1:4])
    assert await device.read_at(10, 6) == b"abcdef"


async def test_zero_length_operations(device: Device) -> None:
    await device.write_at(SIZE, b"")
    assert await device.read_at(SIZE, 0) == b""
    assert await device.read_at(0, 0) == b""


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1), (0, -1), (10 * SIZE, 1)],
)
async def test_read_outside_raises_range_error(device: Device, offset: int, length: int) -> None:
    with pytest.raises(DeviceRangeError):
        await device.read_at(offset, length)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1)])
async def test_write_outside_raises_and_changes_nothing(
    device: Device, offset: int, length: int
) -> None:
    with pytest.raises(DeviceRangeError):
        await device.write_at(offset, b"\xff" * length)
    assert await device.read_at(0, SIZE) == bytes(SIZE)


async def test_short_last_block(device: Device) -> None:
    tail = pattern(1000, 3)
    await device.write_at(5 * BS, tail)
    assert await device.read_at(5 * BS, 1000) == tail
    await device.write_at(5 * BS - 5, b"0123456789")  # straddles into the short block
    assert await device.read_at(5 * BS - 5, 10) == b"0123456789"
    assert await device.read_at(5 * BS + 5, 995) == tail[5:]


async def test_random_operations_match_a_model(device: Device) -> None:
    rng = random.Random(1234)
    model = bytearray(SIZE)
    for step in range(200):
        offset = rng.randrange(SIZE)
        length = rng.randrange(0, min(3 * BS, SIZE - offset) + 1)
        if rng.random() < 0.6:
            data = rng.randbytes(length)
            await device.write_at(offset, data)
            model[offset : offset + length] = data
        else:
            assert await device.read_at(offset, length) == model[offset : offset + length], step
        if step % 50 == 0:
            await device.flush()
    assert await device.read_at(0, SIZE) == model


async def test_close_is_idempotent_and_final(device: Device) -> None:
    await device.write_at(0, b"x")
    await device.close()
    await device.close()
    with pytest.raises(DeviceClosedError):
        await device.read_at(0, 1)
    with pytest.raises(DeviceClosedError):
        await device.write_at(0, b"y")
    with pytest.raises(DeviceClosedError):
        await device.flush()


async def test_async_context_manager_closes(tmp_path: Path) -> None:
    for name, factory in FACTORIES.items():
        (tmp_path / name).mkdir()
        dev = factory(tmp_path / name)
        async with dev as entered:
            assert entered is dev
        with pytest.raises(DeviceClosedError):
            await dev.read_at(0, 1)
