"""StreamChannel over real sockets: events arrive whole whichever receive
path the stream offers (receive_into straight into the codec's buffer, or
receive_some), and a peer vanishing mid-frame is a broken link."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator

import pytest

from ferry.buffers import Buffer
from ferry.errors import BrokenResourceError
from ferry.migration.channel import StreamChannel
from ferry.protocol.codec import encode
from ferry.protocol.messages import (
    Completed,
    DirtyAck,
    Encoding,
    Event,
    NeedAt,
    WriteBlocks,
)
from ferry.transport.sockets import SocketStream

MiB = 1024 * 1024


class Spy:
    """Counts which receive method a channel uses; forwards everything."""

    def __init__(self, inner: SocketStream, *, offer_receive_into: bool) -> None:
        self.inner = inner
        self.into_calls = 0
        self.some_calls = 0
        if offer_receive_into:
            self.receive_into = self._receive_into

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def send_all(self, data: Buffer) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self.some_calls += 1
        return await self.inner.receive_some(max_bytes)

    async def _receive_into(self, buffer: memoryview) -> int:
        self.into_calls += 1
        return await self.inner.receive_into(buffer)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    left, right = socket.socketpair()
    a, b = SocketStream(left, "left"), SocketStream(right, "right")
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def sample_events() -> list[Event]:
    rnd = random.Random(3)
    out: list[Event] = []
    for i in range(8):
        size = rnd.choice([4096, 300_000, MiB, 2 * MiB])
        hashes = tuple(bytes([i]) * 16 for _ in range(4))
        out.append(WriteBlocks(0, 4 * i, Encoding.PLAIN, hashes, rnd.randbytes(size)))
        out += [DirtyAck(0, i), NeedAt(0, i * 4096, 4096)]
    return [*out, Completed(0)]


@pytest.mark.parametrize("offer_receive_into", [True, False])
async def test_events_arrive_whole_over_either_receive_path(offer_receive_into: bool) -> None:
    events = sample_events()
    async with socket_pair() as (a, b):
        spy = Spy(b, offer_receive_into=offer_receive_into)
        sender, receiver = StreamChannel(a), StreamChannel(spy)

        async def send_all() -> None:
            for event in events:
                await sender.send(event)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_all())
            received = [await receiver.receive() for _ in events]
    assert received == events
    if offer_receive_into:
        assert spy.into_calls > 0
        assert spy.some_calls == 0
    else:
        assert spy.some_calls > 0


@pytest.mark.parametrize("offer_receive_into", [True, False])
async def test_peer_vanishing_mid_frame_is_a_broken_link(offer_receive_into: bool) -> None:
    frame = encode(WriteBlocks(0, 0, Encoding.PLAIN, (b"\x01" * 16,), b"x" * 100_000))
    async with socket_pair() as (a, b):
        receiver = StreamChannel(Spy(b, offer_receive_into=offer_receive_into))
        await a.send_all(frame[: len(frame) // 2])
        await a.aclose()
        with pytest.raises(BrokenResourceError, match="middle of a frame"):
            await receiver.receive()


async def test_clean_eof_between_frames_is_a_broken_link_too() -> None:
    async with socket_pair() as (a, b):
        receiver = StreamChannel(b)
        await a.send_all(encode(Completed(1)))
        await a.send_eof()
        assert await receiver.receive() == Completed(1)
        with pytest.raises(BrokenResourceError, match="peer closed"):
            await receiver.receive()
