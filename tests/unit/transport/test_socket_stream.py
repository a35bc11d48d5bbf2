"""SocketStream: the zero-copy ``receive_into`` path of TCP and UNIX streams.

The whole conformance suite runs again with every receive going through
``receive_into``, then the parts of the capability that receive_some does
not cover: EOF as 0, closing, which streams offer it, fairness.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from ferry.buffers import Buffer
from ferry.errors import ClosedResourceError
from ferry.transport import sockets
from ferry.transport.memory import memory_stream_pair
from ferry.transport.sockets import ReceiveIntoStream, SocketStream
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.unix import connect_unix, listen_unix

from .conformance import CHECKS, Pair, PairFactory, run_check


class ViaReceiveInto:
    """A Stream whose receive_some is served by the inner stream's receive_into,
    so the conformance suite exercises receive_into."""

    def __init__(self, inner: ReceiveIntoStream) -> None:
        self.inner = inner

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def send_all(self, data: Buffer) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        buffer = bytearray(max_bytes)
        n = await self.inner.receive_into(memoryview(buffer))
        return bytes(buffer[:n])

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def wrapped(a: object, b: object) -> AsyncIterator[Pair]:
    assert isinstance(a, ReceiveIntoStream)
    assert isinstance(b, ReceiveIntoStream)
    wa, wb = ViaReceiveInto(a), ViaReceiveInto(b)
    try:
        yield Pair(wa, wb, vanish_b=wb.aclose)
    finally:
        await wa.aclose()
        await wb.aclose()


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[Pair]:
    async with await listen_tcp() as listener:
        a = await connect_tcp(*listener.address)
        b = await listener.accept()
        async with wrapped(a, b) as pair:
            yield pair


def unix_pair(tmp_path: Path) -> Callable[[], AbstractAsyncContextManager[Pair]]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        path = tmp_path / "into.sock"
        async with await listen_unix(path) as listener:
            a = await connect_unix(path)
            b = await listener.accept()
            async with wrapped(a, b) as pair:
                yield pair

    return make


@pytest.fixture(params=["tcp", "unix"])
def make_pair(request: pytest.FixtureRequest, tmp_path: Path) -> PairFactory:
    return tcp_pair if request.param == "tcp" else unix_pair(tmp_path)


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_conformance_through_receive_into(check: str, make_pair: PairFactory) -> None:
    await run_check(check, make_pair)


@contextlib.asynccontextmanager
async def raw_pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    left, right = socket.socketpair()
    a, b = SocketStream(left, "left"), SocketStream(right, "right")
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_receive_into_fills_the_callers_buffer_and_reports_eof_as_zero() -> None:
    async with raw_pair() as (a, b):
        await a.send_all(b"abcdef")
        await a.send_eof()
        buffer = bytearray(b"_" * 10)
        view = memoryview(buffer)
        got = 0
        while n := await b.receive_into(view[got:]):
            got += n
        assert buffer == b"abcdef____"
        assert await b.receive_into(view) == 0  # EOF is sticky
        with pytest.raises(ValueError, match="non-empty"):
            await b.receive_into(view[:0])


async def test_close_wakes_a_pending_receive_into_and_later_calls_fail() -> None:
    async with raw_pair() as (a, _):
        pending = asyncio.create_task(a.receive_into(memoryview(bytearray(16))))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not pending.done()
        await a.aclose()
        with pytest.raises(ClosedResourceError):
            await pending
        with pytest.raises(ClosedResourceError):
            await a.receive_into(memoryview(bytearray(16)))


async def test_only_socket_streams_offer_receive_into(tmp_path: Path) -> None:
    m1, m2 = memory_stream_pair()
    assert not isinstance(m1, ReceiveIntoStream)
    async with await listen_unix(tmp_path / "s") as listener:
        client = await connect_unix(tmp_path / "s")
        server = await listener.accept()
        assert isinstance(client, ReceiveIntoStream)
        assert isinstance(server, ReceiveIntoStream)
        await client.aclose()
        await server.aclose()
    await m1.aclose()
    await m2.aclose()


async def test_a_receiver_that_always_finds_data_still_lets_other_tasks_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every byte already in the kernel, no receive has to wait; the
    stream must still yield to the loop now and then."""
    monkeypatch.setattr(sockets, "FAIRNESS_BYTES", 1000)
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 200  # 51200 bytes: fits the socket buffers
    right.sendall(payload)
    right.close()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    stream = SocketStream(left, "left")
    buffer = bytearray(len(payload))
    view = memoryview(buffer)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        got = 0
        while got < len(payload):
            got += await stream.receive_into(view[got : got + 100])
        task.cancel()
    await stream.aclose()
    assert buffer == payload
    assert ticks >= len(payload) // 1000 - 1
