"""Guest images: kernel, initramfs and root disk built from a blueprint.

Public API::

    build_blueprint(blueprint, out_dir=None, *, cache_dir=None) -> BuiltImage
    load_blueprint(path_or_name) -> Blueprint
    qemu_argv(kernel, initramfs, *, memory_mib, cmdline, ...) -> list[str]
    kernel_cmdline(*, tsc_khz, ...) -> str;  host_tsc_khz() -> int
    choose_accel(override=None) -> AccelChoice  (async; best_accel() for sync callers)
"""

from ferry.vm.image.accel import AccelChoice, best_accel, choose_accel, probe_kvm
from ferry.vm.image.blueprint import Blueprint, BuiltImage, build_blueprint, load_blueprint
from ferry.vm.image.errors import BlueprintError, ImageError, ModuleError, PackageError
from ferry.vm.image.qemu_cmd import (
    Accel,
    AgentChannel,
    DiskSpec,
    FileDisk,
    NbdDisk,
    SerialToFile,
    SerialToSocket,
    TapNet,
    UserNet,
    host_tsc_khz,
    kernel_cmdline,
    qemu_argv,
)

__all__ = [
    "Accel",
    "AccelChoice",
    "AgentChannel",
    "Blueprint",
    "BlueprintError",
    "BuiltImage",
    "DiskSpec",
    "FileDisk",
    "ImageError",
    "ModuleError",
    "NbdDisk",
    "PackageError",
    "SerialToFile",
    "SerialToSocket",
    "TapNet",
    "UserNet",
    "best_accel",
    "build_blueprint",
    "choose_accel",
    "host_tsc_khz",
    "kernel_cmdline",
    "load_blueprint",
    "probe_kvm",
    "qemu_argv",
]
