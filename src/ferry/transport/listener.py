"""A bound, listening server socket that hands out Streams.

:func:`ferry.transport.tcp.listen_tcp` and friends return a :class:`Listener`
only after the socket is bound and listening (trio style: readiness is the
return), so ``listener.address`` is the real address, port 0 resolved.

Two ways to use it:

* ``await listener.accept()`` returns the next connection: what a CLI that
  waits for exactly one peer wants.
* A *handler* given at creation runs once per connection, each in its own
  task owned by the listener; the handler's stream is always closed after it
  returns, and an exception from it is logged with the peer, not lost.

Closing the listener (``aclose`` or leaving ``async with``) stops accepting,
cancels running handlers and waits for them, closes connections nobody
accepted, and wakes pending ``accept()`` calls with ClosedResourceError.
A connection whose setup fails (a refused TLS client certificate) is logged
at WARNING and dropped; the listener keeps serving. At most
:data:`MAX_CONNECTION_SETUPS` setups (TLS handshakes, each under its own
deadline) run at once; a connection arriving beyond that is dropped at once,
so a flood of silent clients costs a bounded number of tasks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from ferry.errors import ClosedResourceError, ConfigError, TransportError
from ferry.transport.base import Stream

logger = logging.getLogger(__name__)

AddressT = TypeVar("AddressT")

Handler = Callable[[Stream], Awaitable[None]]
"""A per-connection coroutine function; the stream is closed when it returns."""

StreamFactory = Callable[[socket.socket], Awaitable[Stream]]
"""Turns an accepted socket into a Stream (e.g. runs the TLS handshake); on
failure it closes whatever it wrapped the socket in."""


class Server(Protocol):
    """The accept loop a Listener owns (:class:`ferry.transport.sockets.SocketServer`)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

ACCEPT_BACKLOG = 16
"""Connections accepted but not yet taken by ``accept()``. When full, the oldest is
dropped for the newest, so a flood cannot grow memory without bound and cannot
lock out the peer that connects after it."""


MAX_CONNECTION_SETUPS = 64
"""Connections in setup (a TLS handshake) at once."""


class Listener(Generic[AddressT]):
    """A listening socket; see the module docstring for the contract."""

    def __init__(
        self,
        server: Server,
        address: AddressT,
        make_stream: StreamFactory,
        handler: Handler | None,
        on_close: Callable[[], None] | None = None,
        *,
        label: str | None = None,
    ) -> None:
        self._server = server
        self._address = address
        self._label = label or str(address)
        self._make_stream = make_stream
        self._handler = handler
        self._on_close = on_close
        self._pending: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._setups = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<Listener {self._label} closed={self._closed}>"

    @property
    def address(self) -> AddressT:
        """The address actually bound (host, port) or socket path."""
        return self._address

    async def __aenter__(self) -> Listener[AddressT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def accept(self) -> Stream:
        """Wait for and return the next connection."""
        if self._handler is not None:
            raise ConfigError("this listener passes connections to a handler; accept() is off")
        if self._closed:
            raise ClosedResourceError(f"listener {self._label} is closed")
        stream = await self._pending.get()
        if stream is None:
            self._pending.put_nowait(None)  # wake the next waiter too
            raise ClosedResourceError(f"listener {self._label} is closed")
        return stream

    async def on_connection(self, sock: socket.socket) -> None:
        """The server's per-connection callback; runs in a task the server created."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_connection(sock)
        finally:
            self._tasks.discard(task)

    async def _serve_connection(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            return
        if self._setups >= MAX_CONNECTION_SETUPS:
            sock.close()
            logger.warning("%s: too many connections in setup, dropped one", self._label)
            return
        self._setups += 1
        try:
            stream = await self._make_stream(sock)
        except TransportError as exc:
            sock.close()  # a no-op if the factory already closed it
            logger.warning("%s: dropped a connection: %s", self._label, exc)
            return
        except BaseException:
            sock.close()
            raise
        finally:
            self._setups -= 1
        if self._handler is None:
            # Full: drop the oldest unaccepted connection, not the newest. A flood that
            # has stopped then cannot lock out the peer that comes after it (the newest
            # is the likeliest to still be there), and the queue stays bounded.
            oldest = self._pending.get_nowait() if self._pending.qsize() >= ACCEPT_BACKLOG else None
            self._pending.put_nowait(stream)
            if oldest is not None:
                logger.warning("%s: backlog full, dropped the oldest unaccepted connection (%s)",
                               self._label, oldest.peer)
                await oldest.aclose()
            return
        try:
            await self._handler(stream)
        except Exception:
            logger.exception("%s: handler for %s failed", self._label, stream.peer)
        finally:
            await stream.aclose()

    async def aclose(self) -> None:
        """Stop listening, cancel handlers, close unaccepted connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.close()
        try:
            tasks = [t for t in self._tasks if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            while not self._pending.empty():
                stream = self._pending.get_nowait()
                if stream is not None:
                    await stream.aclose()
            self._pending.put_nowait(None)
            await self._server.wait_closed()
        finally:
            if self._on_close is not None:
                self._on_close()
