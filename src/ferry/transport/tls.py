"""SSL contexts for mutual TLS between ferry nodes (TLS 1.3 only).

Both sides present a certificate from the same private CA
(:mod:`ferry.transport.certs`) and verify the other's: the server requires a
client certificate, the client checks the server's certificate and host name.
Pass the contexts to :func:`ferry.transport.tcp.connect_tcp` /
:func:`ferry.transport.tcp.listen_tcp`, which run :class:`TLSStream` over
the TCP connection; ``TLSStream.wrap`` also puts TLS over any other Stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from typing import TypeVar, cast

from ferry.buffers import Buffer
from ferry.errors import (
    BrokenResourceError,
    ClosedResourceError,
    TLSConfigError,
    TransportError,
)
from ferry.transport.base import Stream
from ferry.transport.certs import HostCertFiles
from ferry.transport.sockets import ReceiveIntoStream
from ferry.transport.streams import (
    CLOSE_GRACE_S,
    DEFAULT_RECEIVE_BYTES,
    ConnectTimeoutError,
    HalfCloseUnsupportedError,
    describe,
)

PathLike = str | os.PathLike[str]
T = TypeVar("T")

TLS_WRITE_CHUNK_BYTES = 256 * 1024
"""Plaintext encrypted per step of send_all: large enough to amortise the
Python overhead per call, small enough to bound the ciphertext held at once."""


def _load(context: ssl.SSLContext, cert: PathLike, key: PathLike, ca: PathLike) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"cannot load certificate {os.fspath(cert)} / key {os.fspath(key)}: {exc}"
        ) from exc
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA certificate {os.fspath(ca)}: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED


def server_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """A server context that refuses clients without a certificate signed by ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(context, cert, key, ca)
    return context


