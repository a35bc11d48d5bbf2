"""TCP (optionally TLS) connections and listeners, as Streams.

Listeners bind loopback (127.0.0.1) unless given another host: exposing a
migration endpoint on every interface must be an explicit choice
(``host="0.0.0.0"`` or ``"::"``). With an ``ssl_context`` the TLS handshake
runs per connection, after accept, so a client that fails it is logged and
dropped without disturbing the listener or other connections.

With TLS 1.3 the client finishes its handshake before the server has checked
the client certificate; a refused client therefore sees the server's alert
as a BrokenResourceError on its first receive (or send), not in connect.
"""

from __future__ import annotations

import asyncio
import ssl

from ferry.errors import BrokenResourceError, TransportError
from ferry.transport.base import Stream
from ferry.transport.listener import Handler, Listener
from ferry.transport.streams import (
    READER_LIMIT_BYTES,
    AsyncioStream,
    ConnectTimeoutError,
    describe,
)
from ferry.transport.tls import TLSStream

DEFAULT_HOST = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 10.0
"""A server-side TLS handshake that takes longer is abandoned, so a silent
client cannot hold a connection slot forever."""

TcpAddress = tuple[str, int]


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return "tcp:unknown"


async def connect_tcp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout_s: float = 10.0,
) -> Stream:
    """Connect to ``host:port`` (TLS when ``ssl_context`` is given) within ``timeout_s``.

    ``server_hostname`` is the name the server certificate must carry; it
    defaults to ``host``. Failure raises BrokenResourceError, a timeout
    ConnectTimeoutError (both a BrokenResourceError and a DeadlineError).
    """
    peer = format_address(host, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection(host, port, limit=READER_LIMIT_BYTES)
    except TimeoutError as exc:
        raise ConnectTimeoutError(f"connect timed out after {timeout_s} s", peer=peer) from exc
    except OSError as exc:
        raise BrokenResourceError(f"connect failed: {describe(exc)}", peer=peer) from exc
    stream = AsyncioStream(reader, writer, peer)
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
    host: str = DEFAULT_HOST, port: int = 0, *, ssl_context: ssl.SSLContext | None = None
) -> Listener[TcpAddress]:
    """Bind and listen; take connections with ``await listener.accept()``."""
    return await _listen(None, host, port, ssl_context)


async def serve_tcp(
    handler: Handler,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Listener[TcpAddress]:
    """Bind and listen, running ``handler(stream)`` for every connection."""
    return await _listen(handler, host, port, ssl_context)


async def _listen(
    handler: Handler | None, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> Listener[TcpAddress]:
    async def make_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Stream:
        stream = AsyncioStream(reader, writer, _peer_of(writer))
        if ssl_context is None:
            return stream
        return await TLSStream.wrap(
            stream, ssl_context, server_side=True, timeout_s=HANDSHAKE_TIMEOUT_S
        )

    listener: Listener[TcpAddress] | None = None

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert listener is not None
        await listener.on_connection(reader, writer)

    where = format_address(host, port)
    try:
        server = await asyncio.start_server(
            on_connection, host, port, limit=READER_LIMIT_BYTES, reuse_address=True
        )
    except OSError as exc:
        raise TransportError(f"cannot listen on {where}: {describe(exc)}") from exc
    bound = server.sockets[0].getsockname()
    address = (str(bound[0]), int(bound[1]))
    listener = Listener(server, address, make_stream, handler, label=format_address(*address))
    return listener
