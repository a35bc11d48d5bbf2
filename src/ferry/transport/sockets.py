"""A :class:`~ferry.transport.base.Stream` straight on a non-blocking socket.

TCP and UNIX connections use :class:`SocketStream` instead of asyncio's
``StreamReader``/``StreamWriter``, because the reader copies every byte twice
in user space (into its own buffer, then out of it) and the writer copies
the unsent tail of every write into its buffer. Here:

* ``receive_into(buffer)`` is one ``recv_into`` from the kernel into the
  caller's buffer (the migration codec hands its frame buffer), and
  ``receive_some`` one ``recv``;
* ``send_all`` is ``send`` of memoryview slices of the caller's data, no
  user-space copy;
* the socket is only read when a receive asks for data, so a slow consumer
  leaves bytes in the kernel and TCP's own window slows the sender: flow
  control without any buffer of ours.

Each call first tries the socket; only if it would block does it wait for
readiness (``loop.add_reader``/``add_writer``, removed again afterwards).
A stream that keeps finding data ready never has to suspend, so it yields to
the event loop after every :data:`FAIRNESS_BYTES` moved without suspending,
as asyncio's streams do when their buffers run dry.

:class:`SocketServer` is the matching accept loop behind
:class:`~ferry.transport.listener.Listener`. Errors follow the Stream
contract: OS failures become BrokenResourceError naming the peer, use after
``aclose`` ClosedResourceError; ``aclose`` wakes pending calls.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from ferry.buffers import Buffer
from ferry.errors import BrokenResourceError, ClosedResourceError
from ferry.transport.base import Stream
from ferry.transport.streams import DEFAULT_RECEIVE_BYTES, describe, set_socket_nodelay

logger = logging.getLogger(__name__)

FAIRNESS_BYTES = 8 * 1024 * 1024
"""Bytes a stream moves without suspending before it yields once to the
event loop, so one busy connection cannot starve the other tasks (asyncio's
StreamReader yields at least every 2 x its 4 MiB limit, about the same)."""

ACCEPT_RETRY_S = 0.1
"""Pause after a failed accept (out of descriptors or memory) before trying
again, like asyncio's servers: the condition is usually transient and
retrying at once would spin."""

_TRANSIENT_ACCEPT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPERM}
)


@runtime_checkable
class ReceiveIntoStream(Stream, Protocol):
    """A Stream that can also receive straight into a caller's buffer.

    ``receive_into(buffer)`` writes 1..len(buffer) bytes into ``buffer`` and
    returns the count, or 0 once the peer closed its sending side; failures
    and closing behave as for ``receive_some``. Code that wants to skip a
    copy checks ``isinstance(stream, ReceiveIntoStream)`` and falls back to
    ``receive_some`` otherwise (TLS, pipes, memory streams).
    """

    async def receive_into(self, buffer: memoryview) -> int: ...


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SocketStream:
    """A Stream over a connected stream socket, which it owns and closes.

    Besides the Stream contract it offers :meth:`receive_into`, the
    zero-copy receive the migration channel uses when a stream has it.
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        set_socket_nodelay(sock)
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._eof_sent = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._unyielded_bytes = 0

    def __repr__(self) -> str:
        return f"<SocketStream peer={self._peer!r} closed={self._closed}>"

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def socket(self) -> socket.socket:
        """The underlying socket, for inspecting options; do not read or write it."""
        return self._sock

    @property
    def can_send_eof(self) -> bool:
        """Sockets can always close only their sending side."""
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream already closed", peer=self._peer)

    def _broken(self, action: str, exc: OSError) -> BrokenResourceError | ClosedResourceError:
        """The error to raise for an OS failure: Closed if we closed the socket
        meanwhile (EBADF), else Broken naming the peer."""
        if self._closed:
            return ClosedResourceError("stream already closed", peer=self._peer)
        return BrokenResourceError(f"{action} failed: {describe(exc)}", peer=self._peer)

    async def _wait(self, *, readable: bool) -> None:
        """Wait until the socket is readable (or writable); aclose() wakes it."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        if readable:
            if self._read_waiter is not None:
                raise RuntimeError(f"{self!r}: another task is already receiving")
            self._loop.add_reader(self._fd, _wake, waiter)
            self._read_waiter = waiter
        else:
            if self._write_waiter is not None:
                raise RuntimeError(f"{self!r}: another task is already sending")
            self._loop.add_writer(self._fd, _wake, waiter)
            self._write_waiter = waiter
        try:
            await waiter
        finally:
            # After aclose() the descriptor number may already belong to a
            # new socket: aclose() unregistered ours, so leave it alone.
            if readable:
                self._read_waiter = None
                if not self._closed:
                    self._loop.remove_reader(self._fd)
            else:
                self._write_waiter = None
                if not self._closed:
                    self._loop.remove_writer(self._fd)
        self._unyielded_bytes = 0
        self._check_open()

    async def _be_fair(self) -> None:
        """Yield to the loop once enough bytes went by without suspending.

        Called *before* the socket is touched, so a cancellation here
        loses no data."""
        if self._unyielded_bytes >= FAIRNESS_BYTES:
            self._unyielded_bytes = 0
            await asyncio.sleep(0)
            self._check_open()

    async def receive_into(self, buffer: memoryview) -> int:
        """Receive 1..len(buffer) bytes into ``buffer``; 0 once the peer closed
        its sending side. The bytes go from the kernel straight into ``buffer``."""
        if not len(buffer):
            raise ValueError("receive_into needs a non-empty buffer")
        self._check_open()
        await self._be_fair()
        while True:
            try:
                n = self._sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)
                continue
            except OSError as exc:
                raise self._broken("receive", exc) from exc
            self._unyielded_bytes += n
            return n

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """Return 1..max_bytes bytes, or b"" once the peer closed its sending side."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        self._check_open()
        await self._be_fair()
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)
                continue
            except OSError as exc:
                raise self._broken("receive", exc) from exc
            self._unyielded_bytes += len(data)
            return data

    async def send_all(self, data: Buffer) -> None:
        """Send every byte of ``data``; the kernel copies it straight from ``data``."""
        self._check_open()
        if self._eof_sent:
            raise ClosedResourceError("send_all after send_eof", peer=self._peer)
        with memoryview(data) as whole, whole.cast("B") as view:
            await self._be_fair()
            pos, end = 0, len(view)
            while pos < end:
                try:
                    pos += self._sock.send(view[pos:])
                except (BlockingIOError, InterruptedError):
                    await self._wait(readable=False)
                except OSError as exc:
                    raise self._broken("send", exc) from exc
            self._unyielded_bytes += end

    async def send_eof(self) -> None:
        """Close our sending side; the peer's receive then returns EOF."""
        self._check_open()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken("send_eof", exc) from exc

    async def aclose(self) -> None:
        """Close the socket; idempotent. Pending receives and sends wake with
        ClosedResourceError. Nothing is queued in user space, so nothing is lost."""
        if self._closed:
            return
        self._closed = True
        for waiter, remove in (
            (self._read_waiter, self._loop.remove_reader),
            (self._write_waiter, self._loop.remove_writer),
        ):
            if waiter is not None:
                remove(self._fd)
                _wake(waiter)
        self._sock.close()


