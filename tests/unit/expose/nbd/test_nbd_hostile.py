"""Hostile NBD clients: one that never reads its replies, idle handshakes, a
flood of handshakes. The server's memory stays bounded and a legitimate
client is served afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tracemalloc
from pathlib import Path

import pytest

from ferry.expose.nbd import server as nbd_server
from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.providers.memory import MemoryDevice

from .nbd_helpers import RawClient, request

MiB = 1024 * 1024
READS = 60_000
READ_BYTES = 4096
STALL_ITERATIONS = 200
"""Event-loop turns without progress after which the client counts as stuck
(the server stopped reading); only ends the attack, asserts nothing."""


class CountingDevice(MemoryDevice):
    """A memory device (no file behind it: replies come from ``read_at``)."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.reads = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return await super().read_at(offset, length)


async def _push_until_stuck(sock: socket.socket, data: bytes) -> int:
    """Send as much of ``data`` as the server lets in; return the bytes sent."""
    view = memoryview(data)
    sent = 0
    idle = 0
    while sent < len(view) and idle < STALL_ITERATIONS:
        try:
            n = sock.send(view[sent:])
        except BlockingIOError:
            idle += 1
            await asyncio.sleep(0)
            continue
        sent += n
        idle = 0
        await asyncio.sleep(0)
    return sent


async def test_a_client_that_never_reads_replies_cannot_grow_the_server(
    sock_dir: Path,
) -> None:
    device = CountingDevice(64 * MiB)
    await device.write_at(0, b"ferry" * 1000)
    server = NBDServer({"d": Export(device)})
    async with server.serve_unix(sock_dir / "s.sock") as path:
        client = await RawClient.connect(path)
        await client.go("d")
        raw = client.writer.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        attack = b"".join(
            request(0, i, (i * READ_BYTES) % (64 * MiB), READ_BYTES) for i in range(READS)
        )
        tracemalloc.start()
        try:
            sent = await _push_until_stuck(sock, attack)
            requests_sent = sent // 28
            # Let the server work through whatever it accepted.
            idle, last = 0, -1
            while device.reads < requests_sent and idle < STALL_ITERATIONS:
                idle = idle + 1 if device.reads == last else 0
                last = device.reads
                await asyncio.sleep(0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 * MiB, f"server held {peak / MiB:.0f} MiB for a client that never reads"
        assert requests_sent < READS  # the server stopped taking requests
        # Now the client reads: every reply it asked for arrives, and the rest goes through.
        rest = attack[sent:]
        writer = asyncio.create_task(asyncio.to_thread(_send_blocking, sock, rest))
        for i in range(READS):
            error, handle = await client.simple_reply()
            assert (error, handle) == (0, i)
            data = await client.reader.readexactly(READ_BYTES)
            if i == 0:
                assert data[:10] == b"ferryferry"
        await writer
        assert await client.read(READS + 1, 0, 5) == (0, b"ferry")
        sock.close()
        await client.close()


def _send_blocking(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)


@pytest.fixture
def short_handshakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(nbd_server, "MAX_HANDSHAKING", 2)


@pytest.mark.usefixtures("short_handshakes")
async def test_idle_and_stalled_handshakes_are_dropped_and_a_real_client_served(
    sock_dir: Path,
) -> None:
    server = NBDServer({"d": Export(MemoryDevice(MiB))})
    async with server.serve_unix(sock_dir / "s.sock") as path:
        idle = [await asyncio.open_unix_connection(path) for _ in range(6)]
        stalled = await RawClient.connect(path)
        await stalled.greeting()  # then says nothing more
        for reader, _writer in idle:
            with contextlib.suppress(ConnectionError):
                while await reader.read(4096):
                    pass  # the greeting, then EOF when the server drops us
        assert await stalled.reader.read(1) == b""
        good = await RawClient.connect(path)
        await good.go("d")
        assert await good.write(1, 0, b"still here") == 0
        assert await good.read(2, 0, 10) == (0, b"still here")
        await good.close()
        for _reader, writer in idle:
            writer.close()
        await stalled.close()


async def test_unix_socket_is_private_by_default(sock_dir: Path) -> None:
    server = NBDServer({"d": Export(MemoryDevice(4096))})
    async with server.serve_unix(sock_dir / "s.sock") as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with server.serve_unix(sock_dir / "g.sock", mode=0o660) as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
