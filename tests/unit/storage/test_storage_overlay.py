"""OverlayDevice: copy-on-write over a base that is never written, and its map file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.errors import BaseMismatchError, DeviceError, ReadOnlyError
from ferry.storage import FileDevice, MemoryDevice, OverlayDevice, OverlayMapError, ReadOnlyGate

from .storage_helpers import GatedDevice, pattern

BS = 4096
SIZE = 6 * BS + 300
BASE = pattern(SIZE, 42)
BASE_ID = b"sha256:base-image"


async def make_base() -> ReadOnlyGate:
    """The base image, behind a read-only gate: any write to it would raise."""
    mem = MemoryDevice(SIZE, name="base")
    await mem.write_at(0, BASE)
    return ReadOnlyGate(mem, read_only=True)


async def open_overlay(path: Path, base_id: bytes = BASE_ID) -> OverlayDevice:
    return OverlayDevice(await make_base(), path, block_size_bytes=BS, base_id=base_id)


async def test_reads_the_base_until_written(tmp_path: Path) -> None:
    async with await open_overlay(tmp_path / "ov") as ov:
        assert await ov.read_at(0, SIZE) == BASE
        assert ov.overlay_blocks() == frozenset()
        assert ov.base_blocks() == frozenset(range(7))


async def test_partial_write_copies_the_base_block_first(tmp_path: Path) -> None:
    base = await make_base()
    async with OverlayDevice(
        base, tmp_path / "ov", block_size_bytes=BS, base_id=BASE_ID, close_base=False
    ) as ov:
        await ov.write_at(BS + 100, b"hello")  # inside block 1
        await ov.write_at(3 * BS - 2, b"abcd")  # blocks 2 and 3, both partial
        expected = bytearray(BASE)
        expected[BS + 100 : BS + 105] = b"hello"
        expected[3 * BS - 2 : 3 * BS + 2] = b"abcd"
        assert await ov.read_at(0, SIZE) == expected
        assert ov.overlay_blocks() == {1, 2, 3}
        assert ov.base_blocks() == {0, 4, 5, 6}
        # The data file holds whole blocks: the base copy plus the write.
        data_file = (tmp_path / "ov").read_bytes()
        assert data_file[BS : 4 * BS] == expected[BS : 4 * BS]
        # ...and only those blocks are allocated.
        await ov.flush()
        probe = FileDevice(tmp_path / "ov", read_only=True)
        try:
            assert probe.allocated_blocks(BS) == {1, 2, 3}
        finally:
            await probe.close()
    assert await base.read_at(0, SIZE) == BASE  # the base was never written
    await base.close()


async def test_short_last_block_whole_write_needs_no_copy(tmp_path: Path) -> None:
    async with await open_overlay(tmp_path / "ov") as ov:
        await ov.write_at(6 * BS, b"\x00" * 300)
        assert ov.overlay_blocks() == {6}
        assert await ov.read_at(6 * BS - 4, 304) == BASE[6 * BS - 4 : 6 * BS] + bytes(300)


async def test_reopen_restores_state(tmp_path: Path) -> None:
    path = tmp_path / "ov"
    async with await open_overlay(path) as ov:
        await ov.write_at(2 * BS + 7, b"persist me")
        await ov.write_at(5 * BS, b"\xee" * BS)
        expected = await ov.read_at(0, SIZE)
    async with await open_overlay(path) as again:
        assert again.overlay_blocks() == {2, 5}
        assert await again.read_at(0, SIZE) == expected


async def test_map_on_disk_is_the_last_flush(tmp_path: Path) -> None:
    """A write after the last flush is not in the map yet: a crash forgets it."""
    path = tmp_path / "ov"
    ov = await open_overlay(path)
    try:
        await ov.write_at(0, b"flushed")
        await ov.flush()
        await ov.write_at(4 * BS, b"not flushed")
        # A second opener sees what a restart after a crash would see.
        async with await open_overlay(path) as after_crash:
            assert after_crash.overlay_blocks() == {0}
            assert await after_crash.read_at(0, 7) == b"flushed"
            assert await after_crash.read_at(4 * BS, 11) == BASE[4 * BS : 4 * BS + 11]
    finally:
        await ov.close()


async def test_new_overlay_discards_a_stale_data_file(tmp_path: Path) -> None:
    path = tmp_path / "ov"
    path.write_bytes(b"\xff" * SIZE)  # data without a map
    async with await open_overlay(path) as ov:
        assert await ov.read_at(0, SIZE) == BASE
        await ov.write_at(10, b"x")
        assert await ov.read_at(0, BS) == BASE[:10] + b"x" + BASE[11:BS]


async def test_other_base_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ov"
    async with await open_overlay(path) as ov:
        await ov.write_at(0, b"x")
    base = await make_base()
    with pytest.raises(BaseMismatchError):
        OverlayDevice(base, path, block_size_bytes=BS, base_id=b"another-image")
    # A base of another size is another base too.
    with pytest.raises(BaseMismatchError):
        OverlayDevice(MemoryDevice(SIZE + 1), path, block_size_bytes=BS, base_id=BASE_ID)
    with pytest.raises(OverlayMapError, match="blocks"):
        OverlayDevice(base, path, block_size_bytes=2 * BS, base_id=BASE_ID)
    await base.close()


def damage_map(map_path: Path, damage: str) -> None:
    raw = bytearray(map_path.read_bytes())
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "flip-bitmap":
        raw[-5] ^= 0x01  # the last bitmap byte, just before the CRC
    elif damage == "bad-magic":
        raw[0:8] = b"NOTAMAP!"
    elif damage == "extend":
        raw += b"\x00"
    else:
        raw = bytearray()
    map_path.write_bytes(raw)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip-bitmap", "bad-magic", "extend", "empty"],
)
async def test_corrupt_map_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ov"
    async with await open_overlay(path) as ov:
        await ov.write_at(BS, b"x")
    damage_map(Path(str(path) + ".map"), damage)
    base = await make_base()
    with pytest.raises(OverlayMapError):
        OverlayDevice(base, path, block_size_bytes=BS, base_id=BASE_ID)
    await base.close()


async def test_map_without_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ov"
    async with await open_overlay(path) as ov:
        await ov.write_at(0, b"x")
    path.unlink()
    with pytest.raises(DeviceError):
        await open_overlay(path)


async def test_closing_closes_the_base_unless_told_not_to(tmp_path: Path) -> None:
    base = await make_base()
    ov = OverlayDevice(base, tmp_path / "a", block_size_bytes=BS, base_id=BASE_ID)
    await ov.close()
    with pytest.raises(DeviceError):
        await base.read_at(0, 1)
    shared = await make_base()
    ov2 = OverlayDevice(
        shared, tmp_path / "b", block_size_bytes=BS, base_id=BASE_ID, close_base=False
    )
    await ov2.close()
    assert await shared.read_at(0, 4) == BASE[:4]
    await shared.close()


async def test_base_writes_would_fail(tmp_path: Path) -> None:
    """Guard for the other tests: the gated base really rejects writes."""
    base = await make_base()
    with pytest.raises(ReadOnlyError):
        await base.write_at(0, b"x")
    await base.close()


async def test_copy_up_cannot_overwrite_a_concurrent_write(tmp_path: Path) -> None:
    """A partial write waiting on the base must not clobber a later whole-block write."""
    gated = GatedDevice(await make_base())
    gated.gate.clear()
    async with OverlayDevice(gated, tmp_path / "ov", block_size_bytes=BS, base_id=BASE_ID) as ov:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ov.write_at(BS + 1, b"p"))  # partial: reads the base first
            await gated.started.wait()
            whole = tg.create_task(ov.write_at(BS, b"W" * BS))
            await asyncio.sleep(0)
            gated.gate.set()
        assert whole.done()
        assert await ov.read_at(BS, BS) == b"W" * BS
