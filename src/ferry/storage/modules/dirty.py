"""Dirty-block tracking for pre-copy migration, split into two handles.

``dirty_tracker(device, block_size_bytes)`` returns ``(local, remote)``, as
Silo's ``NewDirtyTracker`` does:

* ``local`` (:class:`DirtyLocal`) is the device the VM, NBD or FUSE writes to.
* ``remote`` (:class:`DirtyRemote`) is what the migrator reads through.

Only blocks the migrator has already read need re-sending when they change,
so a block becomes *tracked* when the migrator first reads it (or all at once
with :meth:`DirtyRemote.track_all`), and a write makes only tracked blocks
*dirty*.

Why no write is ever missed: the migrator marks a block tracked *before* it
reads the block, and a writer checks "tracked?" only *after* its write has
reached the inner device. If the writer's check comes first, the tracking
(and hence the migrator's read) starts after the write completed, so the read
sees the new data. Otherwise the writer sees the block tracked and marks it
dirty, and the migrator sends it again. A write that fails or is cancelled
half-way still marks its blocks, since part of it may have landed.
"""

from __future__ import annotations

from collections.abc import Iterable

from ferry.buffers import Buffer
from ferry.storage.device import Device, Geometry, check_range
from ferry.storage.modules._forward import ForwardingDevice


class _DirtyState:
    """What the two handles share."""

    def __init__(self, inner: Device, block_size_bytes: int) -> None:
        self.inner = inner
        self.geometry = Geometry(inner.size_bytes, block_size_bytes)
        self.tracked = bytearray(self.geometry.block_count)  # 1 = tracked
        self.dirty: set[int] = set()
        self.closed = False

    def mark_written(self, blocks: Iterable[int]) -> None:
        tracked = self.tracked
        self.dirty.update(b for b in blocks if 0 <= b < len(tracked) and tracked[b])

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.inner.close()


class _DirtyHandle(ForwardingDevice):
    def __init__(self, state: _DirtyState) -> None:
        super().__init__(state.inner)
        self._state = state

    @property
    def geometry(self) -> Geometry:
        return self._state.geometry

    async def write_at(self, offset: int, data: Buffer) -> None:
        # Mark after the inner write returns (see the module docstring), and
        # also when it fails or is cancelled, since part of it may have landed.
        check_range(self.size_bytes, offset, memoryview(data).nbytes, self.name)
        try:
            await self._inner.write_at(offset, data)
        finally:
            self._state.mark_written(
                self._state.geometry.blocks_touching(offset, memoryview(data).nbytes)
            )

    async def close(self) -> None:
        await self._state.close()


class DirtyLocal(_DirtyHandle):
    """The VM's view: a device whose writes to tracked blocks make them dirty."""


class DirtyRemote(_DirtyHandle):
    """The migrator's view: reads start tracking; the dirty set is taken from here.

    Writes through this handle are tracked like local ones (they change data
    the destination may already have).
    """

    async def read_at(self, offset: int, length: int) -> bytes:
        # Track before reading (see the module docstring).
        check_range(self.size_bytes, offset, length, self.name)
        tracked = self._state.tracked
        for block in self._state.geometry.blocks_touching(offset, length):
            tracked[block] = 1
        return await self._inner.read_at(offset, length)

    def take_dirty(self) -> list[int]:
        """Return the dirty blocks, sorted, and clear the set (atomically)."""
        dirty, self._state.dirty = self._state.dirty, set()
        return sorted(dirty)

    def dirty_count(self) -> int:
        """How many blocks are dirty now."""
        return len(self._state.dirty)

    def track(self, blocks: Iterable[int]) -> None:
        """Track ``blocks`` without reading them (blocks the destination gets another way,
        e.g. from a shared base): later writes to them make them dirty."""
        tracked = self._state.tracked
        for block in blocks:
            tracked[block] = 1

    def track_all(self) -> None:
        """Track every block, so every later write makes its blocks dirty."""
        tracked = self._state.tracked
        tracked[:] = b"\x01" * len(tracked)

    def is_tracked(self, block: int) -> bool:
        """Whether writes to ``block`` make it dirty."""
        return bool(self._state.tracked[block])


def dirty_tracker(device: Device, block_size_bytes: int) -> tuple[DirtyLocal, DirtyRemote]:
    """Wrap ``device`` in a dirty tracker and return its (local, remote) handles.

    Both handles share one state; closing either closes ``device`` once.
    """
    state = _DirtyState(device, block_size_bytes)
    return DirtyLocal(state), DirtyRemote(state)
