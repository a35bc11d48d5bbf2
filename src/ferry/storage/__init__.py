"""ferry's block storage engine: one device interface, providers, decorator modules.

Providers hold data (:class:`MemoryDevice`, :class:`FileDevice`,
:class:`OverlayDevice`); modules wrap a device and are devices themselves
(dirty tracking, volatility, locking, metrics, the waiting cache).
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.buffers import Buffer
    from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, Device, Geometry, check_range
    from ferry.storage.modules.dirty import DirtyLocal, DirtyRemote, dirty_tracker
    from ferry.storage.modules.lockable import Lockable, ReadOnlyGate
    from ferry.storage.modules.metrics import DeviceStats, MetricsDevice
    from ferry.storage.modules.volatility import VolatilityMonitor
    from ferry.storage.modules.waiting import (
        UnalignedWriteError,
        WaitingLocal,
        WaitingRemote,
        waiting_cache,
    )
    from ferry.storage.providers.file import DeviceFullError, FileDevice
    from ferry.storage.providers.memory import MemoryDevice
    from ferry.storage.providers.overlay import OverlayDevice, OverlayMapError

__all__ = [
    "DEFAULT_BLOCK_SIZE_BYTES",
    "Buffer",
    "Device",
    "DeviceFullError",
    "DeviceStats",
    "DirtyLocal",
    "DirtyRemote",
    "FileDevice",
    "Geometry",
    "Lockable",
    "MemoryDevice",
    "MetricsDevice",
    "OverlayDevice",
    "OverlayMapError",
    "ReadOnlyGate",
    "UnalignedWriteError",
    "VolatilityMonitor",
    "WaitingLocal",
    "WaitingRemote",
    "check_range",
    "dirty_tracker",
    "waiting_cache",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "Buffer": "ferry.buffers",
    "DEFAULT_BLOCK_SIZE_BYTES": "ferry.storage.device",
    "Device": "ferry.storage.device",
    "Geometry": "ferry.storage.device",
    "check_range": "ferry.storage.device",
    "DirtyLocal": "ferry.storage.modules.dirty",
    "DirtyRemote": "ferry.storage.modules.dirty",
    "dirty_tracker": "ferry.storage.modules.dirty",
    "Lockable": "ferry.storage.modules.lockable",
    "ReadOnlyGate": "ferry.storage.modules.lockable",
    "DeviceStats": "ferry.storage.modules.metrics",
    "MetricsDevice": "ferry.storage.modules.metrics",
    "VolatilityMonitor": "ferry.storage.modules.volatility",
    "UnalignedWriteError": "ferry.storage.modules.waiting",
    "WaitingLocal": "ferry.storage.modules.waiting",
    "WaitingRemote": "ferry.storage.modules.waiting",
    "waiting_cache": "ferry.storage.modules.waiting",
    "DeviceFullError": "ferry.storage.providers.file",
    "FileDevice": "ferry.storage.providers.file",
    "MemoryDevice": "ferry.storage.providers.memory",
    "OverlayDevice": "ferry.storage.providers.overlay",
    "OverlayMapError": "ferry.storage.providers.overlay",
})
