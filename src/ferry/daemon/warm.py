"""Holder processes started ahead of need, so a run skips Python's start-up.

A VM's holder is its own process (``python -m ferry.node.process``); starting one
costs ~0.55 s of interpreter start and imports here before it reads its request.
The daemon keeps ``size`` of them started and waiting on stdin
(:func:`ferry.node.process.spawn_holder`); a run takes one and a replacement is
started once the run is done. ``size`` 0 turns this off. An idle holder holds no VM, no
mount and no network: if the daemon dies, it reads end-of-file and exits.

:class:`WarmVMs` goes further: whole VMs of one package resumed ahead of need, their
QEMU waiting with ``-incoming defer`` in a ready network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.hostconfig import HostConfig
from ferry.node.control import ControlClient
from ferry.node.process import spawn_holder, start_warm
from ferry.node.supervisor import LaunchRequest
from ferry.vm.registry import VMPaths

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


@dataclass(slots=True)
class WarmVM:
    """A package resumed ahead of need, waiting in its holder to be claimed."""

    warm_id: str
    package_dir: Path
    proc: Process


class WarmVMs:
    """Up to ``size`` warm VMs of the package this daemon ran last (``--warm-vms``).

    A warm VM is a holder that resumed the package as far as QEMU waiting for its state
    (network up, devices open, guest RAM preloaded) under a placeholder id
    (:func:`ferry.vm.runner.run_vm`'s ``claim``); a run of that package claims one, which
    names it and publishes its forwards, then loads the state and continues. It holds
    the package's RAM and a QEMU process while it waits, so the pool is bounded, kept for
    one package (the last one run), and off (``size`` 0) by default. A replacement starts
    once a run is done. Warm VMs end with the daemon: their holders read end-of-file on
    the pipe the daemon keeps open and discard themselves.
    """

    def __init__(self, size: int, host: HostConfig, *, prime: bool = True) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, not {size}")
        self.size = size
        self.host = host
        self.prime = prime
        """Prime each warm VM before it waits (:mod:`ferry.vm.prime`)."""
        self._guest_ports: tuple[int, ...] = ()
        self.paths = VMPaths.of(host)
        self._ready: list[WarmVM] = []
        self._package: Path | None = None
        self._wake = asyncio.Event()

    @property
    def ready(self) -> int:
        return sum(1 for w in self._ready if w.proc.returncode is None)

    def want(self, package_dir: Path, *, guest_ports: tuple[int, ...] = ()) -> None:
        """Keep ``package_dir`` warm from now on (warm VMs of another package go); a
        primed warm VM takes a connection on each of ``guest_ports`` (the guest ports
        the run was published on) before it waits."""
        if self.size == 0:
            return
        self._package = package_dir
        self._guest_ports = guest_ports
        self._wake.set()

    def take(self, package_dir: Path) -> WarmVM | None:
        """A warm VM of ``package_dir`` to claim, if one waits."""
        for w in list(self._ready):
            if w.proc.returncode is not None:
                self._ready.remove(w)
            elif w.package_dir == package_dir:
                self._ready.remove(w)
                return w
        return None

    async def keep_filled(self) -> None:
        """Run in the daemon's task group."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            package = self._package
            for w in [w for w in self._ready if w.package_dir != package]:
                self._ready.remove(w)
                await _discard(w)
            self._ready = [w for w in self._ready if w.proc.returncode is None]
            while package is not None and len(self._ready) < self.size:
                request = LaunchRequest(f"warm-{os.urandom(4).hex()}", package, self.host,
                                        (), warm=True, prime_ports=self._guest_ports
                                        if self.prime else None)
                try:
                    proc, _ = await start_warm(request)
                except FerryError as exc:
                    log.warning("cannot keep a warm VM of %s: %s", package, exc)
                    break
                self._ready.append(WarmVM(request.vm_id, package, proc))
                log.info("warm vm %s of %s ready", request.vm_id, package)

    def control(self, w: WarmVM) -> ControlClient:
        return ControlClient(self.paths.control_socket(w.warm_id), w.warm_id)

    async def close(self) -> None:
        for w in self._ready:
            await _discard(w)
        self._ready.clear()


async def _discard(w: WarmVM) -> None:
    """Close the warm VM's pipe: its holder discards it and exits."""
    if w.proc.stdin is not None:
        w.proc.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(w.proc.wait(), 60)
    if w.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            w.proc.terminate()
        await w.proc.wait()
