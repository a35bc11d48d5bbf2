"""The resume fast path's parts: held port forwards, the RAM preload, which chunks to preload.

Real sockets and a real FUSE mount (root, as the e2e tests); no QEMU.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.expose.fuse import PRELOAD_CHUNK_BYTES, FuseError, FuseMount
from ferry.net import PortForward, Proto, TcpForwarder, UdpForwarder
from ferry.storage import FileDevice, OverlayDevice
from ferry.storage.hashing import block_hash
from ferry.vm.manifest import AgentSettings, DeviceEntry, GuestNetwork, MachineSpec, VMManifest
from ferry.vm.pkgcache import OpenedPackage, nonzero_blocks
from ferry.vm.runner import _preload_chunks, process_usage

BLOCK = 64 * 1024


# -- held forwards ----------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo:" + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_tcp_forward_holds_clients_until_the_gate_opens() -> None:
    server, port = await _echo_server()
    gate = asyncio.Event()
    fwd = TcpForwarder(PortForward("127.0.0.1", 0, port), ("127.0.0.1", port), gate=gate)
    await fwd.start()
    try:
        reader, writer = await asyncio.open_connection(*fwd.local_address)
        writer.write(b"hello\n")
        await writer.drain()
        # Accepted (no refusal, no reset) but not relayed while the gate is shut.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        gate.set()
        assert await asyncio.wait_for(reader.readline(), 5) == b"echo:hello\n"
        writer.close()
    finally:
        await fwd.stop()
        server.close()
        await server.wait_closed()


async def test_udp_forward_holds_datagrams_until_the_gate_opens() -> None:
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.setblocking(False)
    gate = asyncio.Event()
    fwd = UdpForwarder(PortForward("127.0.0.1", 0, 9, proto=Proto.UDP), target.getsockname(),
                       gate=gate)
    await fwd.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    try:
        client.sendto(b"early", fwd.local_address)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(target, 100), 0.3)
        gate.set()
        assert await asyncio.wait_for(loop.sock_recv(target, 100), 5) == b"early"
    finally:
        client.close()
        await fwd.stop()
        target.close()


# -- which chunks to preload ------------------------------------------------------------


def _package(tmp_path: Path, memory: bytes, *, hashes: bool = True) -> OpenedPackage:
    """A package directory with what the preload reads: the memory file and its hashes."""
    (tmp_path / "memory").write_bytes(memory)
    (tmp_path / "hashes").mkdir()
    if hashes:
        digests = b"".join(block_hash(memory[i:i + BLOCK]) for i in range(0, len(memory), BLOCK))
        (tmp_path / "hashes" / "memory.xxh3").write_bytes(digests)
    memory_mib = -(-len(memory) // 2**20)
    manifest = VMManifest(
        name="t", blueprint="t", image_key="k", created="2026-01-01T00:00:00Z",
        machine=MachineSpec("microvm", "Nehalem-v1", 1, memory_mib, "tcg"),
        kernel_cmdline="console=ttyS0", kernel="boot/vmlinuz", initramfs="boot/initramfs.cpio",
        state="state.bin", state_bytes=1,
        memory=DeviceEntry("memory", "memory", memory_mib << 20, BLOCK, "hashes/memory.xxh3"),
        disks=(), agent=AgentSettings(True, (), ()),
        network=GuestNetwork("10.0.2.15", 24, "10.0.2.2", "52:54:00:12:34:56"),
        readiness="true")
    return OpenedPackage(tmp_path, "0" * 64, manifest, cache_hit=True)


def _memory_image(size: int, nonzero_blocks_at: list[int]) -> bytes:
    image = bytearray(size)
    for block in nonzero_blocks_at:
        image[block * BLOCK + 100] = 0x5A
    return bytes(image)


def test_nonzero_blocks_come_from_the_hashes(tmp_path: Path) -> None:
    package = _package(tmp_path, _memory_image(2**20, [0, 11, 15]))
    assert nonzero_blocks(package, package.manifest.memory) == [0, 11, 15]
    # A device whose last block is short: its zero hash is that of the short block.
    size = 3 * BLOCK + 4096
    (tmp_path / "disk").write_bytes(bytes(size))
    digests = b"".join(block_hash(bytes(min(BLOCK, size - i))) for i in range(0, size, BLOCK))
    (tmp_path / "hashes" / "disk.xxh3").write_bytes(digests)
    assert nonzero_blocks(package, DeviceEntry("d", "disk", size, BLOCK,
                                               "hashes/disk.xxh3")) == []


def test_nonzero_blocks_without_usable_hashes(tmp_path: Path) -> None:
    package = _package(tmp_path, _memory_image(2**20, [3]), hashes=False)
    assert nonzero_blocks(package, package.manifest.memory) is None
    (tmp_path / "hashes" / "memory.xxh3").write_bytes(b"x" * 15)
    assert nonzero_blocks(package, package.manifest.memory) is None


async def test_preload_chunks_cover_nonzero_and_overlay_blocks(tmp_path: Path) -> None:
    per_chunk = PRELOAD_CHUNK_BYTES // BLOCK
    size = 4 * PRELOAD_CHUNK_BYTES
    package = _package(tmp_path, _memory_image(size, [1, per_chunk + 2]))
    base = FileDevice(tmp_path / "memory", read_only=True)
    async with OverlayDevice(base, tmp_path / "memory.ovl", block_size_bytes=BLOCK,
                             base_id=b"pkg") as overlay:
        assert _preload_chunks(package, overlay) == [0, PRELOAD_CHUNK_BYTES]
        # A VM that wrote into chunk 3 (a suspended one) preloads its own data too.
        await overlay.write_at(3 * PRELOAD_CHUNK_BYTES + 5, b"own")
        assert _preload_chunks(package, overlay) == [0, PRELOAD_CHUNK_BYTES,
                                                     3 * PRELOAD_CHUNK_BYTES]


# -- the page-cache preload through FUSE --------------------------------------------------


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[tuple[FuseMount, bytes]]:
    size = 4 * PRELOAD_CHUNK_BYTES
    data = bytes(os.urandom(PRELOAD_CHUNK_BYTES)) + bytes(size - PRELOAD_CHUNK_BYTES)
    (tmp_path / "back").write_bytes(data)
    (tmp_path / "mnt").mkdir()
    async with FileDevice(tmp_path / "back") as dev, \
            FuseMount(tmp_path / "mnt", {"memory": dev}) as mount:
        yield mount, data


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_preloaded_pages_are_read_without_the_daemon(
        mounted: tuple[FuseMount, bytes]) -> None:
    mount, data = mounted
    chunk = PRELOAD_CHUNK_BYTES
    stats = await mount.preload("memory", [(0, data[:chunk]), (chunk, bytes(chunk))])
    assert (stats.bytes_stored, stats.bytes_zero) == (chunk, chunk)  # zeros are skipped
    before = mount.counters("memory").reads
    # Reading from a thread of this process is safe here: nothing forks meanwhile.
    got = await asyncio.to_thread(_read, mount.path("memory"), 4096, chunk - 4096)
    assert got == data[4096:chunk]
    assert mount.counters("memory").reads == before  # served from the page cache
    # A range that was not preloaded still goes through the daemon, correctly.
    assert await asyncio.to_thread(_read, mount.path("memory"), 2 * chunk, 100) == bytes(100)
    assert mount.counters("memory").reads > before


async def test_preload_refuses_chunks_outside_the_file(
        mounted: tuple[FuseMount, bytes]) -> None:
    mount, _ = mounted
    with pytest.raises(FuseError, match="outside the file"):
        await mount.preload("memory", [(4 * PRELOAD_CHUNK_BYTES - 10, b"x" * 20)])
    with pytest.raises(KeyError):
        await mount.preload("nothing", [])


def test_process_usage_reads_this_process() -> None:
    usage = process_usage(os.getpid())
    assert usage["cpu_s"] > 0
    assert usage["minflt"] > 0
    assert process_usage(2**22 + 12345) == {}  # no such pid
