"""The reusable conformance suite every Stream implementation must pass.

Like trio's ``check_two_way_stream``: each ``check_*`` coroutine takes a
*pair factory*, an async context manager producing a connected :class:`Pair`
of streams, and asserts one part of the contract in
:mod:`ferry.transport.base`. :data:`CHECKS` lists them all so a transport's
test module parametrises over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import pytest

from ferry.errors import BrokenResourceError, ClosedResourceError
from ferry.transport.base import Stream
from ferry.transport.streams import HalfCloseUnsupportedError

LARGE_PAYLOAD_BYTES = 8 * 1024 * 1024
CHECK_DEADLINE_S = 60.0
"""A guard against a deadlocked check hanging the run, not a performance bound."""


@dataclass
class Pair:
    """Two connected streams; ``vanish_b`` makes b's side disappear (close or kill)."""

    a: Stream
    b: Stream
    vanish_b: Callable[[], Awaitable[None]]
    half_close: bool = True


PairFactory = Callable[[], AbstractAsyncContextManager[Pair]]


async def receive_exactly(stream: Stream, n: int) -> bytes:
    """Read exactly ``n`` bytes; fail if the stream ends early."""
    chunks = bytearray()
    while len(chunks) < n:
        data = await stream.receive_some(min(n - len(chunks), 1 << 20))
        assert data, f"EOF after {len(chunks)} of {n} bytes"
        chunks += data
    return bytes(chunks)


async def receive_until_eof(stream: Stream) -> bytes:
    chunks = bytearray()
    while data := await stream.receive_some():
        chunks += data
    return bytes(chunks)


async def check_send_receive_both_ways(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        assert isinstance(pair.a, Stream)
        assert isinstance(pair.a.peer, str)
        assert pair.a.peer
        assert pair.b.peer
        await pair.a.send_all(b"hello from a")
        assert await receive_exactly(pair.b, 12) == b"hello from a"
        await pair.b.send_all(bytearray(b"hello from b"))
        assert await receive_exactly(pair.a, 12) == b"hello from b"
        await pair.a.send_all(memoryview(b"xxviewyy")[2:6])
        assert await receive_exactly(pair.b, 4) == b"view"
        await pair.a.send_all(b"")  # sends nothing, must not break anything
        await pair.a.send_all(b"z")
        assert await receive_exactly(pair.b, 1) == b"z"


async def check_receive_some_bounds(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await pair.a.send_all(b"0123456789" * 100)
        got = bytearray()
        while len(got) < 1000:
            data = await pair.b.receive_some(7)
            assert 1 <= len(data) <= 7
            got += data
        assert got == b"0123456789" * 100
        with pytest.raises(ValueError, match="max_bytes"):
            await pair.b.receive_some(0)


async def check_large_payload_integrity(make_pair: PairFactory) -> None:
    payload = os.urandom(LARGE_PAYLOAD_BYTES)
    async with make_pair() as pair:
        async with asyncio.TaskGroup() as tg:
            received = tg.create_task(receive_exactly(pair.b, 2 * len(payload)))
            await pair.a.send_all(payload)  # one call
            view = memoryview(payload)
            for offset in range(0, len(view), 1 << 20):  # memoryview slices
                await pair.a.send_all(view[offset : offset + (1 << 20)])
        digest = hashlib.sha256(payload + payload).digest()
        assert hashlib.sha256(received.result()).digest() == digest


async def check_many_small_sends(make_pair: PairFactory) -> None:
    rng = random.Random(1234)
    messages = [rng.randbytes(rng.randint(1, 64)) for _ in range(3000)]
    expected = b"".join(messages)
    async with make_pair() as pair:
        async with asyncio.TaskGroup() as tg:
            received = tg.create_task(receive_exactly(pair.b, len(expected)))
            for message in messages:
                await pair.a.send_all(message)
        assert received.result() == expected


async def check_send_eof(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        if not pair.half_close:
            with pytest.raises(HalfCloseUnsupportedError):
                await pair.a.send_eof()
            return
        await pair.a.send_all(b"last words")
        await pair.a.send_eof()
        await pair.a.send_eof()  # idempotent
        assert await receive_until_eof(pair.b) == b"last words"
        assert await pair.b.receive_some() == b""  # EOF is sticky
        with pytest.raises(ClosedResourceError):
            await pair.a.send_all(b"after eof")
        # The other direction still works after a half-close.
        await pair.b.send_all(b"reply")
        await pair.b.send_eof()
        assert await receive_until_eof(pair.a) == b"reply"


async def check_aclose_idempotent_and_use_after_close(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await pair.a.aclose()
        await pair.a.aclose()
        with pytest.raises(ClosedResourceError):
            await pair.a.send_all(b"x")
        with pytest.raises(ClosedResourceError):
            await pair.a.receive_some()
        with pytest.raises(ClosedResourceError):
            await pair.a.send_eof()
        # A clean close reads as EOF on the other side.
        assert await receive_until_eof(pair.b) == b""


async def check_close_wakes_pending_receive(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        pending = asyncio.create_task(pair.a.receive_some())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not pending.done()
        await pair.a.aclose()
        with pytest.raises(ClosedResourceError):
            await pending


async def check_peer_vanishes(make_pair: PairFactory) -> None:
    """After the peer disappears, receive gives EOF or Broken, and send eventually Broken."""
    async with make_pair() as pair:
        await pair.b.send_all(b"before")
        assert await receive_exactly(pair.a, 6) == b"before"
        await pair.vanish_b()
        broken: BrokenResourceError | None = None
        try:
            tail = await receive_until_eof(pair.a)
        except BrokenResourceError as exc:
            broken = exc
        if broken is None:
            assert tail == b""
        else:
            assert broken.peer == pair.a.peer
        with pytest.raises(BrokenResourceError) as info:
            await send_until_broken(pair.a)
        assert info.value.peer == pair.a.peer
        assert pair.a.peer in str(info.value)


async def send_until_broken(stream: Stream) -> None:
    """Keep sending; bounded because the first writes may still land in kernel
    buffers before the peer's reset or hang-up is seen."""
    chunk = bytes(64 * 1024)
    for _ in range(10_000):
        await stream.send_all(chunk)
        await asyncio.sleep(0.001)


async def check_concurrent_both_directions(make_pair: PairFactory) -> None:
    """Both ends send a large payload at once while reading: must not deadlock."""
    payload_a = os.urandom(LARGE_PAYLOAD_BYTES // 2)
    payload_b = os.urandom(LARGE_PAYLOAD_BYTES // 2)
    async with make_pair() as pair:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pair.a.send_all(payload_a))
            tg.create_task(pair.b.send_all(payload_b))
            at_b = tg.create_task(receive_exactly(pair.b, len(payload_a)))
            at_a = tg.create_task(receive_exactly(pair.a, len(payload_b)))
        assert at_b.result() == payload_a
        assert at_a.result() == payload_b


CHECKS: dict[str, Callable[[PairFactory], Awaitable[None]]] = {
    "both_ways": check_send_receive_both_ways,
    "receive_bounds": check_receive_some_bounds,
    "large_payload": check_large_payload_integrity,
    "many_small_sends": check_many_small_sends,
    "send_eof": check_send_eof,
    "aclose": check_aclose_idempotent_and_use_after_close,
    "close_wakes_receive": check_close_wakes_pending_receive,
    "peer_vanishes": check_peer_vanishes,
    "concurrent": check_concurrent_both_directions,
}


async def run_check(name: str, make_pair: PairFactory) -> None:
    """Run one named check under a deadlock guard."""
    async with asyncio.timeout(CHECK_DEADLINE_S):
        await CHECKS[name](make_pair)

