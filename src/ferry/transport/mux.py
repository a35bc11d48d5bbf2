"""Several byte streams over one authenticated :class:`Stream`.

A live migration whose guest RAM travels in QEMU's own migration stream
needs two streams between the hosts: the migration channel (disks,
hand-off, reports) and QEMU's RAM stream. Both ride the one link the peer
authenticated on (mutual TLS or a token), so the RAM stream needs no second
handshake, no second listener and no second credential. :class:`Mux` splits
that link into ``count`` substreams, each a full :class:`Stream` (the
transport conformance suite runs over them).

Wire format, every frame::

    offset 0  1 byte   substream id (< count; both ends agree on count)
    offset 1  1 byte   kind: 0 DATA, 1 EOF (sender half-closed), 2 CLOSE (sender closed)
    offset 2  4 bytes  payload length, big-endian; 0 unless DATA, at most MAX_FRAME_BYTES
    offset 6  payload

:class:`FrameDecoder` is the sans-IO parser; :class:`Mux` drives it. Peer
input is validated before use (unknown id or kind, oversized or empty DATA
frames, data after EOF: :class:`~ferry.errors.RemoteProtocolError`, which
breaks every substream), and what a peer can make this side buffer is
bounded: each substream queues at most ``window_frames`` frames; beyond that
the reader stops reading the link (TCP backpressure), so a substream whose
consumer stops reading holds back the others. Each consumer must keep
reading, or close its substream (frames for a closed substream are dropped).

Senders interleave frame by frame (one lock around the link), so a small
control message waits behind at most one frame of a bulk stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ferry.aio import cancel_and_wait
from ferry.buffers import Buffer
from ferry.errors import (
    BrokenResourceError,
    ClosedResourceError,
    FerryError,
    RemoteProtocolError,
)
from ferry.transport.base import Stream
from ferry.transport.streams import DEFAULT_RECEIVE_BYTES

MAX_FRAME_BYTES = 256 * 1024
DEFAULT_WINDOW_FRAMES = 16
"""Frames one substream buffers (4 MiB at most) before the reader waits for its consumer."""

_HEADER = struct.Struct(">BBI")
HEADER_BYTES = _HEADER.size
MAX_SUBSTREAMS = 8


class Kind(enum.IntEnum):
    DATA = 0
    EOF = 1
    CLOSE = 2


@dataclass(frozen=True, slots=True)
class Frame:
    sub: int
    kind: Kind
    payload: bytes = b""


def encode_header(sub: int, kind: Kind, length: int = 0) -> bytes:
    if not 0 <= length <= MAX_FRAME_BYTES:
        raise ValueError(f"frame payload of {length} bytes")
    return _HEADER.pack(sub, kind, length)


class FrameDecoder:
    """Bytes in, validated frames out; no I/O."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._buffer = bytearray()
        self._ended = [False] * count

    def feed(self, data: bytes) -> list[Frame]:
        """The complete frames ``data`` finishes; raises RemoteProtocolError on bad input."""
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER_BYTES:
            sub, kind, length = _HEADER.unpack_from(self._buffer)
            if sub >= self._count:
                raise RemoteProtocolError(f"mux frame for substream {sub} of {self._count}")
            try:
                k = Kind(kind)
            except ValueError:
                raise RemoteProtocolError(f"mux frame of unknown kind {kind}") from None
            if length > MAX_FRAME_BYTES:
                raise RemoteProtocolError(f"mux frame of {length} bytes "
                                          f"(at most {MAX_FRAME_BYTES})")
            if k is Kind.DATA and length == 0:
                raise RemoteProtocolError("empty mux DATA frame")
            if k is not Kind.DATA and length:
                raise RemoteProtocolError(f"mux {k.name} frame with a payload")
            if len(self._buffer) < HEADER_BYTES + length:
                break
            if self._ended[sub]:
                raise RemoteProtocolError(f"mux frame on substream {sub} after its end")
            payload = bytes(self._buffer[HEADER_BYTES:HEADER_BYTES + length])
            del self._buffer[:HEADER_BYTES + length]
            if k is not Kind.DATA:
                self._ended[sub] = True
            frames.append(Frame(sub, k, payload))
        return frames


