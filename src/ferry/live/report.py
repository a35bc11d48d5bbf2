"""What each side of a live migration reports.

Each report carries its side's :class:`~ferry.live.timeline.Timeline` (that
host's clock only). The downtime across both hosts is put together on the
source from its own timeline, the destination's report (which comes back in
the report frame, :mod:`ferry.live.report_exchange`) and the clock offset
measured there: see :mod:`ferry.live.downtime`.

The destination's report arrives from a peer, so :meth:`DestinationReport.from_json`
checks every field's type and bounds every string, list and map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry.errors import RemoteProtocolError
from ferry.live import checks
from ferry.live.timeline import Mark, Side, Timeline
from ferry.migration.destination import ReceiveReport
from ferry.migration.report import MigrationReport

MAX_ITEMS = 64
"""Devices: a VM has a memory device and at most 16 disks."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


@dataclass(slots=True)
class SourceReport:
    """The source's view: the migrator's report plus the VM-level timeline."""

    vm: str
    outcome: str = "running"
    error: str | None = None
    handed_off: bool = False
    timeline: Timeline = field(default_factory=lambda: Timeline(Side.SOURCE))
    before_suspend_ms: float | None = None
    state_bytes: int = 0
    flush_bytes: int = 0
    migration: MigrationReport | None = None
    ram_path: str = "engine"
    ram_path_reason: str | None = None
    ram_stream_bytes: int = 0
    """Bytes of QEMU's migration stream (guest RAM and device state), as QEMU wrote it."""
    ram_wire_bytes: int = 0
    """What went on the link for it: frames, chunks compressed where it paid."""
    ram_compression: dict[str, Any] | None = None
    """What the link's compression chose and measured (:mod:`ferry.migration.autocompress`)."""
    memory_bytes: int = 0
    """The guest's RAM size (what the stream moved)."""
    qemu_downtime_ms: float | None = None
    """QEMU's own downtime figure for its stream (source's view)."""
    downtime_limit_raised_to_ms: int | None = None
    """Set when QEMU's precopy did not converge in time and its limit was raised."""

    @property
    def downtime_source_view_ms(self) -> float | None:
        """Source paused -> the destination's "running" acknowledgement received (source
        clock): an upper bound of the downtime (see :mod:`ferry.live.downtime`)."""
        return _ms(self.timeline.span_s(Mark.PAUSE, Mark.HANDOFF_ACKED))

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "outcome": self.outcome, "error": self.error,
                "handed_off": self.handed_off, "timeline": self.timeline.to_json(),
                "before_suspend_ms": self.before_suspend_ms, "state_bytes": self.state_bytes,
                "flush_bytes": self.flush_bytes, "ram_path": self.ram_path,
                "ram_path_reason": self.ram_path_reason,
                "ram_stream_bytes": self.ram_stream_bytes,
                "ram_wire_bytes": self.ram_wire_bytes,
                "ram_compression": self.ram_compression,
                "qemu_downtime_ms": self.qemu_downtime_ms,
                "downtime_limit_raised_to_ms": self.downtime_limit_raised_to_ms,
                "downtime_source_view_ms": self.downtime_source_view_ms,
                "migration": None if self.migration is None else self.migration.to_json()}


@dataclass(slots=True)
class DestinationReport:
    """The destination's view, on the destination's clock."""

    vm: str
    outcome: str = "running"
    error: str | None = None
    handed_off: bool = False
    timeline: Timeline = field(default_factory=lambda: Timeline(Side.DESTINATION))
    qemu_spawn_ms: float | None = None
    qemu_ready_before_handoff: bool = False
    after_resume_ms: float | None = None
    clock_offset_ns: int | None = None
    """The guest's clock against this host's, as the agent's after-resume sync found it."""
    state_bytes: int = 0
    prefetch_windows: int = 0             # ring windows warmed before the state load
    prefetch_ms: float | None = None
    prefetch_ram_reads: int = 0           # FUSE reads while warming (0: stored, not read)
    state_load_ram_reads: int = 0         # FUSE reads of guest RAM during the state load
    state_load_ram_read_bytes: int = 0
    cont_ram_reads: int = 0               # FUSE reads of guest RAM between cont and RESUME
    cont_ram_read_bytes: int = 0
    ram_stream_bytes: int = 0             # QEMU's stream (RAM, device state) received
    cont_reply_ms: float | None = None    # QMP cont until its reply (disks re-activated)
    faults: int = 0                       # reads (FUSE, NBD) that waited for a block in flight
    fault_wait_ms_p50: float | None = None
    fault_wait_ms_p90: float | None = None
    fault_wait_ms_max: float | None = None
    fault_wait_ms_sum: float = 0.0
    fault_wait_buckets: list[int] = field(default_factory=list)
    """Waits per bucket of :data:`ferry.latency.BUCKETS_MS` (and +Inf)."""
    receive: ReceiveReport | None = None

    @property
    def handoff_to_running_ms(self) -> float | None:
        """HANDOFF received -> guest running, on this host's clock alone."""
        return _ms(self.timeline.span_s(Mark.HANDOFF_RECEIVED, Mark.RUNNING))

    @property
    def verified(self) -> bool:
        return self.receive is not None and self.receive.verified

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["timeline"] = self.timeline.to_json()
        data["receive"] = None if self.receive is None else dataclasses.asdict(self.receive)
        data["handoff_to_running_ms"] = self.handoff_to_running_ms
        return data

    @classmethod
    def from_json(cls, data: object) -> DestinationReport:
        """A peer's report, every field checked (RemoteProtocolError names the first bad one)."""
        if not isinstance(data, dict):
            raise RemoteProtocolError("the destination's report is not a JSON object")
        report = _flat_from_json(cls, data, special=("timeline", "receive"))
        report.timeline = Timeline.from_json(Side.DESTINATION, data.get("timeline", {}))
        if (receive := data.get("receive")) is not None:
            if not isinstance(receive, dict):
                raise RemoteProtocolError("receive is not a JSON object")
            report.receive = _flat_from_json(ReceiveReport, receive, special=())
        return report


# -- checking a peer's report ----------------------------------------------------------

def _counts(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ValueError(f"{what} must be a list of at most {MAX_ITEMS} items")
    return [checks.integer(v, what) for v in value]


def _texts(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ValueError(f"{what} must be a list of at most {MAX_ITEMS} items")
    return [checks.text(v, what) for v in value]


_CHECKS: dict[str, Callable[[object, str], object]] = {
    "str": checks.text, "int": checks.integer, "float": checks.finite, "bool": checks.boolean,
    "list[str]": _texts, "list[int]": _counts}
"""A checker per annotation (the modules use ``from __future__ import annotations``,
so annotations are strings); ``X | None`` also takes null."""

T = TypeVar("T")


def _flat_from_json(cls: type[T], data: dict[str, Any], *, special: tuple[str, ...]) -> T:
    """``cls(**data)`` with every field of a plain type checked; ``special`` fields are
    left at their defaults for the caller; unknown keys are ignored."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in special or f.name not in data:
            continue
        kind = str(f.type)
        optional = kind.endswith(" | None")
        check = _CHECKS[kind.removesuffix(" | None")]
        value = data[f.name]
        try:
            values[f.name] = None if optional and value is None else check(value, f.name)
        except ValueError as exc:
            raise RemoteProtocolError(f"{cls.__name__}: {exc}") from None
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise RemoteProtocolError(f"{cls.__name__}: {exc}") from None
