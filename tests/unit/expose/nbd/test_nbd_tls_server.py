"""The NBD server with TLS required, against a raw client over real TCP and TLS.

The client is Python's ``ssl`` (OpenSSL) through asyncio streams, upgraded
in place with ``StreamWriter.start_tls`` after NBD_OPT_STARTTLS, so the
server's memory-BIO TLS is checked against an independent implementation.
The interop test with QEMU's gnutls client is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.expose.nbd import server as server_module
from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.providers.file import FileDevice
from ferry.transport.certs import HostCertFiles, create_ca, create_host_cert
from ferry.transport.tls import client_context_for, server_context_for

from .conftest import RecordingDevice
from .nbd_helpers import RawClient, go_payload, option

SIZE = 4 << 20
ACK, ERR_TLS_REQD = 1, 2**31 + 5
STARTTLS, ABORT, LIST, EXPORT_NAME, GO = 5, 2, 3, 1, 7


@dataclass(frozen=True)
class Certs:
    server: HostCertFiles
    client: HostCertFiles
    rogue_client: HostCertFiles
    """Signed by another CA: must be refused."""


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    base = Path(tempfile.mkdtemp(prefix="ferry-nbd-tls-"))
    try:
        create_ca(base / "ca")
        create_ca(base / "rogue-ca", name="rogue-ca")
        yield Certs(
            server=create_host_cert(base / "ca", base / "server", "server", ips=["127.0.0.1"]),
            client=create_host_cert(base / "ca", base / "client", "client"),
            rogue_client=create_host_cert(base / "rogue-ca", base / "rogue", "client"),
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Served:
    host: str
    port: int
    device: RecordingDevice
    file_path: Path


@pytest.fixture
async def served(certs: Certs, sock_dir: Path) -> AsyncIterator[Served]:
    device = RecordingDevice(SIZE)
    file_path = sock_dir / "file.img"
    file_path.write_bytes(os.urandom(SIZE))
    file_device = FileDevice(file_path)  # offers file_extent: the sendfile path
    server = NBDServer({"disk": Export(device), "file": Export(file_device, read_only=True)})
    try:
        ctx = server_context_for(certs.server)
        async with server.serve_tcp("127.0.0.1", 0, ssl_context=ctx) as (host, port):
            yield Served(host, port, device, file_path)
    finally:
        await file_device.close()


async def connect(served: Served) -> RawClient:
    reader, writer = await asyncio.open_connection(served.host, served.port)
    return RawClient(reader, writer)


async def start_tls(client: RawClient, files: HostCertFiles) -> None:
    """Greeting, STARTTLS, and the TLS upgrade of the client's stream."""
    await client.greeting()
    client.writer.write(option(STARTTLS))
    assert await client.option_reply() == (STARTTLS, ACK, b"")
    await client.writer.start_tls(client_context_for(files), server_hostname="127.0.0.1")


async def go_after_greeting(client: RawClient, name: str) -> tuple[int, int]:
    """NBD_OPT_GO on a client whose greeting (and TLS) is done."""
    client.writer.write(option(GO, go_payload(name)))
    size = flags = -1
    while True:
        _, rtype, payload = await client.option_reply()
        if rtype == ACK:
            return size, flags
        assert rtype == 3, f"unexpected reply {rtype:#x}: {payload!r}"
        if struct.unpack_from(">H", payload)[0] == 0:
            _, size, flags = struct.unpack(">HQH", payload)


async def test_tls_client_reads_and_writes(served: Served, certs: Certs) -> None:
    c = await connect(served)
    await start_tls(c, certs.client)
    assert (await go_after_greeting(c, "disk"))[0] == SIZE
    data = os.urandom(300_000)  # several TLS records each way
    assert await c.write(1, 12345, data) == 0
    assert served.device.data[12345 : 12345 + len(data)] == data
    assert await c.read(2, 12345, len(data)) == (0, data)
    await c.close()


async def test_large_file_reads_go_through_tls_not_sendfile(served: Served, certs: Certs) -> None:
    """A file-backed export would answer large reads with sendfile, which would
    put plaintext on a TLS connection: the client would see a broken record."""
    c = await connect(served)
    await start_tls(c, certs.client)
    await go_after_greeting(c, "file")
    expected = served.file_path.read_bytes()
    for handle, (offset, length) in enumerate([(0, 4096), (777, 1 << 20), (SIZE - 3, 3)]):
        assert await c.read(handle, offset, length) == (0, expected[offset : offset + length])
    # Pipelined: several large reads in flight at once, replies in any order.
    wanted = {10 + i: (i * 300_000, 300_000) for i in range(6)}
    for handle, (offset, length) in wanted.items():
        c.writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, offset, length))
    for _ in range(len(wanted)):
        error, handle = await c.simple_reply()
        assert error == 0
        offset, length = wanted.pop(handle)
        assert await c.reader.readexactly(length) == expected[offset : offset + length]
    await c.close()


