"""A Redis VM live-migrated along a route of hosts while a client writes to it.

What ``ferry demo migrate``, ``bench/live_migrate.py`` and the e2e tests
share: ``ferry vm run --detach`` of a signed Redis package on the first host
with Redis published on its address; a :class:`~ferry.testing.workload.RedisWriter`
writing ``SET w:<n>`` throughout (it follows the VM from host to host); then
one :meth:`~ferry.testing.site.Site.hop` per leg of the route, each waiting
for writes to continue on the new host before the next. At the end every
write the client saw acknowledged is read back (lost writes) and the longest
stall the client saw is reported.

Other loads (:class:`~ferry.testing.workload.HopLoad`, e.g. a
:class:`~ferry.testing.workload.PageWriter`) can run beside the writer: each
is running before the first hop, is told when a hop starts and ends, and
what it says about a hop goes into that hop's :attr:`Hop.loads`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.live.summary import MigrationSummary
from ferry.testing.site import Site
from ferry.testing.workload import HopLoad, Load, RedisWriter, end_loads, start_loads

REDIS_PORT = 16379
GUEST_REDIS_PORT = 6379
WRITES_TIMEOUT_S = 120.0

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Hop:
    src: str
    dst: str
    reply: dict[str, Any]
    """What ``ferry vm migrate --json`` printed (``summary``, ``source``, ``destination``)."""
    command_s: float
    """Wall time of the ``ferry vm migrate`` command (process start to exit)."""
    writes_during: int
    loads: dict[str, Any] = field(default_factory=dict)
    """What the loads beside the writer said about this hop (:meth:`HopLoad.hop_done`)."""

    @property
    def summary(self) -> MigrationSummary:
        """The printed summary, checked (MalformedSummaryError if a key is off)."""
        return MigrationSummary.from_json(self.reply["summary"])


@dataclass(slots=True)
class RedisHops:
    hops: list[Hop] = field(default_factory=list)
    acknowledged: int = 0
    lost: list[int] = field(default_factory=list)
    client_max_stall_ms: float = 0.0
    client_reconnects: int = 0


async def run_redis_hops(site: Site, package: Path, route: Sequence[str], *, vm: str,
                         migrate_port: int, writes_between: int = 50,
                         run_extra: Sequence[str] = (), migrate_extra: Sequence[str] = (),
                         client_host: str | None = None, loads: Sequence[HopLoad] = (),
                         service_address: str | None = None,
                         progress: Progress = lambda _: None) -> RedisHops:
    """Start ``package`` on ``route[0]``, migrate it along ``route`` under writes.

    The client writes from ``client_host`` (default: ``route[0]``). ``loads`` run
    beside it (their targets are the caller's to set); stopping them is done here,
    reading their results the caller's. With ``service_address`` the VM has one
    (``ferry vm run --service-address``) and the writer uses it, on one connection
    that should survive every hop; otherwise it writes to the current host's
    published port and reconnects after each hop.

    The VM is left running on ``route[-1]``; stopping it is the caller's
    (:meth:`Site.stop_all`).
    """
    if len(route) < 2:
        raise ConfigError("a route needs at least two hosts")
    first = route[0]
    progress(f"resuming the Redis package on {first}, Redis published on "
             f"{site.address(first)}:{REDIS_PORT}")
    if service_address is not None:
        run_extra = [*run_extra, "--service-address", service_address]
        progress(f"the VM's service address {service_address} follows it; the client "
                 "writes there on one connection")
    await site.vm_run(first, vm, package, *run_extra, "-p",
                      f"{site.address(first)}:{REDIS_PORT}:{GUEST_REDIS_PORT}")
    targets = ([(service_address, GUEST_REDIS_PORT)] if service_address is not None
               else [(site.address(h), REDIS_PORT) for h in dict.fromkeys(route)])
    writer = RedisWriter(targets, namespace=site.hosts[client_host or first].namespace)
    result = RedisHops()
    stop = asyncio.Event()
    everyone: list[Load] = [*loads, writer]
    tasks: list[asyncio.Task[None]] = []
    hosts = list(dict.fromkeys(route))
    try:
        await start_loads(everyone, stop, tasks, writes_between=writes_between,
                          timeout_s=WRITES_TIMEOUT_S)
        for src, dst in itertools.pairwise(route):
            progress(f"a client writes continuously; migrating the VM {src} -> {dst}")
            before = len(writer.acknowledged)
            for extra in loads:
                extra.hop_started()
            started = time.monotonic()
            reply = await site.hop(vm, src, dst, migrate_port, *migrate_extra)
            took = time.monotonic() - started
            said: dict[str, Any] = {}
            for extra in loads:
                extra.preferred = hosts.index(dst)
                async with asyncio.timeout(WRITES_TIMEOUT_S):
                    said.update(await extra.hop_done())
            async with asyncio.timeout(WRITES_TIMEOUT_S):
                await writer.wait_acknowledged(len(writer.acknowledged) + writes_between)
            result.hops.append(Hop(src, dst, reply, round(took, 3),
                                   len(writer.acknowledged) - before, said))
    finally:
        stop.set()
        await end_loads(tasks)
    progress(f"reading back every acknowledged write on {route[-1]}")
    result.lost = await writer.lost()
    result.acknowledged = len(writer.acknowledged)
    result.client_max_stall_ms = round(writer.max_stall_s * 1e3, 1)
    result.client_reconnects = writer.reconnects
    return result
