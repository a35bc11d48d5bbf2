"""FUSE exposure: a group of ferry devices as files QEMU can map ``MAP_SHARED``.

See docs/fuse.md. Public API::

    async with FuseMount(mountpoint, {"memory": dev}) as m:
        qemu_mem_path = m.path("memory")
        stats = await m.flush("memory")   # msync: dirty pages -> device
        await m.preload("memory", [(0, n)])  # device -> page cache, before the guest runs
"""

from ferry.expose.fuse.bdi import NO_TUNING, BdiTuning
from ferry.expose.fuse.errors import (
    DaemonError,
    FlushError,
    FuseError,
    MountError,
    SessionBusyError,
)
from ferry.expose.fuse.filesystem import DeviceFS, IoCounters
from ferry.expose.fuse.mount import (
    PRELOAD_CHUNK_BYTES,
    FlushStats,
    FuseMount,
    PreloadStats,
    clean_stale_mount,
    find_mount,
)

__all__ = [
    "NO_TUNING",
    "PRELOAD_CHUNK_BYTES",
    "BdiTuning",
    "DaemonError",
    "DeviceFS",
    "FlushError",
    "FlushStats",
    "FuseError",
    "FuseMount",
    "IoCounters",
    "MountError",
    "PreloadStats",
    "SessionBusyError",
    "clean_stale_mount",
    "find_mount",
]
