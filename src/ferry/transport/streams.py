"""A :class:`~ferry.transport.base.Stream` over an asyncio reader/writer pair.

Pipes (stdio, subprocesses) end up as an ``asyncio.StreamReader`` plus
``asyncio.StreamWriter``; :class:`AsyncioStream` puts the Stream contract on
top of them (TCP and UNIX sockets use the copy-free
:class:`ferry.transport.sockets.SocketStream` instead). It is where asyncio's
and the OS's exceptions (``ConnectionResetError``, ``BrokenPipeError``,
``ssl.SSLError``, ``IncompleteReadError`` ...) become
:class:`BrokenResourceError` naming the peer, and where use after
``aclose()`` becomes :class:`ClosedResourceError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence

from ferry.buffers import Buffer
from ferry.errors import (
    BrokenResourceError,
    ClosedResourceError,
    DeadlineError,
    TransportError,
)

logger = logging.getLogger(__name__)

DEFAULT_RECEIVE_BYTES = 256 * 1024
"""Default ``receive_some`` size. asyncio's socket transports read at most
256 KiB per ``recv``, so asking for more rarely returns more, and asking for
less costs extra wake-ups on a bulk migration stream."""

READER_LIMIT_BYTES = 4 * 1024 * 1024
"""StreamReader buffer limit. The reader stops reading the socket once twice
this much is buffered; asyncio's 64 KiB default stalls a fast sender after
128 KiB and costs throughput on a bulk copy."""

WRITE_HIGH_WATER_BYTES = 1024 * 1024
"""``send_all`` waits (drain) only once this much is queued in user space:
fewer, larger writes, while the memory a stream can hold stays bounded."""

CLOSE_GRACE_S = 2.0
"""How long ``aclose`` lets queued bytes (at most the high-water mark) and a
TLS close_notify go out before aborting the connection, so a peer that stopped
reading cannot hang our close."""


class HalfCloseUnsupportedError(TransportError):
    """``send_eof`` on a transport that cannot close only its sending side (TLS)."""


class ConnectTimeoutError(BrokenResourceError, DeadlineError):
    """Connecting (including the TLS handshake) exceeded its deadline."""


class PeerIdleError(BrokenResourceError, DeadlineError):
    """The peer sent nothing within the idle deadline; we gave up on it."""


_BROKEN_ERRORS = (OSError, ssl.SSLError, asyncio.IncompleteReadError, EOFError)
"""What asyncio raises when the link breaks. ConnectionError and
BrokenPipeError are OSErrors; asyncio surfaces a lost connection in
``drain()`` as ConnectionResetError."""


@contextlib.contextmanager
def translate_errors(peer: str, action: str) -> Iterator[None]:
    """Turn OS/asyncio/ssl link failures into BrokenResourceError naming ``peer``."""
    try:
        yield
    except _BROKEN_ERRORS as exc:
        raise BrokenResourceError(f"{action} failed: {describe(exc)}", peer=peer) from exc


def describe(exc: BaseException) -> str:
    """A short, readable description of a low-level exception."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def set_socket_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle on TCP sockets: the protocol sends small control frames
    (acks, fetch requests) whose latency matters more than packet count."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """:func:`set_socket_nodelay` for the socket under an asyncio writer."""
    set_socket_nodelay(writer.get_extra_info("socket"))


class AsyncioStream:
    """A Stream over an asyncio ``StreamReader``/``StreamWriter`` pair.

    ``also_close`` lists transports that the stream owns besides the
    writer's (a pipe stream reads from one transport and writes to another).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        *,
        also_close: Sequence[asyncio.BaseTransport] = (),
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._also_close = tuple(also_close)
        self._closed = False
        self._eof_sent = False
        set_nodelay(writer)
        transport = writer.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    def __repr__(self) -> str:
        return f"<AsyncioStream peer={self._peer!r} closed={self._closed}>"

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def can_send_eof(self) -> bool:
        """Whether ``send_eof`` can close only our sending side (not over TLS)."""
        return self._writer.can_write_eof()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream already closed", peer=self._peer)

    async def send_all(self, data: Buffer) -> None:
        """Send every byte of ``data`` (a memoryview is passed through uncopied)."""
        self._check_open()
        if self._eof_sent:
            raise ClosedResourceError("send_all after send_eof", peer=self._peer)
        if self._writer.is_closing():
            # asyncio silently drops writes to a transport it already closed
            # because the connection was lost.
            raise BrokenResourceError("connection lost", peer=self._peer)
        with translate_errors(self._peer, "send"):
            self._writer.write(data)
            await self._writer.drain()
        self._check_open()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """Return 1..max_bytes bytes, or b"" once the peer closed its sending side."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        self._check_open()
        with translate_errors(self._peer, "receive"):
            data = await self._reader.read(max_bytes)
        # aclose() from another task wakes a pending read with EOF.
        self._check_open()
        return data

    async def send_eof(self) -> None:
        """Close our sending side; the peer's receive_some then returns b""."""
        self._check_open()
        if self._eof_sent:
            return
        if not self._writer.can_write_eof():
            raise HalfCloseUnsupportedError(
                "this transport cannot close only its sending side", peer=self._peer
            )
        self._eof_sent = True
        with translate_errors(self._peer, "send_eof"):
            await self._writer.drain()
            self._writer.write_eof()

    async def aclose(self) -> None:
        """Close the stream; idempotent. Queued bytes get a short grace period."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        for transport in self._also_close:
            transport.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self._writer.wait_closed()
        except TimeoutError:
            logger.debug("close of %s timed out; aborting", self._peer)
            self._abort()
        except asyncio.CancelledError:
            self._abort()
            raise
        except _BROKEN_ERRORS as exc:
            # The link was already broken; closing it is all we wanted.
            logger.debug("close of %s: %s", self._peer, describe(exc))

    def _abort(self) -> None:
        transport = self._writer.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
