"""Devices over a shared base: only what the VM changed travels, and a wrong base is caught.

A VM run from a package keeps its changes in overlays over the package's
files. When the destination has the same package, the arriving devices are
overlays over its own copy and the source says ``YouHave`` for every block
the VM never wrote. These tests move such a VM A -> B -> C in memory (real
overlays over real files, no QEMU) with a writer running, and check the
contents, the bytes on the wire, a destination without the base, and a
destination whose "same" base holds other bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from ferry.errors import IntegrityError
from ferry.migration.channel import memory_channel_pair
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy
from ferry.migration.report import MigrationReport
from ferry.migration.source import MigrationHooks, Migrator
from ferry.protocol.messages import DeviceInfo
from ferry.storage import FileDevice, OverlayDevice
from ferry.testing.live import sample_manifest
from ferry.vm.devices import (
    DISK_PREFIX,
    MEMORY,
    Bases,
    VMDevices,
    incoming_devices,
    local_devices,
    memory_backing,
    wire_order,
)
from ferry.vm.manifest import DeviceEntry
from ferry.vm.overlays import PackageBases, base_hash, base_id, package_overlay
from ferry.vm.pkgcache import OpenedPackage

BS = 4096
FAST = DirtyPolicy(max_dirty_blocks=4, min_cycles_below=2, max_cycles=6, cycle_throttle_s=0.01)
BLOCKS = 256
SIZE = BLOCKS * BS
PACKAGE_ID = "ab" * 32


def write_base(path: Path, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(SIZE))


def overlay(base: Path, upper: Path) -> OverlayDevice:
    return OverlayDevice(FileDevice(base, read_only=True), upper, block_size_bytes=BS,
                         base_id=base_id(PACKAGE_ID, "root"), name="root")


def bases_from(base: Path, directory: Path) -> Bases:
    """What PackageBases does, for a base file outside a package cache."""
    def find(info: DeviceInfo) -> OverlayDevice | None:
        if info.base_hash != base_hash(base_id(PACKAGE_ID, "root")):
            return None
        directory.mkdir(exist_ok=True)
        return overlay(base, directory / "root.ovl")
    return find


async def contents(devices: VMDevices) -> dict[str, bytes]:
    return {d.name: await d.vm_handle.read_at(0, d.vm_handle.size_bytes) for d in devices.all()}


async def hop(src: VMDevices, bases: Bases | None, *, seed: int,
              ) -> tuple[VMDevices, dict[str, bytes], MigrationReport]:
    """Migrate ``src`` while a writer changes a few blocks; the new stacks, the contents at
    the hand-off and the source's report."""
    a, b = memory_channel_pair()
    stop = asyncio.Event()
    at_handoff: dict[str, bytes] = {}
    made: list[VMDevices] = []

    async def write() -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            dev = rnd.choice(src.all()).vm_handle
            await dev.write_at(rnd.randrange(8) * BS + rnd.randrange(BS - 64),
                               rnd.randbytes(64))
            await asyncio.sleep(0.001)

    async def suspend() -> None:
        stop.set()
        at_handoff.update(await contents(src))

    async def open_devices(infos: Sequence[DeviceInfo]) -> Sequence[DestinationDevice]:
        devices, dest = await incoming_devices(infos, memory_backing, "vm", bases=bases)
        made.append(devices)
        return dest

    migrator = Migrator([d.source_device() for d in wire_order(src)], a, policy=FAST,
                        hooks=MigrationHooks(suspend=suspend))
    receiver = Receiver(b, open_devices)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(write())
        tg.create_task(receiver.run())
        report = await migrator.run()
        await writer
    await src.close()
    return made[0], at_handoff, report


def root_report(report: MigrationReport) -> tuple[int, int]:
    """(blocks said to be in the base, bytes sent) for the root disk."""
    d = next(d for d in report.devices if d.name == DISK_PREFIX + "root")
    return d.base_blocks, d.bytes_total


async def test_only_changed_blocks_travel_along_a_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    write_base(base, 1)
    memory = memory_backing(MEMORY, 8 * BS)
    devices = local_devices(memory, {"root": overlay(base, tmp_path / "a.ovl")},
                            block_size_bytes=BS)
    await devices.disks["root"].vm_handle.write_at(100 * BS, b"\x01" * BS)  # before the move
    for seed, host in enumerate("BCD"):
        devices, expected, report = await hop(devices, bases_from(base, tmp_path / host),
                                              seed=seed)
        assert await contents(devices) == expected
        in_base, sent = root_report(report)
        # The writer touches blocks 0..7 only; block 100 was changed on A.
        assert in_base >= BLOCKS - 9
        assert sent <= 16 * BS  # the changed blocks, maybe twice, never the whole disk
        assert isinstance(devices.disks["root"].stack.provider, OverlayDevice)
    await devices.close()


async def test_a_destination_without_the_base_gets_every_block(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    write_base(base, 2)
    devices = local_devices(memory_backing(MEMORY, 8 * BS),
                            {"root": overlay(base, tmp_path / "a.ovl")}, block_size_bytes=BS)
    devices, expected, report = await hop(devices, None, seed=5)
    assert await contents(devices) == expected
    in_base, sent = root_report(report)
    assert in_base == 0
    assert sent >= SIZE
    # ... and from there on (no overlay at B) the next hop offers no base either.
    devices, expected, report = await hop(devices, bases_from(base, tmp_path / "C"), seed=6)
    assert await contents(devices) == expected
    assert root_report(report)[0] == 0
    await devices.close()


async def test_a_base_with_other_bytes_under_the_same_name_is_caught(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    write_base(base, 3)
    other = tmp_path / "other.img"  # a cache entry that rotted, or lies
    write_base(other, 4)
    devices = local_devices(memory_backing(MEMORY, 8 * BS),
                            {"root": overlay(base, tmp_path / "a.ovl")}, block_size_bytes=BS)
    with pytest.raises(ExceptionGroup) as caught:
        await hop(devices, bases_from(other, tmp_path / "B"), seed=7)
    assert caught.group_contains(IntegrityError)


def package(tmp_path: Path) -> OpenedPackage:
    m = sample_manifest()
    m = dataclasses.replace(m, disks=(DeviceEntry("root", "disks/root.img", SIZE, BS,
                                                  "hashes/root.xxh3"),))
    (tmp_path / "pkg" / "disks").mkdir(parents=True)
    write_base(tmp_path / "pkg" / "disks" / "root.img", 5)
    return OpenedPackage(tmp_path / "pkg", PACKAGE_ID, m, cache_hit=True)


async def test_package_bases_match_by_name_and_shape(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    (tmp_path / "ovl").mkdir()
    bases = PackageBases(pkg, tmp_path / "ovl")
    named = base_hash(base_id(PACKAGE_ID, "root"))
    found = bases(DeviceInfo("disk/root", SIZE, BS, named))
    assert isinstance(found, OverlayDevice)
    assert await found.read_at(0, SIZE) == (tmp_path / "pkg/disks/root.img").read_bytes()
    await found.close()
    assert bases(DeviceInfo("disk/root", SIZE, BS, None)) is None
    assert bases(DeviceInfo("disk/root", SIZE, BS, base_hash(b"another package"))) is None
    assert bases(DeviceInfo("disk/root", SIZE * 2, BS, named)) is None  # another shape
    assert bases(DeviceInfo("disk/root", SIZE, BS * 2, named)) is None
    # The runner's overlays carry the same name, so a VM run here offers this base.
    ovl = package_overlay(pkg, pkg.manifest.disks[0], tmp_path / "ovl")
    assert base_hash(ovl.base_id) == named
    await ovl.close()
