"""The migrate demo: a Redis VM live-migrates between two hosts while a client writes to it.

Steps (each one the ``ferry`` command a user would type, run "on" a host):

1. two hosts: network namespaces ``ferry-host-demo-a`` / ``-b`` on one switch, each
   with its own ferry run and state dirs (nothing leaves the machine);
2. the demo's signed Redis package (made by the VM demo, reused) resumed on A with
   ``ferry vm run --detach`` and Redis published on A's address;
3. ``ferry vm receive --detach --listen B:7400`` on B;
4. a client writes ``SET w:<n>`` continuously; ``ferry vm migrate demo --to B:7400``
   moves the VM; the client follows it to B;
5. ``ferry vm receive`` on A and ``ferry vm migrate demo --to A`` bring it back: the first
   hop pays for what is cold on B (page cache, a fresh QEMU), the second shows a host
   that ran the guest before; both downtimes are printed, each named;
6. every write the client saw acknowledged is read back on A; the VM is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.package.trust import TrustStore
from ferry.testing.hosts import HostSet, host_namespaces
from ferry.testing.workload import RedisWriter
from ferry.vm.registry import VMPaths, cleanup_leftovers

REDIS_PORT = 16379
MIGRATE_PORT = 7400
WRITES_BEFORE = 50
WRITES_AFTER = 50

Progress = Callable[[str], None]


@dataclass(slots=True)
class MigrateDemoResult:
    summary: dict[str, Any] = field(default_factory=dict)  # A -> B, the first hop
    return_summary: dict[str, Any] = field(default_factory=dict)  # B -> A
    acknowledged: int = 0
    lost: list[int] = field(default_factory=list)
    client_max_stall_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.acknowledged > 0 and not self.lost and bool(self.summary.get("verified"))
                and bool(self.return_summary.get("verified")))


class _Hosts:
    def __init__(self, hosts: HostSet, root: Path) -> None:
        self.hosts = hosts
        self.root = root

    def paths(self, host: str) -> VMPaths:
        return VMPaths(self.root / host / "run", self.root / host / "state")

    async def ferry(self, host: str, *args: str) -> Any:
        paths = self.paths(host)
        env = {**os.environ, "FERRY_RUN_DIR": str(paths.run_root),
               "FERRY_STATE_DIR": str(paths.state_root)}
        proc = await asyncio.create_subprocess_exec(
            *self.hosts[host].exec_argv([sys.executable, "-m", "ferry.cli.main", *args,
                                         "--json"]),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise FerryError(f"ferry {' '.join(args)} on {host} failed: "
                             f"{err.decode(errors='replace')[-500:]}")
        return json.loads(out)


async def run_migrate_demo(progress: Progress) -> MigrateDemoResult:
    from ferry.demo.vm import _ensure_package, demo_dir

    root = demo_dir()
    root.mkdir(parents=True, exist_ok=True)
    package, _, _ = await _ensure_package(root, progress)
    trust_dir = root / "trusted"
    TrustStore.from_path(trust_dir, missing_ok=True).add(
        root / "keys" / "signing.key.pub")
    hosts_root = root / "hosts"
    hosts_root.mkdir(mode=0o700, exist_ok=True)
    result = MigrateDemoResult()
    progress("two hosts: network namespaces joined by a switch")
    async with host_namespaces(["demo-a", "demo-b"], switch_tag="demo") as hs:
        h = _Hosts(hs, hosts_root)
        a, b = hs["demo-a"].address, hs["demo-b"].address
        try:
            progress(f"resuming the Redis package on host A, Redis published on {a}:{REDIS_PORT}")
            await h.ferry("demo-a", "vm", "run", "--detach", "--name", "demo", "--trust",
                          str(trust_dir), "-p", f"{a}:{REDIS_PORT}:6379", str(package))
            progress(f"host B receives on {b}:{MIGRATE_PORT} (its one-time token in a 0600 file)")
            token_file = hosts_root / "demo-b.token"
            await h.ferry("demo-b", "vm", "receive", "--detach", "--listen",
                          f"{b}:{MIGRATE_PORT}", "--token-file", str(token_file))
            writer = RedisWriter([(a, REDIS_PORT), (b, REDIS_PORT)],
                                 namespace=hs["demo-a"].namespace)
            stop = asyncio.Event()
            load = asyncio.create_task(writer.run(stop))
            try:
                async with asyncio.timeout(60):
                    await writer.wait_acknowledged(WRITES_BEFORE)
                progress("a client writes continuously; migrating the VM A -> B")
                reply = await h.ferry("demo-a", "vm", "migrate", "demo", "--to",
                                      f"{b}:{MIGRATE_PORT}", "--token-file", str(token_file))
                result.summary = reply["summary"]
                at_handoff = len(writer.acknowledged)
                async with asyncio.timeout(60):
                    await writer.wait_acknowledged(at_handoff + WRITES_AFTER)
                # The first hop pays for what is cold on B (its page cache, a fresh
                # QEMU); the way back shows a host that ran this guest before.
                progress(f"host A receives on {a}:{MIGRATE_PORT}; migrating back B -> A")
                back_token = hosts_root / "demo-a.token"
                await h.ferry("demo-a", "vm", "receive", "--detach", "--listen",
                              f"{a}:{MIGRATE_PORT}", "--token-file", str(back_token))
                reply = await h.ferry("demo-b", "vm", "migrate", "demo", "--to",
                                      f"{a}:{MIGRATE_PORT}", "--token-file", str(back_token))
                result.return_summary = reply["summary"]
                at_return = len(writer.acknowledged)
                async with asyncio.timeout(60):
                    await writer.wait_acknowledged(at_return + WRITES_AFTER)
            finally:
                stop.set()
                await load
            progress("reading back every acknowledged write on A")
            result.lost = await writer.lost()
            result.acknowledged = len(writer.acknowledged)
            result.client_max_stall_ms = round(writer.max_stall_s * 1e3, 1)
            with contextlib.suppress(FerryError):
                await h.ferry("demo-a", "vm", "stop", "demo")
        finally:
            for host in ("demo-a", "demo-b"):
                await _stop_leftovers(h.paths(host))
    return result


async def _stop_leftovers(paths: VMPaths) -> None:
    """Stop whatever still runs on a demo host (after a failure) and clean up."""
    import signal

    from ferry.vm.registry import read_json

    for rec in (paths.run_root / "vms").glob("*/supervisor.json"):
        pid = (read_json(rec) or {}).get("pid")
        if isinstance(pid, int):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(1.0)
    await cleanup_leftovers(paths)
