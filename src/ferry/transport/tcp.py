"""TCP (optionally TLS) connections and listeners, as Streams.

Listeners bind loopback (127.0.0.1) unless given another host: exposing a
migration endpoint on every interface must be an explicit choice
(``host="0.0.0.0"`` or ``"::"``). With an ``ssl_context`` the TLS handshake
runs per connection, after accept, so a client that fails it is logged and
dropped without disturbing the listener or other connections.

A :class:`~ferry.transport.tuning.TcpTuning` (dead-peer detection, bounded
buffers) applies to a connecting socket before it connects, and to a
listener's sockets and every connection it accepts.

With TLS 1.3 the client finishes its handshake before the server has checked
the client certificate; a refused client therefore sees the server's alert
as a BrokenResourceError on its first receive (or send), not in connect.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl

from ferry.errors import BrokenResourceError, TransportError
from ferry.transport.base import Stream
from ferry.transport.listener import Handler, Listener
from ferry.transport.sockets import (
    LISTEN_BACKLOG,
    SocketServer,
    SocketStream,
    connect_socket,
)
from ferry.transport.streams import ConnectTimeoutError, describe
from ferry.transport.tls import TLSStream
from ferry.transport.tuning import TcpTuning, apply, apply_buffers, fit, measured_rtt_s

DEFAULT_HOST = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 10.0
"""A server-side TLS handshake that takes longer is abandoned, so a silent
client cannot hold a connection slot forever."""

TcpAddress = tuple[str, int]


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "tcp:unknown"
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return "tcp:unknown"


def link_rtt_s(stream: Stream) -> float | None:
    """The kernel's smoothed RTT of the TCP connection under ``stream`` (maybe under TLS);
    None for other streams or before any sample."""
    inner = stream
    while isinstance(inner, TLSStream):
        inner = inner.transport
    if not isinstance(inner, SocketStream) \
            or inner.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return measured_rtt_s(inner.socket)
    except OSError:
        return None


async def _connect_any(host: str, port: int, tuning: TcpTuning | None) -> socket.socket:
    """Connect to the first address of ``host`` that accepts, like asyncio does."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    prepare = None if tuning is None else functools.partial(apply, tuning=tuning)
    for family, _, proto, _, address in infos:
        try:
            return await connect_socket(family, address, proto, prepare=prepare)
        except OSError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"all of {len(errors)} addresses failed: {'; '.join(map(describe, errors))}")


async def connect_tcp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout_s: float = 10.0,
    tuning: TcpTuning | None = None,
) -> Stream:
    """Connect to ``host:port`` (TLS when ``ssl_context`` is given) within ``timeout_s``.

    ``server_hostname`` is the name the server certificate must carry; it
    defaults to ``host``. Failure raises BrokenResourceError, a timeout
    ConnectTimeoutError (both a BrokenResourceError and a DeadlineError).
    Without TLS the stream is a :class:`SocketStream` (it has ``receive_into``).
    """
    peer = format_address(host, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            sock = await _connect_any(host, port, tuning)
    except TimeoutError as exc:
        if exc.errno is not None:  # the kernel's ETIMEDOUT, before our deadline
            raise BrokenResourceError(f"connect failed: {describe(exc)}", peer=peer) from exc
        raise ConnectTimeoutError(f"connect timed out after {timeout_s} s", peer=peer) from exc
    except OSError as exc:
        raise BrokenResourceError(f"connect failed: {describe(exc)}", peer=peer) from exc
    if tuning is not None:
        try:
            fit(sock, tuning)  # the handshake measured the RTT
        except OSError as exc:
            sock.close()
            raise BrokenResourceError(f"tuning failed: {describe(exc)}", peer=peer) from exc
    stream = SocketStream(sock, peer)
    if ssl_context is None:
        return stream
    return await TLSStream.wrap(
        stream,
        ssl_context,
        server_side=False,
        server_hostname=server_hostname or host,
        timeout_s=max(deadline - loop.time(), 0.0),
    )


async def listen_tcp(
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    tuning: TcpTuning | None = None,
) -> Listener[TcpAddress]:
    """Bind and listen; take connections with ``await listener.accept()``."""
    return await _listen(None, host, port, ssl_context, tuning)


async def serve_tcp(
    handler: Handler,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Listener[TcpAddress]:
    """Bind and listen, running ``handler(stream)`` for every connection."""
    return await _listen(handler, host, port, ssl_context, None)


async def _bind(host: str, port: int, tuning: TcpTuning | None) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (as asyncio's
    create_server: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, _, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if tuning is not None:
                apply_buffers(sock, tuning)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _listen(
    handler: Handler | None,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    tuning: TcpTuning | None,
) -> Listener[TcpAddress]:
    async def make_stream(sock: socket.socket) -> Stream:
        if tuning is not None:
            try:
                apply(sock, tuning)
                fit(sock, tuning)
            except OSError as exc:  # the peer reset the connection already
                raise BrokenResourceError(f"tuning failed: {describe(exc)}",
                                          peer=_peer_of(sock)) from exc
        stream = SocketStream(sock, _peer_of(sock))
        if ssl_context is None:
            return stream
        try:
            return await TLSStream.wrap(
                stream, ssl_context, server_side=True, timeout_s=HANDSHAKE_TIMEOUT_S
            )
        except BaseException:
            await stream.aclose()
            raise

    listener: Listener[TcpAddress] | None = None

    async def on_connection(sock: socket.socket) -> None:
        assert listener is not None
        await listener.on_connection(sock)

    where = format_address(host, port)
    try:
        sockets = await _bind(host, port, tuning)
    except OSError as exc:
        raise TransportError(f"cannot listen on {where}: {describe(exc)}") from exc
    bound = sockets[0].getsockname()
    address = (str(bound[0]), int(bound[1]))
    server = SocketServer(sockets, on_connection)
    listener = Listener(server, address, make_stream, handler, label=format_address(*address))
    return listener
