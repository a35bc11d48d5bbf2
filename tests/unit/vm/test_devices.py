"""Chainable VM device stacks: A -> B -> C in memory, the guest writing all the way.

The destination's stacks (waiting cache over a dirty tracker) must be both
what a VM runs on after the hand-off and what the next migration reads, so a
VM can keep moving. No QEMU here: a task writes through the handles QEMU
would use (``vm_handle``) until the suspend hook "pauses" it, and after the
hand-off writes go on at the destination.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from ferry.migration.channel import memory_channel_pair
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy
from ferry.migration.source import MigrationHooks, Migrator
from ferry.protocol.messages import DeviceInfo
from ferry.storage.providers.memory import MemoryDevice
from ferry.vm.devices import (
    MEMORY,
    VMDevices,
    incoming_devices,
    local_devices,
    memory_backing,
    wire_order,
)
from ferry.vm.errors import DeviceSetError

BS = 4096
FAST = DirtyPolicy(max_dirty_blocks=4, min_cycles_below=2, max_cycles=6, cycle_throttle_s=0.01)
MEM = 64 * BS + 100  # a partial last block
DISK = 16 * BS


async def contents(devices: VMDevices) -> dict[str, bytes]:
    return {d.name: await d.vm_handle.read_at(0, d.vm_handle.size_bytes) for d in devices.all()}


async def hop(src: VMDevices, *, seed: int) -> tuple[VMDevices, dict[str, bytes]]:
    """Migrate ``src`` while writing to it; returns the new stacks and the hand-off contents."""
    a, b = memory_channel_pair()
    stop = asyncio.Event()
    at_handoff: dict[str, bytes] = {}
    made: list[VMDevices] = []

    async def write() -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            dev = rnd.choice(src.all()).vm_handle
            off = rnd.randrange(dev.size_bytes - 64)
            await dev.write_at(off, rnd.randbytes(rnd.randrange(1, 64)))
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()  # the "guest" is paused from here on
        at_handoff.update(await contents(src))

    async def open_devices(infos: Sequence[DeviceInfo]) -> Sequence[DestinationDevice]:
        devices, dest = await incoming_devices(infos, memory_backing, "vm")
        made.append(devices)
        return dest

    async def on_handoff(payload: bytes) -> None:
        # The guest runs at the destination from here: write a whole block, which
        # must win over anything the source still sends for it.
        assert made[0].memory is not None
        dev = made[0].memory.vm_handle
        await dev.write_at(0, b"\xee" * BS)
        at_handoff[MEMORY] = b"\xee" * BS + at_handoff[MEMORY][BS:]

    migrator = Migrator([d.source_device() for d in wire_order(src)], a, policy=FAST,
                        hooks=MigrationHooks(suspend=suspend))
    receiver = Receiver(b, open_devices, on_handoff=on_handoff)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(write())
        tg.create_task(receiver.run())
        await migrator.run()
        await writer
    return made[0], at_handoff


async def test_a_vm_keeps_moving_and_nothing_is_lost() -> None:
    rnd = random.Random(1)
    memory = MemoryDevice(MEM)
    await memory.write_at(0, rnd.randbytes(MEM))
    disk = MemoryDevice(DISK)
    await disk.write_at(0, rnd.randbytes(DISK))
    devices = local_devices(memory, {"root": disk}, block_size_bytes=BS)
    assert [d.name for d in wire_order(devices)] == [MEMORY, "disk/root"]
    for seed in range(3):  # A -> B -> C -> D
        devices, expected = await hop(devices, seed=seed)
        assert await contents(devices) == expected
        assert devices.memory is not None
        remote = devices.memory.waiting_remote
        assert remote is not None
        assert remote.missing() == []


async def test_unexpected_device_sets_are_refused() -> None:
    infos = [DeviceInfo("disk/root", BS, BS), DeviceInfo("swap", BS, BS)]
    with pytest.raises(DeviceSetError):
        await incoming_devices(infos, memory_backing, "vm")
    with pytest.raises(DeviceSetError):
        await incoming_devices([DeviceInfo(MEMORY, BS, BS), DeviceInfo(MEMORY, BS, BS)],
                         memory_backing, "vm")
    with pytest.raises(DeviceSetError):  # the state travels in the HANDOFF payload only
        await incoming_devices([DeviceInfo(MEMORY, BS, BS), DeviceInfo("state", BS, BS)],
                         memory_backing, "vm")
