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
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ferry.errors import BrokenResourceError, TransportError
from ferry.transport import auth
from ferry.transport.base import Stream
from ferry.transport.streams import AsyncioStream, ConnectTimeoutError
from ferry.transport.tcp import format_address
from ferry.transport.tls import TLSStream

if TYPE_CHECKING:
    from ferry.transport.listener import Listener

log = logging.getLogger(__name__)

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


ACCEPT_BACKLOG = 16
"""Connections accepted (TLS done) but not yet taken by ``accept()``; more are closed."""


class LinkListener:
    """Accepts migration connections on ``host:port`` (``port`` 0 picks one).

    A connection whose TLS handshake fails is logged and dropped; the
    listener keeps accepting. :func:`accept_peer` adds authentication.
    """

    def __init__(self, server: asyncio.Server, queue: asyncio.Queue[Stream],
                 address: tuple[str, int]) -> None:
        self._server = server
        self._queue = queue
        self.address = address

    async def accept(self) -> Stream:
        return await self._queue.get()


async def accept_peer(listener: LinkListener, authenticate: auth.Authenticate, *,
                      handshake_timeout_s: float = auth.HANDSHAKE_TIMEOUT_S) -> Stream:
    """The first connection that authenticates; silent, garbage or unauthenticated ones are
    dropped (each after at most ``handshake_timeout_s``) and the listener keeps accepting."""
    return await auth.accept_authenticated(cast("Listener[Any]", listener), authenticate,
                                           handshake_timeout_s=handshake_timeout_s)


@contextlib.asynccontextmanager
async def listen(host: str, port: int = 0,
                 options: LinkOptions = LinkOptions()) -> AsyncIterator[LinkListener]:
    queue: asyncio.Queue[Stream] = asyncio.Queue()

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
                log.warning("dropped a connection: %s", exc)
                await stream.aclose()
                return
        # Full: drop the oldest for the newest (see transport.listener.ACCEPT_BACKLOG).
        oldest = queue.get_nowait() if queue.qsize() >= ACCEPT_BACKLOG else None
        queue.put_nowait(stream)
        if oldest is not None:
            log.warning("backlog full, dropped the oldest unaccepted connection (%s)", oldest.peer)
            await oldest.aclose()

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
        while not queue.empty():
            await queue.get_nowait().aclose()
        with contextlib.suppress(Exception):
            await server.wait_closed()
