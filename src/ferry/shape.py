"""A VM's machine shape: memory size, vCPUs and CPU model, validated once.

:class:`MachineShape` is the one place these three values and their bounds live. The
blueprint's memory size (:mod:`ferry.guest.image.blueprint`), the runtime's
:class:`~ferry.qemu.config.VMConfig`, QEMU's command line
(:class:`~ferry.qemu.argv.QemuConfig`) and a package's manifest record
(:class:`~ferry.vm.manifest.MachineSpec`, ``.shape``) all go through it. It sits low in
the layers (beside :mod:`ferry.hostconfig`) so that the guest image builder, below
``qemu/``, can use the same bounds.

The accelerator is not part of the shape: it is the host's choice (a probe or the
user's override) made when QEMU starts, not a property of the guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import ConfigError

MIN_MEMORY_MIB = 16
"""A sanity floor (the runtime's bound before there was one shape), not a measured minimum."""
MAX_MEMORY_MIB = 64 * 1024
"""64 GiB: a sanity cap (guest RAM is one file on ferry's FUSE mount, hashed per block);
a peer's manifest is held to it too (:mod:`ferry.live.launch`)."""
MAX_VCPUS = 64

DEFAULT_CPU_MODEL = "Nehalem-v1"
"""The CPU model every ferry VM runs with unless told otherwise (and the KVM probe's).

A named model, not ``host``/``max``: a snapshot's CPU state (CPUID, MSRs, XSAVE
layout) must be acceptable to the QEMU that restores it, on any host, so the portable
default is a fixed model. ``Nehalem-v1`` is the x86-64-v2 baseline (SSE4.2, POPCNT):
TCG emulates all of it without warnings in QEMU 7.2 (plain ``Nehalem`` asks for
spec-ctrl, which TCG lacks), and every x86 CPU KVM hosts have had since ~2011 has it.
``qemu64`` is even safer but lacks SSE4.x. See docs/runtime.md, "CPU model"."""


def check_memory_mib(memory_mib: object) -> int:
    """``memory_mib`` if it is an int in MIN_MEMORY_MIB..MAX_MEMORY_MIB; else ConfigError."""
    if type(memory_mib) is not int:
        raise ConfigError(f"memory_mib must be an int, got {memory_mib!r:.40}")
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise ConfigError(f"memory_mib must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}, "
                          f"got {memory_mib}")
    return memory_mib


def check_vcpus(vcpus: object) -> int:
    """``vcpus`` if it is an int in 1..MAX_VCPUS; else ConfigError."""
    if type(vcpus) is not int or not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"vcpus must be 1..{MAX_VCPUS}, got {vcpus!r:.40}")
    return vcpus


@dataclass(frozen=True, slots=True)
class MachineShape:
    """Guest RAM, vCPUs and CPU model of one VM; raises ConfigError when out of bounds."""

    memory_mib: int
    vcpus: int = 1
    cpu_model: str = DEFAULT_CPU_MODEL

    def __post_init__(self) -> None:
        check_memory_mib(self.memory_mib)
        check_vcpus(self.vcpus)
        # Not a name: empty, a leading comma (QEMU's option syntax) or a space.
        if (not isinstance(self.cpu_model, str) or not self.cpu_model
                or self.cpu_model.startswith(",") or " " in self.cpu_model):
            raise ConfigError(f"cpu_model must be a QEMU CPU model name, got "
                              f"{self.cpu_model!r:.40}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024
