"""The figures a user reads after ``ferry vm migrate``: one frozen value, JSON-able.

Built on the source from its own report, the destination's report (when it
came back) and the clock offset measured with it. The downtime figures are
the ones of :mod:`ferry.live.downtime`, each named for what it measures.

The summary crosses the VM holder's control socket (and is what
``ferry vm migrate --json`` prints), so :meth:`MigrationSummary.from_json`
checks every field's type, bounds every string, map and number, and raises
:class:`~ferry.live.errors.MalformedSummaryError` naming the first bad field.
The JSON is flat (the downtime's keys sit beside the others)::

    {"vm": "r1", "outcome": "completed", "handed_off": true, "mode": "hybrid",
     "downtime_source_view_ms": 52.1, "downtime_corrected_ms": 40.3,
     "downtime_corrected_uncertainty_ms": 2.5,
     "downtime_steps_ms": {"pause": 1.2, ...},
     "clock": {"offset_ms": 4990000.0, "rtt_ms": 1.0, "samples": 5} | null,
     "total_s": 1.5, "precopy_s": 1.2, "postcopy_s": 0.3, "cycles": 3,
     "stop_reason": "small-dirty-set", "postcopy_fetches": 2,
     "bytes_total": 1048576, "wire_bytes": 4096,
     "devices": {"memory": {"size_bytes": 1048576, "bytes_by_phase": {"precopy": 1048576},
                            "zero_blocks": 15, "postcopy_fetches": 0,
                            "base_blocks": 0}},
     "verified": true}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry.live import checks
from ferry.live.clock import ClockFigures, ClockOffset
from ferry.live.downtime import Downtime
from ferry.live.errors import MalformedSummaryError
from ferry.live.report import MAX_ITEMS, DestinationReport, SourceReport
from ferry.migration.policy import Mode, StopReason

MAX_DEVICES = MAX_ITEMS
"""A VM has a memory device, a state device and at most 16 disks (as in its reports)."""
MAX_PHASES = 16
"""Entries of a device's ``bytes_by_phase``: one per migration phase (there are 7)."""
MEMORY_DEVICE = "memory"
QEMU_STREAM_PHASE = "qemu_stream"
"""The ``bytes_by_phase`` entry of guest RAM that went in QEMU's own stream."""
MAX_BUCKETS = 32
"""Entries of ``fault_latency_buckets`` (:data:`ferry.latency.BUCKETS_MS` has 14, +Inf)."""
MAX_STEPS = 16
"""Entries of ``downtime_steps_ms``: the downtime's steps and overlapped parts (8 today)."""

@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """One device's share: bytes sent per migration phase, zero blocks, post-copy fetches,
    and blocks the destination had from its copy of the device's base (not sent)."""

    size_bytes: int
    bytes_by_phase: dict[str, int]
    zero_blocks: int
    postcopy_fetches: int
    base_blocks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"size_bytes": self.size_bytes, "bytes_by_phase": dict(self.bytes_by_phase),
                "zero_blocks": self.zero_blocks, "postcopy_fetches": self.postcopy_fetches,
                "base_blocks": self.base_blocks}

    @classmethod
    def from_json(cls, data: object, what: str) -> DeviceSummary:
        """Raises ValueError naming the first bad field (``what`` says which device)."""
        d = _object(data, what)
        phases = _object(d.get("bytes_by_phase"), f"{what}.bytes_by_phase", MAX_PHASES)
        return cls(size_bytes=_count(d.get("size_bytes"), f"{what}.size_bytes"),
                   bytes_by_phase={checks.text(k, f"{what}.bytes_by_phase"):
                                   _count(v, f"{what}.bytes_by_phase[{k!r:.40}]")
                                   for k, v in phases.items()},
                   zero_blocks=_count(d.get("zero_blocks"), f"{what}.zero_blocks"),
                   postcopy_fetches=_count(d.get("postcopy_fetches"),
                                           f"{what}.postcopy_fetches"),
                   base_blocks=_count(d.get("base_blocks", 0), f"{what}.base_blocks"))


