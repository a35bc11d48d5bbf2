"""Guest RAM that only QEMU holds, written out as a ferry device through a *sink* QEMU.

A VM whose RAM arrived in QEMU's own stream (:mod:`ferry.qemu.ramstream`)
keeps it in QEMU's private memory, where neither a flush nor a device-state
save (``x-ignore-shared`` leaves out shared RAM only) can reach it. An
export into a package needs it as a memory image plus the device state
without RAM. So the paused VM is migrated once more, over a local UNIX
socket, into a sink: a second QEMU of the same machine whose RAM is a ferry
memory device on this process's FUSE mount, started ``-incoming`` and never
run. Afterwards the sink's memory device is the image and the sink's own
device-state save is the state; the sink quits without ever running the guest.

The sink needs every device the guest has, its network card included, so
it gets a tap of its own in the VM's namespace (nothing is attached to it:
no packet ever goes through), and the VM's disks through a second NBD
server (QEMU only reads them while loading; it writes nothing without running).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

from ferry.net import command
from ferry.qemu import QemuVM
from ferry.qemu.argv import TapNet
from ferry.qemu.errors import DeviceStateError
from ferry.storage.device import Device
from ferry.storage.providers.memory import MemoryDevice

log = logging.getLogger(__name__)

SINK_TAP = "ferry-sink0"


@contextlib.asynccontextmanager
async def _sink_tap(namespace: str | None) -> AsyncIterator[str]:
    ns = ["-n", namespace] if namespace else []
    await command.run(["ip", *ns, "tuntap", "add", "dev", SINK_TAP, "mode", "tap"])
    try:
        yield SINK_TAP
    finally:
        await command.run(["ip", *ns, "link", "del", SINK_TAP], check=False)


@contextlib.asynccontextmanager
async def ram_in_sink(vm: QemuVM, *, disks: Mapping[str, Device], work_dir: Path,
                      namespace: str | None,
                      wrap_argv: Callable[[Sequence[str]], list[str]] | None
                      ) -> AsyncIterator[tuple[QemuVM, Device]]:
    """Move the paused ``vm``'s RAM and devices into a sink QEMU; yields the sink (paused,
    never run) and its memory device. ``vm`` ends ``postmigrate``: ``resume`` continues it.
    """
    if vm.private_ram is None:
        raise DeviceStateError("guest RAM is already a ferry device: no sink needed",
                               vm=vm.name)
    memory = MemoryDevice(vm.config.memory_bytes, name="memory")
    async with _sink_tap(namespace) as tap:
        config = vm.config
        if isinstance(config.net, TapNet):
            config = dataclasses.replace(config, net=dataclasses.replace(config.net,
                                                                         ifname=tap))
        sink = QemuVM(config, work_dir=work_dir, memory=memory, disks=disks,
                      name=f"{vm.name}-sink", wrap_argv=wrap_argv)
        async with sink:
            await sink.start_incoming()
            # The stream carries RAM: both ends without x-ignore-shared (QEMU checks).
            caps = {"capabilities": [{"capability": "x-ignore-shared", "state": False},
                                     {"capability": "pause-before-switchover",
                                      "state": False}]}
            await sink.qmp.execute("migrate-set-capabilities", caps)
            await vm.qmp.execute("migrate-set-capabilities", caps)
            await vm.pause()
            sock = work_dir / "sink.sock"
            await sink.qmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            await vm.migrate_to(f"unix:{sock}", what="write RAM into the sink")
            await sink.wait_incoming("load RAM into the sink")
            yield sink, memory  # the sink's save_device_state flushes RAM into ``memory``
