"""migrate_out's hook order against a fake QemuVM and a real Receiver, in memory: pause before
the state is saved, the VM resumed if the hand-off fails, QEMU stopped only after the
destination acknowledged, which it does once its guest runs, and that stop never holding back
post-copy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from ferry.errors import FerryError
from ferry.live import payload as wire
from ferry.live.errors import LiveMigrationError
from ferry.live.rampath import RamPath
from ferry.live.source import LiveOptions, migrate_out
from ferry.live.timeline import Mark
from ferry.migration.channel import memory_channel_pair
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy
from ferry.migration.stacks import destination_stack
from ferry.protocol.messages import DeviceInfo
from ferry.qemu import DeviceStateStats, devstate
from ferry.storage.device import Device
from ferry.storage.providers.memory import MemoryDevice
from ferry.vm.devices import local_devices

BS = 4096
STATE = b"QEVM" + bytes(range(200))
OPTIONS = LiveOptions(policy=DirtyPolicy(max_dirty_blocks=4, min_cycles_below=1, max_cycles=3,
                                         cycle_throttle_s=0.0), agent_hooks=False,
                      ram=RamPath.ENGINE)


@dataclass
class FakeConfig:
    memory_bytes: int = 256 * 1024


class FakeQMP:
    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return []  # no virtio devices: nothing to prefetch


@dataclass
class FakeFlush:
    bytes_written: int = 0


@dataclass
class FakeVM:
    """The part of QemuVM migrate_out uses; every call lands in ``calls``."""

    calls: list[str]
    stop_s: float = 0.0
    name: str = "fake"
    config: FakeConfig = field(default_factory=FakeConfig)
    qmp: FakeQMP = field(default_factory=FakeQMP)
    stopped_at: float | None = None

    async def flush_memory(self) -> FakeFlush:
        self.calls.append("flush")
        return FakeFlush()

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def save_device_state(self, dest: Device, *, flush: bool = True) -> DeviceStateStats:
        self.calls.append("save")
        await devstate.store(dest, STATE, vm=self.name)
        return DeviceStateStats(state_bytes=len(STATE), migrate_s=0.0)

    async def stop(self) -> None:
        self.calls.append("stop")
        await asyncio.sleep(self.stop_s)
        self.stopped_at = time.monotonic()


@dataclass
class Destination:
    calls: list[str]
    fail: bool = False
    running_at: float | None = None
    completed_at: float | None = None
    state: bytes = b""

    async def open_devices(self, infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        return [destination_stack(i.name, MemoryDevice(i.size_bytes), i.block_size_bytes)
                .destination_device() for i in infos]

    async def on_handoff(self, data: bytes) -> None:
        self.state = wire.decode(data).state
        if self.fail:
            raise FerryError("the destination's QEMU refused the state")
        self.calls.append("destination running")
        self.running_at = time.monotonic()


async def run(vm: FakeVM, dest: Destination, *, network_hooks: bool = False) -> Any:
    a, b = memory_channel_pair()
    devices = local_devices(MemoryDevice(256 * 1024, name="memory"),
                            {"root": MemoryDevice(128 * 1024, name="root")},
                            block_size_bytes=BS)
    receiver = Receiver(b, dest.open_devices, on_handoff=dest.on_handoff)

    async def receive() -> None:
        with contextlib.suppress(FerryError):  # its failure is the source's to report
            await receiver.run()
            dest.completed_at = time.monotonic()

    async def handed_off() -> None:
        vm.calls.append("on_handed_off")

    async def paused() -> None:
        vm.calls.append("on_paused")

    async def resumed() -> None:
        vm.calls.append("on_resumed")

    hooks: dict[str, Any] = ({"on_paused": paused, "on_resumed": resumed} if network_hooks
                             else {})
    task = asyncio.create_task(receive())
    try:
        return await migrate_out(vm, devices, a, options=OPTIONS,  # type: ignore[arg-type]
                                 on_handed_off=handed_off, **hooks)
    finally:
        async with asyncio.timeout(10):  # the receiver ends with the migration, either way
            await task


async def test_pause_before_save_stop_after_the_running_acknowledgement() -> None:
    calls: list[str] = []
    vm, dest = FakeVM(calls), Destination(calls)
    report = await run(vm, dest)
    assert report.outcome == "completed"
    assert report.handed_off
    assert dest.state == STATE
    assert calls.index("pause") < calls.index("save")
    assert calls.index("destination running") < calls.index("stop") < calls.index(
        "on_handed_off")
    assert "resume" not in calls
    # The acknowledgement the source times was sent after the destination's guest ran.
    acked = report.timeline.at(Mark.HANDOFF_ACKED)
    assert dest.running_at is not None
    assert acked is not None
    assert acked >= dest.running_at
    assert report.downtime_source_view_ms > 0


async def test_a_failed_hand_off_resumes_the_vm_and_never_stops_it() -> None:
    calls: list[str] = []
    vm = FakeVM(calls)
    with pytest.raises(LiveMigrationError) as info:
        await run(vm, Destination(calls, fail=True))
    assert info.value.handed_off is False
    assert calls.index("pause") < calls.index("resume")
    assert "stop" not in calls
    assert "on_handed_off" not in calls


async def test_the_service_address_follows_the_pause_and_the_resume() -> None:
    """on_paused (re-route the service address to the destination) runs once the guest
    is paused; on_resumed (take it back) only after a failure resumed it here."""
    calls: list[str] = []
    report = await run(FakeVM(calls), Destination(calls), network_hooks=True)
    assert report.outcome == "completed"
    assert calls.count("on_paused") == 1
    assert calls.index("pause") < calls.index("on_paused") < calls.index("on_handed_off")
    assert "on_resumed" not in calls

    calls = []
    with pytest.raises(LiveMigrationError):
        await run(FakeVM(calls), Destination(calls, fail=True), network_hooks=True)
    assert calls.index("pause") < calls.index("on_paused") < calls.index("resume") \
        < calls.index("on_resumed")


async def test_stopping_qemu_does_not_hold_back_post_copy() -> None:
    calls: list[str] = []
    vm, dest = FakeVM(calls, stop_s=0.5), Destination(calls)
    report = await run(vm, dest)
    assert report.outcome == "completed"
    assert dest.completed_at is not None
    assert vm.stopped_at is not None
    assert dest.completed_at < vm.stopped_at  # every device verified while QEMU still stopped
    assert calls[-1] == "on_handed_off"  # ... and migrate_out waited for the stop to finish


async def test_ram_paths_are_refused_where_they_cannot_work() -> None:
    """RAM in QEMU's stream needs a link for it; RAM private to QEMU cannot go as a device."""
    a, _ = memory_channel_pair()
    vm = FakeVM([])
    devices = local_devices(MemoryDevice(256 * 1024, name="memory"), block_size_bytes=BS)
    qemu_ram = dataclasses.replace(OPTIONS, ram=RamPath.QEMU)
    with pytest.raises(LiveMigrationError, match="needs a link") as info:
        await migrate_out(vm, devices, a, options=qemu_ram)  # type: ignore[arg-type]
    assert not info.value.handed_off
    devices.memory = None
    with pytest.raises(LiveMigrationError, match="private to QEMU"):
        await migrate_out(vm, devices, a, options=OPTIONS)  # type: ignore[arg-type]
    assert vm.calls == []  # nothing touched the VM
