"""The destination's waiting cache: reads of blocks not yet migrated wait.

During post-copy the destination VM runs before every block has arrived.
``waiting_cache(device, block_size_bytes)`` returns ``(local, remote)``:

* ``local`` (:class:`WaitingLocal`) is the device the destination VM uses. A
  read of an *absent* block asks for it (``on_need(block)``, once per block
  per absence, however many readers wait) and waits until it is *present*.
  A write covering a whole block needs nothing: the block becomes present
  and *locally written*, and remote data for it is dropped from then on,
  since the VM's write is newer than anything the source can still send. A
  write covering part of an absent block first needs and waits for the
  block, so the rest of the block is right.
* ``remote`` (:class:`WaitingRemote`) is what the migration receiver uses:
  it writes whole blocks of source data (skipping locally written ones),
  marks blocks present or absent again (a dirty list), and can ``fail()``
  the cache so that every waiter raises instead of hanging when the source
  is gone.

Every block starts absent. Local writes and remote writes are serialised by
one lock, so a remote write can never land on top of a local one; the blocks
of a local write count as locally written from the moment it starts, so a
dirty list arriving during it cannot make them absent. A local write that
fails still counts as done (like a disk, the contents there are undefined).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from ferry.buffers import Buffer
from ferry.errors import DeviceClosedError, DeviceError, DeviceRangeError
from ferry.latency import LatencyRecorder
from ferry.storage.device import Device, Geometry, check_range
from ferry.storage.modules._forward import ForwardingDevice, device_name


class UnalignedWriteError(DeviceError):
    """Remote data must cover whole blocks (the last block may be short)."""


NeedCallback = Callable[[int], None]


class _WaitingState:
    """What the two handles share."""

    def __init__(self, inner: Device, block_size_bytes: int, on_need: NeedCallback | None) -> None:
        self.inner = inner
        self.name = device_name(inner)
        self.geometry = Geometry(inner.size_bytes, block_size_bytes)
        n = self.geometry.block_count
        self.present = bytearray(n)
        self.present_count = 0
        self.local = bytearray(n)
        self.on_need = on_need
        self.needed: set[int] = set()  # on_need called in the current absence
        self.arrivals: dict[int, asyncio.Event] = {}
        self.all_present = asyncio.Event()  # also set on fail/close to wake
        if n == 0:
            self.all_present.set()
        self.failure: BaseException | None = None
        self.closed = False
        self.write_lock = asyncio.Lock()
        self.stalls = LatencyRecorder()
        """How long local reads and partial writes waited for absent blocks."""

    # -- state changes ----------------------------------------------------

    def check_block(self, block: int) -> None:
        if not 0 <= block < self.geometry.block_count:
            raise DeviceRangeError(
                f"block {block} outside 0..{self.geometry.block_count - 1}", device=self.name
            )

    def set_present(self, block: int) -> None:
        if not self.present[block]:
            self.present[block] = 1
            self.present_count += 1
            if self.present_count == self.geometry.block_count:
                self.all_present.set()
        self.needed.discard(block)
        event = self.arrivals.pop(block, None)
        if event is not None:
            event.set()

    def set_absent(self, block: int) -> None:
        if self.local[block] or not self.present[block]:
            return
        self.present[block] = 0
        self.present_count -= 1
        if self.failure is None and not self.closed:
            self.all_present.clear()

    def wake_all(self) -> None:
        for event in self.arrivals.values():
            event.set()
        self.arrivals.clear()
        self.all_present.set()

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        self.wake_all()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wake_all()
            await self.inner.close()

    # -- waiting ----------------------------------------------------------

    def check_usable(self) -> None:
        if self.closed:
            raise DeviceClosedError("device is closed", device=self.name)
        if self.failure is not None:
            raise self.failure

    def need(self, block: int) -> None:
        callback = self.on_need
        if callback is None or block in self.needed:
            return
        # Recorded first: the callback may mark the block present at once.
        self.needed.add(block)
        try:
            callback(block)
        except BaseException:
            self.needed.discard(block)
            raise

    def set_on_need(self, callback: NeedCallback | None) -> None:
        self.on_need = callback
        # Readers already waiting were never reported to this callback.
        for block in list(self.arrivals):
            if not self.present[block]:
                self.need(block)

    async def wait_present(self, blocks: Iterable[int]) -> None:
        """Need every absent block of ``blocks``, then wait until all are present."""
        blocks = list(blocks)
        present = self.present
        started: float | None = None
        while True:
            absent = [b for b in blocks if not present[b]]
            if not absent:
                if started is not None:
                    self.stalls.observe(time.perf_counter() - started)
                return
            if started is None:
                started = time.perf_counter()
            self.check_usable()
            for block in absent:  # ask for all of them at once
                self.need(block)
            for block in absent:
                if not present[block]:
                    # Again: the block may have arrived and been made absent
                    # while we waited for an earlier one (a new absence).
                    self.need(block)
                    event = self.arrivals.get(block)
                    if event is None:
                        event = self.arrivals[block] = asyncio.Event()
                    await event.wait()
                    self.check_usable()
            # Loop: a dirty list may have made a block absent again meanwhile.

    async def wait_all_present(self) -> None:
        while self.present_count < self.geometry.block_count:
            self.check_usable()
            await self.all_present.wait()
            if self.present_count < self.geometry.block_count:
                self.check_usable()


class _WaitingHandle(ForwardingDevice):
    def __init__(self, state: _WaitingState) -> None:
        super().__init__(state.inner)
        self._state = state

    @property
    def geometry(self) -> Geometry:
        return self._state.geometry

    def _check_open(self) -> None:
        if self._state.closed:
            raise DeviceClosedError("device is closed", device=self.name)

    async def close(self) -> None:
        await self._state.close()


class WaitingLocal(_WaitingHandle):
    """The destination VM's device: reads and partial writes wait for absent blocks."""

    @property
    def stalls(self) -> LatencyRecorder:
        """The waits for absent blocks so far (post-copy "faults")."""
        return self._state.stalls

    async def read_at(self, offset: int, length: int) -> bytes:
        self._check_open()
        check_range(self.size_bytes, offset, length, self.name)
        await self._state.wait_present(self.geometry.blocks_touching(offset, length))
        return await self._inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        check_range(self.size_bytes, offset, len(view), self.name)
        state = self._state
        geometry = state.geometry
        blocks = geometry.blocks_touching(offset, len(view))
        if not blocks:
            return
        partial = [
            b for b in {blocks[0], blocks[-1]} if not _covers(geometry, offset, len(view), b)
        ]
        while True:
            await state.wait_present(partial)
            async with state.write_lock:
                if any(not state.present[b] for b in partial):
                    continue  # made absent again while we waited for the lock
                for block in blocks:
                    state.local[block] = 1
                try:
                    await self._inner.write_at(offset, view)
                finally:
                    for block in blocks:
                        state.set_present(block)
                return


