"""Event channels: how the migrator talks to its peer without seeing a socket.

A :class:`Channel` sends and receives protocol events. :class:`StreamChannel`
is the few lines of I/O around the sans-IO codec that put events on any
:class:`~ferry.transport.base.Stream`; :func:`memory_channel_pair` connects two
migrators directly in memory for unit tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ferry.errors import BrokenResourceError, ClosedResourceError
from ferry.protocol.codec import Connection, ConnectionClosed
from ferry.protocol.messages import Event
from ferry.transport.base import Stream
from ferry.transport.sockets import ReceiveIntoStream
from ferry.transport.streams import PeerIdleError

log = logging.getLogger(__name__)

RECEIVE_CHUNK_BYTES = 1024 * 1024


class Channel(Protocol):
    """Ordered, reliable delivery of protocol events to one peer.

    ``receive()`` raises :class:`BrokenResourceError` when the peer is gone
    (clean EOF included: the protocol always ends with an explicit event).
    ``send`` may be called from several tasks; each event is sent whole.
    """

    @property
    def peer(self) -> str: ...

    async def send(self, event: Event) -> None: ...

    async def receive(self) -> Event: ...

    async def aclose(self) -> None: ...


class StreamChannel:
    """A Channel over a byte Stream, framed by the migration codec."""

    def __init__(
        self,
        stream: Stream,
        *,
        max_frame_bytes: int | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        """``idle_timeout_s``: ``receive()`` raises :class:`PeerIdleError` when
        the peer sends nothing for this long (None: wait forever)."""
        self._stream = stream
        self._idle_timeout_s = idle_timeout_s
        # Sockets read straight into the codec's buffer; other streams hand us
        # bytes that the codec then copies in.
        self._receive_into = stream.receive_into if isinstance(stream, ReceiveIntoStream) else None
        self._conn = (
            Connection() if max_frame_bytes is None else Connection(max_frame_bytes=max_frame_bytes)
        )
        self._send_lock = asyncio.Lock()
        self._closed = False

    @property
    def peer(self) -> str:
        return self._stream.peer

    async def send(self, event: Event) -> None:
        pieces = self._conn.send(event)
        async with self._send_lock:
            for piece in pieces:
                await self._stream.send_all(piece)

    async def receive(self) -> Event:
        while True:
            event = self._conn.next_event()
            if isinstance(event, ConnectionClosed):
                raise BrokenResourceError("peer closed the connection", peer=self.peer)
            if event is not None:
                return event
            if self._idle_timeout_s is None:
                await self._receive_more()
                continue
            try:
                async with asyncio.timeout(self._idle_timeout_s):
                    await self._receive_more()
            except TimeoutError:
                raise PeerIdleError(
                    f"peer sent nothing for {self._idle_timeout_s:g} s", peer=self.peer
                ) from None

    async def _receive_more(self) -> None:
        """Read once from the stream into the codec."""
        if self._receive_into is not None:
            nbytes = await self._receive_into(self._conn.get_buffer())
            self._check_not_mid_frame(nbytes)
            self._conn.buffer_updated(nbytes)
        else:
            data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
            self._check_not_mid_frame(len(data))
            self._conn.receive_data(data)

    def _check_not_mid_frame(self, nbytes: int) -> None:
        if not nbytes and self._conn.buffered_bytes:
            # The peer vanished mid-frame: a broken link, not a protocol violation.
            raise BrokenResourceError(
                f"connection closed in the middle of a frame "
                f"({self._conn.buffered_bytes} bytes buffered)",
                peer=self.peer,
            )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.aclose()


class _MemoryChannel:
    def __init__(
        self, name: str, inbox: asyncio.Queue[Event | None], outbox: asyncio.Queue[Event | None]
    ) -> None:
        self._name = name
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False

    @property
    def peer(self) -> str:
        return self._name

    async def send(self, event: Event) -> None:
        if self._closed:
            raise ClosedResourceError("channel closed", peer=self._name)
        await self._outbox.put(event)

    async def receive(self) -> Event:
        if self._closed:
            raise ClosedResourceError("channel closed", peer=self._name)
        event = await self._inbox.get()
        if event is None:
            self._inbox.put_nowait(None)
            raise BrokenResourceError("peer closed the channel", peer=self._name)
        return event

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)


def memory_channel_pair() -> tuple[Channel, Channel]:
    """Two connected in-memory channels (events are passed by reference)."""
    a_to_b: asyncio.Queue[Event | None] = asyncio.Queue()
    b_to_a: asyncio.Queue[Event | None] = asyncio.Queue()
    return _MemoryChannel("memory-b", b_to_a, a_to_b), _MemoryChannel("memory-a", a_to_b, b_to_a)
