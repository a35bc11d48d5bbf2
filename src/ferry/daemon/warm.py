"""Holder processes started ahead of need, so a run skips Python's start-up.

A VM's holder is its own process (``python -m ferry.node.process``); starting one
costs ~0.55 s of interpreter start and imports here before it reads its request.
The daemon keeps ``size`` of them started and waiting on stdin
(:func:`ferry.node.process.spawn_holder`); a run takes one and a replacement is
started once the run is done. ``size`` 0 turns this off. An idle holder holds no VM, no
mount and no network: if the daemon dies, it reads end-of-file and exits.

This is the first part of issue 12's warm start; QEMU processes waiting with
``-incoming defer`` and ready network namespaces are not pooled yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.node.process import spawn_holder

log = logging.getLogger(__name__)

Process = asyncio.subprocess.Process


class HolderPool:
    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, not {size}")
        self.size = size
        self._idle: list[Process] = []
        self._wake = asyncio.Event()

    @property
    def idle(self) -> int:
        return sum(1 for p in self._idle if p.returncode is None)

    async def keep_filled(self) -> None:
        """Run in the daemon's task group: start holders until ``size`` wait."""
        while True:
            self._idle = [p for p in self._idle if p.returncode is None]
            while len(self._idle) < self.size:
                try:
                    self._idle.append(await spawn_holder())
                except OSError as exc:
                    log.warning("cannot start a spare holder process: %s", exc)
                    break
            self._wake.clear()
            await self._wake.wait()

    def take(self) -> Process | None:
        """A waiting holder (None: none ready; the caller starts one itself). The
        replacement starts on :meth:`refill`, once the run no longer needs the CPU (a
        Python start-up beside a resume slowed it by ~200 ms on 2 cores)."""
        while self._idle:
            proc = self._idle.pop()
            if proc.returncode is None:
                return proc
        return None

    def refill(self) -> None:
        """Start replacements for the holders taken."""
        self._wake.set()

    async def close(self) -> None:
        for proc in self._idle:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
        self._idle.clear()
