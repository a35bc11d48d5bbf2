"""The QEMU VM runtime: one guest on ferry-served RAM (FUSE) and disks (NBD).

Public API (see docs/runtime.md)::

    async with QemuVM(VMConfig.from_image(img), work_dir=d, memory=mem,
                      disks={"root": disk}) as vm:
        await vm.start(); await vm.wait_for_console(MARKER_READY, timeout_s=120)
        await vm.pause(); await vm.resume(); await vm.flush_memory()
        stats = await vm.save_device_state(path_or_device)
        await vm.stop(); await vm.start_incoming(); await vm.load_device_state(src)
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.qemu.config import VMConfig
    from ferry.qemu.devstate import MAX_STATE_BYTES, DeviceStateStats
    from ferry.qemu.errors import DeviceStateError, VMError, VMExitedError, VMStateError
    from ferry.qemu.state import VMState
    from ferry.qemu.vm import MEMORY_FILE, QemuVM

__all__ = [
    "MAX_STATE_BYTES",
    "MEMORY_FILE",
    "DeviceStateError",
    "DeviceStateStats",
    "QemuVM",
    "VMConfig",
    "VMError",
    "VMExitedError",
    "VMState",
    "VMStateError",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "VMConfig": "ferry.qemu.config",
    "MAX_STATE_BYTES": "ferry.qemu.devstate",
    "DeviceStateStats": "ferry.qemu.devstate",
    "DeviceStateError": "ferry.qemu.errors",
    "VMError": "ferry.qemu.errors",
    "VMExitedError": "ferry.qemu.errors",
    "VMStateError": "ferry.qemu.errors",
    "VMState": "ferry.qemu.state",
    "MEMORY_FILE": "ferry.qemu.vm",
    "QemuVM": "ferry.qemu.vm",
})
