"""Volumes: disks that outlive a VM (``ferry volume create/ls/rm``, ``vm run --volume``).

A volume is a sparse raw file under the host's state root::

    <state root>/volumes/<name>/volume.img    the disk (sparse, mode 0600)
    <state root>/volumes/<name>/volume.json   name, size, creation time
    <state root>/volumes/<name>/lock          flock()ed by the VM holding it

**How a volume reaches a guest.** A VM from a package resumes a snapshot of a microvm
machine: its virtio-mmio transports cannot be hot-plugged (QEMU's virtio-mmio bus has no
hotplug handler: ``device_add`` answers "Bus 'virtio-mmio-bus.23' does not support
hotplugging", and the guest probed its transports at boot), and the device state
fixes the device set. So a volume takes the place of one of the package's *extra disks*
(``ferry vm snapshot --disk NAME:MIB``): where the disk would be a copy-on-write overlay
over the package's file, it is the volume's file, exported over ferry's NBD server like
every disk, with the same size (a mismatch is refused). After the resume the guest drops
its clean caches (``sync; echo 3 > /proc/sys/vm/drop_caches``) so nothing it read from
the package's disk before the snapshot hides the volume's blocks. The disk must not be
mounted in the snapshot (mount it after the resume, e.g. in the user data).

**One VM at a time.** The VM's holder process keeps an exclusive ``flock`` on the
volume's lock file while the VM runs: a second ``vm run --volume`` of it and ``volume
rm`` are refused, and the lock goes with the process (a SIGKILLed holder frees it).

**Migration.** A VM with a volume is not live-migrated (nor stopped into a package, nor
suspended): the volume is this host's. ``ferry vm migrate`` refuses it with an error
naming the volume; stop the VM, and the volume stays for the next VM here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError, FerryError

VOLUMES_DIR = "volumes"
IMAGE = "volume.img"
RECORD = "volume.json"
LOCK = "lock"
MAX_SIZE_MIB = 1024 * 1024
"""1 TiB: a sparse file costs nothing until written; the bound stops a typo."""
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?$")


class VolumeError(FerryError):
    """A volume operation that cannot be done (missing, in use, exists)."""


def check_volume_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"volume name {name!r:.70}: 1..63 of [a-z0-9_.-], starting and "
                          "ending with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Volume:
    name: str
    size_bytes: int
    created_at: float
    directory: Path
    in_use: bool

    @property
    def image(self) -> Path:
        return self.directory / IMAGE

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes,
                "created_at": self.created_at, "in_use": self.in_use,
                "path": str(self.image)}


def volumes_root(state_root: Path) -> Path:
    return state_root / VOLUMES_DIR


def _dir(state_root: Path, name: str) -> Path:
    return volumes_root(state_root) / check_volume_name(name)


def create_volume(state_root: Path, name: str, size_mib: int) -> Volume:
    """A new empty volume; :class:`VolumeError` if the name is taken."""
    if not isinstance(size_mib, int) or not 1 <= size_mib <= MAX_SIZE_MIB:
        raise ConfigError(f"volume size must be 1..{MAX_SIZE_MIB} MiB")
    directory = _dir(state_root, name)
    root = directory.parent
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = root / f".{name}.{os.getpid()}.new"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    try:
        fd = os.open(scratch / IMAGE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size_mib * 2**20)
        finally:
            os.close(fd)
        (scratch / LOCK).touch(mode=0o600)
        (scratch / RECORD).write_text(json.dumps({"name": name,
                                                  "size_bytes": size_mib * 2**20,
                                                  "created_at": time.time()}))
        try:
            os.rename(scratch, directory)  # fails if the name exists (a non-empty dir)
        except OSError as exc:
            raise VolumeError(f"volume {name} exists") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return get_volume(state_root, name)


def _locked(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def get_volume(state_root: Path, name: str) -> Volume:
    directory = _dir(state_root, name)
    try:
        rec = json.loads((directory / RECORD).read_text())
        return Volume(name, int(rec["size_bytes"]), float(rec["created_at"]), directory,
                      _locked(directory))
    except FileNotFoundError:
        raise VolumeError(f"no volume {name} here (see 'ferry volume ls')") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VolumeError(f"volume {name}: unreadable record: {exc}") from exc


def list_volumes(state_root: Path) -> list[Volume]:
    root = volumes_root(state_root)
    out = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") or not _NAME_RE.match(entry.name):
            continue
        with contextlib.suppress(VolumeError):
            out.append(get_volume(state_root, entry.name))
    return out


def remove_volume(state_root: Path, name: str) -> None:
    """Delete a volume; :class:`VolumeError` while a VM holds it."""
    volume = get_volume(state_root, name)
    with attached(state_root, name):  # the lock: nobody can attach it meanwhile
        graveyard = volume.directory.parent / f".{name}.{os.getpid()}.rm"
        os.rename(volume.directory, graveyard)
    shutil.rmtree(graveyard, ignore_errors=True)


@contextlib.contextmanager
def attached(state_root: Path, name: str) -> Iterator[Volume]:
    """Hold ``name`` exclusively (the VM using it); :class:`VolumeError` if another holds it."""
    volume = get_volume(state_root, name)
    fd = os.open(volume.directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeError(f"volume {name} is attached to another VM") from None
        yield volume
    finally:
        os.close(fd)


def parse_volume_args(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``--volume NAME[:DISK]`` arguments as {volume: disk or ""} (checked names)."""
    out: dict[str, str] = {}
    for item in items:
        name, _, disk = item.partition(":")
        check_volume_name(name)
        if name in out:
            raise ConfigError(f"--volume {name} given twice")
        out[name] = disk
    return out


def assign_disks(volumes: dict[str, str], disks: list[str]) -> dict[str, str]:
    """Which of the package's extra ``disks`` (in manifest order, root excluded) each
    volume replaces: {disk: volume}. A volume without a disk takes the next free one."""
    taken: dict[str, str] = {}
    for name, disk in volumes.items():
        if disk:
            if disk not in disks:
                raise ConfigError(f"--volume {name}:{disk}: the package has no extra disk "
                                  f"{disk} (it has: {', '.join(disks) or 'none'}; add one "
                                  "with 'ferry vm snapshot --disk NAME:MIB')")
            if disk in taken:
                raise ConfigError(f"disk {disk} is given two volumes")
            taken[disk] = name
    for name, disk in volumes.items():
        if not disk:
            free = [d for d in disks if d not in taken]
            if not free:
                raise ConfigError(f"--volume {name}: no extra disk of the package left for "
                                  "it (a volume takes the place of an extra disk made with "
                                  "'ferry vm snapshot --disk NAME:MIB')")
            taken[free[0]] = name
    return taken
