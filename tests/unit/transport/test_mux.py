"""The mux's frame parser against hostile input, and what a broken link does to substreams."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ferry.buffers import Buffer
from ferry.errors import BrokenResourceError, RemoteProtocolError
from ferry.transport.memory import memory_stream_pair
from ferry.transport.mux import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_WINDOW_BYTES,
    FrameDecoder,
    Kind,
    Mux,
    credit_of,
    encode_credit,
    encode_header,
    window_bytes,
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
    (encode_header(0, Kind.CREDIT, 2) + b"\0\1", "CREDIT frame of 2 bytes"),
    (encode_credit(0, 0), "of 0 bytes"),
    (encode_header(0, Kind.CLOSE) + encode_credit(0, 5), "after its end"),
])
def test_decoder_refuses_hostile_frames(wire: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        FrameDecoder(2).feed(wire)


def test_credit_frames_decode_and_may_follow_the_peers_eof() -> None:
    frames = FrameDecoder(2).feed(encode_header(1, Kind.EOF) + encode_credit(1, 70000))
    assert [f.kind for f in frames] == [Kind.EOF, Kind.CREDIT]
    assert credit_of(frames[1]) == 70000


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


async def test_a_stalled_substream_holds_back_only_its_own_sender() -> None:
    a, b = memory_stream_pair(capacity_bytes=1 << 20)
    async with Mux(a, 2, window_frames=2) as ma, Mux(b, 2, window_frames=2) as mb:
        # Nobody reads substream 1 on b's side: its sender stops at the window...
        sender = asyncio.create_task(ma.sub(1).send_all(bytes(MAX_FRAME_BYTES * 8)))
        async with asyncio.timeout(5):
            while len(mb.sub(1)._frames) < 2:  # noqa: ASYNC110 (a test's poll of internals)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not sender.done()
        assert len(mb.sub(1)._frames) == 2  # bounded: the window, not the 8 frames sent
        # ...while substream 0 flows past it.
        await ma.sub(0).send_all(b"ping")
        assert await asyncio.wait_for(mb.sub(0).receive_some(), 5) == b"ping"
        # Reading substream 1 gives credit back, and the sender finishes.
        got = 0
        async with asyncio.timeout(5):
            while got < MAX_FRAME_BYTES * 8:
                got += len(await mb.sub(1).receive_some(1 << 20))
        await asyncio.wait_for(sender, 5)
        # Closed: frames past the close are dropped; the sender learns of the close at
        # the latest on its next send.
        await mb.sub(1).aclose()
        async with asyncio.timeout(5):
            while not ma.sub(1)._peer_closed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        with pytest.raises(BrokenResourceError):
            await ma.sub(1).send_all(b"more")


async def test_in_flight_bytes_never_exceed_the_window() -> None:
    """What matters for the hand-off: a bulk substream cannot fill the link's buffers."""
    a, b = memory_stream_pair(capacity_bytes=64 << 20)  # a link with deep buffers
    sent = 0
    send_all = a.send_all

    async def counting(data: Buffer) -> None:
        nonlocal sent
        await send_all(data)
        sent += len(memoryview(data))

    a.send_all = counting  # type: ignore[method-assign]
    async with Mux(a, 2, window_frames=2) as ma, Mux(b, 2, window_frames=2) as mb:
        sender = asyncio.create_task(ma.sub(1).send_all(bytes(MAX_FRAME_BYTES * 40)))
        await asyncio.sleep(0.1)
        # Nobody reads at b: the link holds the window (and headers), not 40 frames.
        assert 2 * MAX_FRAME_BYTES <= sent <= 2 * (MAX_FRAME_BYTES + HEADER_BYTES)
        # Reading half the window earns the sender more.
        await mb.sub(1).receive_some(MAX_FRAME_BYTES)
        await asyncio.sleep(0.1)
        assert 3 * MAX_FRAME_BYTES <= sent <= 3 * (MAX_FRAME_BYTES + HEADER_BYTES)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


async def test_a_peer_that_ignores_the_window_breaks_the_link() -> None:
    a, b = memory_stream_pair()
    async with Mux(b, 2, window_frames=1) as mux:
        frame = encode_header(1, Kind.DATA, MAX_FRAME_BYTES) + bytes(MAX_FRAME_BYTES)
        await a.send_all(frame + frame)  # the second frame has no credit
        with pytest.raises(BrokenResourceError, match="beyond its window"):
            await asyncio.wait_for(mux.sub(0).receive_some(), 5)
    await a.aclose()




async def test_a_receiver_grows_its_window_for_a_long_link() -> None:
    """fit_windows on the receiving end only: the growth reaches the sender as credit, so
    it may have that much unread at the receiver; beyond it, it waits again."""
    a, b = memory_stream_pair(capacity_bytes=64 << 20)
    async with Mux(a, 2, window_frames=2) as ma, Mux(b, 2, window_frames=2) as mb:
        rtt_s = 0.1
        windows = mb.fit_windows(rtt_s, 100.0)  # 2.5 x 1.25 MB
        assert windows == [window_bytes(rtt_s, 100.0)] * 2
        assert windows[1] == int(12_500_000 * 0.1 * 2.5)
        total = windows[1] // MAX_FRAME_BYTES * MAX_FRAME_BYTES
        # Nobody reads at b, yet the whole grown window goes out...
        await asyncio.wait_for(ma.sub(1).send_all(bytes(total)), 5)
        # ...and not a frame more.
        more = asyncio.create_task(ma.sub(1).send_all(bytes(2 * MAX_FRAME_BYTES)))
        await asyncio.sleep(0.1)
        assert not more.done()
        got = 0
        while got < total + 2 * MAX_FRAME_BYTES:
            got += len(await asyncio.wait_for(mb.sub(1).receive_some(), 5))
        await asyncio.wait_for(more, 5)
        assert mb.fit_windows(rtt_s, 10.0) == windows  # a window never shrinks


def test_windows_are_bounded() -> None:
    assert window_bytes(0.1, 100_000.0) == MAX_WINDOW_BYTES
    assert window_bytes(float("inf"), 1.0) == MAX_WINDOW_BYTES


async def test_a_peer_that_grants_more_than_the_largest_window_breaks_the_link() -> None:
    a, b = memory_stream_pair()
    async with Mux(b, 2, window_frames=1) as mux:
        # Growth is legal (the peer may have grown its window)...
        await a.send_all(encode_credit(0, MAX_WINDOW_BYTES - MAX_FRAME_BYTES))
        await a.send_all(encode_credit(0, 1))  # ...but not past the largest window.
        with pytest.raises(BrokenResourceError, match="more credit"):
            await asyncio.wait_for(mux.sub(0).receive_some(), 5)
    await a.aclose()
