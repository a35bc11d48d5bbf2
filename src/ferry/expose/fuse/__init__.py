"""FUSE exposure: a group of ferry devices as files QEMU can map ``MAP_SHARED``.

See docs/fuse.md. Public API::

    async with FuseMount(mountpoint, {"memory": dev}) as m:
        qemu_mem_path = m.path("memory")
        stats = await m.flush("memory")   # msync: dirty pages -> device
        await m.preload("memory", [(0, n)])  # device -> page cache, before the guest runs
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "NO_TUNING": "ferry.expose.fuse.bdi",
    "BdiTuning": "ferry.expose.fuse.bdi",
    "DaemonError": "ferry.expose.fuse.errors",
    "FlushError": "ferry.expose.fuse.errors",
    "FuseError": "ferry.expose.fuse.errors",
    "MountError": "ferry.expose.fuse.errors",
    "SessionBusyError": "ferry.expose.fuse.errors",
    "DeviceFS": "ferry.expose.fuse.filesystem",
    "IoCounters": "ferry.expose.fuse.filesystem",
    "PRELOAD_CHUNK_BYTES": "ferry.expose.fuse.mount",
    "FlushStats": "ferry.expose.fuse.mount",
    "FuseMount": "ferry.expose.fuse.mount",
    "PreloadStats": "ferry.expose.fuse.mount",
    "clean_stale_mount": "ferry.expose.fuse.mount",
    "find_mount": "ferry.expose.fuse.mount",
})
