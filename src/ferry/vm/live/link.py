"""The migration link between two hosts: TCP (optionally mutual TLS) that notices a dead peer.

A migration that loses its peer must fail, not hang, so that the source can
resume its VM. A killed peer process resets the connection at once, but a
cut cable loses packets silently, so the sockets carry ``TCP_USER_TIMEOUT``
(unacknowledged data older than ``dead_peer_s`` kills the connection) and
keepalives (an idle connection is probed every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ferry.errors import BrokenResourceError, TransportError
from ferry.transport.base import Stream
from ferry.transport.streams import AsyncioStream, ConnectTimeoutError
from ferry.transport.tcp import format_address
from ferry.transport.tls import TLSStream

DEFAULT_DEAD_PEER_S = 3.0
SOCKET_BUFFER_BYTES = 1024 * 1024
"""Bounded kernel buffers: data queued in them is ahead of any on-demand block
after the hand-off; 1 MiB still fills a data-centre link's bandwidth-delay product."""
READER_LIMIT_BYTES = 1 << 20
TLS_HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """``dead_peer_s``: how long a silent peer is tolerated; ``tls``: a mutual-TLS context."""

    dead_peer_s: float = DEFAULT_DEAD_PEER_S
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None


def tune(sock: socket.socket, dead_peer_s: float) -> None:
    """Disable Nagle and make a dead peer break the connection within ``dead_peer_s``."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, round(dead_peer_s)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_peer_s * 1000))


async def connect(host: str, port: int, options: LinkOptions = LinkOptions(), *,
                  timeout_s: float = 10.0) -> Stream:
    """Connect to a receiving peer."""
    peer = format_address(host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setblocking(False)
    tune(sock, options.dead_peer_s)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=READER_LIMIT_BYTES)
    except TimeoutError as exc:
        sock.close()
        raise ConnectTimeoutError(f"connect timed out after {timeout_s} s", peer=peer) from exc
    except OSError as exc:
        sock.close()
        raise BrokenResourceError(f"connect failed: {exc}", peer=peer) from exc
    stream: Stream = AsyncioStream(reader, writer, peer)
    if options.tls is not None:
        stream = await TLSStream.wrap(stream, options.tls, server_side=False,
                                      server_hostname=options.server_hostname or host,
                                      timeout_s=TLS_HANDSHAKE_TIMEOUT_S)
    return stream


class LinkListener:
    """Accepts migration connections on ``host:port`` (``port`` 0 picks one)."""

    def __init__(self, server: asyncio.Server, queue: asyncio.Queue[Stream | BaseException],
                 address: tuple[str, int]) -> None:
        self._server = server
        self._queue = queue
        self.address = address

    async def accept(self) -> Stream:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


@contextlib.asynccontextmanager
async def listen(host: str, port: int = 0,
                 options: LinkOptions = LinkOptions()) -> AsyncIterator[LinkListener]:
    queue: asyncio.Queue[Stream | BaseException] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            tune(sock, options.dead_peer_s)
        name = writer.get_extra_info("peername")
        stream: Stream = AsyncioStream(reader, writer, format_address(str(name[0]), int(name[1])))
        if options.tls is not None:
            try:
                stream = await TLSStream.wrap(stream, options.tls, server_side=True,
                                              timeout_s=TLS_HANDSHAKE_TIMEOUT_S)
            except TransportError as exc:
                await queue.put(exc)
                return
        await queue.put(stream)

    try:
        server = await asyncio.start_server(on_connection, host, port, limit=READER_LIMIT_BYTES,
                                            reuse_address=True)
    except OSError as exc:
        raise TransportError(f"cannot listen on {format_address(host, port)}: {exc}") from exc
    bound = server.sockets[0].getsockname()
    try:
        yield LinkListener(server, queue, (str(bound[0]), int(bound[1])))
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
