"""The mux's frame parser against hostile input, and what a broken link does to substreams."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ferry.errors import BrokenResourceError, RemoteProtocolError
from ferry.transport.memory import memory_stream_pair
from ferry.transport.mux import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    Kind,
    Mux,
    encode_header,
)


def test_decoder_reassembles_frames_split_anywhere() -> None:
    wire = (encode_header(1, Kind.DATA, 3) + b"abc" + encode_header(0, Kind.DATA, 2) + b"xy"
            + encode_header(1, Kind.EOF))
    for cut in range(len(wire) + 1):
        d = FrameDecoder(2)
        frames = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert [(f.sub, f.kind, f.payload) for f in frames] == [
            (1, Kind.DATA, b"abc"), (0, Kind.DATA, b"xy"), (1, Kind.EOF, b"")]


@pytest.mark.parametrize(("wire", "message"), [
    (bytes([2, 0, 0, 0, 0, 1]) + b"a", "substream 2"),
    (bytes([0, 9, 0, 0, 0, 0]), "unknown kind"),
    (encode_header(0, Kind.DATA, 1)[:2] + (MAX_FRAME_BYTES + 1).to_bytes(4, "big"), "at most"),
    (bytes([0, 0, 0, 0, 0, 0]), "empty"),
    (bytes([0, 1, 0, 0, 0, 1]) + b"a", "with a payload"),
    (encode_header(0, Kind.EOF) + encode_header(0, Kind.DATA, 1) + b"a", "after its end"),
])
def test_decoder_refuses_hostile_frames(wire: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        FrameDecoder(2).feed(wire)


def test_an_oversized_length_is_refused_before_its_payload_is_buffered() -> None:
    header = bytes([0, 0]) + (1 << 31).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError):
        FrameDecoder(1).feed(header)
    assert HEADER_BYTES == 6


async def test_garbage_on_the_link_breaks_every_substream() -> None:
    a, b = memory_stream_pair()
    async with Mux(b, 2) as mux:
        await a.send_all(bytes([7, 7, 7, 7, 7, 7]))
        for i in (0, 1):
            with pytest.raises(BrokenResourceError, match="substream 7"):
                await asyncio.wait_for(mux.sub(i).receive_some(), 5)
    await a.aclose()


async def test_a_substream_nobody_reads_is_bounded_and_dropped_once_closed() -> None:
    a, b = memory_stream_pair(capacity_bytes=1 << 20)
    async with Mux(a, 2, window_frames=2) as ma, Mux(b, 2, window_frames=2) as mb:
        # Fill substream 1's window on b's side; substream 0 then waits behind it...
        sender = asyncio.create_task(ma.sub(1).send_all(bytes(MAX_FRAME_BYTES * 8)))
        async with asyncio.timeout(5):
            while len(mb.sub(1)._frames) < 2:  # noqa: ASYNC110 (a test's poll of internals)
                await asyncio.sleep(0.01)
        # (the link itself is full too: the ping waits in the sender's queue)
        ping = asyncio.create_task(ma.sub(0).send_all(b"ping"))
        got = asyncio.create_task(mb.sub(0).receive_some())
        await asyncio.sleep(0.05)
        assert not got.done()
        assert len(mb.sub(1)._frames) == 2  # bounded: the window, not the 8 frames sent
        # ...until the consumer of substream 1 closes it: its frames are dropped.
        await mb.sub(1).aclose()
        assert await asyncio.wait_for(got, 5) == b"ping"
        await ping
        # Frames past the close are dropped; the sender learns of the close at the latest
        # on its next send.
        with contextlib.suppress(BrokenResourceError):
            await asyncio.wait_for(sender, 5)
        with pytest.raises(BrokenResourceError):
            await ma.sub(1).send_all(b"more")
