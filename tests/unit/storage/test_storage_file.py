"""FileDevice: sparse creation, allocated blocks, sizing rules, read-only, ENOSPC."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.errors import ConfigError, DeviceError, ReadOnlyError
from ferry.storage import DeviceFullError, FileDevice

from .storage_helpers import pattern

BS = 4096


async def test_create_makes_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    dev = FileDevice(path, size_bytes=64 * BS, create=True)
    try:
        assert path.stat().st_size == 64 * BS
        assert path.stat().st_blocks == 0  # no data blocks allocated yet
        assert dev.allocated_blocks(BS) == set()
        await dev.write_at(3 * BS + 10, b"x" * 20)
        await dev.write_at(40 * BS, b"y" * (2 * BS))
        await dev.flush()
        assert dev.allocated_blocks(BS) == {3, 40, 41}
        assert dev.allocated_blocks(8 * BS) == {0, 5}
    finally:
        await dev.close()


async def test_allocated_blocks_clips_to_device_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * (4 * BS))  # file longer than the device
    dev = FileDevice(path, size_bytes=2 * BS + 100)
    try:
        assert dev.allocated_blocks(BS) == {0, 1, 2}
    finally:
        await dev.close()


async def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = pattern(3 * BS + 5, 1)
    async with FileDevice(path, size_bytes=8 * BS, create=True) as dev:
        await dev.write_at(BS - 1, data)
        await dev.flush()
    async with FileDevice(path) as again:
        assert again.size_bytes == 8 * BS
        assert await again.read_at(BS - 1, len(data)) == data
        assert path.read_bytes()[BS - 1 : BS - 1 + len(data)] == data


async def test_create_extends_but_never_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"a" * 100)
    async with FileDevice(path, size_bytes=50, create=True) as dev:
        assert dev.size_bytes == 50
    assert path.stat().st_size == 100
    async with FileDevice(path, size_bytes=300, create=True) as dev:
        assert await dev.read_at(0, 300) == b"a" * 100 + bytes(200)


def test_sizing_errors(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"a" * 100)
    with pytest.raises(DeviceError, match="fewer than"):
        FileDevice(path, size_bytes=200)
    with pytest.raises(DeviceError, match="open"):
        FileDevice(tmp_path / "missing.img")
    with pytest.raises(ConfigError):
        FileDevice(path, create=True)
    with pytest.raises(ConfigError):
        FileDevice(path, size_bytes=100, create=True, read_only=True)


async def test_read_only_rejects_writes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"abcd")
    async with FileDevice(path, read_only=True) as dev:
        with pytest.raises(ReadOnlyError):
            await dev.write_at(0, b"z")
        assert await dev.read_at(0, 4) == b"abcd"
        await dev.flush()
    assert path.read_bytes() == b"abcd"


async def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    async with FileDevice(path, size_bytes=2 * BS, create=True) as dev:
        os.truncate(path, BS)  # someone else shrank it under us
        with pytest.raises(DeviceError, match="truncated"):
            await dev.read_at(BS - 10, 20)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, so writing beyond it hits a real ENOSPC."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_no_space_raises_device_full(tiny_fs: Path) -> None:
    async def fill(dev: FileDevice) -> None:
        for i in range(32):
            await dev.write_at(i * 32 * 1024, b"z" * 32 * 1024)

    async with FileDevice(tiny_fs / "disk.img", size_bytes=1024 * 1024, create=True) as dev:
        with pytest.raises(DeviceFullError) as info:
            await fill(dev)
        assert info.value.device == str(tiny_fs / "disk.img")
