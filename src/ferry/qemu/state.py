"""The VM lifecycle as data.

::

    CREATED ──start()──────────▶ RUNNING ◀──resume()── PAUSED
       │                          │  ──pause()/save_device_state()──▶ │
       └──start_incoming()──▶ INCOMING ──load_device_state()──▶ PAUSED
    any state ──stop() or QEMU exits──▶ STOPPED ──start()/start_incoming()──▶ ...

STOPPED is not final: a new QEMU can be spawned on the same memory mount
and disks (that is how a restore on the same host reuses the page cache).
"""

from __future__ import annotations

import enum


class VMState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"
    """QEMU runs with ``-incoming defer`` and waits for its device state."""
    STOPPED = "stopped"


CAN_SPAWN = frozenset({VMState.CREATED, VMState.STOPPED})
HAS_PROCESS = frozenset({VMState.RUNNING, VMState.PAUSED, VMState.INCOMING})
