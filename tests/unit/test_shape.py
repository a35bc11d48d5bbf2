"""One machine shape, one set of bounds."""

from __future__ import annotations

import pytest

from ferry.errors import ConfigError
from ferry.shape import (
    DEFAULT_CPU_MODEL,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    MachineShape,
    check_memory_mib,
)


def test_defaults_are_one_vcpu_and_the_portable_cpu_model() -> None:
    shape = MachineShape(256)
    assert (shape.memory_mib, shape.vcpus, shape.cpu_model) == (256, 1, "Nehalem-v1")
    assert DEFAULT_CPU_MODEL == "Nehalem-v1"
    assert shape.memory_bytes == 256 * 1024 * 1024


@pytest.mark.parametrize("memory_mib", [MIN_MEMORY_MIB, 256, MAX_MEMORY_MIB])
def test_memory_bounds_are_inclusive(memory_mib: int) -> None:
    assert MachineShape(memory_mib).memory_mib == memory_mib
    assert check_memory_mib(memory_mib) == memory_mib


@pytest.mark.parametrize("memory_mib", [MIN_MEMORY_MIB - 1, MAX_MEMORY_MIB + 1, 0, -1])
def test_memory_out_of_bounds(memory_mib: int) -> None:
    with pytest.raises(ConfigError, match=r"memory_mib must be 16\.\.65536"):
        MachineShape(memory_mib)


@pytest.mark.parametrize("value", [True, 64.0, "64", None])
def test_memory_must_be_an_int(value: object) -> None:
    with pytest.raises(ConfigError, match="memory_mib must be an int"):
        check_memory_mib(value)


@pytest.mark.parametrize("vcpus", [0, -1, MAX_VCPUS + 1, True])
def test_vcpus_out_of_bounds(vcpus: int) -> None:
    with pytest.raises(ConfigError, match="vcpus"):
        MachineShape(64, vcpus=vcpus)
    assert MachineShape(64, vcpus=MAX_VCPUS).vcpus == MAX_VCPUS


@pytest.mark.parametrize("cpu_model", ["", ",+x2apic", "host -smp 4"])
def test_cpu_model_must_be_a_name(cpu_model: str) -> None:
    with pytest.raises(ConfigError, match="cpu_model"):
        MachineShape(64, cpu_model=cpu_model)
    assert MachineShape(64, cpu_model="host").cpu_model == "host"


def test_frozen_and_slotted() -> None:
    shape = MachineShape(64)
    with pytest.raises(AttributeError):
        shape.memory_mib = 128  # type: ignore[misc]
    assert not hasattr(shape, "__dict__")