def client_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """A client context presenting ``cert`` and verifying the server against ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname is on
    _load(context, cert, key, ca)
    return context


def server_context_for(files: HostCertFiles) -> ssl.SSLContext:
    """:func:`server_context` from the files :func:`create_host_cert` wrote."""
    return server_context(files.cert_path, files.key_path, files.ca_path)


def client_context_for(files: HostCertFiles) -> ssl.SSLContext:
    """:func:`client_context` from the files :func:`create_host_cert` wrote."""
    return client_context(files.cert_path, files.key_path, files.ca_path)


class TLSStream:
    """TLS over any Stream, driven through ``ssl.SSLObject`` and memory BIOs.

    Why not asyncio's own TLS: when a server refuses a handshake (say, a
    client certificate from the wrong CA), asyncio drops the connection
    without sending the TLS alert, so the client only sees EOF; and asyncio
    takes a TCP close without close_notify as a clean EOF, hiding truncation.
    Here the alert is always flushed, a refused client gets a
    BrokenResourceError naming the reason, and a stream cut without
    close_notify raises BrokenResourceError instead of looking finished.

    TLS cannot close one direction only, so ``send_eof`` raises
    HalfCloseUnsupportedError; ``aclose`` sends close_notify (best effort)
    and closes the underlying stream.
    """

    def __init__(self, transport: Stream, sslobj: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._transport = transport
        self._ssl = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        # One writer of ciphertext at a time: receive_some may have to send
        # (TLS 1.3 key updates) while send_all is sending.
        self._send_lock = asyncio.Lock()
        self._receive_lock = asyncio.Lock()
        self._closed = False
        self._broken = False
        self._receive_into = (
            transport.receive_into if isinstance(transport, ReceiveIntoStream) else None)
        self._ciphertext = memoryview(bytearray(DEFAULT_RECEIVE_BYTES))

    @classmethod
    async def wrap(
        cls,
        transport: Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout_s: float = 10.0,
    ) -> TLSStream:
        """Run the handshake over ``transport`` and return the TLS stream.

        On failure (refused certificate, timeout, peer gone) the transport is
        closed and BrokenResourceError (ConnectTimeoutError on timeout) raised.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                                      server_hostname=server_hostname)
        except (ssl.SSLError, ValueError) as exc:
            await transport.aclose()
            raise TLSConfigError(f"cannot start TLS: {exc}", peer=transport.peer) from exc
        stream = cls(transport, sslobj, incoming, outgoing)
        try:
            async with asyncio.timeout(timeout_s):
                await stream._handshake()
        except TimeoutError as exc:
            await transport.aclose()
            raise ConnectTimeoutError(f"TLS handshake timed out after {timeout_s} s",
                                      peer=transport.peer) from exc
        except BaseException:
            await transport.aclose()
            raise
        return stream

    def __repr__(self) -> str:
        return f"<TLSStream peer={self.peer!r} closed={self._closed}>"

    @property
    def transport(self) -> Stream:
        """The stream the TLS records travel on, for inspecting it; do not read or write it."""
        return self._transport

    @property
    def peer(self) -> str:
        return self._transport.peer

    @property
    def can_send_eof(self) -> bool:
        return False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream already closed", peer=self.peer)

    def _tls_broken(self, action: str, exc: ssl.SSLError) -> BrokenResourceError:
        self._broken = True
        return BrokenResourceError(f"{action} failed: {describe(exc)}", peer=self.peer)

    async def _flush(self) -> None:
        """Send whatever ciphertext the SSL object has produced, in order."""
        async with self._send_lock:
            if self._outgoing.pending:
                await self._transport.send_all(self._outgoing.read())

    async def _fill(self) -> None:
        """Feed the SSL object the next ciphertext; EOF is passed on as EOF."""
        if self._receive_into is not None:
            # Into one reused buffer: a fresh 256 KiB object per read costs page faults.
            count = await self._receive_into(self._ciphertext)
            if count:
                self._incoming.write(self._ciphertext[:count])
            else:
                self._incoming.write_eof()
            return
        data = await self._transport.receive_some(DEFAULT_RECEIVE_BYTES)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError as exc:
                # Send the alert so the peer learns why, then give up.
                with contextlib.suppress(TransportError):
                    await self._flush()
                raise self._tls_broken("TLS handshake", exc) from exc
        await self._flush()

    async def send_all(self, data: Buffer) -> None:
        self._check_open()
        if self._broken:
            raise BrokenResourceError("TLS stream is broken", peer=self.peer)
        view = memoryview(data).cast("B")
        while view:
            try:
                written = self._ssl.write(view[:TLS_WRITE_CHUNK_BYTES])
            except ssl.SSLError as exc:
                raise self._tls_broken("send", exc) from exc
            view = view[written:]
            await self._flush()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")

        def read() -> bytes:
            data = self._ssl.read(max_bytes)
            return self._read_buffered(data, max_bytes) if data else data

        return await self._receive(read, b"")

    async def receive_into(self, buffer: memoryview) -> int:
        """Receive 1..len(buffer) plaintext bytes straight into ``buffer``; 0 at the end.

        OpenSSL decrypts into ``buffer`` itself: no plaintext object is
        allocated or copied (the migration channel reads into its codec's buffer
        this way, as it does from a plain socket).
        """
        if not len(buffer):
            raise ValueError("receive_into needs a non-empty buffer")

        def read() -> int:
            # With a buffer, read() returns a count (typeshed says bytes).
            total = cast(int, self._ssl.read(len(buffer), buffer))
            while total and total < len(buffer) and self._incoming.pending:
                try:
                    count = cast(int, self._ssl.read(len(buffer) - total, buffer[total:]))
                except ssl.SSLError:
                    break  # want-read, close_notify or an error: the next call sees it
                if not count:
                    break
                total += count
            return total

        return await self._receive(read, 0)

    async def _receive(self, read: Callable[[], T], at_end: T) -> T:
        """Run ``read`` (one or more ``SSLObject.read``) until it has data or the end."""
        self._check_open()
        async with self._receive_lock:
            while True:
                self._check_open()
                try:
                    data = read()
                except ssl.SSLWantReadError:
                    if self._outgoing.pending:
                        await self._flush()
                    try:
                        await self._fill()
                    except ClosedResourceError:
                        self._check_open()  # closed by our aclose: report it as ours
                        raise
                    continue
                except ssl.SSLZeroReturnError:
                    return at_end  # close_notify: a clean end of stream
                except ssl.SSLError as exc:
                    # Includes SSLEOFError: the link ended without close_notify.
                    raise self._tls_broken("receive", exc) from exc
                if self._outgoing.pending:
                    await self._flush()
                return data

    def _read_buffered(self, first: bytes, max_bytes: int) -> bytes:
        """Append already-received records to ``first``, up to ``max_bytes``.

        One ``SSLObject.read`` returns at most one TLS record (16 KiB); taking
        every record already buffered per call makes bulk receives about
        as cheap per byte as on plain TCP.
        """
        if len(first) >= max_bytes or not self._incoming.pending:
            return first
        buffer = bytearray(max_bytes)
        buffer[: len(first)] = first
        view = memoryview(buffer)
        total = len(first)
        while total < max_bytes:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                count = cast(int, self._ssl.read(max_bytes - total, view[total:]))
            except ssl.SSLError:
                break  # want-read, close_notify or an error: the next call sees it
            if not count:
                break
            total += count
        view.release()
        del buffer[total:]
        return bytes(buffer)

    async def send_eof(self) -> None:
        self._check_open()
        raise HalfCloseUnsupportedError("TLS cannot close only its sending side", peer=self.peer)

    async def aclose(self) -> None:
        """Send close_notify if the link still works, then close the transport."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._broken:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()  # queues close_notify; wants the peer's next
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await self._flush()
        except (TransportError, TimeoutError):
            pass  # the peer is gone or stuck; closing is all that is left
        finally:
            await self._transport.aclose()
