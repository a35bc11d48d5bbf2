"""TCP tuned for a migration link: dead-peer detection on both ends, mutual TLS, the zero-copy
receive path kept."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ferry.errors import BrokenResourceError, ConfigError
from ferry.live.access import Access, TLSFiles
from ferry.transport.certs import create_ca, create_host_cert
from ferry.transport.sockets import ReceiveIntoStream, SocketStream
from ferry.transport.tcp import connect_tcp, link_rtt_s, listen_tcp
from ferry.transport.tuning import (
    BDP_HEADROOM,
    MAX_LINK_BUFFER_BYTES,
    NOTSENT_LOWAT_BYTES,
    SOCKET_BUFFER_BYTES,
    TcpTuning,
    apply,
    link_buffer_bytes,
    set_buffers,
)


def _assert_tuned(sock: socket.socket, dead_peer_s: float) -> None:
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(dead_peer_s * 1000)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == round(dead_peer_s)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_both_ends_are_tuned_and_keep_receive_into() -> None:
    tuning = TcpTuning(dead_peer_s=2.0)
    async with await listen_tcp("127.0.0.1", 0, tuning=tuning) as listener:
        client = await connect_tcp(*listener.address, tuning=tuning)
        server = await listener.accept()
        for end in (client, server):
            assert isinstance(end, SocketStream)
            assert isinstance(end, ReceiveIntoStream)
            _assert_tuned(end.socket, 2.0)
        await client.send_all(b"hello")
        assert await server.receive_some() == b"hello"
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


async def test_untuned_connections_keep_kernel_defaults() -> None:
    async with await listen_tcp("127.0.0.1", 0) as listener:
        client = await connect_tcp(*listener.address)
        server = await listener.accept()
        assert isinstance(client, SocketStream)
        assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        await client.aclose()
        await server.aclose()


def test_apply_sets_user_timeout_keepalive_and_buffers() -> None:
    with socket.socket() as sock:
        apply(sock, TcpTuning(dead_peer_s=2.5, buffer_bytes=256 * 1024))
        _assert_tuned(sock, 2.5)
        # Linux doubles the value it is given for its own bookkeeping.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 256 * 1024


@pytest.mark.parametrize("bad", [{"dead_peer_s": 0.0}, {"dead_peer_s": float("nan")},
                                 {"buffer_bytes": 10}])
def test_tuning_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TcpTuning(**bad)  # type: ignore[arg-type]


async def test_connect_refused_is_a_broken_link() -> None:
    async with await listen_tcp("127.0.0.1", 0) as listener:
        port = listener.address[1]
    with pytest.raises(BrokenResourceError):
        await connect_tcp("127.0.0.1", port, tuning=TcpTuning())


async def test_mutual_tls_link_through_access(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    a = create_host_cert(tmp_path / "ca", tmp_path / "a", "a", ["127.0.0.1"])
    b = create_host_cert(tmp_path / "ca", tmp_path / "b", "b", ["127.0.0.1"])
    server_access = Access(tls=TLSFiles(b.cert_path, b.key_path, b.ca_path))
    client_access = Access(tls=TLSFiles(a.cert_path, a.key_path, a.ca_path))
    async with await server_access.listen("127.0.0.1", 0, dead_peer_s=2.0) as listener:
        client = await client_access.connect(*listener.address, dead_peer_s=2.0)
        peer = await server_access.accept(listener)
        await client.send_all(b"over tls")
        assert await peer.receive_some() == b"over tls"
        await client.aclose()
        await peer.aclose()


def test_link_buffers_follow_the_bandwidth_delay_product_within_bounds() -> None:
    # 1 Gbit/s x 100 ms = 12.5 MB, with headroom.
    assert link_buffer_bytes(0.1, 1000) == int(12_500_000 * BDP_HEADROOM)
    assert link_buffer_bytes(0.0001, 1000) == SOCKET_BUFFER_BYTES  # a LAN keeps the floor
    assert link_buffer_bytes(0.1, None) == MAX_LINK_BUFFER_BYTES  # unknown rate: 10 Gbit/s
    assert link_buffer_bytes(10.0, 1_000_000) == MAX_LINK_BUFFER_BYTES
    assert link_buffer_bytes(0.02, 100) == SOCKET_BUFFER_BYTES  # 250 KB


@pytest.mark.skipif(os.geteuid() != 0, reason="buffers above net.core.rmem_max need root")
async def test_a_link_fitted_connection_measures_its_rtt_and_bounds_what_is_unsent() -> None:
    """Loopback's RTT is tiny: the buffers come down from the pre-handshake ceiling to the
    floor, and unsent data is capped by TCP_NOTSENT_LOWAT on both ends."""
    tuning = TcpTuning(dead_peer_s=2.0, fit_to_link=True)
    async with await listen_tcp("127.0.0.1", 0, tuning=tuning) as listener:
        client = await connect_tcp(*listener.address, tuning=tuning)
        server = await listener.accept()
        for end in (client, server):
            assert isinstance(end, SocketStream)
            rtt_s = link_rtt_s(end)
            assert rtt_s is not None
            assert 0 < rtt_s < 0.05
            # The kernel reports twice what was set (its bookkeeping overhead).
            assert end.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) \
                == 2 * SOCKET_BUFFER_BYTES
            assert end.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) \
                == 2 * SOCKET_BUFFER_BYTES
            assert end.socket.getsockopt(socket.IPPROTO_TCP, 25) == NOTSENT_LOWAT_BYTES
            _assert_tuned(end.socket, 2.0)
        await client.aclose()
        await server.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="buffers above net.core.rmem_max need root")
def test_fit_sets_the_buffers_a_long_rtt_needs() -> None:
    """What fit() does once a handshake measured 100 ms (the RTT is injected: loopback
    cannot have it; the e2e test over an emulated link checks a real one)."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        set_buffers(a, link_buffer_bytes(0.1, 1000))
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) \
            == 2 * int(12_500_000 * BDP_HEADROOM)


def test_link_rate_is_validated() -> None:
    with pytest.raises(ConfigError):
        TcpTuning(link_mbit=0.0)
