"""Which way a live migration moves guest RAM (both sides learn it from the offer)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from ferry.hostconfig import Accel
from ferry.transport.base import Stream
from ferry.transport.mux import Mux
from ferry.transport.tcp import link_rtt_s
from ferry.transport.tuning import ASSUMED_LINK_MBIT

_log = logging.getLogger(__name__)

FIXED_TCG_DIRTY_TRACKING = (9, 0)
"""QEMU before 9.0 under TCG loses guest writes from its precopy dirty tracking: the
bitmap sync cleared the migration bits without resetting TCG's writable TLB entries
(fixed upstream by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
memory access"). Measured on QEMU 7.2 here: guest RAM arrived different from the paused
source in 4-47% of hops, guest kernels crashed (docs/live-migration.md)."""


LINK_WINDOWS = (16, 2)
"""Mux frames (256 KiB) buffered per substream of a link carrying QEMU's stream: the
channel 16; the RAM stream only 2, so little RAM is in flight past QEMU's view (its
downtime estimate counts what it wrote) and the disks' final dirty list, at the
switch-over, queues behind as little of it as possible."""


def fit_link_windows(mux: Mux, link: Stream) -> None:
    """Grow this end's receive windows to the link's bandwidth-delay product (the RTT
    its TCP connection measured, the rate :data:`ASSUMED_LINK_MBIT`): with the windows of
    :data:`LINK_WINDOWS` alone QEMU's stream gets 512 KiB per RTT (42 Mbit/s at 100 ms).
    What is queued ahead of the switch-over's messages stays bounded by the socket's
    unsent limit (:data:`~ferry.transport.tuning.NOTSENT_LOWAT_BYTES`), not the window."""
    rtt_s = link_rtt_s(link)
    if rtt_s is not None:
        windows = mux.fit_windows(rtt_s, ASSUMED_LINK_MBIT)
        _log.debug("link RTT %.1f ms: mux receive windows %s bytes", rtt_s * 1e3, windows)


class RamPath(enum.Enum):
    AUTO = "auto"
    """QEMU's stream where it is safe (:func:`choose`), else the engine."""
    QEMU = "qemu"
    """QEMU's own precopy stream (per-page dirty tracking, zero pages as headers), carried
    by the migration's link (:mod:`ferry.qemu.ramstream`) into the destination QEMU's
    private RAM; the storage engine moves the disks."""
    ENGINE = "engine"
    """Guest RAM as a ferry device (the FUSE memory file): block pre-copy, dirty cycles,
    post-copy on demand. Needed where RAM must be a device on arrival."""


class UnsafeRamPathError(ValueError):
    """QEMU's stream was asked for where QEMU's dirty tracking loses writes."""


@dataclass(frozen=True, slots=True)
class RamChoice:
    path: RamPath
    reason: str


def choose(requested: RamPath, *, accel: Accel, qemu_version: tuple[int, ...],
           ram_is_device: bool) -> RamChoice:
    """The path for a VM whose source QEMU is ``qemu_version`` under ``accel``.

    RAM private to QEMU (``ram_is_device`` False) can only go in QEMU's stream. Raises
    :class:`UnsafeRamPathError` when QEMU's stream is asked for where it loses writes.
    """
    version = ".".join(map(str, qemu_version))
    safe = accel is Accel.KVM or qemu_version >= FIXED_TCG_DIRTY_TRACKING
    if not ram_is_device:
        if not safe:
            raise UnsafeRamPathError(
                f"guest RAM is private to QEMU {version}, whose TCG dirty tracking loses "
                "writes in precopy; it cannot move safely (QEMU >= 9.0 or KVM needed)")
        return RamChoice(RamPath.QEMU, "guest RAM is private to QEMU: only its stream "
                                       "can carry it")
    if requested is RamPath.ENGINE:
        return RamChoice(RamPath.ENGINE, "asked for")
    if safe:
        why = "KVM" if accel is Accel.KVM else f"QEMU {version} under TCG"
        return RamChoice(RamPath.QEMU, f"asked for ({why})" if requested is RamPath.QEMU
                         else f"QEMU's stream is safe here ({why})")
    if requested is RamPath.QEMU:
        raise UnsafeRamPathError(
            f"QEMU {version} under TCG loses guest writes from its precopy dirty tracking "
            "(fixed in QEMU 9.0): refusing --ram qemu; use --ram engine or QEMU >= 9.0")
    return RamChoice(RamPath.ENGINE, f"QEMU {version} under TCG loses writes from its "
                                     "precopy dirty tracking (fixed in 9.0)")
