"""Which block goes next: the source's work queue.

Blocks wait in an ordered queue (least volatile first for pre-copy); blocks
the destination asks for (NeedAt) go to an urgent queue that is always served
first. A block is never in flight twice: picking a block clears its pending
flag and sets its in-flight flag until the transfer is done. Consecutive
pending blocks of one device are batched into one run, up to a limit, so a
frame carries up to ``max_run_blocks`` blocks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Run:
    device: int
    first_block: int
    count: int


class WorkQueue:
    def __init__(self, block_counts: list[int], *, max_run_blocks: int = 16) -> None:
        self._block_counts = block_counts
        self._pending = [bytearray(n) for n in block_counts]
        self._inflight = [bytearray(n) for n in block_counts]
        self._queue: deque[tuple[int, int]] = deque()
        self._urgent: deque[tuple[int, int]] = deque()
        self._pending_count = 0
        self._inflight_count = 0
        self._max_run = max_run_blocks
        self._work = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False

    @property
    def pending_count(self) -> int:
        return self._pending_count

    @property
    def inflight_count(self) -> int:
        return self._inflight_count

    def is_pending(self, device: int, block: int) -> bool:
        return bool(self._pending[device][block])

    def push(self, device: int, blocks: Iterable[int]) -> None:
        """Queue ``blocks`` of ``device`` (in the given order) for sending."""
        pending = self._pending[device]
        for block in blocks:
            if not pending[block]:
                pending[block] = 1
                self._pending_count += 1
                self._queue.append((device, block))
        self._changed()

    def push_urgent(self, device: int, blocks: Iterable[int]) -> int:
        """Move pending ``blocks`` to the front. Returns how many were pending.

        Blocks already in flight or already sent need nothing: they are on the wire.
        """
        moved = 0
        pending = self._pending[device]
        for block in blocks:
            if pending[block]:
                self._urgent.append((device, block))
                moved += 1
        self._changed()
        return moved

    def discard(self, device: int, blocks: Iterable[int]) -> None:
        """Forget pending ``blocks`` (the destination will never need them)."""
        pending = self._pending[device]
        for block in blocks:
            if pending[block]:
                pending[block] = 0
                self._pending_count -= 1
        self._changed()

    def next_run(self) -> Run | None:
        """Take the next run to send, or None if nothing is pending right now."""
        for source in (self._urgent, self._queue):
            while source:
                device, block = source.popleft()
                if self._pending[device][block] and not self._inflight[device][block]:
                    return self._take(device, block)
        return None

    def _take(self, device: int, block: int) -> Run:
        pending = self._pending[device]
        inflight = self._inflight[device]
        end = block + 1
        limit = min(self._block_counts[device], block + self._max_run)
        while end < limit and pending[end] and not inflight[end]:
            end += 1
        for b in range(block, end):
            pending[b] = 0
            inflight[b] = 1
        count = end - block
        self._pending_count -= count
        self._inflight_count += count
        self._changed()
        return Run(device, block, count)

    def done(self, run: Run) -> None:
        inflight = self._inflight[run.device]
        pending = self._pending[run.device]
        for b in range(run.first_block, run.first_block + run.count):
            inflight[b] = 0
            if pending[b]:
                # Pushed again while in flight: next_run skipped (and dropped) its
                # queue entry then, so it goes back in line now.
                self._queue.append((run.device, b))
        self._inflight_count -= run.count
        self._changed()

    def close(self) -> None:
        """Wake every waiter; next_run keeps returning what is left, then None."""
        self._closed = True
        self._work.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_for_work(self) -> None:
        await self._work.wait()

    async def wait_drained(self) -> None:
        """Return once nothing is pending or in flight."""
        await self._drained.wait()

    def _changed(self) -> None:
        if self._pending_count or self._closed:
            self._work.set()
        else:
            self._work.clear()
        if self._pending_count == 0 and self._inflight_count == 0:
            self._drained.set()
        else:
            self._drained.clear()
