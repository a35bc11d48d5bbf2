"""Every transport runs the whole conformance suite (conformance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from ferry.transport.base import Stream
from ferry.transport.certs import create_ca, create_host_cert
from ferry.transport.memory import memory_stream_pair
from ferry.transport.mux import Mux
from ferry.transport.pipe import fd_stream, subprocess_stream
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.tls import client_context_for, server_context_for
from ferry.transport.unix import connect_unix, listen_unix

from .conformance import CHECKS, Pair, PairFactory, run_check

RELAY = Path(__file__).with_name("stdio_relay.py")


@contextlib.asynccontextmanager
async def closing(a: Stream, b: Stream, *, half_close: bool = True) -> AsyncIterator[Pair]:
    try:
        yield Pair(a, b, vanish_b=b.aclose, half_close=half_close)
    finally:
        await a.aclose()
        await b.aclose()


@contextlib.asynccontextmanager
async def memory_pair() -> AsyncIterator[Pair]:
    a, b = memory_stream_pair()
    async with closing(a, b) as pair:
        yield pair


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[Pair]:
    async with await listen_tcp() as listener:
        a = await connect_tcp(*listener.address)
        b = await listener.accept()
        async with closing(a, b) as pair:
            yield pair


def unix_pair(tmp_path: Path) -> Callable[[], AbstractAsyncContextManager[Pair]]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        path = tmp_path / "conformance.sock"
        async with await listen_unix(path) as listener:
            a = await connect_unix(path)
            b = await listener.accept()
            async with closing(a, b) as pair:
                yield pair

    return make


def tls_pair(tmp_path: Path) -> Callable[[], AbstractAsyncContextManager[Pair]]:
    create_ca(tmp_path / "ca")
    server_files = create_host_cert(tmp_path / "ca", tmp_path / "server", "server.test",
                                    ips=["127.0.0.1"])
    client_files = create_host_cert(tmp_path / "ca", tmp_path / "client", "client.test")

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        ctx = server_context_for(server_files)
        async with await listen_tcp(ssl_context=ctx) as listener:
            a = await connect_tcp(*listener.address, ssl_context=client_context_for(client_files))
            b = await listener.accept()
            async with closing(a, b, half_close=False) as pair:
                yield pair

    return make


@contextlib.asynccontextmanager
async def os_pipe_pair() -> AsyncIterator[Pair]:
    a_to_b_r, a_to_b_w = os.pipe()
    b_to_a_r, b_to_a_w = os.pipe()
    a = await fd_stream(b_to_a_r, a_to_b_w, peer="pipe:b")
    b = await fd_stream(a_to_b_r, b_to_a_w, peer="pipe:a")
    async with closing(a, b) as pair:
        yield pair


def subprocess_pair(tmp_path: Path) -> Callable[[], AbstractAsyncContextManager[Pair]]:
    """a: our end of a child's stdin/stdout; b: the UNIX connection the child
    relays to. Vanishing kills the child."""

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        path = tmp_path / "relay.sock"
        async with await listen_unix(path) as listener:
            a, process = await subprocess_stream([sys.executable, str(RELAY), str(path)])
            try:
                b = await listener.accept()

                async def kill() -> None:
                    process.kill()
                    await process.wait()

                async with closing(a, b) as pair:
                    pair.vanish_b = kill
                    yield pair
            finally:
                await a.aclose()
                if process.returncode is None:
                    process.kill()
                await process.wait()

    return make


@contextlib.asynccontextmanager
async def mux_pair() -> AsyncIterator[Pair]:
    """Substream 1 of two Muxes over a TLS-less TCP link, while substream 0 carries a
    steady stream of its own both ways (what the migration channel does beside QEMU's
    RAM stream)."""
    async with await listen_tcp() as listener:
        raw_a = await connect_tcp(*listener.address)
        raw_b = await listener.accept()
        async with Mux(raw_a, 2) as mux_a, Mux(raw_b, 2) as mux_b:
            async def chatter(s: Stream, r: Stream) -> None:
                for i in range(200):
                    await s.send_all(b"x" * (i % 50 + 1))
                    await asyncio.sleep(0.001)
                await s.send_eof()
                while await r.receive_some():
                    pass

            async with asyncio.TaskGroup() as tg:
                tg.create_task(chatter(mux_a.sub(0), mux_a.sub(0)))
                tg.create_task(chatter(mux_b.sub(0), mux_b.sub(0)))
                async with closing(mux_a.sub(1), mux_b.sub(1)) as pair:
                    yield pair


TRANSPORTS = ["memory", "tcp", "unix", "tls", "os_pipe", "subprocess", "mux"]


@pytest.fixture(params=TRANSPORTS)
def make_pair(request: pytest.FixtureRequest, tmp_path: Path) -> PairFactory:
    name: str = request.param
    if name == "memory":
        return memory_pair
    if name == "tcp":
        return tcp_pair
    if name == "unix":
        return unix_pair(tmp_path)
    if name == "tls":
        return tls_pair(tmp_path)
    if name == "os_pipe":
        return os_pipe_pair
    if name == "mux":
        return mux_pair
    return subprocess_pair(tmp_path)


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_conformance(check: str, make_pair: PairFactory) -> None:
    await run_check(check, make_pair)


async def test_suite_catches_a_broken_stream() -> None:
    """The suite can fail: a stream that corrupts every other chunk is caught."""

    class Lossy:
        def __init__(self, inner: Stream) -> None:
            self.inner = inner
            self.count = 0

        @property
        def peer(self) -> str:
            return self.inner.peer

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            self.count += 1
            if self.count % 2 == 0:
                data = bytes(byte ^ 0xFF for byte in data)
            await self.inner.send_all(data)

        async def receive_some(self, max_bytes: int = 65536) -> bytes:
            return await self.inner.receive_some(max_bytes)

        async def send_eof(self) -> None:
            await self.inner.send_eof()

        async def aclose(self) -> None:
            await self.inner.aclose()

    @contextlib.asynccontextmanager
    async def lossy_pair() -> AsyncIterator[Pair]:
        a, b = memory_stream_pair()
        async with closing(Lossy(a), b) as pair:
            yield pair

    with pytest.raises(AssertionError):
        await run_check("many_small_sends", lossy_pair)
