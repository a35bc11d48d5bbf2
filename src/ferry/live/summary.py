"""The figures a user reads after ``ferry vm migrate``: one frozen value, JSON-able.

Built on the source from its own report, the destination's report (when it
came back) and the clock offset measured with it. The downtime figures are
the ones of :mod:`ferry.live.downtime`, each named for what it measures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ferry.live.clock import ClockOffset
from ferry.live.downtime import Downtime
from ferry.live.report import DestinationReport, SourceReport


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    size_bytes: int
    bytes_by_phase: dict[str, int]
    zero_blocks: int
    postcopy_fetches: int


@dataclass(frozen=True, slots=True)
class MigrationSummary:
    """Downtime, total time, bytes per device and phase, cycles, post-copy fetches.

    The migrator's figures are None when the migration failed before it reported.
    """

    vm: str
    outcome: str
    handed_off: bool
    downtime: Downtime
    mode: str | None = None
    total_s: float | None = None
    precopy_s: float | None = None
    postcopy_s: float | None = None
    cycles: int | None = None
    stop_reason: str | None = None
    """Why the dirty cycles ended (:class:`~ferry.migration.policy.StopReason` value)."""
    postcopy_fetches: int | None = None
    bytes_total: int | None = None
    wire_bytes: int | None = None
    devices: dict[str, DeviceSummary] = field(default_factory=dict)
    verified: bool | None = None
    """Every block checked by the destination (None: its report did not come back)."""

    @classmethod
    def of(cls, source: SourceReport, destination: DestinationReport | None,
           clock: ClockOffset | None) -> MigrationSummary:
        downtime = Downtime.measure(
            source.timeline, None if destination is None else destination.timeline, clock)
        verified = None if destination is None else destination.verified
        summary = cls(vm=source.vm, outcome=source.outcome, handed_off=source.handed_off,
                      downtime=downtime, verified=verified)
        mig = source.migration
        if mig is None:
            return summary
        return dataclasses.replace(
            summary, mode=mig.mode, total_s=mig.total_s, precopy_s=mig.precopy_s,
            postcopy_s=mig.postcopy_s, cycles=mig.cycles, stop_reason=mig.stop_reason,
            postcopy_fetches=mig.postcopy_fetches,
            bytes_total=sum(d.bytes_total for d in mig.devices),
            wire_bytes=sum(d.wire_bytes for d in mig.devices),
            devices={d.name: DeviceSummary(d.size_bytes, dict(d.bytes_by_phase), d.zero_blocks,
                                           d.postcopy_fetches) for d in mig.devices})

    def to_json(self) -> dict[str, Any]:
        """Keys: vm, outcome, handed_off, mode, the ``downtime_*`` figures and ``clock``
        (:meth:`Downtime.to_json`), total_s, precopy_s, postcopy_s, cycles, stop_reason,
        postcopy_fetches, bytes_total, wire_bytes, devices, verified."""
        return {"vm": self.vm, "outcome": self.outcome, "handed_off": self.handed_off,
                "mode": self.mode, **self.downtime.to_json(), "total_s": self.total_s,
                "precopy_s": self.precopy_s, "postcopy_s": self.postcopy_s,
                "cycles": self.cycles, "stop_reason": self.stop_reason,
                "postcopy_fetches": self.postcopy_fetches,
                "bytes_total": self.bytes_total, "wire_bytes": self.wire_bytes,
                "devices": {name: dataclasses.asdict(d) for name, d in self.devices.items()},
                "verified": self.verified}