@dataclass(frozen=True, slots=True)
class MigrationSummary:
    """Downtime, total time, bytes per device and phase, cycles, post-copy fetches.

    The migrator's figures are None when the migration failed before it reported.
    """

    vm: str
    outcome: str
    """The source's outcome: ``completed``, ``failed`` or ``running``."""
    handed_off: bool
    downtime: Downtime
    mode: Mode | None = None
    total_s: float | None = None
    precopy_s: float | None = None
    postcopy_s: float | None = None
    cycles: int | None = None
    stop_reason: StopReason | None = None
    """Why the dirty cycles ended (None: post-copy mode, or no migrator report)."""
    postcopy_fetches: int | None = None
    bytes_total: int | None = None
    wire_bytes: int | None = None
    devices: dict[str, DeviceSummary] = field(default_factory=dict)
    verified: bool | None = None
    """Every block checked by the destination (None: its report did not come back)."""
    faults: int | None = None
    """The destination VM's reads that waited for a block still in flight (post-copy)."""
    fault_latency_ms_p50: float | None = None
    fault_latency_ms_p90: float | None = None
    fault_latency_ms_max: float | None = None
    fault_latency_ms_sum: float | None = None
    fault_latency_buckets: tuple[int, ...] = ()
    """Waits per bucket of :data:`ferry.latency.BUCKETS_MS` (and +Inf)."""

    @classmethod
    def of(cls, source: SourceReport, destination: DestinationReport | None,
           clock: ClockOffset | None) -> MigrationSummary:
        downtime = Downtime.measure(
            source.timeline, None if destination is None else destination.timeline, clock)
        verified = None if destination is None else destination.verified
        summary = cls(vm=source.vm, outcome=source.outcome, handed_off=source.handed_off,
                      downtime=downtime, verified=verified)
        if destination is not None:
            summary = dataclasses.replace(
                summary, faults=destination.faults,
                fault_latency_ms_p50=destination.fault_wait_ms_p50,
                fault_latency_ms_p90=destination.fault_wait_ms_p90,
                fault_latency_ms_max=destination.fault_wait_ms_max,
                fault_latency_ms_sum=destination.fault_wait_ms_sum,
                fault_latency_buckets=tuple(destination.fault_wait_buckets))
        mig = source.migration
        if mig is None:
            return summary
        devices = {d.name: DeviceSummary(d.size_bytes, dict(d.bytes_by_phase), d.zero_blocks,
                                         d.postcopy_fetches, d.base_blocks)
                   for d in mig.devices}
        if source.ram_stream_bytes:
            # Guest RAM went in QEMU's stream, not through the migrator.
            devices[MEMORY_DEVICE] = DeviceSummary(
                source.memory_bytes, {QEMU_STREAM_PHASE: source.ram_stream_bytes}, 0, 0)
        return dataclasses.replace(
            summary, mode=Mode(mig.mode), total_s=mig.total_s, precopy_s=mig.precopy_s,
            postcopy_s=mig.postcopy_s, cycles=mig.cycles,
            stop_reason=None if mig.stop_reason is None else StopReason(mig.stop_reason),
            postcopy_fetches=mig.postcopy_fetches,
            bytes_total=sum(d.bytes_total for d in mig.devices) + source.ram_stream_bytes,
            wire_bytes=sum(d.wire_bytes for d in mig.devices)
            + (source.ram_wire_bytes or source.ram_stream_bytes),
            devices=devices)

    def to_json(self) -> dict[str, Any]:
        """Keys: vm, outcome, handed_off, mode, the ``downtime_*`` figures and ``clock``
        (:meth:`Downtime.to_json`), total_s, precopy_s, postcopy_s, cycles, stop_reason,
        postcopy_fetches, bytes_total, wire_bytes, devices, verified."""
        return {"vm": self.vm, "outcome": self.outcome, "handed_off": self.handed_off,
                "mode": None if self.mode is None else self.mode.value,
                **self.downtime.to_json(), "total_s": self.total_s,
                "precopy_s": self.precopy_s, "postcopy_s": self.postcopy_s,
                "cycles": self.cycles,
                "stop_reason": None if self.stop_reason is None else self.stop_reason.value,
                "postcopy_fetches": self.postcopy_fetches,
                "bytes_total": self.bytes_total, "wire_bytes": self.wire_bytes,
                "devices": {name: d.to_json() for name, d in self.devices.items()},
                "verified": self.verified, "faults": self.faults,
                "fault_latency_ms_p50": self.fault_latency_ms_p50,
                "fault_latency_ms_p90": self.fault_latency_ms_p90,
                "fault_latency_ms_max": self.fault_latency_ms_max,
                "fault_latency_ms_sum": self.fault_latency_ms_sum,
                "fault_latency_buckets": list(self.fault_latency_buckets)}

    @classmethod
    def from_json(cls, data: object) -> MigrationSummary:
        """The summary :meth:`to_json` gave, every field checked; unknown keys are ignored.

        Raises :class:`MalformedSummaryError` naming the first bad field.
        """
        try:
            return cls._from_json(data)
        except ValueError as exc:
            raise MalformedSummaryError(f"bad migration summary: {exc}") from None

    @classmethod
    def _from_json(cls, data: object) -> MigrationSummary:
        d = _object(data, "summary")
        devices = _object(d.get("devices", {}), "devices", MAX_DEVICES)
        return cls(
            vm=checks.text(d.get("vm"), "vm"), outcome=checks.text(d.get("outcome"), "outcome"),
            handed_off=checks.boolean(d.get("handed_off"), "handed_off"),
            downtime=_downtime(d),
            mode=_maybe(d, "mode", lambda v, w: _enum(Mode, v, w)),
            total_s=_maybe(d, "total_s", checks.finite),
            precopy_s=_maybe(d, "precopy_s", checks.finite),
            postcopy_s=_maybe(d, "postcopy_s", checks.finite),
            cycles=_maybe(d, "cycles", _count),
            stop_reason=_maybe(d, "stop_reason", lambda v, w: _enum(StopReason, v, w)),
            postcopy_fetches=_maybe(d, "postcopy_fetches", _count),
            bytes_total=_maybe(d, "bytes_total", _count),
            wire_bytes=_maybe(d, "wire_bytes", _count),
            devices={checks.text(name, "device name"):
                     DeviceSummary.from_json(dev, f"devices[{name!r:.40}]")
                     for name, dev in devices.items()},
            verified=_maybe(d, "verified", checks.boolean),
            faults=_maybe(d, "faults", _count),
            fault_latency_ms_p50=_maybe(d, "fault_latency_ms_p50", checks.finite),
            fault_latency_ms_p90=_maybe(d, "fault_latency_ms_p90", checks.finite),
            fault_latency_ms_max=_maybe(d, "fault_latency_ms_max", checks.finite),
            fault_latency_ms_sum=_maybe(d, "fault_latency_ms_sum", checks.finite),
            fault_latency_buckets=_buckets(d.get("fault_latency_buckets", [])))


