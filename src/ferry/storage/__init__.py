"""ferry's block storage engine: one device interface, providers, decorator modules.

Providers hold data (:class:`MemoryDevice`, :class:`FileDevice`,
:class:`OverlayDevice`); modules wrap a device and are devices themselves
(dirty tracking, volatility, locking, metrics, the waiting cache).
"""

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
