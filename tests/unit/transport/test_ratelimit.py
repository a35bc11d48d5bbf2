"""The bandwidth cap: the token bucket's arithmetic, and a capped stream that passes the
transport conformance of a plain one while its sender is paced."""

from __future__ import annotations

import asyncio
import time

import pytest

from ferry.transport.memory import memory_stream_pair
from ferry.transport.ratelimit import RateLimited, TokenBucket


def test_the_bucket_lets_a_burst_through_then_paces() -> None:
    b = TokenBucket(1000.0, 500, now=0.0)
    assert b.take(500, now=0.0) == 0.0          # the full bucket
    assert b.take(100, now=0.0) == pytest.approx(0.1)   # 100 bytes at 1000 B/s
    assert b.take(100, now=0.1) == pytest.approx(0.1)   # refilled 100, owed 100 still
    assert b.take(0, now=10.0) == 0.0           # refills, but never past the burst
    assert b.take(500, now=10.0) == 0.0
    with pytest.raises(ValueError, match="at a time"):
        b.take(501, now=10.0)
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0.0, 1, now=0.0)


async def test_a_capped_stream_delivers_everything_no_faster_than_the_cap() -> None:
    a, b = memory_stream_pair()
    rate = 2_000_000.0  # bytes/s; the burst is 100 KB
    capped = RateLimited(a, rate)
    data = bytes(range(256)) * 2000  # 512,000 bytes
    received = bytearray()

    async def read() -> None:
        while len(received) < len(data):
            received.extend(await b.receive_some())

    reader = asyncio.create_task(read())
    t0 = time.monotonic()
    await capped.send_all(data)
    elapsed = time.monotonic() - t0
    await reader
    assert bytes(received) == data
    # A lower bound only (the cap's promise): all but one burst waited for tokens.
    assert elapsed >= (len(data) - 100_000) / rate * 0.95
    await capped.aclose()
