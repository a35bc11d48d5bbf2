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
    offset 1  1 byte   kind: 0 DATA, 1 EOF (sender half-closed), 2 CLOSE (sender closed),
                       3 CREDIT (the receiver read that many more bytes)
    offset 2  4 bytes  payload length, big-endian: 1..MAX_FRAME_BYTES for DATA, 4 for
                       CREDIT, 0 otherwise
    offset 6  payload  (CREDIT: a u32 big-endian byte count, at least 1)

Flow control is per substream and credit-based, as in HTTP/2: a sender may
have at most the substream's *window* (``window_frames`` frames of
:data:`MAX_FRAME_BYTES`; both ends pass the same windows) sent and not yet
read by the consumer at the other end, and the receiver grants credit back
as its consumer reads. A receiver may grow its window for a long link
(:meth:`Mux.fit_windows`) by granting the growth as credit, up to
:data:`MAX_WINDOW_BYTES`. So what a peer can make this side buffer is bounded
by the windows, the reader never stops reading the link for a slow
consumer (a stalled substream holds back only its own sender), and a bulk
substream never has more than its window queued in the kernel's socket
buffers ahead of another substream's next message: with QEMU's RAM stream
in one substream, the migration channel's hand-off messages wait behind at
most the RAM window, not behind megabytes of TCP buffers.

:class:`FrameDecoder` is the sans-IO parser; :class:`Mux` drives it. Peer
input is validated before use (unknown id or kind, oversized or empty DATA
frames, data after EOF, data beyond the window, credit beyond it:
:class:`~ferry.errors.RemoteProtocolError`, which breaks every substream).
Frames for a substream closed here are dropped.

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
MAX_WINDOW_BYTES = 32 * 1024 * 1024
"""The largest window a receiver may grow a substream to (:meth:`Mux.fit_windows`), and
so the most a peer can make one substream buffer here: 2.5 bandwidth-delay products of
1 Gbit/s at 100 ms (31 MB) fit. A sender refuses credit beyond it."""
WINDOW_BDPS = 2.5
"""A fitted window in bandwidth-delay products: credit goes back once the consumer read
half a window and takes half an RTT to arrive, so a window of W carries W/2 per RTT at
best; 2 BDPs fill the link, the rest is headroom for a varying RTT."""


def window_bytes(rtt_s: float, mbit: float) -> int:
    """A substream window that lets one substream fill ``mbit`` at ``rtt_s``, at most
    :data:`MAX_WINDOW_BYTES`."""
    want = mbit * 1e6 / 8 * max(rtt_s, 0.0) * WINDOW_BDPS
    return MAX_WINDOW_BYTES if not want < MAX_WINDOW_BYTES else int(want)

_HEADER = struct.Struct(">BBI")
_CREDIT = struct.Struct(">I")
HEADER_BYTES = _HEADER.size
MAX_SUBSTREAMS = 8


class Kind(enum.IntEnum):
    DATA = 0
    EOF = 1
    CLOSE = 2
    CREDIT = 3


@dataclass(frozen=True, slots=True)
class Frame:
    sub: int
    kind: Kind
    payload: bytes = b""


def encode_header(sub: int, kind: Kind, length: int = 0) -> bytes:
    if not 0 <= length <= MAX_FRAME_BYTES:
        raise ValueError(f"frame payload of {length} bytes")
    return _HEADER.pack(sub, kind, length)


def encode_credit(sub: int, nbytes: int) -> bytes:
    """A whole CREDIT frame granting ``nbytes`` more on substream ``sub``."""
    return encode_header(sub, Kind.CREDIT, _CREDIT.size) + _CREDIT.pack(nbytes)


def credit_of(frame: Frame) -> int:
    """The byte count a (decoded, hence checked) CREDIT frame grants."""
    return int(_CREDIT.unpack(frame.payload)[0])


