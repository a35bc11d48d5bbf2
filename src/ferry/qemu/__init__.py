"""The QEMU VM runtime: one guest on ferry-served RAM (FUSE) and disks (NBD).

Public API (see docs/runtime.md)::

    async with QemuVM(VMConfig.from_image(img), work_dir=d, memory=mem,
                      disks={"root": disk}) as vm:
        await vm.start(); await vm.wait_for_console(MARKER_READY, timeout_s=120)
        await vm.pause(); await vm.resume(); await vm.flush_memory()
        stats = await vm.save_device_state(path_or_device)
        await vm.stop(); await vm.start_incoming(); await vm.load_device_state(src)
"""

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
