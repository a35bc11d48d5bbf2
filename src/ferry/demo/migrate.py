"""The migrate demo: a Redis VM live-migrates between two hosts while a client writes to it.

Steps (each one the ``ferry`` command a user would type, run "on" a host):

1. three hosts: network namespaces ``ferry-host-demo-a`` / ``-b`` / ``-c`` on one
   switch, each with its own ferry run and state dirs (nothing leaves the machine);
2. the demo's signed Redis package (made by the VM demo, reused) resumed on A with
   ``ferry vm run --detach``, Redis published on A's address and on the VM's service
   address (docs/networking.md), which follows the VM;
3. ``ferry vm receive --detach --listen B:7400`` on B;
4. a client on C writes ``SET w:<n>`` continuously to the service address, on one
   connection; ``ferry vm migrate demo --to B:7400`` moves the VM and the connection
   carries on (the demo counts the times the client had to reconnect: 0);
5. ``ferry vm receive`` on A and ``ferry vm migrate demo --to A`` bring it back: the first
   hop pays for what is cold on B (page cache, a fresh QEMU), the second shows a host
   that ran the guest before; both downtimes are printed, each named;
6. every write the client saw acknowledged is read back on A; the VM is stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.errors import FerryError
from ferry.hostconfig import HostConfig
from ferry.live.summary import MigrationSummary
from ferry.package.trust import TrustStore
from ferry.testing.hosts import host_namespaces
from ferry.testing.redis_hops import run_redis_hops
from ferry.testing.site import Site

MIGRATE_PORT = 7400
WRITES_BETWEEN = 50
SERVICE_ADDRESS = "10.77.0.250"
"""The demo VM's service address, on the demo hosts' network."""

Progress = Callable[[str], None]


@dataclass(slots=True)
class MigrateDemoResult:
    summary: MigrationSummary | None = None  # A -> B, the first hop
    return_summary: MigrationSummary | None = None  # B -> A
    acknowledged: int = 0
    lost: list[int] = field(default_factory=list)
    client_max_stall_ms: float = 0.0
    client_reconnects: int = 0

    @property
    def ok(self) -> bool:
        return (self.acknowledged > 0 and not self.lost and self.client_reconnects == 0
                and all(s is not None and s.verified for s in (self.summary,
                                                               self.return_summary)))


async def run_migrate_demo(progress: Progress, host: HostConfig) -> MigrateDemoResult:
    from ferry.demo.vm import _ensure_package, demo_dir

    root = demo_dir(host)
    root.mkdir(parents=True, exist_ok=True)
    package, _, _ = await _ensure_package(root, progress, host)
    trust_dir = root / "trusted"
    TrustStore.from_path(trust_dir, missing_ok=True).add(
        root / "keys" / "signing.key.pub")
    hosts_root = root / "hosts"
    hosts_root.mkdir(mode=0o700, exist_ok=True)
    result = MigrateDemoResult()
    progress("three hosts: network namespaces joined by a switch (the client on the third)")
    async with host_namespaces(["demo-a", "demo-b", "demo-c"], switch_tag="demo") as hs:
        site = Site(hs, hosts_root)
        try:
            # The first hop pays for what is cold on B (its page cache, a fresh
            # QEMU); the way back shows a host that ran this guest before.
            hops = await run_redis_hops(site, package, ["demo-a", "demo-b", "demo-a"],
                                        vm="demo", migrate_port=MIGRATE_PORT,
                                        writes_between=WRITES_BETWEEN,
                                        run_extra=["--trust", str(trust_dir)],
                                        client_host="demo-c",
                                        service_address=SERVICE_ADDRESS,
                                        progress=progress)
            result.summary = hops.hops[0].summary
            result.return_summary = hops.hops[1].summary
            result.lost = hops.lost
            result.acknowledged = hops.acknowledged
            result.client_max_stall_ms = hops.client_max_stall_ms
            result.client_reconnects = hops.client_reconnects
            with contextlib.suppress(FerryError):
                await site.ferry("demo-a", "vm", "stop", "demo")
        finally:
            await site.stop_all()
    return result
