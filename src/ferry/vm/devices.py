"""The device stacks of a VM that can move.

Every device of a live VM (guest RAM, each disk) is a *chainable* stack::

    provider ─ VolatilityMonitor ─ dirty tracker ─┬─ local ──[waiting cache]── what QEMU uses
                                                   └─ remote ── what the next migration reads

On the host where the VM was booted there is no waiting cache: QEMU (via
FUSE/NBD) writes the dirty tracker's local handle. On a destination the
receiver fills a waiting cache on top of the tracker's local handle, so reads
of blocks that have not arrived wait; once the migration in has completed the
very same stack can be migrated out again (A -> B -> C -> A).

Device names on the wire: ``memory`` and ``disk/<name>`` (QEMU's device
state travels in the HANDOFF payload, :mod:`ferry.live.payload`).

A device whose provider is an overlay over a package's file offers that
file as its base (:mod:`ferry.vm.overlays`); a destination that has the
same base (``Bases``) builds the device as an overlay over its own copy and
receives only the blocks the VM changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ferry.migration.destination import DestinationDevice
from ferry.migration.source import SourceDevice
from ferry.migration.stacks import SourceStack, source_stack
from ferry.protocol.messages import DeviceInfo
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, Device
from ferry.storage.modules.waiting import WaitingLocal, WaitingRemote, waiting_cache
from ferry.storage.providers.memory import MemoryDevice
from ferry.storage.providers.overlay import OverlayDevice
from ferry.vm.errors import DeviceSetError
from ferry.vm.overlays import base_hash

MEMORY = "memory"
DISK_PREFIX = "disk/"

Backing = Callable[[str, int], Device]
"""Makes the provider of a device from its wire name and size (default: MemoryDevice)."""

Bases = Callable[[DeviceInfo], Device | None]
"""A provider over this host's copy of the base a source's device names, or None
(:class:`ferry.vm.overlays.PackageBases`)."""


def memory_backing(name: str, size_bytes: int) -> Device:
    return MemoryDevice(size_bytes, name=name)


@dataclass(slots=True)
class LiveDevice:
    """One chainable stack; ``vm_handle`` is what QEMU (FUSE/NBD) uses."""

    name: str
    stack: SourceStack
    waiting_local: WaitingLocal | None = None
    waiting_remote: WaitingRemote | None = None

    @property
    def vm_handle(self) -> Device:
        return self.waiting_local if self.waiting_local is not None else self.stack.local

    def source_device(self) -> SourceDevice:
        """What the migrator reads; an overlay's device names its base."""
        provider = self.stack.provider
        if isinstance(provider, OverlayDevice):
            return self.stack.source_device(base_hash=base_hash(provider.base_id),
                                            base_blocks=provider.base_blocks)
        return self.stack.source_device()

    async def close(self) -> None:
        if self.waiting_local is not None:
            await self.waiting_local.close()
        else:
            await self.stack.close()


@dataclass(slots=True)
class VMDevices:
    """Guest RAM and the disks (first one is the root disk).

    ``memory`` is None where guest RAM is private to QEMU (it arrived in
    QEMU's own migration stream, :mod:`ferry.qemu.ramstream`)."""

    memory: LiveDevice | None
    disks: dict[str, LiveDevice] = field(default_factory=dict)

    def all(self) -> list[LiveDevice]:
        return [*([self.memory] if self.memory is not None else []), *self.disks.values()]

    def vm_disks(self) -> dict[str, Device]:
        """What :class:`~ferry.qemu.QemuVM` takes as ``disks``."""
        return {name: d.vm_handle for name, d in self.disks.items()}

    async def close(self) -> None:
        for dev in self.all():
            await dev.close()


def local_devices(memory: Device, disks: Mapping[str, Device] | None = None, *,
                  block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES) -> VMDevices:
    """Stacks for a VM booted on this host, over the given providers."""
    return VMDevices(
        memory=LiveDevice(MEMORY, source_stack(MEMORY, memory, block_size_bytes)),
        disks={n: LiveDevice(DISK_PREFIX + n, source_stack(DISK_PREFIX + n, d, block_size_bytes))
               for n, d in (disks or {}).items()},
    )


def incoming_device(info: DeviceInfo, backing: Backing,
                    bases: Bases | None = None) -> tuple[LiveDevice, bool]:
    """A chainable stack with a waiting cache on top, for a device described by the source,
    and whether it stands on a base found here (``bases``)."""
    provider = bases(info) if bases is not None and info.base_hash is not None else None
    has_base = provider is not None
    if provider is None:
        provider = backing(info.name, info.size_bytes)
    stack = source_stack(info.name, provider, info.block_size_bytes)
    local, remote = waiting_cache(stack.local, info.block_size_bytes)
    return LiveDevice(info.name, stack, local, remote), has_base


async def incoming_devices(infos: Sequence[DeviceInfo], backing: Backing, vm: str, *,
                           with_memory: bool = True, bases: Bases | None = None,
                           ) -> tuple[VMDevices, list[DestinationDevice]]:
    """The destination's stacks for the source's Hello, in the Hello's order (the memory
    device only ``with_memory``: else RAM comes in QEMU's stream), each over a base of
    ``bases`` where one matches. The caller closes the result (:meth:`VMDevices.close`)."""
    names = [i.name for i in infos]
    n_memory = names.count(MEMORY)
    n_disks = len({n for n in names if n.startswith(DISK_PREFIX)})
    if n_memory != int(with_memory) or n_memory + n_disks != len(names):
        raise DeviceSetError(f"unexpected device set {names}", vm=vm)
    made: list[LiveDevice] = []
    dest: list[DestinationDevice] = []
    try:
        for info in infos:
            device, has_base = incoming_device(info, backing, bases)
            made.append(device)
            assert device.waiting_remote is not None
            dest.append(DestinationDevice(device.waiting_remote, has_base=has_base))
    except BaseException:
        for device in made:
            await device.close()
        raise
    memory = [d for d in made if d.name == MEMORY]
    disks = {d.name[len(DISK_PREFIX):]: d for d in made if d.name.startswith(DISK_PREFIX)}
    return VMDevices(memory[0] if memory else None, disks), dest


def wire_order(devices: VMDevices) -> list[LiveDevice]:
    """Memory first (it is what the guest touches first after resume), then the disks."""
    return devices.all()
