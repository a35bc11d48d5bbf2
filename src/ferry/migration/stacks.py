"""Ready-made device stacks for the two sides of a migration.

Source: provider -> VolatilityMonitor -> dirty tracker, split into the
``local`` handle (what the VM, NBD or FUSE writes through) and the
``remote`` handle the migrator reads. Destination: provider -> waiting cache,
split into ``local`` (what the VM uses: reads of absent blocks wait) and
``remote`` (what the receiver writes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ferry.migration.blocks import Compression
from ferry.migration.destination import DestinationDevice
from ferry.migration.source import SourceDevice
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, Device
from ferry.storage.modules.dirty import DirtyLocal, DirtyRemote, dirty_tracker
from ferry.storage.modules.volatility import VolatilityMonitor
from ferry.storage.modules.waiting import WaitingLocal, WaitingRemote, waiting_cache


@dataclass(frozen=True, slots=True)
class SourceStack:
    name: str
    local: DirtyLocal
    remote: DirtyRemote
    volatility: VolatilityMonitor
    provider: Device
    """The device under the stack (what the monitor wraps)."""

    def source_device(
        self,
        *,
        compression: Compression = Compression.NONE,
        base_hash: bytes | None = None,
        base_blocks: Callable[[], frozenset[int]] | None = None,
    ) -> SourceDevice:
        return SourceDevice(
            self.name,
            self.remote,
            self.volatility,
            base_hash=base_hash,
            base_blocks=base_blocks,
            compression=compression,
        )

    async def close(self) -> None:
        await self.local.close()


def source_stack(
    name: str, device: Device, block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
) -> SourceStack:
    volatility = VolatilityMonitor(device, block_size_bytes)
    local, remote = dirty_tracker(volatility, block_size_bytes)
    return SourceStack(name, local, remote, volatility, device)


@dataclass(frozen=True, slots=True)
class DestinationStack:
    name: str
    local: WaitingLocal
    remote: WaitingRemote

    def destination_device(self, *, has_base: bool = False) -> DestinationDevice:
        return DestinationDevice(self.remote, has_base=has_base)

    async def close(self) -> None:
        await self.local.close()


def destination_stack(
    name: str, device: Device, block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
) -> DestinationStack:
    local, remote = waiting_cache(device, block_size_bytes)
    return DestinationStack(name, local, remote)
