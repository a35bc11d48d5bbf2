"""Which RAM path a migration takes, against synthetic QEMU versions and accelerators."""

from __future__ import annotations

import pytest

from ferry.hostconfig import Accel
from ferry.live.rampath import RamPath, UnsafeRamPathError, choose


@pytest.mark.parametrize(("requested", "accel", "version", "expected"), [
    (RamPath.AUTO, Accel.TCG, (10, 0), RamPath.QEMU),
    (RamPath.AUTO, Accel.TCG, (9, 0), RamPath.QEMU),
    (RamPath.AUTO, Accel.TCG, (7, 2), RamPath.ENGINE),
    (RamPath.AUTO, Accel.KVM, (7, 2), RamPath.QEMU),
    (RamPath.ENGINE, Accel.TCG, (10, 0), RamPath.ENGINE),
    (RamPath.QEMU, Accel.TCG, (10, 0), RamPath.QEMU),
    (RamPath.QEMU, Accel.KVM, (7, 2), RamPath.QEMU),
])
def test_the_path(requested: RamPath, accel: Accel, version: tuple[int, int],
                  expected: RamPath) -> None:
    choice = choose(requested, accel=accel, qemu_version=version, ram_is_device=True)
    assert choice.path is expected
    assert choice.reason


def test_qemu_s_stream_is_refused_where_it_loses_writes() -> None:
    with pytest.raises(UnsafeRamPathError, match=r"9\.0"):
        choose(RamPath.QEMU, accel=Accel.TCG, qemu_version=(7, 2), ram_is_device=True)


def test_private_ram_only_moves_in_qemu_s_stream() -> None:
    for requested in RamPath:
        choice = choose(requested, accel=Accel.TCG, qemu_version=(10, 0), ram_is_device=False)
        assert choice.path is RamPath.QEMU
        with pytest.raises(UnsafeRamPathError):
            choose(requested, accel=Accel.TCG, qemu_version=(8, 2), ram_is_device=False)
