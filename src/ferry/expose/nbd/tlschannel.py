"""TLS on an NBD client socket after NBD_OPT_STARTTLS, through ``ssl.SSLObject``.

The NBD server drives plain non-blocking sockets with ``sock_recv_into`` and
``sendmsg`` (see :mod:`ferry.expose.nbd.server`). STARTTLS upgrades such a
socket in the middle of option haggling, so TLS here is an ``SSLObject``
between two memory BIOs, as in :class:`ferry.transport.tls.TLSStream`:
ciphertext moves between the BIOs and the socket with the event loop's
socket calls, and plaintext moves between the ``SSLObject`` and the sans-IO
core's buffers. asyncio's own ``start_tls`` needs a transport, which the
server does not have, and would drop a refused client without sending it
the TLS alert that tells it why.

What changes under TLS: the data of READ replies can no longer leave with
``sendfile`` (the kernel would send plaintext), and every byte is copied
once more, into or out of the SSL object.

Ordering. Replies are sent under the connection's send lock; ciphertext is
written to the socket under this channel's own lock as well, because
receiving may also have ciphertext to send (TLS 1.3 key updates), and two
writers must not interleave their records.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from typing import cast

from ferry.expose.nbd.errors import NBDTLSError

RECEIVE_BYTES = 256 * 1024
"""Ciphertext read from the socket per ``recv``: several 16 KiB records, so a
1 MiB WRITE arrives in a few system calls."""

_COALESCE_BYTES = 64 * 1024
"""Small buffers (reply headers, small read replies) are joined up to this
size before encryption: each ``SSLObject.write`` makes at least one record,
and a 16-byte header in a record of its own costs 22 bytes of overhead and a
call into OpenSSL."""

_FLUSH_BYTES = 1024 * 1024
"""Ciphertext buffered before it is sent while encrypting a large reply:
bounds memory for a 32 MiB READ without a system call per record."""

CLOSE_GRACE_S = 1.0
"""How long close_notify may wait for room in the socket before we give up."""


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """A short reason such as ``certificate verify failed: unable to get local
    issuer certificate`` (a client certificate from another CA) for logs."""
    reason = str(exc.reason or exc.strerror or exc).lower().replace("_", " ")
    detail = getattr(exc, "verify_message", None)
    return f"{reason}: {detail}" if detail else reason


class TLSChannel:
    """Server-side TLS over a connected non-blocking socket.

    Create it after the NBD_REP_ACK to NBD_OPT_STARTTLS has gone out, call
    :meth:`handshake`, then use :meth:`recv_into` and :meth:`send` instead
    of the socket's. Errors: :class:`NBDTLSError` for anything TLS refuses
    (the alert, if any, has been sent), ``OSError`` when the socket fails.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        try:
            self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        except (ssl.SSLError, ValueError) as exc:
            raise NBDTLSError(f"cannot start TLS with this context: {exc}") from exc
        self._cipher_lock = asyncio.Lock()
        self._receive_buffer = bytearray(RECEIVE_BYTES)
        self._broken = False

    @property
    def version(self) -> str | None:
        """The negotiated protocol, such as ``TLSv1.3``."""
        return self._ssl.version()

    def peer_subject(self) -> str:
        """The common name of the client's certificate, or ``?``."""
        subject = (self._ssl.getpeercert() or {}).get("subject", ())
        for rdn in subject:
            for attribute in rdn:
                if isinstance(attribute, tuple) and attribute[0] == "commonName":
                    return str(attribute[1])
        return "?"

    async def handshake(self, initial: bytes = b"") -> None:
        """Run the server side of the TLS handshake.

        ``initial`` is ciphertext the client sent before we started (it may
        send its hello right behind NBD_OPT_STARTTLS). A refused handshake
        sends the client its alert, then raises :class:`NBDTLSError`.
        """
        if initial:
            self._incoming.write(initial)
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise NBDTLSError(
                        "client closed the connection during the TLS handshake"
                    ) from None
            except ssl.SSLError as exc:
                self._broken = True
                # Send the alert so the client learns why it was refused.
                with contextlib.suppress(OSError):
                    await self._flush()
                raise NBDTLSError(f"TLS handshake failed: {describe_ssl_error(exc)}") from exc
        await self._flush()  # our last flight, and TLS 1.3 session tickets

    async def recv_into(self, target: memoryview) -> int:
        """Decrypt received bytes into ``target``; 0 means the client is done.

        A connection cut without close_notify also reads as the end: NBD
        frames its own messages, and the core reports one cut in the middle.
        """
        if not target:
            raise ValueError("recv_into needs a non-empty buffer")
        at_eof = False
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                total = cast(int, self._ssl.read(len(target), target))
                break
            except ssl.SSLWantReadError:
                if at_eof:
                    return 0
                if self._outgoing.pending:
                    await self._flush()
                # At EOF the BIO is told so, and read() then reports how it ended.
                at_eof = not await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            except ssl.SSLError as exc:
                self._broken = True
                raise NBDTLSError(f"TLS receive failed: {describe_ssl_error(exc)}") from exc
        # One read() returns at most one record; take the others already here.
        while total < len(target) and (self._incoming.pending or self._ssl.pending()):
            try:
                count = cast(int, self._ssl.read(len(target) - total, target[total:]))
            except ssl.SSLError:
                break  # want-read, end or error: the next call sees it
            if not count:
                break
            total += count
        if self._outgoing.pending:
            await self._flush()
        return total

    async def send(self, buffers: Sequence[memoryview]) -> None:
        """Encrypt ``buffers`` back to back and send them; the caller holds the send lock."""
        if self._broken:
            raise NBDTLSError("TLS stream is broken")
        small = bytearray()
        for view in buffers:
            if len(view) < _COALESCE_BYTES:
                small += view
                if len(small) < _COALESCE_BYTES:
                    continue
                view, small = memoryview(small), bytearray()
            elif small:
                await self._encrypt(memoryview(small))
                small = bytearray()
            await self._encrypt(view)
        if small:
            await self._encrypt(memoryview(small))
        await self._flush()

    async def _encrypt(self, view: memoryview) -> None:
        while view:
            try:
                written = self._ssl.write(view)
            except ssl.SSLError as exc:
                self._broken = True
                raise NBDTLSError(f"TLS send failed: {describe_ssl_error(exc)}") from exc
            view = view[written:]
            if self._outgoing.pending >= _FLUSH_BYTES:
                await self._flush()

    async def close(self) -> None:
        """Send close_notify if the stream still works (best effort, bounded)."""
        if self._broken:
            return
        self._broken = True
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()  # queues close_notify, then wants the client's
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self._flush()

    async def _flush(self) -> None:
        """Send whatever ciphertext the SSL object has produced, in order."""
        async with self._cipher_lock:
            if self._outgoing.pending:
                await self._loop.sock_sendall(self._sock, self._outgoing.read())

    async def _fill(self) -> bool:
        """Feed the SSL object the next ciphertext; ``False`` (and EOF fed) at the end."""
        n = await self._loop.sock_recv_into(self._sock, self._receive_buffer)
        if not n:
            self._incoming.write_eof()
            return False
        self._incoming.write(memoryview(self._receive_buffer)[:n])
        return True
