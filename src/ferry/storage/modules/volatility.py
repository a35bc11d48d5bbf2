"""Write-rate ("volatility") per block over a sliding time window.

The migrator sends the least volatile blocks first: a block written a moment
ago is likely to be written again, and sending it early only makes it dirty
(Silo's ``volatilityMonitor`` does the same).

Cost per write is O(blocks the write touches): each write appends one event
per block to a time-ordered queue and bumps a counter; expired events are
dropped from the front of the queue lazily, each exactly once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from ferry.buffers import Buffer
from ferry.storage.device import Device, Geometry, check_range
from ferry.storage.modules._forward import ForwardingDevice


class VolatilityMonitor(ForwardingDevice):
    """A device that counts writes per block over the last ``window_s`` seconds."""

    def __init__(
        self,
        device: Device,
        block_size_bytes: int,
        *,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device)
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.geometry = Geometry(device.size_bytes, block_size_bytes)
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._counts: dict[int, int] = {}

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self.size_bytes, offset, memoryview(data).nbytes, self.name)
        try:
            await self._inner.write_at(offset, data)
        finally:
            # Count even a failed write: part of it may have landed.
            now = self._clock()
            self._expire(now)
            n = self.geometry.block_count
            for block in self.geometry.blocks_touching(offset, memoryview(data).nbytes):
                if 0 <= block < n:
                    self._events.append((now, block))
                    self._counts[block] = self._counts.get(block, 0) + 1

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        events, counts = self._events, self._counts
        while events and events[0][0] <= cutoff:
            _, block = events.popleft()
            left = counts[block] - 1
            if left:
                counts[block] = left
            else:
                del counts[block]

    def volatility(self, block: int) -> int:
        """Writes to ``block`` within the window."""
        self._expire(self._clock())
        return self._counts.get(block, 0)

    def counts(self) -> dict[int, int]:
        """Write counts within the window, for blocks that have any."""
        self._expire(self._clock())
        return dict(self._counts)

    def least_volatile_first(self, blocks: Iterable[int]) -> list[int]:
        """``blocks`` ordered by write count within the window, then by index."""
        self._expire(self._clock())
        counts = self._counts
        return sorted(blocks, key=lambda b: (counts.get(b, 0), b))
