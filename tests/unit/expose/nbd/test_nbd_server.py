"""The asyncio NBD server against raw sockets: bad input, concurrency, flush order."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.expose.nbd.errors import NBDServeError
from ferry.expose.nbd.protocol import transmission_flags
from ferry.expose.nbd.server import Export, NBDServer

from .conftest import RecordingDevice
from .nbd_helpers import RawClient, go_payload, option, request

SIZE = 4 << 20
EINVAL, EPERM, EIO, ENOSPC = 22, 1, 5, 28


@pytest.fixture
async def served(sock_dir: Path) -> AsyncIterator[tuple[str, RecordingDevice]]:
    device = RecordingDevice(SIZE)
    ro = RecordingDevice(65536)
    server = NBDServer({"disk": Export(device), "ro": Export(ro, read_only=True)})
    async with server.serve_unix(sock_dir / "nbd.sock") as path:
        yield path, device
    assert not Path(path).exists()  # noqa: ASYNC240 - the socket file is removed on exit


async def assert_closed_by_server(client: RawClient) -> None:
    assert await client.reader.read(1) == b""
    await client.close()


async def test_good_client_roundtrip(served: tuple[str, RecordingDevice]) -> None:
    path, device = served
    c = await RawClient.connect(path)
    size, _ = await c.go("disk")
    assert size == SIZE
    assert await c.write(1, 4096, b"hello") == 0
    assert device.data[4096:4101] == b"hello"
    assert await c.read(2, 4096, 5) == (0, b"hello")
    await c.close()


async def test_wrong_magic_disconnects_only_that_client(
    served: tuple[str, RecordingDevice],
) -> None:
    path, _ = served
    good = await RawClient.connect(path)
    await good.go("disk")
    assert await good.write(1, 0, b"before") == 0

    bad = await RawClient.connect(path)
    await bad.greeting()
    bad.writer.write(b"IHAVEOPZ" + struct.pack(">II", 7, 0))
    await assert_closed_by_server(bad)

    bad2 = await RawClient.connect(path)
    await bad2.go("disk")
    bad2.writer.write(b"\xde\xad\xbe\xef" * 7)  # bad request magic
    await assert_closed_by_server(bad2)

    assert await good.read(2, 0, 6) == (0, b"before")
    await good.close()


async def test_oversized_option_disconnects(served: tuple[str, RecordingDevice]) -> None:
    path, _ = served
    c = await RawClient.connect(path)
    await c.greeting()
    c.writer.write(b"IHAVEOPT" + struct.pack(">II", 7, 1 << 30))
    await assert_closed_by_server(c)


async def test_missing_export(served: tuple[str, RecordingDevice]) -> None:
    path, _ = served
    c = await RawClient.connect(path)
    await c.greeting()
    c.writer.write(option(7, go_payload("nope")))
    opt, rtype, message = await c.option_reply()
    assert (opt, rtype) == (7, 2**31 + 6)
    assert b"nope" in message
    c.writer.write(option(1, b"nope"))  # EXPORT_NAME cannot fail politely: hang up
    await assert_closed_by_server(c)


async def test_out_of_range_and_read_only(served: tuple[str, RecordingDevice]) -> None:
    path, device = served
    c = await RawClient.connect(path)
    await c.go("disk")
    assert await c.read(1, SIZE - 10, 20) == (EINVAL, b"")
    assert await c.write(2, SIZE - 10, b"x" * 20) == ENOSPC
    assert device.data[SIZE - 10 :] == bytes(10)
    c.writer.write(request(42, 3))  # unknown command
    assert await c.simple_reply() == (EINVAL, 3)
    assert await c.read(4, 0, 4) == (0, bytes(4))  # still in sync
    await c.close()

    r = await RawClient.connect(path)
    await r.go("ro")
    assert await r.write(1, 0, b"nope") == EPERM
    assert await r.read(2, 0, 4) == (0, bytes(4))
    await r.close()


async def test_device_error_becomes_eio(served: tuple[str, RecordingDevice]) -> None:
    path, device = served
    c = await RawClient.connect(path)
    await c.go("disk")
    device.fail_reads = True
    assert await c.read(1, 0, 512) == (EIO, b"")
    device.fail_reads = False
    assert await c.read(2, 0, 4) == (0, bytes(4))
    await c.close()


async def test_client_vanishing_mid_write(served: tuple[str, RecordingDevice]) -> None:
    path, _ = served
    keeper = await RawClient.connect(path)
    await keeper.go("disk")
    assert await keeper.write(1, 0, b"A" * 8192) == 0

    for cut in (10, 28 + 4000):  # inside the header, inside the payload
        quitter = await RawClient.connect(path)
        await quitter.go("disk")
        quitter.writer.write(request(1, 9, 0, 8192, data=b"B" * 8192)[:cut])
        await quitter.writer.drain()
        await quitter.close()

    # A reader that leaves before its reply is sent.
    leaver = await RawClient.connect(path)
    await leaver.go("disk")
    leaver.writer.write(request(0, 5, 0, 1 << 20))
    await leaver.close()

    assert await keeper.read(2, 0, 8192) == (0, b"A" * 8192)
    late = await RawClient.connect(path)
    await late.go("disk")
    assert await late.read(1, 0, 4) == (0, b"AAAA")
    await late.close()
    await keeper.close()


async def test_pipelined_requests_out_of_order(served: tuple[str, RecordingDevice]) -> None:
    path, device = served
    c = await RawClient.connect(path)
    await c.go("disk")
    device.write_gate = asyncio.Event()
    # A write that blocks in the device, then reads queued behind it: the
    # reads are answered first, proving requests run concurrently.
    c.writer.write(request(1, 100, 65536, 4, data=b"slow"))
    for h in range(5):
        c.writer.write(request(0, h, h * 512, 512))
    await c.writer.drain()
    seen = []
    for _ in range(5):
        error, handle = await c.simple_reply()
        assert error == 0
        await c.reader.readexactly(512)
        seen.append(handle)
    assert sorted(seen) == list(range(5))
    device.write_gate.set()
    assert await c.simple_reply() == (0, 100)
    assert device.data[65536:65540] == b"slow"
    await c.close()


async def test_flush_waits_for_writes_of_other_connections(
    served: tuple[str, RecordingDevice],
) -> None:
    path, device = served
    writer = await RawClient.connect(path)
    await writer.go("disk")
    flusher = await RawClient.connect(path)
    await flusher.go("disk")
    device.write_gate = asyncio.Event()
    writer.writer.write(request(1, 1, 0, 3, data=b"abc"))
    await device.write_started.wait()
    flusher.writer.write(request(3, 2))
    await flusher.writer.drain()
    for _ in range(20):  # give a wrong server every chance to flush early
        await asyncio.sleep(0.005)
    assert "flush" not in device.log
    device.write_gate.set()
    assert await flusher.simple_reply() == (0, 2)
    assert await writer.simple_reply() == (0, 1)
    assert device.log == ["write-start 0", "write-end 0", "flush"]
    await writer.close()
    await flusher.close()


async def test_fua_flushes_before_reply(served: tuple[str, RecordingDevice]) -> None:
    path, device = served
    c = await RawClient.connect(path)
    await c.go("disk")
    assert await c.write(1, 0, b"x", flags=1) == 0
    assert device.log == ["write-start 0", "write-end 0", "flush"]
    await c.close()


async def test_disconnect_finishes_outstanding_requests(
    served: tuple[str, RecordingDevice],
) -> None:
    path, device = served
    c = await RawClient.connect(path)
    await c.go("disk")
    device.write_gate = asyncio.Event()
    c.writer.write(request(1, 1, 0, 3, data=b"xyz") + request(2, 2))
    await device.write_started.wait()
    device.write_gate.set()
    assert await c.simple_reply() == (0, 1)
    await assert_closed_by_server(c)
    assert device.data[:3] == b"xyz"


async def test_stop_with_idle_client_connected(sock_dir: Path) -> None:
    server = NBDServer({"d": Export(RecordingDevice(4096))})
    async with server.serve_unix(sock_dir / "s.sock") as path:
        c = await RawClient.connect(path)
        await c.go("d")
    await assert_closed_by_server(c)


async def test_tcp_and_bind_errors(sock_dir: Path) -> None:
    server = NBDServer({"d": Export(RecordingDevice(4096))})
    expected_flags = transmission_flags(server.catalogue["d"], structured_replies=False)
    with pytest.raises(NBDServeError, match="insecure"):
        async with server.serve_tcp():
            pass
    async with server.serve_tcp(insecure=True) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        c = RawClient(reader, writer)
        assert await c.go("d") == (4096, expected_flags)
        await c.close()
        with pytest.raises(NBDServeError):
            async with server.serve_tcp(host, port, insecure=True):
                pass
