"""Mutual TLS: certificates from certs.py, contexts from tls.py, refusals on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ferry.errors import BrokenResourceError, TLSConfigError
from ferry.transport.certs import HostCertFiles, create_ca, create_host_cert
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.tls import (
    TLSStream,
    client_context,
    client_context_for,
    server_context,
    server_context_for,
)

from .conformance import CHECKS, Pair, PairFactory, run_check
from .test_socket_stream import ViaReceiveInto


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, HostCertFiles]:
    """A server and a client from one CA, and an intruder from another."""
    create_ca(tmp_path / "ca")
    create_ca(tmp_path / "other-ca", name="someone-else")
    return {
        "server": create_host_cert(tmp_path / "ca", tmp_path / "server", "server.test",
                                   ips=["127.0.0.1", "::1"]),
        "client": create_host_cert(tmp_path / "ca", tmp_path / "client", "client.test"),
        "intruder": create_host_cert(tmp_path / "other-ca", tmp_path / "intruder", "intruder",
                                     ips=["127.0.0.1"]),
    }


async def talk(host: str, port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect, send a ping, return what comes back."""
    stream = await connect_tcp(host, port, ssl_context=ctx)
    try:
        await stream.send_all(b"ping")
        return await stream.receive_some()
    finally:
        await stream.aclose()


async def test_mutual_tls_round_trip(pki: dict[str, HostCertFiles]) -> None:
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        client = await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))
        server = await listener.accept()
        await client.send_all(b"hello over tls")
        assert await server.receive_some() == b"hello over tls"
        await client.aclose()
        await server.aclose()


async def refused_client(
    pki: dict[str, HostCertFiles],
    ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    alert: str,
) -> None:
    """The client must fail with BrokenResourceError carrying the server's
    ``alert``, the server must log the refusal and go on to accept a
    legitimate client."""
    caplog.set_level(logging.WARNING, logger="ferry.transport.listener")
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        with pytest.raises(BrokenResourceError, match=alert):
            # TLS 1.3: the client may finish its handshake before the server
            # rejects its certificate; the alert then arrives on the first read.
            await talk(*listener.address, ctx)
        good = await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))
        accepted = await asyncio.wait_for(listener.accept(), 10)
        await good.send_all(b"legit")
        assert await accepted.receive_some() == b"legit"
        await good.aclose()
        await accepted.aclose()
    refusals = [r.getMessage() for r in caplog.records if "dropped a connection" in r.getMessage()]
    assert len(refusals) == 1
    assert "TLS" in refusals[0]
    assert "127.0.0.1" in refusals[0]


async def test_client_from_other_ca_is_refused(
    pki: dict[str, HostCertFiles], caplog: pytest.LogCaptureFixture
) -> None:
    intruder = pki["intruder"]
    # The intruder trusts our CA (so it would accept our server) but its own
    # certificate comes from elsewhere.
    ctx = client_context(intruder.cert_path, intruder.key_path, pki["client"].ca_path)
    await refused_client(pki, ctx, caplog, alert="ALERT_UNKNOWN_CA")


async def test_client_without_certificate_is_refused(
    pki: dict[str, HostCertFiles], caplog: pytest.LogCaptureFixture
) -> None:
    ctx = ssl.create_default_context(cafile=str(pki["client"].ca_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    await refused_client(pki, ctx, caplog, alert="ALERT_CERTIFICATE_REQUIRED")


async def test_client_refuses_server_from_other_ca(pki: dict[str, HostCertFiles]) -> None:
    intruder = pki["intruder"]
    ctx = server_context(intruder.cert_path, intruder.key_path, pki["server"].ca_path)
    async with await listen_tcp(ssl_context=ctx) as listener:
        with pytest.raises(BrokenResourceError, match=r"CERTIFICATE_VERIFY_FAILED"):
            await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))


async def test_client_checks_server_hostname(pki: dict[str, HostCertFiles]) -> None:
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        client_ctx = client_context_for(pki["client"])
        ok = await connect_tcp(*listener.address, ssl_context=client_ctx,
                               server_hostname="server.test")
        await ok.aclose()
        with pytest.raises(BrokenResourceError, match=r"CERTIFICATE_VERIFY_FAILED"):
            await connect_tcp(*listener.address, ssl_context=client_ctx,
                              server_hostname="not-the-server.test")