class FrameDecoder:
    """Bytes in, validated frames out; no I/O."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._buffer = bytearray()
        self._ended = [False] * count  # the peer's direction ended (EOF or CLOSE)
        self._closed = [False] * count  # the peer closed the substream (CLOSE)

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
            if k is Kind.CREDIT and length != _CREDIT.size:
                raise RemoteProtocolError(f"mux CREDIT frame of {length} bytes")
            if k in (Kind.EOF, Kind.CLOSE) and length:
                raise RemoteProtocolError(f"mux {k.name} frame with a payload")
            if len(self._buffer) < HEADER_BYTES + length:
                break
            # Credit is for this side's direction, which the peer's EOF does not end.
            if self._closed[sub] if k is Kind.CREDIT else self._ended[sub]:
                raise RemoteProtocolError(f"mux frame on substream {sub} after its end")
            payload = bytes(self._buffer[HEADER_BYTES:HEADER_BYTES + length])
            del self._buffer[:HEADER_BYTES + length]
            frame = Frame(sub, k, payload)
            if k is Kind.CREDIT and credit_of(frame) == 0:
                raise RemoteProtocolError("mux CREDIT frame of 0 bytes")
            if k in (Kind.EOF, Kind.CLOSE):
                self._ended[sub] = True
                self._closed[sub] = k is Kind.CLOSE
            frames.append(frame)
        return frames


class Substream:
    """One logical stream of a :class:`Mux` (see :mod:`ferry.transport.base`)."""

    def __init__(self, mux: Mux, sub: int, window_frames: int) -> None:
        self._mux = mux
        self._sub = sub
        self._window = window_frames * MAX_FRAME_BYTES
        self._frames: collections.deque[bytes] = collections.deque()
        self._pending = b""
        self._room = self._window  # bytes the peer may still send before our next credit
        self._read = 0  # bytes the consumer took since the last credit
        self._credit = self._window  # bytes this side may still send
        self._extra_grant = 0  # window growth not yet granted to the peer
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
        offset = 0
        while offset < len(view):
            if self._peer_closed:
                raise BrokenResourceError("peer closed the substream", peer=self.peer)
            if self._credit == 0:  # the peer's consumer has a window's worth unread
                self._mux._raise_if_broken(self)
                await self._wake.wait()
                self._check_open()
                continue
            n = min(MAX_FRAME_BYTES, self._credit, len(view) - offset)
            self._credit -= n
            await self._mux._send(self, self._sub, Kind.DATA, view[offset:offset + n])
            offset += n
            self._check_open()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        while True:
            self._check_open()
            if not self._pending and self._frames:
                self._pending = self._frames.popleft()
                self._read += len(self._pending)
                if self._read >= self._window // 2:
                    self._mux._credit_due.set()
            if self._pending:
                out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
                return out
            if self._ended:
                return b""
            self._mux._raise_if_broken(self)
            await self._wake.wait()

    def grow_window(self, window_bytes: int) -> int:
        """Let the peer have up to ``window_bytes`` (at most :data:`MAX_WINDOW_BYTES`)
        unread here; a window never shrinks. Returns the window now. The growth goes to
        the peer as credit, so the two ends need not agree on it beforehand."""
        new = min(max(window_bytes, self._window), MAX_WINDOW_BYTES)
        grown = new - self._window
        if grown > 0:
            self._window = new
            self._room += grown
            self._extra_grant += grown
            self._mux._credit_due.set()
        return self._window

    def _take_grant(self) -> int:
        """Bytes to credit the peer now (what the consumer took, window growth), or 0."""
        granted, self._extra_grant = self._extra_grant, 0
        if self._read >= self._window // 2:
            granted += self._read
            self._room += self._read
            self._read = 0
        return granted

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

    def _deliver(self, frame: Frame) -> None:
        if frame.kind is Kind.DATA:
            if not self._closed:  # frames for a substream closed here are dropped
                if len(frame.payload) > self._room:
                    raise RemoteProtocolError(
                        f"mux substream {self._sub}: the peer sent beyond its window "
                        f"({len(frame.payload)} bytes, {self._room} allowed)")
                self._room -= len(frame.payload)
                self._frames.append(frame.payload)
        elif frame.kind is Kind.CREDIT:
            self._credit += credit_of(frame)
            if self._credit > MAX_WINDOW_BYTES:  # the peer may have grown its window
                raise RemoteProtocolError(f"mux substream {self._sub}: the peer granted "
                                          f"more credit than the largest window")
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
        """``window_frames``: each substream's window in frames of :data:`MAX_FRAME_BYTES`
        (one number for all, or one per substream); both ends must pass the same."""
        if not 1 <= count <= MAX_SUBSTREAMS:
            raise ValueError(f"count must be 1..{MAX_SUBSTREAMS}, not {count}")
        windows = [window_frames] * count if isinstance(window_frames, int) \
            else list(window_frames)
        if len(windows) != count or min(windows) < 1:
            raise ValueError(f"window_frames must be {count} numbers >= 1, not {window_frames}")
        self._stream = stream
        self._subs = [Substream(self, i, w) for i, w in enumerate(windows)]
        self._send_lock = asyncio.Lock()
        self._credit_due = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._granter: asyncio.Task[None] | None = None
        self._error: FerryError | None = None
        self._closed = False

    @property
    def peer(self) -> str:
        return self._stream.peer

    def sub(self, index: int) -> Substream:
        return self._subs[index]

    def fit_windows(self, rtt_s: float, mbit: float) -> list[int]:
        """Grow each substream's receive window to fill a link of ``rtt_s`` and ``mbit``
        (:func:`window_bytes`; never below the window it has). Either end may call it,
        for its own receiving side. Returns the windows."""
        want = window_bytes(rtt_s, mbit)
        return [sub.grow_window(want) for sub in self._subs]

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"mux {self.peer}")
            self._granter = asyncio.create_task(self._grant(), name=f"mux credit {self.peer}")

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
        for task in (self._reader, self._granter):
            if task is not None:
                await cancel_and_wait(task, swallow_errors=True)
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
                            sub._deliver(Frame(sub._sub, Kind.EOF))
                    return
                for frame in decoder.feed(data):
                    self._subs[frame.sub]._deliver(frame)
        except (BrokenResourceError, ClosedResourceError, RemoteProtocolError) as exc:
            self._fail(exc)

    async def _grant(self) -> None:
        """Send the credit the consumers earned (one task, so a consumer never waits to
        send, and a credit is never half-given when a consumer is cancelled)."""
        while True:
            await self._credit_due.wait()
            self._credit_due.clear()
            for sub in self._subs:
                if granted := sub._take_grant():
                    try:
                        await self._send(None, sub._sub, Kind.CREDIT,
                                         _CREDIT.pack(granted))
                    except BrokenResourceError:
                        return  # every substream learns of it from _error

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


__all__ = ["MAX_FRAME_BYTES", "MAX_WINDOW_BYTES", "Frame", "FrameDecoder", "Kind", "Mux",
           "Substream", "credit_of", "encode_credit", "window_bytes"]
