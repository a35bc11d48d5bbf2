"""How far a running outgoing live migration is, read while it runs.

:func:`ferry.live.source.migrate_out` attaches its migrator's
:class:`~ferry.migration.source.Progress` and, on the RAM-stream path, QEMU's
stream to a :class:`MigrationProgress`; the VM's holder reports
:meth:`MigrationProgress.snapshot` in its status (``ferry.node.control``), which the
daemon's migrate operations and dashboard show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ferry.migration.source import Progress


class MigrationProgress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self._disks: Progress | None = None
        self._ram_bytes: Callable[[], int] = lambda: 0

    def attach(self, disks: Progress, ram_bytes: Callable[[], int] | None = None) -> None:
        self._disks = disks
        if ram_bytes is not None:
            self._ram_bytes = ram_bytes

    def snapshot(self) -> dict[str, Any]:
        """``phase`` (``starting`` until the migrator runs), ``bytes_sent`` (blocks and
        QEMU's stream), ``cycles`` (dirty passes done), ``elapsed_s``."""
        p = self._disks
        return {"phase": "starting" if p is None else p.phase.value,
                "bytes_sent": (0 if p is None else p.bytes_sent) + self._ram_bytes(),
                "cycles": 0 if p is None else p.cycle,
                "elapsed_s": round(time.monotonic() - self.started, 3)}
