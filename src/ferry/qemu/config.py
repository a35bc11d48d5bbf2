"""What a :class:`~ferry.qemu.vm.QemuVM` boots: a frozen, validated value."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.guest.image import BuiltImage
from ferry.hostconfig import Accel
from ferry.qemu.argv import NetSpec
from ferry.shape import DEFAULT_CPU_MODEL, MachineShape


@dataclass(frozen=True, slots=True)
class VMConfig:
    """Kernel, initramfs and machine shape of one VM.

    ``machine`` (memory, vCPUs, CPU model) is validated by :class:`MachineShape`.

    ``accel`` None means :func:`~ferry.qemu.accel.choose_accel` (the probe, with no
    override) at spawn time; a caller with a host configuration passes its choice
    (:func:`~ferry.qemu.accel.host_accel`), as the snapshot does.
    ``kernel_args`` are appended to ferry's standard command line.
    """

    kernel: Path
    initramfs: Path
    machine: MachineShape
    accel: Accel | None = None
    kernel_args: tuple[str, ...] = ()
    quiet_kernel: bool = True
    net: NetSpec | None = None
    agent: bool = False
    """Add the guest agent's virtio-serial port (socket ``work_dir/agent.sock``)."""
    extra_qemu_args: tuple[str, ...] = ()
    sandbox: bool = True
    """Run QEMU under its seccomp sandbox when this QEMU supports it (ferry.qemu.sandbox)."""
    qmp_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.qmp_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")

    @property
    def memory_bytes(self) -> int:
        return self.machine.memory_bytes

    @classmethod
    def from_image(cls, image: BuiltImage, *, cpu_model: str | None = None,
                   **overrides: Any) -> VMConfig:
        """The config for a built blueprint (its kernel, initramfs, memory size and vCPUs;
        ``cpu_model`` or the default one)."""
        shape = MachineShape(image.blueprint.memory_mib, image.blueprint.vcpus,
                             cpu_model=DEFAULT_CPU_MODEL if cpu_model is None else cpu_model)
        base = cls(kernel=image.kernel, initramfs=image.initramfs, machine=shape)
        return replace(base, **overrides) if overrides else base
