"""The one manifest -> QEMU config conversion that `vm run` and `vm receive` share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ferry.errors import ConfigError
from ferry.hostconfig import Accel
from ferry.net import GUEST_MAC
from ferry.qemu.argv import TapNet
from ferry.shape import MachineShape
from ferry.testing.live import sample_manifest
from ferry.vm.errors import ManifestError
from ferry.vm.machine import machine_config
from ferry.vm.manifest import GuestNetwork, MachineSpec


def test_the_snapshot_machine_exactly() -> None:
    m = dataclasses.replace(sample_manifest(),
                            machine=MachineSpec("microvm", "Nehalem-v1", 2, 256, "tcg"))
    config = machine_config(m, Path("/k"), Path("/i"), tap="tap9", sandbox=False)
    assert config.machine == MachineShape(256, vcpus=2, cpu_model="Nehalem-v1")
    assert config.accel is Accel.TCG
    assert config.net == TapNet("tap9", mac=GUEST_MAC)
    assert (config.kernel, config.initramfs, config.sandbox) == (Path("/k"), Path("/i"), False)
    g = m.network
    assert config.kernel_args == (f"ferry.ip={g.ip}/{g.prefix_len}", f"ferry.gw={g.gateway}")


def test_a_guest_snapshotted_with_another_address_is_refused() -> None:
    m = sample_manifest()
    other = dataclasses.replace(m, network=GuestNetwork("10.9.9.9", 24, m.network.gateway,
                                                        m.network.mac))
    with pytest.raises(ManifestError, match=r"vm v1: the guest was snapshotted with 10\.9\.9\.9"):
        machine_config(other, Path("/k"), Path("/i"), tap="t", sandbox=True, vm="v1")


def test_the_record_gives_its_shape_and_keeps_its_json_keys() -> None:
    shape = MachineShape(512, vcpus=2, cpu_model="Westmere-v1")
    spec = MachineSpec.recording(shape, accel="kvm", qemu="10.0.3")
    assert spec.shape == shape
    # The on-disk format is unchanged: the same keys a package written before has.
    assert dataclasses.asdict(spec) == {
        "machine": "microvm", "cpu_model": "Westmere-v1", "vcpus": 2, "memory_mib": 512,
        "accel": "kvm", "qemu": "10.0.3"}
    # A package from before the QEMU version was recorded:
    old: dict[str, Any] = {"machine": "microvm", "cpu_model": "Nehalem-v1", "vcpus": 1,
                           "memory_mib": 256, "accel": "tcg"}
    assert MachineSpec(**old).shape == MachineShape(256)


def test_a_record_outside_the_shapes_bounds_makes_no_config() -> None:
    m = dataclasses.replace(sample_manifest(),
                            machine=MachineSpec("microvm", "Nehalem-v1", 0, 256, "tcg"))
    with pytest.raises(ConfigError, match="vcpus"):
        machine_config(m, Path("/k"), Path("/i"), tap="t", sandbox=True)
