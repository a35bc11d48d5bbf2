"""Which way a live migration moves guest RAM (both sides learn it from the offer)."""

from __future__ import annotations

import enum


class RamPath(enum.Enum):
    QEMU = "qemu"
    """QEMU's own precopy stream (per-page dirty tracking, zero pages as headers), carried
    by the migration's link (:mod:`ferry.qemu.ramstream`) into the destination QEMU's
    private RAM; the storage engine moves the disks. The default."""
    ENGINE = "engine"
    """Guest RAM as a ferry device (the FUSE memory file): block pre-copy, dirty cycles,
    post-copy on demand. Needed where RAM must be a device on arrival."""
