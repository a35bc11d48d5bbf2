"""What a live migration reports, and where its downtime went.

Both sides record ``time.monotonic()`` (CLOCK_MONOTONIC) at each step. The
source's timeline reaches the destination in the HANDOFF payload, so the
destination can compute the whole downtime, *source paused -> destination
running*, from one clock. That is only meaningful while both peers share a
clock (peers on one machine, as the namespace hosts of tests and benchmarks);
between machines the cross-host steps are left out and the source's view
(pause -> hand-off acknowledged) is the upper bound.

Steps of the downtime, in order (they add up to the downtime)::

    pause            QMP stop on the source
    flush_and_save   final flush of guest RAM through FUSE, overlapped with the
                     device-state save (QMP migrate, no RAM); both are also
                     reported on their own as final_flush and state_save
    final_dirty_list the last DirtyList and its DirtyAck (one round trip)
    handoff          the HANDOFF event (with the device state) reaching the destination
    state_load       migrate-incoming on the destination (it reads guest RAM: virtio
                     rings; absent blocks are fetched on demand)
    cont             QMP cont until QEMU's RESUME event
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

STEPS = ("pause", "flush_and_save", "final_dirty_list", "handoff", "state_load", "cont")
OVERLAPPED = ("final_flush", "state_save")


class Mark(enum.Enum):
    """Timestamps of the suspend/hand-off sequence (monotonic seconds)."""

    SUSPEND = "suspend"            # suspend hook entered (before-suspend hook, if any, runs)
    PAUSE = "pause"                # QMP stop sent: downtime starts
    PAUSED = "paused"
    FLUSHED = "flushed"
    STATE_SAVED = "state_saved"
    SUSPENDED = "suspended"        # both of the above done
    DIRTY_ACKED = "dirty_acked"    # final DirtyAck received (payload being built)
    HANDOFF_RECEIVED = "handoff_received"
    STATE_LOADED = "state_loaded"
    RUNNING = "running"            # RESUME event on the destination: downtime ends
    HANDOFF_ACKED = "handoff_acked"


def breakdown_ms(t: dict[str, float]) -> dict[str, float]:
    """Per-step durations in ms from a merged timeline (steps with a missing mark are left out)."""
    order = [Mark.PAUSE, Mark.PAUSED, Mark.SUSPENDED, Mark.DIRTY_ACKED,
             Mark.HANDOFF_RECEIVED, Mark.STATE_LOADED, Mark.RUNNING]
    out: dict[str, float] = {}
    pairs = [*zip(STEPS, itertools.pairwise(order), strict=True),
             ("final_flush", (Mark.PAUSED, Mark.FLUSHED)),
             ("state_save", (Mark.PAUSED, Mark.STATE_SAVED))]
    for step, (a, b) in pairs:
        if a.value in t and b.value in t:
            out[step] = round((t[b.value] - t[a.value]) * 1e3, 3)
    return out


@dataclass(slots=True)
class SourceReport:
    """The source's view: the migrator's report plus the VM-level timeline."""

    vm: str
    outcome: str = "running"
    error: str | None = None
    handed_off: bool = False
    timeline: dict[str, float] = field(default_factory=dict)
    before_suspend_ms: float | None = None
    state_bytes: int = 0
    flush_bytes: int = 0
    state_in_payload: bool = True
    downtime_source_ms: float | None = None   # pause -> hand-off acknowledged
    digests: dict[str, str] = field(default_factory=dict)
    migration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class DestinationReport:
    """The destination's view, including the source's timeline from the payload."""

    vm: str
    outcome: str = "running"
    error: str | None = None
    handed_off: bool = False
    timeline: dict[str, float] = field(default_factory=dict)
    source_timeline: dict[str, float] = field(default_factory=dict)
    qemu_spawn_ms: float | None = None
    qemu_ready_before_handoff: bool = False
    after_resume_ms: float | None = None
    clock_offset_ns: int | None = None
    state_bytes: int = 0
    prefetch_windows: int = 0             # ring windows warmed before the state load
    prefetch_ms: float | None = None
    prefetch_ram_reads: int = 0           # FUSE reads while warming (0: stored, not read)
    state_load_ram_reads: int = 0         # FUSE reads of guest RAM during the state load
    state_load_ram_read_bytes: int = 0
    cont_ram_reads: int = 0               # FUSE reads of guest RAM between cont and RESUME
    cont_ram_read_bytes: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    source_digests: dict[str, str] = field(default_factory=dict)
    receive: dict[str, Any] = field(default_factory=dict)

    @property
    def downtime_ms(self) -> float | None:
        """Source paused -> destination running (same-machine clocks)."""
        start = self.source_timeline.get(Mark.PAUSE.value)
        end = self.timeline.get(Mark.RUNNING.value)
        if start is None or end is None:
            return None
        return round((end - start) * 1e3, 3)

    @property
    def downtime_steps_ms(self) -> dict[str, float]:
        return breakdown_ms({**self.source_timeline, **self.timeline})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["downtime_ms"] = self.downtime_ms
        data["downtime_steps_ms"] = self.downtime_steps_ms
        return data
