"""An in-memory, connected pair of Streams, for testing code that uses a Stream.

Each direction is a bounded byte buffer, so a sender that outruns its
receiver waits in ``send_all`` exactly as it would on a socket (backpressure
is real, and so are deadlocks caused by ignoring it). EOF and close follow
the socket semantics the conformance suite checks for every transport:

* ``send_eof()`` on one end: the other end reads what was sent, then ``b""``.
* ``aclose()`` on one end: that end's calls raise ClosedResourceError; the
  other end still reads what was already sent, then ``b""``, and its
  ``send_all`` raises BrokenResourceError (nobody will ever read it).
"""

from __future__ import annotations

import asyncio

from ferry.buffers import Buffer
from ferry.errors import BrokenResourceError, ClosedResourceError
from ferry.transport.streams import DEFAULT_RECEIVE_BYTES

DEFAULT_CAPACITY_BYTES = 64 * 1024
"""Bytes one direction buffers before ``send_all`` waits: about a socket
buffer, small enough that tests exercise backpressure."""


class _Direction:
    """One direction of the pair: a bounded buffer plus its end-of-life flags."""

    def __init__(self, capacity_bytes: int) -> None:
        self.buffer = bytearray()
        self.capacity_bytes = capacity_bytes
        self.eof = False  # the sender sent EOF or closed
        self.receiver_closed = False
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Wake every task waiting for this direction to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self) -> None:
        await self._changed.wait()


class MemoryStream:
    """One end of :func:`memory_stream_pair`."""

    def __init__(self, outgoing: _Direction, incoming: _Direction, peer: str) -> None:
        self._out = outgoing
        self._in = incoming
        self._peer = peer
        self._closed = False
        self._eof_sent = False

    def __repr__(self) -> str:
        return f"<MemoryStream peer={self._peer!r} closed={self._closed}>"

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def can_send_eof(self) -> bool:
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream already closed", peer=self._peer)

    async def send_all(self, data: Buffer) -> None:
        self._check_open()
        if self._eof_sent:
            raise ClosedResourceError("send_all after send_eof", peer=self._peer)
        view = memoryview(data).cast("B")
        while True:
            if self._out.receiver_closed:
                raise BrokenResourceError("peer closed the stream", peer=self._peer)
            if not view:
                return
            space = self._out.capacity_bytes - len(self._out.buffer)
            if space > 0:
                self._out.buffer += view[:space]
                view = view[space:]
                self._out.notify()
                continue
            await self._out.wait()
            self._check_open()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        while True:
            self._check_open()
            buffer = self._in.buffer
            if buffer:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
                self._in.notify()
                return data
            if self._in.eof:
                return b""
            await self._in.wait()

    async def send_eof(self) -> None:
        self._check_open()
        self._eof_sent = True
        self._out.eof = True
        self._out.notify()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.eof = True
        self._out.notify()
        self._in.receiver_closed = True
        self._in.buffer.clear()
        self._in.notify()


def memory_stream_pair(
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES, names: tuple[str, str] = ("a", "b")
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory Streams; ``names`` label the ends in errors and logs."""
    if capacity_bytes < 1:
        raise ValueError(f"capacity_bytes must be >= 1, not {capacity_bytes}")
    a_to_b = _Direction(capacity_bytes)
    b_to_a = _Direction(capacity_bytes)
    a = MemoryStream(a_to_b, b_to_a, peer=f"memory:{names[1]}")
    b = MemoryStream(b_to_a, a_to_b, peer=f"memory:{names[0]}")
    return a, b
