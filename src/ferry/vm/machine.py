"""A package's machine as QEMU must recreate it: the one manifest -> VMConfig conversion.

A snapshot resumes only on the machine it was taken on: the same CPU model,
vCPUs, memory, accelerator and device set, and the guest network every ferry
host gives (:mod:`ferry.net`). ``ferry vm run`` (:mod:`ferry.vm.runner`) and
``ferry vm receive`` (:mod:`ferry.live.receive`) both build their QEMU config
here, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from ferry.hostconfig import Accel
from ferry.net import GUEST_IP, GUEST_MAC
from ferry.qemu import VMConfig
from ferry.qemu.argv import TapNet
from ferry.vm.errors import ManifestError
from ferry.vm.manifest import VMManifest


def check_guest_network(manifest: VMManifest, *, vm: str | None = None) -> None:
    """The guest was snapshotted with the address and MAC this host gives guests."""
    g = manifest.network
    if (g.ip, g.mac) != (GUEST_IP, GUEST_MAC):
        raise ManifestError(f"the guest was snapshotted with {g.ip}/{g.mac}, this host gives "
                            f"guests {GUEST_IP}/{GUEST_MAC}", vm=vm)


def machine_config(manifest: VMManifest, kernel: Path, initramfs: Path, *, tap: str,
                   sandbox: bool, vm: str | None = None) -> VMConfig:
    """The snapshot's machine exactly (same devices, CPU model, accelerator: no KVM probe)."""
    check_guest_network(manifest, vm=vm)
    m = manifest.machine
    g = manifest.network
    return VMConfig(kernel=kernel, initramfs=initramfs, machine=m.shape, accel=Accel(m.accel),
                    agent=manifest.agent.enabled, net=TapNet(tap, mac=GUEST_MAC),
                    sandbox=sandbox,
                    kernel_args=(f"ferry.ip={g.ip}/{g.prefix_len}", f"ferry.gw={g.gateway}"))