class WaitingRemote(_WaitingHandle):
    """The migration receiver's handle on a waiting cache.

    ``read_at`` goes straight to the inner device (no waiting), for
    verification; ``write_at`` takes whole blocks of source data.
    """

    async def write_at(self, offset: int, data: Buffer) -> None:
        """Write source data for whole blocks, skipping locally written ones.

        The written blocks become present and their readers wake.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        check_range(self.size_bytes, offset, len(view), self.name)
        geometry = self._state.geometry
        if view and not geometry.is_whole_block(offset, len(view)):
            raise UnalignedWriteError(
                f"remote write [{offset}, {offset + len(view)}) is not whole blocks",
                device=self.name,
            )
        state = self._state
        blocks = geometry.blocks_touching(offset, len(view))
        async with state.write_lock:
            i = 0
            while i < len(blocks):
                if state.local[blocks[i]]:
                    i += 1
                    continue
                j = i
                while j + 1 < len(blocks) and not state.local[blocks[j + 1]]:
                    j += 1
                start = geometry.block_offset(blocks[i]) - offset
                end = min(geometry.block_offset(blocks[j] + 1) - offset, len(view))
                await self._inner.write_at(offset + start, view[start:end])
                for block in blocks[i : j + 1]:
                    state.set_present(block)
                i = j + 1

    def mark_present(self, blocks: Iterable[int]) -> None:
        """Mark ``blocks`` present (the destination already has their data)."""
        state = self._state
        for block in blocks:
            state.check_block(block)
            state.set_present(block)

    def mark_absent(self, blocks: Iterable[int]) -> None:
        """Make ``blocks`` absent again (a dirty list), except locally written ones."""
        state = self._state
        for block in blocks:
            state.check_block(block)
            state.set_absent(block)

    def mark_all_present(self) -> None:
        self.mark_present(range(self._state.geometry.block_count))

    def is_present(self, block: int) -> bool:
        self._state.check_block(block)
        return bool(self._state.present[block])

    def present_count(self) -> int:
        return self._state.present_count

    def missing(self) -> list[int]:
        """The absent blocks, sorted."""
        return [b for b, p in enumerate(self._state.present) if not p]

    def locally_written(self) -> frozenset[int]:
        """Blocks the destination wrote itself; remote data for them is dropped."""
        return frozenset(b for b, w in enumerate(self._state.local) if w)

    async def wait_all_present(self) -> None:
        """Return once every block is present; raise the ``fail()`` error instead."""
        await self._state.wait_all_present()

    def set_on_need(self, callback: NeedCallback | None) -> None:
        """Replace the on-need callback; blocks readers already wait for are reported."""
        self._state.set_on_need(callback)

    def fail(self, exc: BaseException) -> None:
        """Make every current and future waiter raise ``exc`` instead of waiting."""
        self._state.fail(exc)


def _covers(geometry: Geometry, offset: int, length: int, block: int) -> bool:
    start = geometry.block_offset(block)
    return offset <= start and start + geometry.block_length(block) <= offset + length


def waiting_cache(
    device: Device,
    block_size_bytes: int,
    *,
    on_need: NeedCallback | None = None,
) -> tuple[WaitingLocal, WaitingRemote]:
    """Wrap ``device`` in a waiting cache and return its (local, remote) handles.

    All blocks start absent. Closing either handle closes ``device`` once and
    makes waiters raise :class:`DeviceClosedError`.
    """
    state = _WaitingState(device, block_size_bytes, on_need)
    return WaitingLocal(state), WaitingRemote(state)