async def test_plain_tcp_client_does_not_reach_accept(
    pki: dict[str, HostCertFiles], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferry.transport.listener")
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        plain = await connect_tcp(*listener.address)
        await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
        assert await plain.receive_some() == b""
        await plain.aclose()
        accept = asyncio.create_task(listener.accept())
        await asyncio.sleep(0.05)
        assert not accept.done()
        accept.cancel()
    assert any("dropped a connection" in r.getMessage() for r in caplog.records)


def test_contexts_require_tls13_and_client_certs(pki: dict[str, HostCertFiles]) -> None:
    server = server_context_for(pki["server"])
    client = client_context_for(pki["client"])
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


def test_host_certificate_contents(pki: dict[str, HostCertFiles]) -> None:
    files = pki["server"]
    cert = x509.load_pem_x509_certificate(files.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ca = x509.load_pem_x509_certificate(files.ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    original_ca = files.ca_path.parent.parent / "ca" / "ca.pem"
    assert files.ca_path.read_bytes() == original_ca.read_bytes()


def test_key_files_are_private(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    host = create_host_cert(tmp_path / "ca", tmp_path / "host", "h")
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.key_path.stat().st_mode) == 0o600


def test_create_ca_refuses_to_replace_existing(tmp_path: Path) -> None:
    first = create_ca(tmp_path)
    original = first.cert_path.read_bytes()
    with pytest.raises(TLSConfigError, match="already exists"):
        create_ca(tmp_path)
    assert first.cert_path.read_bytes() == original
    assert create_ca(tmp_path, overwrite=True).cert_path.read_bytes() != original


def test_config_errors(pki: dict[str, HostCertFiles], tmp_path: Path) -> None:
    files = pki["server"]
    with pytest.raises(TLSConfigError, match="cannot load certificate"):
        server_context(tmp_path / "missing.pem", files.key_path, files.ca_path)
    with pytest.raises(TLSConfigError, match="cannot load CA"):
        client_context(files.cert_path, files.key_path, tmp_path / "missing-ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError):
        server_context(garbage, files.key_path, files.ca_path)
    with pytest.raises(TLSConfigError):
        server_context(files.cert_path, files.key_path, garbage)
    # A key that does not belong to the certificate.
    with pytest.raises(TLSConfigError):
        server_context(files.cert_path, pki["client"].key_path, files.ca_path)
    with pytest.raises(TLSConfigError, match="cannot read the CA"):
        create_host_cert(tmp_path / "no-ca", tmp_path / "x", "x")
    with pytest.raises(TLSConfigError, match="invalid IP"):
        create_host_cert(files.ca_path.parent.parent / "ca", tmp_path / "x", "x", ips=["nope"])


async def test_truncation_without_close_notify_is_an_error(pki: dict[str, HostCertFiles]) -> None:
    """A TLS stream cut at the TCP level must not look like a clean end."""
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        client = await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))
        server = await listener.accept()
        assert isinstance(server, TLSStream)
        await server.send_all(b"partial")
        await server._transport.aclose()  # no close_notify
        assert await client.receive_some() == b"partial"
        with pytest.raises(BrokenResourceError, match="UNEXPECTED_EOF"):
            await client.receive_some()
        await client.aclose()
        await server.aclose()


def tls_into_pair(pki: dict[str, HostCertFiles]) -> PairFactory:
    """TLS streams whose receive_some goes through TLSStream.receive_into."""

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
            a = await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))
            b = await listener.accept()
            assert isinstance(a, TLSStream)
            assert isinstance(b, TLSStream)
            wa, wb = ViaReceiveInto(a), ViaReceiveInto(b)
            try:
                yield Pair(wa, wb, vanish_b=wb.aclose, half_close=False)
            finally:
                await wa.aclose()
                await wb.aclose()

    return make


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_conformance_through_tls_receive_into(
        check: str, pki: dict[str, HostCertFiles]) -> None:
    await run_check(check, tls_into_pair(pki))


async def test_tls_receive_into_any_buffer_size_gets_every_byte(
        pki: dict[str, HostCertFiles]) -> None:
    # Records are 16 KiB: buffers smaller, equal and larger than one, and spanning several.
    payload = bytes(range(256)) * 1024  # 256 KiB
    async with await listen_tcp(ssl_context=server_context_for(pki["server"])) as listener:
        a = await connect_tcp(*listener.address, ssl_context=client_context_for(pki["client"]))
        b = await listener.accept()
        assert isinstance(b, TLSStream)
        for size in (1, 7, 16384, 16385, 100_000, 300_000):
            await a.send_all(payload)
            got = bytearray()
            buffer = bytearray(size)
            while len(got) < len(payload):
                n = await b.receive_into(memoryview(buffer))
                assert 1 <= n <= size
                got += buffer[:n]
            assert got == payload, size
        await a.aclose()
        assert await b.receive_into(memoryview(bytearray(10))) == 0  # close_notify: the end
        with pytest.raises(ValueError, match="non-empty"):
            await b.receive_into(memoryview(bytearray(0)))
        await b.aclose()
