"""The migration link: loopback TCP with dead-peer detection, and mutual TLS."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ferry.errors import BrokenResourceError
from ferry.live import link
from ferry.transport.certs import create_ca, create_host_cert
from ferry.transport.tls import client_context_for, server_context_for


async def test_round_trip_and_socket_options() -> None:
    options = link.LinkOptions(dead_peer_s=2.0)
    async with link.listen("127.0.0.1", 0, options) as listener:
        client = await link.connect(*listener.address, options)
        server = await listener.accept()
        await client.send_all(b"hello")
        assert await server.receive_some() == b"hello"
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


def test_tune_sets_user_timeout_and_keepalive() -> None:
    with socket.socket() as sock:
        link.tune(sock, 2.5)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_connect_refused_is_a_broken_link() -> None:
    async with link.listen("127.0.0.1", 0) as listener:
        port = listener.address[1]
    with pytest.raises(BrokenResourceError):
        await link.connect("127.0.0.1", port)


async def test_mutual_tls(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    a = create_host_cert(tmp_path / "ca", tmp_path / "a", "a", ["127.0.0.1"])
    b = create_host_cert(tmp_path / "ca", tmp_path / "b", "b", ["127.0.0.1"])
    server = link.LinkOptions(tls=server_context_for(b))
    async with link.listen("127.0.0.1", 0, server) as listener:
        client = await link.connect(*listener.address, link.LinkOptions(tls=client_context_for(a)))
        peer = await listener.accept()
        await client.send_all(b"over tls")
        assert await peer.receive_some() == b"over tls"
        await client.aclose()
        await peer.aclose()
