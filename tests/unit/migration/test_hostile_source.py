"""A hostile source against the receiver, the file target and the block decoder.

Each case asserts a typed error, memory bounded (tracemalloc peak), no file
left in or outside the target, and (where it applies) that the same target
still receives a legitimate group afterwards.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import lz4.frame
import pytest
import zstandard

from ferry.errors import FerryError, PeerError, RemoteProtocolError
from ferry.migration.blocks import decode_run
from ferry.migration.channel import StreamChannel, memory_channel_pair
from ferry.migration.config import MigrationConfig
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.files import migrate_in
from ferry.migration.hashtable import BlockHashTable
from ferry.migration.limits import GeometryRefusedError, ReceiveLimits
from ferry.protocol.messages import (
    PROTOCOL_VERSION,
    DeviceInfo,
    Encoding,
    Error,
    Hello,
    WriteBlocks,
)
from ferry.storage.device import Geometry
from ferry.storage.hashing import block_hash
from ferry.transport.memory import memory_stream_pair
from ferry.transport.streams import PeerIdleError

MiB = 1024 * 1024
GiB = 1024 * MiB
MEMORY_BOUND_BYTES = 16 * MiB
"""Far below what any of these attacks allocated before the limits (GiBs)."""


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def tree(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def read(path: Path) -> bytes:
    return path.read_bytes()


def hello(*devices: tuple[str, int, int]) -> Hello:
    return Hello(PROTOCOL_VERSION, tuple(DeviceInfo(n, s, b) for n, s, b in devices))


GEOMETRY_HELLOS = {
    "one device of 2^31 blocks": hello(("d", (1 << 31) * 65536, 65536)),
    "1024 devices of 64 GiB": hello(*((f"d{i}", 64 * GiB, 65536) for i in range(1024))),
    "block size 1": hello(("d", 1 << 20, 1)),
    "block size beyond a frame": hello(("d", 1 << 30, 1 << 30)),
    "duplicate names": hello(("d", MiB, 65536), ("d", MiB, 65536)),
    "no devices": hello(),
}

HOSTILE_HELLOS = {
    **GEOMETRY_HELLOS,
    "name with a slash": hello(("../escape", MiB, 65536)),
    "name ..": hello(("..", MiB, 65536)),
    "name with NUL": hello(("a\x00b", MiB, 65536)),
    "name that is another's partial": hello(("a", MiB, 65536), ("a.partial", MiB, 65536)),
}


@pytest.mark.parametrize("case", list(GEOMETRY_HELLOS))
async def test_receiver_refuses_hostile_geometry_before_opening_anything(
    case: str, traced: Callable[[], int]
) -> None:
    ours, theirs = memory_channel_pair()
    await theirs.send(GEOMETRY_HELLOS[case])
    opened: list[object] = []

    async def factory(infos: Sequence[DeviceInfo]) -> Sequence[DestinationDevice]:
        opened.append(infos)
        raise AssertionError("the factory must not run")

    with pytest.raises(GeometryRefusedError):
        await Receiver(ours, factory).run()
    assert not opened
    assert traced() < MEMORY_BOUND_BYTES
    answer = await theirs.receive()
    assert isinstance(answer, Error)
    assert "destination failed" in answer.reason


async def _legit_source(channel: StreamChannel, data: bytes) -> None:
    from ferry.migration.source import Migrator, SourceDevice
    from ferry.storage.modules.dirty import dirty_tracker
    from ferry.storage.modules.volatility import VolatilityMonitor
    from ferry.storage.providers.memory import MemoryDevice

    dev = MemoryDevice(len(data))
    await dev.write_at(0, data)
    vol = VolatilityMonitor(dev, 65536)
    _local, remote = dirty_tracker(vol, 65536)
    await Migrator([SourceDevice("disk", remote, vol)], channel).run()


async def _receive_files(
    into: Path, source: Callable[[StreamChannel], Awaitable[None]], config: MigrationConfig
) -> BaseException | None:
    a, b = memory_stream_pair()
    errors: list[BaseException] = []

    async def run_source() -> None:
        channel = StreamChannel(a)
        try:
            await source(channel)
        except FerryError:
            pass
        finally:
            await channel.aclose()

    async def run_receiver() -> None:
        try:
            await migrate_in(b, into, config)
        except FerryError as exc:
            errors.append(exc)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_source())
        tg.create_task(run_receiver())
    return errors[0] if errors else None


@pytest.mark.parametrize("case", list(HOSTILE_HELLOS))
async def test_file_target_creates_nothing_for_hostile_geometry_then_receives(
    case: str, tmp_path: Path, traced: Callable[[], int]
) -> None:
    into = tmp_path / "into"
    into.mkdir()

    async def hostile(channel: StreamChannel) -> None:
        await channel.send(HOSTILE_HELLOS[case])
        await channel.receive()  # the destination's Error

    error = await _receive_files(into, hostile, MigrationConfig())
    assert isinstance(error, GeometryRefusedError)
    assert traced() < MEMORY_BOUND_BYTES
    assert tree(tmp_path) == ["into"]
    data = bytes(range(256)) * 1024
    assert await _receive_files(into, lambda c: _legit_source(c, data), MigrationConfig()) is None
    assert read(into / "disk") == data


async def test_file_target_refuses_a_group_larger_than_free_space(tmp_path: Path) -> None:
    limits = ReceiveLimits(
        max_device_bytes=1 << 60, max_total_bytes=1 << 60, max_total_blocks=1 << 32
    )

    async def huge(channel: StreamChannel) -> None:
        await channel.send(hello(("d", 1 << 55, 1 << 24)))  # 2^31 blocks: allowed here
        await channel.receive()

    error = await _receive_files(tmp_path, huge, MigrationConfig(limits=limits))
    assert isinstance(error, GeometryRefusedError)
    assert "free" in str(error)
    assert tree(tmp_path) == []


async def test_failure_after_creating_files_leaves_no_partial(tmp_path: Path) -> None:
    async def then_garbage(channel: StreamChannel) -> None:
        await channel.send(hello(("a", MiB, 65536), ("b", MiB, 65536)))
        await channel.receive()  # HelloAck: both partial files exist now
        assert tree(tmp_path) == ["a.partial", "b.partial"]
        await channel.send(WriteBlocks(0, 0, Encoding.PLAIN, (bytes(16),), b"x" * 65536))
        await channel.receive()

    error = await _receive_files(tmp_path, then_garbage, MigrationConfig())
    assert error is not None
    assert tree(tmp_path) == []


async def test_a_silent_source_times_out(tmp_path: Path) -> None:
    async def silent(channel: StreamChannel) -> None:
        await channel.receive()

    error = await _receive_files(tmp_path, silent, MigrationConfig(idle_timeout_s=0.05))
    assert isinstance(error, PeerIdleError)
    assert tree(tmp_path) == []


async def test_a_peer_error_instead_of_hello_is_reported(tmp_path: Path) -> None:
    async def gives_up(channel: StreamChannel) -> None:
        from ferry.protocol.messages import ErrorCode

        await channel.send(Error(ErrorCode.INTERNAL, "no"))

    error = await _receive_files(tmp_path, gives_up, MigrationConfig())
    assert isinstance(error, PeerError)


def _bomb_event(encoding: Encoding, packed: bytes) -> WriteBlocks:
    return WriteBlocks(0, 0, encoding, (block_hash(bytes(65536)),), packed)


BOMB_BYTES = 1 * GiB


def _bombs() -> dict[str, WriteBlocks]:
    zeroes = bytes(BOMB_BYTES)
    return {
        "zstd stating its size": _bomb_event(
            Encoding.ZSTD, zstandard.ZstdCompressor(level=1).compress(zeroes)
        ),
        "zstd hiding its size": _bomb_event(
            Encoding.ZSTD,
            zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeroes),
        ),
        "lz4 stating its size": _bomb_event(Encoding.LZ4, lz4.frame.compress(zeroes)),
        "lz4 hiding its size": _bomb_event(
            Encoding.LZ4, lz4.frame.compress(zeroes, store_size=False)
        ),
    }


@pytest.fixture(scope="module")
def bombs() -> dict[str, WriteBlocks]:
    return _bombs()


@pytest.mark.parametrize(
    "case",
    [
        "zstd stating its size",
        "zstd hiding its size",
        "lz4 stating its size",
        "lz4 hiding its size",
    ],
)
def test_decompression_bombs_are_refused_without_allocating_their_size(
    case: str, bombs: dict[str, WriteBlocks], traced: Callable[[], int]
) -> None:
    event = bombs[case]
    tracemalloc.reset_peak()
    with pytest.raises(RemoteProtocolError):
        decode_run(event, Geometry(1 << 20, 65536), "d")
    assert traced() < len(event.data) + MEMORY_BOUND_BYTES


@pytest.mark.parametrize("encoding", [Encoding.ZSTD, Encoding.LZ4])
def test_garbage_compressed_data_is_a_protocol_error(encoding: Encoding) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_run(_bomb_event(encoding, b"\x28\xb5\x2f\xfd garbage"), Geometry(MiB, 65536), "d")


def test_block_hash_table_memory_follows_blocks_recorded(traced: Callable[[], int]) -> None:
    table = BlockHashTable(1 << 31)
    assert traced() < MiB
    table.set(5, b"a" * 16)
    table.set((1 << 31) - 1, b"b" * 16)
    assert traced() < MiB
    assert len(table) == 2
    assert table.get(5) == b"a" * 16
    assert table.get(6) is None
    table.discard(5)
    table.discard(5)
    assert len(table) == 1
    assert table.get(5) is None
    with pytest.raises(IndexError):
        table.set(1 << 31, b"c" * 16)


def test_block_hash_table_compare_finds_missing_and_differing_blocks() -> None:
    count = 3000  # three chunks, the last one partial
    final = BlockHashTable(count)
    got = BlockHashTable(count)
    for block in range(count):
        final.set(block, block.to_bytes(16, "big"))
        if block not in (5, 2999) and block // 1024 != 1:
            got.set(block, block.to_bytes(16, "big"))
    got.set(7, b"x" * 16)
    got.set(2500, b"y" * 16)
    missing, differing = got.compare(final)
    assert missing == [5, *range(1024, 2048), 2999]
    assert differing == [7, 2500]
    assert final.compare(final) == ([], [])


async def test_completed_before_the_blocks_arrived_is_refused_without_reading_back(
    tmp_path: Path,
) -> None:
    """A source that sends every final hash and Completed but no data: the
    receiver does not read the whole (sparse) device back to find out."""
    from ferry.protocol.messages import BlockHashes, Completed

    blocks = 64

    async def no_data(channel: StreamChannel) -> None:
        await channel.send(hello(("disk", blocks * 65536, 65536)))
        await channel.receive()  # HelloAck
        await channel.send(BlockHashes(0, 0, tuple(bytes(16) for _ in range(blocks))))
        await channel.send(Completed(0))
        await channel.receive()

    error = await _receive_files(tmp_path, no_data, MigrationConfig())
    assert isinstance(error, RemoteProtocolError)
    assert "before block 0 arrived" in str(error)
    assert tree(tmp_path) == []
