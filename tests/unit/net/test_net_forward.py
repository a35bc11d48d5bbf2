"""The userspace TCP/UDP relays, run in this process's own namespace (no root needed).

The targets are echo servers on 127.0.0.1 standing in for the VM namespace's
veth address; only loopback is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest

from ferry.net import (
    ForwardError,
    NamespaceError,
    NetConfigError,
    PortForward,
    Proto,
    TcpForwarder,
    UdpForwarder,
    WildcardAddressError,
    make_forwarder,
    socket_in_netns,
)


@contextlib.asynccontextmanager
async def tcp_echo() -> AsyncIterator[tuple[tuple[str, int], list[asyncio.StreamWriter]]]:
    """Echo server replying ``echo:<data>`` after the client's half-close."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        data = await reader.read()
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[:2], writers


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


@contextlib.asynccontextmanager
async def udp_echo() -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


async def exchange(addr: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


# PortForward ------------------------------------------------------------------------


def test_port_forward_validation() -> None:
    f = PortForward("127.0.0.1", 16379, 6379, proto="udp")  # type: ignore[arg-type]
    assert f.proto is Proto.UDP
    assert str(f) == "127.0.0.1:16379->6379/udp"
    assert str(PortForward("::1", 1, 2)) == "[::1]:1->2/tcp"
    assert PortForward("::1", 1, 2).family == socket.AF_INET6
    with pytest.raises(WildcardAddressError):
        PortForward("0.0.0.0", 1, 2)
    with pytest.raises(WildcardAddressError):
        PortForward("::", 1, 2)
    assert PortForward("::", 1, 2, allow_wildcard=True).host == "::"
    with pytest.raises(NetConfigError, match="IP address"):
        PortForward("localhost", 1, 2)
    with pytest.raises(NetConfigError):
        PortForward("127.0.0.1", 70000, 2)
    with pytest.raises(NetConfigError):
        PortForward("127.0.0.1", 1, 0)
    with pytest.raises(ValueError, match="sctp"):
        PortForward("127.0.0.1", 1, 2, proto="sctp")  # type: ignore[arg-type]


def test_make_forwarder_by_protocol() -> None:
    tcp = PortForward("127.0.0.1", 0, 1)
    udp = PortForward("127.0.0.1", 0, 1, proto=Proto.UDP)
    assert isinstance(make_forwarder(tcp, ("127.0.0.1", 1)), TcpForwarder)
    assert isinstance(make_forwarder(udp, ("127.0.0.1", 1)), UdpForwarder)
    with pytest.raises(NetConfigError):
        TcpForwarder(udp, ("127.0.0.1", 1))
    with pytest.raises(NetConfigError):
        UdpForwarder(tcp, ("127.0.0.1", 1))


# TCP ------------------------------------------------------------------------------


async def test_tcp_relay_with_half_close_and_concurrency() -> None:
    async with tcp_echo() as (target, _):
        fwd = TcpForwarder(PortForward("127.0.0.1", 0, 1), target)
        await fwd.start()
        address = fwd.local_address
        try:
            with pytest.raises(ForwardError, match="already started"):
                await fwd.start()
            payloads = [os.urandom(n) for n in (0, 1, 100_000, 300_000)]
            replies = await asyncio.gather(*(exchange(fwd.local_address, p) for p in payloads))
            assert replies == [b"echo:" + p for p in payloads]
        finally:
            await fwd.stop()
        with pytest.raises(ConnectionRefusedError):
            await exchange(address, b"x")
        with pytest.raises(ForwardError, match="not started"):
            _ = fwd.local_address


async def test_tcp_relay_closes_client_when_target_refuses() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[:2]
    fwd = TcpForwarder(PortForward("127.0.0.1", 0, 1), dead)
    await fwd.start()
    try:
        reader, writer = await asyncio.open_connection(*fwd.local_address)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        await fwd.stop()


async def test_tcp_stop_closes_active_connections() -> None:
    async with tcp_echo() as (target, _):
        fwd = TcpForwarder(PortForward("127.0.0.1", 0, 1), target)
        await fwd.start()
        reader, writer = await asyncio.open_connection(*fwd.local_address)
        writer.write(b"pending")  # no half-close: the echo server keeps waiting
        await writer.drain()
        await asyncio.sleep(0)
        await fwd.stop()
        try:
            rest = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:  # closed with our unread bytes in flight: also closed
            rest = b""
        assert rest == b""
        writer.close()


async def test_tcp_bind_conflict_is_forward_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        fwd = TcpForwarder(PortForward("127.0.0.1", port, 1), ("127.0.0.1", 1))
        with pytest.raises(ForwardError, match="cannot bind"):
            await fwd.start()
    with pytest.raises(ForwardError, match="not started"):
        _ = fwd.local_address


# UDP ------------------------------------------------------------------------------


async def _udp_client(addr: tuple[str, int], payload: bytes) -> bytes:
    def blocking() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for _ in range(5):
                s.sendto(payload, addr)
                try:
                    return s.recv(65536)
                except TimeoutError:
                    continue
        raise AssertionError("no UDP reply")

    return await asyncio.to_thread(blocking)


async def test_udp_relay_keeps_clients_apart() -> None:
    async with udp_echo() as target:
        fwd = UdpForwarder(PortForward("127.0.0.1", 0, 1, proto=Proto.UDP), target)
        await fwd.start()
        try:
            replies = await asyncio.gather(
                *(_udp_client(fwd.local_address, f"client{i}".encode()) for i in range(5))
            )
            assert replies == [f"echo:client{i}".encode() for i in range(5)]
        finally:
            await fwd.stop()


async def test_udp_idle_flows_are_reaped() -> None:
    async with udp_echo() as target:
        fwd = UdpForwarder(PortForward("127.0.0.1", 0, 1, proto=Proto.UDP), target,
                           idle_timeout_s=0.2)
        await fwd.start()
        try:
            assert await _udp_client(fwd.local_address, b"a") == b"echo:a"
            assert len(fwd._flows) == 1
            for _ in range(100):  # bounded wait for the reaper
                if not fwd._flows:
                    break
                await asyncio.sleep(0.05)
            assert fwd._flows == {}
            assert await _udp_client(fwd.local_address, b"b") == b"echo:b"
        finally:
            await fwd.stop()


# Namespaced sockets -------------------------------------------------------------------


async def test_socket_in_missing_namespace() -> None:
    with pytest.raises(NamespaceError, match="does not exist"):
        await socket_in_netns("ferry-no-such-ns-xyz")


async def test_socket_in_current_namespace_is_nonblocking() -> None:
    sock = await socket_in_netns(None)
    try:
        assert sock.getblocking() is False
    finally:
        sock.close()


async def test_tcp_stop_is_prompt_when_the_target_stopped_reading() -> None:
    """A target that accepted and then never reads again (a guest that was stopped),
    and a client still writing: the relay's upstream has data that can never drain.
    Stopping the forwarder must not wait for it (it did, forever: a received VM's holder
    hung in its network teardown on SIGTERM)."""
    stalled: list[socket.socket] = []

    def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        cast(asyncio.Transport, writer.transport).pause_reading()  # accept, never read
        stalled.append(sock)

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    fwd = TcpForwarder(PortForward("127.0.0.1", 0, 1), target)
    await fwd.start()
    try:
        _, writer = await asyncio.open_connection(*fwd.local_address)
        chunk = b"x" * 65536
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):  # until every buffer on the way is full
                while True:
                    writer.write(chunk)
                    await writer.drain()
        async with asyncio.timeout(10):  # a hang guard: it ends at once, or never
            await fwd.stop()
        writer.transport.abort()
    finally:
        await fwd.stop()
        server.close()