# -- checking a summary that crossed a socket ----------------------------------------------

T = TypeVar("T")
E = TypeVar("E", Mode, StopReason)


def _object(value: object, what: str, max_items: int | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    if max_items is not None and len(value) > max_items:
        raise ValueError(f"{what} has {len(value)} entries, over the limit of {max_items}")
    return value


def _count(value: object, what: str) -> int:
    return checks.integer(value, what, low=0)


def _buckets(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_BUCKETS:
        raise ValueError(f"fault_latency_buckets must be a list of at most {MAX_BUCKETS} "
                         "counts")
    return tuple(_count(v, "fault_latency_buckets") for v in value)


def _enum(kind: type[E], value: object, what: str) -> E:
    text = checks.text(value, what)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} must be one of {[m.value for m in kind]}, "
                         f"got {text!r:.40}") from None


def _maybe(d: Mapping[str, Any], key: str,
           check: Callable[[object, str], T]) -> T | None:
    value = d.get(key)
    return None if value is None else check(value, key)


def _downtime(d: Mapping[str, Any]) -> Downtime:
    steps = _object(d.get("downtime_steps_ms", {}), "downtime_steps_ms", MAX_STEPS)
    clock = d.get("clock")
    if clock is not None:
        c = _object(clock, "clock")
        clock = ClockFigures(offset_ms=checks.finite(c.get("offset_ms"), "clock.offset_ms"),
                             rtt_ms=checks.finite(c.get("rtt_ms"), "clock.rtt_ms"),
                             samples=_count(c.get("samples"), "clock.samples"))
    return Downtime(
        source_view_ms=_maybe(d, "downtime_source_view_ms", checks.finite),
        corrected_ms=_maybe(d, "downtime_corrected_ms", checks.finite),
        corrected_uncertainty_ms=_maybe(d, "downtime_corrected_uncertainty_ms", checks.finite),
        steps_ms={checks.text(k, "downtime_steps_ms"):
                  checks.finite(v, f"downtime_steps_ms[{k!r:.40}]") for k, v in steps.items()},
        clock=clock)