ConnectionCallback = Callable[[socket.socket], Awaitable[None]]


class SocketServer:
    """Accepts connections on listening sockets and runs ``on_connection(sock)``
    for each in a task of its own (the :class:`Listener` tracks and cancels those).

    ``close()`` stops accepting at once and closes the listening sockets;
    ``wait_closed()`` waits for the accept loops to finish.
    """

    def __init__(self, sockets: Sequence[socket.socket], on_connection: ConnectionCallback) -> None:
        self._sockets = list(sockets)
        self._on_connection = on_connection
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._connection_tasks: set[asyncio.Task[None]] = set()
        for sock in self._sockets:
            sock.setblocking(False)
            self._accept_tasks.append(self._loop.create_task(self._accept_loop(sock)))

    async def _accept_loop(self, listening: socket.socket) -> None:
        fd = listening.fileno()
        while not self._closed:
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_reader(fd, _wake, waiter)
                self._waiters[fd] = waiter
                try:
                    await waiter
                finally:
                    del self._waiters[fd]
                    if not self._closed:
                        self._loop.remove_reader(fd)
                continue
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                    logger.error("accept failed, no longer accepting: %s", describe(exc))
                    return
                logger.warning("accept failed: %s; retrying", describe(exc))
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if self._closed:
                conn.close()
                return
            task = self._loop.create_task(self._run_connection(conn))
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

    async def _run_connection(self, conn: socket.socket) -> None:
        try:
            await self._on_connection(conn)
        except Exception:
            # on_connection closes the socket on failure; the error must not vanish.
            logger.exception("setting up an accepted connection failed")

    def close(self) -> None:
        """Stop accepting now and close the listening sockets; idempotent."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            fd = sock.fileno()
            if fd in self._waiters:
                self._loop.remove_reader(fd)
                _wake(self._waiters[fd])
            sock.close()

    async def wait_closed(self) -> None:
        """Wait until every accept loop has ended (call ``close()`` first)."""
        if self._accept_tasks:
            await asyncio.gather(*self._accept_tasks, return_exceptions=True)


async def connect_socket(
    family: socket.AddressFamily,
    address: str | tuple[object, ...],
    proto: int = 0,
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A connected non-blocking stream socket to ``address``; closed again on failure.

    ``prepare`` sets options that must precede the connect (buffer sizes).
    """
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        if prepare is not None:
            prepare(sock)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


LISTEN_BACKLOG = 128
"""Kernel queue of connections not yet accepted (asyncio's default is 100)."""
