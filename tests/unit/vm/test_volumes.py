"""Volumes (ferry.vm.volumes): create, list, remove, one holder at a time, names checked,
volumes placed on a package's extra disks."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.vm import volumes
from ferry.vm.volumes import VolumeError


def test_create_list_remove(tmp_path: Path) -> None:
    made = volumes.create_volume(tmp_path, "data-1", 4)
    assert made.size_bytes == 4 * 2**20
    assert made.image.stat().st_size == 4 * 2**20
    assert made.image.stat().st_blocks == 0  # sparse
    assert made.image.stat().st_mode & 0o777 == 0o600
    with pytest.raises(VolumeError, match="exists"):
        volumes.create_volume(tmp_path, "data-1", 4)
    assert [v.name for v in volumes.list_volumes(tmp_path)] == ["data-1"]
    volumes.remove_volume(tmp_path, "data-1")
    assert volumes.list_volumes(tmp_path) == []
    with pytest.raises(VolumeError, match="no volume"):
        volumes.remove_volume(tmp_path, "data-1")


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    volumes.create_volume(tmp_path, "v", 1)
    with volumes.attached(tmp_path, "v") as vol:
        assert volumes.get_volume(tmp_path, "v").in_use
        # flock is per open file description: a second open in this process conflicts too
        with pytest.raises(VolumeError, match="attached"), volumes.attached(tmp_path, "v"):
            pass
        with pytest.raises(VolumeError, match="attached"):
            volumes.remove_volume(tmp_path, "v")
        assert vol.image.exists()
    assert not volumes.get_volume(tmp_path, "v").in_use
    volumes.remove_volume(tmp_path, "v")


def _hold_and_die(state_root: str, ready: multiprocessing.synchronize.Event) -> None:
    import os

    with volumes.attached(Path(state_root), "v"):
        ready.set()
        os._exit(0)  # no cleanup: the kernel drops the lock with the process


def test_a_dead_holder_frees_the_volume(tmp_path: Path) -> None:
    volumes.create_volume(tmp_path, "v", 1)
    ready = multiprocessing.get_context("fork").Event()
    proc = multiprocessing.get_context("fork").Process(target=_hold_and_die,
                                                       args=(str(tmp_path), ready))
    proc.start()
    proc.join(30)
    assert ready.is_set()
    assert not volumes.get_volume(tmp_path, "v").in_use


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a/b", "..", "a b", "x" * 64,
                                  "a\0", ".hidden"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        volumes.create_volume(tmp_path, name, 1)
    assert not (tmp_path / "volumes").exists() or not any(
        p.name == name for p in (tmp_path / "volumes").iterdir())


@pytest.mark.parametrize("size", [0, -1, volumes.MAX_SIZE_MIB + 1])
def test_bad_sizes_are_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError):
        volumes.create_volume(tmp_path, "v", size)


def test_volumes_take_extra_disks() -> None:
    assert volumes.assign_disks({"a": "", "b": "logs"}, ["data", "logs"]) == {
        "logs": "b", "data": "a"}
    with pytest.raises(ConfigError, match="no extra disk"):
        volumes.assign_disks({"a": ""}, [])
    with pytest.raises(ConfigError, match="has no extra disk root"):
        volumes.assign_disks({"a": "root"}, ["data"])
    with pytest.raises(ConfigError, match="two volumes"):
        volumes.assign_disks({"a": "data", "b": "data"}, ["data"])
    with pytest.raises(ConfigError, match="twice"):
        volumes.parse_volume_args(["a", "a:data"])
    assert volumes.parse_volume_args(["a", "b:logs"]) == {"a": "", "b": "logs"}


async def test_a_volume_must_have_the_size_of_the_disk_it_replaces(tmp_path: Path) -> None:
    from ferry.vm.errors import VMLifecycleError
    from ferry.vm.runner import _volume_device

    vol = volumes.create_volume(tmp_path, "v", 8)
    with pytest.raises(VMLifecycleError, match="--size 16"):
        _volume_device(vol.image, "data", 16 * 2**20, "vm1")
    dev = _volume_device(vol.image, "data", 8 * 2**20, "vm1")
    try:
        await dev.write_at(4096, b"kept")
        assert await dev.read_at(4096, 4) == b"kept"
    finally:
        await dev.close()
    assert vol.image.read_bytes()[4096:4100] == b"kept"
