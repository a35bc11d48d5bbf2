"""What a migration reports: times, bytes per device and phase, cycles, fetches."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class DeviceReport:
    name: str
    size_bytes: int
    block_count: int
    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    blocks_by_phase: dict[str, int] = field(default_factory=dict)
    wire_bytes: int = 0
    zero_blocks: int = 0
    base_blocks: int = 0
    dirty_blocks_by_cycle: list[int] = field(default_factory=list)
    """Blocks found by each dirty scan, then the final dirty list's (which also holds
    a stopping scan's blocks when they were not re-sent: see ``stop_reason``)."""
    postcopy_fetches: int = 0

    def add(self, phase: str, blocks: int, nbytes: int) -> None:
        self.blocks_by_phase[phase] = self.blocks_by_phase.get(phase, 0) + blocks
        self.bytes_by_phase[phase] = self.bytes_by_phase.get(phase, 0) + nbytes

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_phase.values())


@dataclass(slots=True)
class MigrationReport:
    devices: list[DeviceReport]
    mode: str = "hybrid"
    cycles: int = 0
    stop_reason: str | None = None
    """Why the dirty cycles ended (a :class:`~ferry.migration.policy.StopReason` value);
    None in post-copy mode (no cycles) or when the migration failed before."""
    total_s: float = 0.0
    precopy_s: float = 0.0
    suspend_to_handoff_ack_s: float | None = None
    """Suspend hook entered -> hand-off acknowledged: includes the VM layer's work before
    it pauses (agent hooks, a flush while the guest runs), so it is not the VM's downtime."""
    postcopy_s: float = 0.0
    postcopy_fetches: int = 0
    outcome: str = "running"
    compression: dict[str, Any] | None = None
    """What the link's compression chose and measured for blocks sent plain by their
    device's setting (:mod:`ferry.migration.autocompress`); None when not asked."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["bytes_total"] = sum(d.bytes_total for d in self.devices)
        data["wire_bytes"] = sum(d.wire_bytes for d in self.devices)
        return data