async def test_plaintext_options_get_tls_reqd_then_tls_works(served: Served, certs: Certs) -> None:
    c = await connect(served)
    await c.greeting()
    c.writer.write(option(LIST))
    opt, rtype, message = await c.option_reply()
    assert (opt, rtype) == (LIST, ERR_TLS_REQD)
    assert b"STARTTLS" in message
    c.writer.write(option(GO, go_payload("disk")))
    assert (await c.option_reply())[:2] == (GO, ERR_TLS_REQD)
    # The same connection may still upgrade, as the spec intends.
    c.writer.write(option(STARTTLS))
    assert await c.option_reply() == (STARTTLS, ACK, b"")
    await c.writer.start_tls(client_context_for(certs.client), server_hostname="127.0.0.1")
    assert (await go_after_greeting(c, "disk"))[0] == SIZE
    await c.close()


async def test_export_name_without_tls_is_dropped_and_server_keeps_serving(
    served: Served, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    plain = await connect(served)
    await plain.greeting()
    with caplog.at_level(logging.INFO, logger="ferry.expose.nbd.server"):
        plain.writer.write(option(EXPORT_NAME, b"disk"))
        assert await plain.reader.read(100) == b""  # hard disconnect, no export data
        await plain.close()
        good = await connect(served)
        await start_tls(good, certs.client)
        assert (await go_after_greeting(good, "disk"))[0] == SIZE
        await good.close()
    assert "EXPORT_NAME before NBD_OPT_STARTTLS" in caplog.text


async def refused(served: Served, ctx: ssl.SSLContext) -> BaseException:
    """Run STARTTLS with ``ctx`` and expect the server to refuse the client."""
    c = await connect(served)
    await c.greeting()
    c.writer.write(option(STARTTLS))
    assert await c.option_reply() == (STARTTLS, ACK, b"")
    try:
        # TLS 1.3: the client finishes its side before the server checks the
        # client certificate, so the refusal may only show on the next read.
        await c.writer.start_tls(ctx, server_hostname="127.0.0.1")
        c.writer.write(option(LIST))
        await c.option_reply()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return exc
    finally:
        c.writer.transport.abort()
    raise AssertionError("the server accepted a client it should refuse")


async def test_client_certificate_from_another_ca_is_refused(
    served: Served, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    # The client trusts our server but presents a certificate of another CA.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(certs.rogue_client.cert_path, certs.rogue_client.key_path)
    ctx.load_verify_locations(cafile=str(certs.server.ca_path))
    with caplog.at_level(logging.INFO, logger="ferry.expose.nbd.server"):
        exc = await refused(served, ctx)
        # The server's alert reached the client, so it knows why.
        assert isinstance(exc, ssl.SSLError), exc
        assert "unknown ca" in str(exc).lower()
        good = await connect(served)
        await start_tls(good, certs.client)
        assert (await go_after_greeting(good, "disk"))[0] == SIZE
        await good.close()
    assert "TLS handshake failed" in caplog.text
    assert "certificate verify failed" in caplog.text


async def test_client_without_certificate_is_refused(served: Served, certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.server.ca_path))
    await refused(served, ctx)


async def test_client_rejects_server_it_does_not_trust(served: Served, certs: Certs) -> None:
    # The rogue client trusts only the rogue CA: it refuses our server.
    exc = await refused(served, client_context_for(certs.rogue_client))
    assert isinstance(exc, ssl.SSLError)
    assert "certificate verify failed" in str(exc)
    # ... and a plaintext option afterwards on a fresh connection still gets TLS_REQD.
    c = await connect(served)
    await c.greeting()
    c.writer.write(option(LIST))
    assert (await c.option_reply())[:2] == (LIST, ERR_TLS_REQD)
    await c.close()


async def test_abort_inside_tls_is_acknowledged(served: Served, certs: Certs) -> None:
    c = await connect(served)
    await start_tls(c, certs.client)
    c.writer.write(option(ABORT))
    assert await c.option_reply() == (ABORT, ACK, b"")
    assert await c.reader.read(1) == b""  # close_notify, then the server hangs up
    await c.close()


async def test_stalled_handshake_is_dropped(
    served: Served, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "TLS_HANDSHAKE_TIMEOUT_S", 0.2)
    c = await connect(served)
    await c.greeting()
    c.writer.write(option(STARTTLS))
    assert await c.option_reply() == (STARTTLS, ACK, b"")
    # Never start the handshake: the server must give up on us.
    assert await asyncio.wait_for(c.reader.read(1), timeout=30) == b""
    await c.close()


async def test_client_context_is_refused(certs: Certs) -> None:
    server = NBDServer({"disk": Export(RecordingDevice(4096))})
    with pytest.raises(ValueError, match="client context"):
        async with server.serve_tcp(ssl_context=client_context_for(certs.client)):
            pass
