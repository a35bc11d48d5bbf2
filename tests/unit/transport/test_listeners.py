"""TCP and UNIX listeners: binding, accept(), handler serving, socket files."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import pytest

from ferry.errors import BrokenResourceError, ClosedResourceError, ConfigError, TransportError
from ferry.transport.base import Stream
from ferry.transport.listener import ACCEPT_BACKLOG, Listener
from ferry.transport.sockets import SocketStream
from ferry.transport.streams import ConnectTimeoutError
from ferry.transport.tcp import connect_tcp, listen_tcp, serve_tcp
from ferry.transport.unix import (
    SEND_BUFFER_BYTES,
    connect_unix,
    connect_unix_when_listening,
    listen_unix,
    serve_unix,
)


async def test_tcp_listener_binds_loopback_by_default() -> None:
    async with await listen_tcp() as listener:
        host, port = listener.address
        assert host == "127.0.0.1"
        assert port > 0
        # Readiness is the return: connecting right away works.
        client = await connect_tcp(host, port)
        server = await listener.accept()
        await client.aclose()
        await server.aclose()


async def test_tcp_listener_binds_all_interfaces_only_when_asked() -> None:
    async with await listen_tcp("0.0.0.0") as listener:
        assert listener.address[0] == "0.0.0.0"


async def test_tcp_connections_disable_nagle() -> None:
    async with await listen_tcp() as listener:
        client = await connect_tcp(*listener.address)
        server = await listener.accept()
        for stream in (client, server):
            assert isinstance(stream, SocketStream)
            sock = stream.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await client.aclose()
        await server.aclose()


@pytest.fixture
def wmem_max() -> int:
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


async def test_unix_connections_ask_for_a_large_send_buffer(tmp_path: Path, wmem_max: int) -> None:
    expected = 2 * min(SEND_BUFFER_BYTES, wmem_max)  # Linux doubles the value asked for
    async with await listen_unix(tmp_path / "buf.sock") as listener:
        client = await connect_unix(tmp_path / "buf.sock")
        server = await listener.accept()
        for stream in (client, server):
            assert isinstance(stream, SocketStream)
            assert stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == expected
        await client.aclose()
        await server.aclose()


async def test_connect_refused_names_peer() -> None:
    async with await listen_tcp() as listener:
        host, port = listener.address
    with pytest.raises(BrokenResourceError, match=f"127.0.0.1:{port}") as info:
        await connect_tcp(host, port)
    assert info.value.peer == f"127.0.0.1:{port}"


async def test_accept_after_close_and_pending_accept_are_woken() -> None:
    listener = await listen_tcp()
    pending = [asyncio.create_task(listener.accept()) for _ in range(2)]
    await asyncio.sleep(0)
    await listener.aclose()
    await listener.aclose()  # idempotent
    for task in pending:
        with pytest.raises(ClosedResourceError):
            await task
    with pytest.raises(ClosedResourceError):
        await listener.accept()
    with pytest.raises(BrokenResourceError):
        await connect_tcp(*listener.address)


async def test_unaccepted_connections_are_closed_with_listener() -> None:
    listener = await listen_tcp()
    client = await connect_tcp(*listener.address)
    await asyncio.sleep(0.05)  # let the listener take the connection
    await listener.aclose()
    assert await client.receive_some() == b""
    await client.aclose()


async def test_serve_tcp_runs_handler_per_connection_and_closes_stream() -> None:
    seen: list[str] = []

    async def echo_upper(stream: Stream) -> None:
        data = await stream.receive_some()
        seen.append(stream.peer)
        await stream.send_all(data.upper())
        # Returning without closing: the listener must close the stream.

    async with await serve_tcp(echo_upper) as listener:
        with pytest.raises(ConfigError):
            await listener.accept()
        clients = [await connect_tcp(*listener.address) for _ in range(3)]
        for i, client in enumerate(clients):
            await client.send_all(f"hello {i}".encode())
        for i, client in enumerate(clients):
            assert await client.receive_some() == f"HELLO {i}".encode()
            assert await client.receive_some() == b""  # closed after the handler
            await client.aclose()
    assert len(seen) == 3


async def test_handler_exception_is_logged_and_stream_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing(stream: Stream) -> None:
        await stream.receive_some()
        raise RuntimeError("handler exploded")

    async with await serve_tcp(failing) as listener:
        client = await connect_tcp(*listener.address)
        await client.send_all(b"go")
        assert await client.receive_some() == b""
        await client.aclose()
        # The listener survives a failing handler.
        second = await connect_tcp(*listener.address)
        await second.aclose()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "handler for 127.0.0.1:" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert "handler exploded" in str(errors[0].exc_info[1])


async def test_closing_listener_cancels_running_handlers() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(stream: Stream) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    listener = await serve_tcp(forever)
    client = await connect_tcp(*listener.address)
    await started.wait()
    await listener.aclose()
    assert cancelled.is_set()
    assert await client.receive_some() == b""
    await client.aclose()


async def test_unix_socket_is_private_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "ferry.sock"
    os.umask(old := os.umask(0))  # read the umask without changing it
    async with await listen_unix(path) as listener:
        assert listener.address == str(path)
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        client = await connect_unix(path)
        server = await listener.accept()
        await client.send_all(b"over unix")
        assert await server.receive_some() == b"over unix"
        await client.aclose()
        await server.aclose()
    assert not path.exists()
    assert os.umask(old) == old


async def test_unix_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # the file stays, nobody listens: a crashed run's leftover
    assert path.exists()
    async with await serve_unix(lambda stream: stream.send_all(b"fresh"), path):
        client = await connect_unix(path)
        assert await client.receive_some() == b"fresh"
        await client.aclose()


async def test_unix_live_socket_and_regular_file_are_not_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    async with await listen_unix(path):
        with pytest.raises(TransportError, match="another server"):
            await listen_unix(path)
        assert path.exists()
    regular = tmp_path / "data.txt"
    regular.write_text("precious")
    with pytest.raises(TransportError, match="not a socket"):
        await listen_unix(regular)
    assert regular.read_text() == "precious"


async def test_connect_unix_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BrokenResourceError, match=r"nothing-here\.sock"):
        await connect_unix(tmp_path / "nothing-here.sock")


async def test_a_flood_of_unaccepted_connections_cannot_lock_out_the_next_peer() -> None:
    """More connections than the backlog arrive before anyone calls accept(): the queue
    stays bounded, and the peer that connects after the flood is the one accept() finds."""
    async with await listen_tcp() as listener:
        flood = [await connect_tcp(*listener.address) for _ in range(ACCEPT_BACKLOG + 8)]
        await asyncio.sleep(0.2)  # let the server queue (and drop) them
        legit = await connect_tcp(*listener.address)
        await legit.send_all(b"legit")
        for s in flood:
            await s.aclose()
        accepted = []
        while True:
            server = await asyncio.wait_for(listener.accept(), 5)
            accepted.append(server)
            if await server.receive_some(5) == b"legit":
                break
        assert len(accepted) <= ACCEPT_BACKLOG  # the 8 oldest were dropped, not queued
        for s in [*accepted, legit]:
            await s.aclose()


async def test_connect_when_listening_waits_for_a_socket_that_appears_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "late.sock"

    async def listen_later() -> Listener[str]:
        await asyncio.sleep(0.1)
        return await listen_unix(path)

    later = asyncio.create_task(listen_later())
    client = await connect_unix_when_listening(path, timeout_s=5)
    async with await later as listener:
        server = await listener.accept()
        await client.send_all(b"hi")
        assert await server.receive_some(2) == b"hi"
        await server.aclose()
    await client.aclose()


async def test_connect_when_listening_gives_up_with_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectTimeoutError, match=r"nothing listened within 0\.1 s"):
        await connect_unix_when_listening(tmp_path / "never.sock", timeout_s=0.1)


async def test_connect_when_listening_does_not_retry_other_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BrokenResourceError) as info:  # ENOTDIR: waiting cannot help
        await connect_unix_when_listening(a_file / "x.sock", timeout_s=5)
    assert not isinstance(info.value, ConnectTimeoutError)