class Substream:
    """One logical stream of a :class:`Mux` (see :mod:`ferry.transport.base`)."""

    def __init__(self, mux: Mux, sub: int, window_frames: int) -> None:
        self._mux = mux
        self._sub = sub
        self._window = window_frames
        self._frames: collections.deque[bytes] = collections.deque()
        self._pending = b""
        self._ended = False  # the peer sent EOF or CLOSE (or the link ended cleanly)
        self._eof_sent = False
        self._closed = False
        self._peer_closed = False
        self._wake = asyncio.Event()

    @property
    def peer(self) -> str:
        return f"{self._mux.peer}#{self._sub}"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("substream already closed", peer=self.peer)

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def send_all(self, data: Buffer) -> None:
        self._check_open()
        if self._eof_sent:
            raise ClosedResourceError("send_all after send_eof", peer=self.peer)
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), MAX_FRAME_BYTES):
            if self._peer_closed:
                raise BrokenResourceError("peer closed the substream", peer=self.peer)
            await self._mux._send(self, self._sub, Kind.DATA, view[offset:offset + MAX_FRAME_BYTES])
            self._check_open()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        while True:
            self._check_open()
            if not self._pending and self._frames:
                self._pending = self._frames.popleft()
                self._notify()  # room for the reader
            if self._pending:
                out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
                return out
            if self._ended:
                return b""
            self._mux._raise_if_broken(self)
            await self._wake.wait()

    async def send_eof(self) -> None:
        self._check_open()
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(BrokenResourceError):
                await self._mux._send(self, self._sub, Kind.EOF, b"")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._frames.clear()
        self._pending = b""
        self._notify()
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(FerryError):
                await self._mux._send(None, self._sub, Kind.CLOSE, b"")

    # -- called by the Mux's reader ----------------------------------------------------

    async def _deliver(self, frame: Frame) -> None:
        if frame.kind is Kind.DATA:
            while len(self._frames) >= self._window and not self._closed:
                await self._wake.wait()
            if not self._closed:
                self._frames.append(frame.payload)
        else:
            self._ended = True
            self._peer_closed = self._peer_closed or frame.kind is Kind.CLOSE
        self._notify()


class Mux:
    """``count`` substreams over ``stream``, which the Mux owns from here on.

    Use as an async context (or call :meth:`start` / :meth:`aclose`); both ends
    must use the same ``count``.
    """

    def __init__(self, stream: Stream, count: int = 2, *,
                 window_frames: int | Sequence[int] = DEFAULT_WINDOW_FRAMES) -> None:
        """``window_frames``: frames each substream buffers (one number for all, or one
        per substream)."""
        if not 1 <= count <= MAX_SUBSTREAMS:
            raise ValueError(f"count must be 1..{MAX_SUBSTREAMS}, not {count}")
        windows = [window_frames] * count if isinstance(window_frames, int) \
            else list(window_frames)
        if len(windows) != count or min(windows) < 1:
            raise ValueError(f"window_frames must be {count} numbers >= 1, not {window_frames}")
        self._stream = stream
        self._subs = [Substream(self, i, w) for i, w in enumerate(windows)]
        self._send_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._error: FerryError | None = None
        self._closed = False

    @property
    def peer(self) -> str:
        return self._stream.peer

    def sub(self, index: int) -> Substream:
        return self._subs[index]

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"mux {self.peer}")

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading and close the link (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            await cancel_and_wait(self._reader, swallow_errors=True)
        if self._error is None:
            self._error = BrokenResourceError("the link was closed", peer=self.peer)
        self._notify()
        await self._stream.aclose()

    # -- internals ---------------------------------------------------------------------

    async def _send(self, owner: Substream | None, sub: int, kind: Kind, payload: Buffer) -> None:
        if self._error is not None:
            raise BrokenResourceError(f"link failed: {self._error}",
                                      peer=owner.peer if owner else self.peer)
        header = encode_header(sub, kind, len(memoryview(payload)))
        async with self._send_lock:
            try:
                if len(memoryview(payload)) <= 4096:
                    await self._stream.send_all(header + bytes(payload))
                else:
                    await self._stream.send_all(header)
                    await self._stream.send_all(payload)
            except (BrokenResourceError, ClosedResourceError) as exc:
                self._fail(BrokenResourceError(str(exc), peer=self.peer))
                raise BrokenResourceError(f"link failed: {exc}",
                                          peer=owner.peer if owner else self.peer) from exc

    async def _read(self) -> None:
        decoder = FrameDecoder(len(self._subs))
        try:
            while True:
                data = await self._stream.receive_some()
                if not data:  # the link ended cleanly: every substream ends
                    for sub in self._subs:
                        if not sub._ended:
                            await sub._deliver(Frame(sub._sub, Kind.EOF))
                    return
                for frame in decoder.feed(data):
                    await self._subs[frame.sub]._deliver(frame)
        except (BrokenResourceError, ClosedResourceError, RemoteProtocolError) as exc:
            self._fail(exc)

    def _fail(self, exc: FerryError) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def _notify(self) -> None:
        for sub in self._subs:
            sub._notify()

    def _raise_if_broken(self, sub: Substream) -> None:
        if self._error is not None:
            raise BrokenResourceError(f"link failed: {self._error}", peer=sub.peer)


__all__ = ["MAX_FRAME_BYTES", "Frame", "FrameDecoder", "Kind", "Mux", "Substream"]
