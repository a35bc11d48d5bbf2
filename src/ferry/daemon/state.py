"""What the daemon's routes share: the host, the operations, events, metrics, locks.

:class:`Daemon` is made once per application (:func:`ferry.daemon.api.create_app`);
each route module (:mod:`ferry.daemon.routes`) reads it. It holds no VM: VMs are held
by their own processes (:mod:`ferry.node`) and found in the host's run directory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from pathlib import Path
from typing import Any

from ferry.daemon import models as m
from ferry.daemon.history import DaemonMigrations
from ferry.daemon.metrics import Metrics
from ferry.daemon.operations import Events, Operations
from ferry.daemon.spot import SpotWatch
from ferry.daemon.warm import HolderPool, WarmVMs
from ferry.errors import FerryError
from ferry.hostconfig import HostConfig
from ferry.node import listing
from ferry.node.control import ControlClient
from ferry.vm import registry
from ferry.vm.runner import process_usage

VM_WATCH_S = 0.5
"""How often the daemon looks for VMs that came or went (for ``vm`` events)."""


class Daemon:
    """What the routes share: the host, the operations, the events, the metrics."""

    def __init__(self, host: HostConfig, *, warm_holders: int = 1, warm_vms: int = 0,
                 warm_prime: bool = True) -> None:
        self.host = host
        self.holders = HolderPool(warm_holders)
        self.warm = WarmVMs(warm_vms, host, prime=warm_prime)
        self.paths = registry.VMPaths.of(host)
        self.events = Events()
        self.history = DaemonMigrations(host.state_root)
        self.metrics = Metrics(self.samples, self.committed_bytes, self.running_migrations)
        self.polled: dict[str, dict[str, Any]] = {}
        """Each running VM's last status from its holder: ``memory_io`` (guest RAM through
        FUSE), ``disk_io`` (NBD per disk), ``vitals`` (agent, dirty rate)."""
        self.locks: dict[str, asyncio.Lock] = {}
        self.cache_lock = asyncio.Lock()
        """Held while a package is opened for a run or removed from the cache."""
        self.pinned: collections.Counter[Path] = collections.Counter()
        """Packages runs are starting on (their holders do not name them yet)."""
        self._ops: Operations | None = None
        self.cluster: Any = None
        """The cluster membership (:class:`ferry.daemon.cluster.DaemonCluster`) when the
        daemon runs with ``--cluster``."""
        self.spot: SpotWatch | None = None
        """The spot watch (``--spot-watch``), if this node runs one."""

    @property
    def ops(self) -> Operations:
        assert self._ops is not None, "the daemon's lifespan has not started"
        return self._ops

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self.locks.setdefault(vm_id, asyncio.Lock())

    def vms(self) -> list[registry.VMInfo]:
        return registry.list_vms(self.paths)

    def packages_in_use(self) -> set[Path]:
        """Cache entries a VM here runs on, is suspended on, or is starting on."""
        used = {Path(v.package) for v in self.vms() if v.package}
        return used | {p for p, n in self.pinned.items() if n > 0}

    def views(self) -> list[m.VM]:
        return [m.VM(**view) for view in listing.vm_views(self.paths)]

    def samples(self) -> list[dict[str, Any]]:
        """The VMs for the metrics (:data:`ferry.daemon.metrics.VMSample`)."""
        out = []
        for view in listing.vm_views(self.paths):
            rec = registry.live_supervisor(self.paths, view["vm_id"]) \
                if view["status"] != "suspended" else None
            qemu_pid = (rec or {}).get("qemu_pid")
            polled = self.polled.get(view["vm_id"], {})
            out.append({**view, **polled,
                        "qemu": process_usage(qemu_pid) if isinstance(qemu_pid, int) else {}})
        return out

    def running_migrations(self) -> list[tuple[str, str]]:
        """(VM, phase) of each outgoing migration running now."""
        return [(g.vm_id, str((g.progress or {}).get("phase", "starting")))
                for g in self.history.running()]

    def committed_bytes(self) -> int:
        """Guest RAM of the VMs whose QEMU runs here (the listing reads each QEMU's ``-m``)."""
        return sum(v["memory_bytes"] or 0 for v in listing.vm_views(self.paths))

    def client(self, vm_id: str) -> ControlClient:
        registry.check_vm_id(vm_id)
        return ControlClient(self.paths.control_socket(vm_id), vm_id)

    async def wait_gone(self, vm_id: str, timeout_s: float = 60.0) -> None:
        """Until the holder of ``vm_id`` has exited (at most ``timeout_s``)."""
        rec = await asyncio.to_thread(registry.live_supervisor, self.paths, vm_id)
        if rec is not None and isinstance(rec.get("pid"), int):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await _process_exit(rec["pid"])

    async def watch_vms(self) -> None:
        """Announce VMs that appear, change state or go (polling the run directory)."""
        seen: dict[str, str] = {}
        while True:
            now = {v["vm_id"]: v["status"]
                   for v in await asyncio.to_thread(listing.vm_views, self.paths)}
            for vm_id, status in now.items():
                if seen.get(vm_id) != status:
                    self.events.publish("vm", vm_id=vm_id, status=status)
            for vm_id in seen.keys() - now.keys():
                self.events.publish("vm", vm_id=vm_id, status="gone")
            seen = now
            await self._poll_counters([v for v, s in now.items() if s == "running"])
            await asyncio.sleep(VM_WATCH_S)

    async def _poll_counters(self, running: list[str]) -> None:
        async def one(vm_id: str) -> None:
            with contextlib.suppress(FerryError, TimeoutError):
                async with asyncio.timeout(VM_WATCH_S):
                    status = await self.client(vm_id).status()
                self.polled[vm_id] = {
                "memory_io": dict(status.memory_io),
                "disk_io": {k: dict(v) for k, v in status.disk_io.items()},
                "vitals": dict(status.vitals or {}),
                "mirror": dict(status.mirror) if status.mirror else None}

        await asyncio.gather(*(one(v) for v in running))
        for gone in self.polled.keys() - set(running):
            del self.polled[gone]


async def _process_exit(pid: int) -> None:
    """Until process ``pid`` (not our child) exits: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def host_memory() -> tuple[int, int]:
    """This host's memory: total and available bytes (``/proc/meminfo``)."""
    total = avail = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    return total, avail
