"""What a destination accepts from a source's Hello, checked before anything is allocated.

A Hello of 40 bytes can describe a device of 2^31 blocks; the receiver sizes
its per-block state (waiting cache, hash tables) and creates files from that
description, so the description is checked against :class:`ReceiveLimits`
first and refused with :class:`GeometryRefusedError` (nothing created, an
Error sent to the source). Firecracker caps its snapshot format the same
way "to prevent DOS attacks".

The defaults accept any group of real VM devices up to 1 TiB in 64 KiB
blocks; ``[limits]`` in the TOML config raises or lowers them. A file target
also refuses a group larger than the free space of its filesystem
(:func:`check_free_space`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError, RemoteProtocolError
from ferry.protocol.codec import MAX_BLOCK_DATA_BYTES
from ferry.protocol.messages import DeviceInfo

_GiB = 1024**3
_TiB = 1024**4

MIN_BLOCK_SIZE_BYTES = 512
MAX_BLOCK_SIZE_BYTES = MAX_BLOCK_DATA_BYTES
"""A block must fit one WriteBlocks frame."""


class GeometryRefusedError(RemoteProtocolError):
    """The source described devices beyond this destination's limits."""


@dataclass(frozen=True, slots=True)
class ReceiveLimits:
    """Caps on the device group a destination accepts (units in the names)."""

    max_devices: int = 256
    """A VM has a handful of devices; 256 leaves room for disk-heavy guests."""
    max_device_bytes: int = 1 * _TiB
    max_total_bytes: int = 4 * _TiB
    max_total_blocks: int = 1 << 24
    """16 Mi blocks (1 TiB in 64 KiB blocks): per-block state is a few bytes,
    so the bookkeeping of a whole group stays below about 100 MiB."""

    def __post_init__(self) -> None:
        for name in ("max_devices", "max_device_bytes", "max_total_bytes", "max_total_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{name} must be a positive integer, not {value!r}")
        if self.max_total_blocks > 1 << 32:
            raise ConfigError("limits.max_total_blocks must be at most 2^32")

    def check(self, devices: Sequence[DeviceInfo]) -> None:
        """Raise GeometryRefusedError unless ``devices`` fit every limit."""
        if not devices:
            raise GeometryRefusedError("the source described no devices")
        if len(devices) > self.max_devices:
            raise GeometryRefusedError(
                f"{len(devices)} devices exceed the limit of {self.max_devices}"
            )
        names: set[str] = set()
        total_bytes = total_blocks = 0
        for info in devices:
            if not info.name:
                raise GeometryRefusedError("a device has an empty name")
            if info.name in names:
                raise GeometryRefusedError(f"device name {info.name!r} appears twice")
            names.add(info.name)
            bs = info.block_size_bytes
            if not MIN_BLOCK_SIZE_BYTES <= bs <= MAX_BLOCK_SIZE_BYTES or bs % MIN_BLOCK_SIZE_BYTES:
                raise GeometryRefusedError(
                    f"{info.name}: block size {bs} is not a multiple of {MIN_BLOCK_SIZE_BYTES} "
                    f"up to {MAX_BLOCK_SIZE_BYTES}"
                )
            if not 0 <= info.size_bytes <= self.max_device_bytes:
                raise GeometryRefusedError(
                    f"{info.name}: {info.size_bytes} bytes exceed the device limit of "
                    f"{self.max_device_bytes}"
                )
            total_bytes += info.size_bytes
            total_blocks += -(-info.size_bytes // bs)
        if total_bytes > self.max_total_bytes:
            raise GeometryRefusedError(
                f"{total_bytes} bytes in all exceed the limit of {self.max_total_bytes}"
            )
        if total_blocks > self.max_total_blocks:
            raise GeometryRefusedError(
                f"{total_blocks} blocks in all exceed the limit of {self.max_total_blocks}"
            )


def check_device_name(name: str) -> None:
    """Refuse a device name that is not a plain file name of its own.

    On a file target names become file names (the VM layer's factory uses
    names such as ``disk/root`` in its own way): no separators, no
    ``.``/``..``, no NUL, and no ``.partial`` suffix (that is where another
    device's data waits until it is verified).
    """
    if (
        not name
        or "/" in name
        or "\x00" in name
        or name in (".", "..")
        or name.endswith(".partial")
        or len(name.encode()) > 255
    ):
        raise GeometryRefusedError(f"unusable device name {name!r}")


def check_free_space(directory: Path, devices: Sequence[DeviceInfo]) -> None:
    """Refuse a group whose total size exceeds the free space under ``directory``.

    Files are sparse, so this is conservative; it keeps a hostile or mistaken
    source from filling the disk before its data fails verification.
    """
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    total = sum(info.size_bytes for info in devices)
    if total > free:
        raise GeometryRefusedError(
            f"the group needs {total} bytes, {directory} has {free} free"
        )
