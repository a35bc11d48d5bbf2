"""Pipe/subprocess specifics and the memory pair's backpressure."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from ferry.errors import BrokenResourceError, ClosedResourceError, TransportError
from ferry.transport.memory import memory_stream_pair
from ferry.transport.pipe import fd_stream, subprocess_stream

from .conformance import receive_until_eof, send_until_broken


async def test_subprocess_stream_echoes_through_cat() -> None:
    stream, process = await subprocess_stream(["cat"])
    try:
        payload = os.urandom(3 * 1024 * 1024)
        async with asyncio.TaskGroup() as tg:
            echoed = tg.create_task(receive_until_eof(stream))
            await stream.send_all(payload)
            await stream.send_eof()  # cat sees EOF on stdin, exits, closes stdout
        assert echoed.result() == payload
        assert await process.wait() == 0
        assert stream.peer == f"subprocess:cat[{process.pid}]"
    finally:
        await stream.aclose()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_subprocess_exit_breaks_the_stream() -> None:
    stream, process = await subprocess_stream([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        assert await process.wait() == 3
        assert await stream.receive_some() == b""
        with pytest.raises(BrokenResourceError, match=r"subprocess:python[\d.]*\["):
            await send_until_broken(stream)
    finally:
        await stream.aclose()


async def test_subprocess_stream_missing_command() -> None:
    with pytest.raises(TransportError, match="cannot start"):
        await subprocess_stream(["/nonexistent/ferry-no-such-binary"])


async def test_fd_stream_owns_its_descriptors() -> None:
    r, w = os.pipe()
    stream = await fd_stream(r, w, peer="loop")
    await stream.send_all(b"to myself")
    assert await stream.receive_some() == b"to myself"
    await stream.aclose()
    for fd in (r, w):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


async def test_memory_backpressure() -> None:
    a, b = memory_stream_pair(capacity_bytes=1024)
    sender = asyncio.create_task(a.send_all(bytes(4096)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not sender.done()  # the buffer is full and nobody reads
    received = bytearray()
    while len(received) < 4096:
        chunk = await b.receive_some(4096)
        assert len(chunk) <= 1024
        received += chunk
    await sender
    assert received == bytes(4096)


async def test_memory_close_wakes_blocked_sender() -> None:
    a, b = memory_stream_pair(capacity_bytes=16)
    blocked_by_peer = asyncio.create_task(a.send_all(bytes(64)))
    await asyncio.sleep(0)
    await b.aclose()
    with pytest.raises(BrokenResourceError, match="memory:b"):
        await blocked_by_peer
    c, d = memory_stream_pair(capacity_bytes=16)
    blocked_by_self = asyncio.create_task(c.send_all(bytes(64)))
    await asyncio.sleep(0)
    await c.aclose()
    with pytest.raises(ClosedResourceError):
        await blocked_by_self
    await a.aclose()
    await d.aclose()
