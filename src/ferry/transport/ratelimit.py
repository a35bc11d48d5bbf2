"""A bandwidth cap on a stream's sending side (``ferry vm migrate --max-mbit``).

:class:`TokenBucket` is the sans-IO core: ``rate`` bytes per second refill a bucket of
at most ``burst`` bytes; :meth:`TokenBucket.take` says how long a sender must wait
before ``n`` more bytes may go. :class:`RateLimited` wraps any :class:`Stream` and
sleeps that long in ``send_all``, in slices of at most ``burst`` bytes, so a large
buffer goes out at the rate and never as one burst. Receiving is not limited.
"""

from __future__ import annotations

import asyncio
import time

from ferry.buffers import Buffer
from ferry.transport.base import Stream

MIN_BURST_BYTES = 64 * 1024
BURST_S = 0.05
"""The bucket holds 50 ms of the rate (at least 64 KiB): small bursts, smooth pacing."""


class TokenBucket:
    def __init__(self, rate_bytes_s: float, burst_bytes: int, now: float) -> None:
        if rate_bytes_s <= 0 or burst_bytes <= 0:
            raise ValueError("the rate and the burst must be positive")
        self.rate = rate_bytes_s
        self.burst = burst_bytes
        self._tokens = float(burst_bytes)
        self._at = now

    def take(self, n: int, now: float) -> float:
        """Spend ``n`` bytes (at most ``burst``); seconds to wait before sending them."""
        if not 0 <= n <= self.burst:
            raise ValueError(f"take 0..{self.burst} bytes at a time, not {n}")
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimited:
    """``stream`` with its sending side capped at ``rate_bytes_s``."""

    def __init__(self, stream: Stream, rate_bytes_s: float) -> None:
        self._stream = stream
        burst = max(MIN_BURST_BYTES, int(rate_bytes_s * BURST_S))
        self._bucket = TokenBucket(rate_bytes_s, burst, time.monotonic())

    @property
    def peer(self) -> str:
        return self._stream.peer

    async def send_all(self, data: Buffer) -> None:
        with memoryview(data) as view:
            view = view.cast("B")
            for start in range(0, len(view), self._bucket.burst):
                chunk = view[start:start + self._bucket.burst]
                wait = self._bucket.take(len(chunk), time.monotonic())
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._stream.send_all(chunk)

    async def receive_some(self, max_bytes: int = 262144) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
