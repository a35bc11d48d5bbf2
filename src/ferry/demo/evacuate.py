"""The evacuate demo: a node takes a GCP preemption notice and moves every VM out live.

Steps:

1. three node hosts (network namespaces ``ferry-host-evdemo1`` .. ``3``) and a fourth for
   etcd and the clients, on one switch; a real etcd there, and a ``ferry daemon
   --cluster`` on each node (:func:`ferry.testing.cluster.cluster_on_hosts`);
   ``evdemo1``'s daemon also watches GCP's metadata service (``--spot-watch gcp``),
   emulated at 169.254.169.254 inside its namespace, exactly where a GCE VM asks;
2. four VMs of the demo's signed Redis package (made by the VM demo, reused) on
   ``evdemo1``, each with a client writing to it without pause;
3. ``instance/preempted`` turns ``TRUE``: the daemon's watcher sees it on its hanging
   GET, the node cordons itself and evacuates before GCP's 30 s: the scheduler spreads
   the VMs over ``evdemo2`` and ``evdemo3``, each moved by live migration;
4. each client follows its VM; every acknowledged write is read back (0 lost); the VMs
   are stopped, and everything the demo made goes away (also when interrupted: the
   daemons get SIGTERM, the namespaces are removed; ``ferry doctor --clean`` removes what
   a killed run left).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ferry.hostconfig import HostConfig
from ferry.package.trust import TrustStore
from ferry.testing.cluster import all_alive, cluster_on_hosts
from ferry.testing.evacuation import LoadedVMs, evacuate_by_notice
from ferry.testing.site import scratch_root

NODES = ["evdemo1", "evdemo2", "evdemo3"]
VMS = 4
REDIS_PORT = 16500
PROVIDER = "gcp"
UP_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


@dataclass(slots=True)
class EvacuateDemoResult:
    window_s: float = 0.0
    notice_seen_s: float = 0.0
    notice_to_done_s: float = 0.0
    moved: list[dict[str, Any]] = field(default_factory=list)
    """``{"vm", "to", "downtime_ms", ...}`` per VM moved (the evacuation's result)."""
    packaged: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    order: str = ""
    reason: str = ""
    acknowledged: int = 0
    lost_writes: int = -1

    @property
    def ok(self) -> bool:
        return (len(self.moved) == VMS and not self.packaged and not self.failed
                and self.lost_writes == 0 and self.notice_to_done_s <= self.window_s)

    def to_json(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "notice_seen_s": round(self.notice_seen_s, 3),
                "notice_to_done_s": round(self.notice_to_done_s, 3), "reason": self.reason,
                "order": self.order, "moved": self.moved, "packaged": self.packaged,
                "failed": self.failed, "acknowledged_writes": self.acknowledged,
                "lost_writes": self.lost_writes, "ok": self.ok}


@contextlib.contextmanager
def _cancelled_on_sigterm() -> Iterator[None]:
    """SIGTERM or SIGHUP cancel this task (as Ctrl-C does), so that what the demo made is
    removed on the way out."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def run_evacuate_demo(progress: Progress, host: HostConfig) -> EvacuateDemoResult:
    with _cancelled_on_sigterm():
        return await _run(progress, host)


async def _run(progress: Progress, host: HostConfig) -> EvacuateDemoResult:
    from ferry.demo.vm import _ensure_package, demo_dir

    root = demo_dir(host)
    root.mkdir(parents=True, exist_ok=True)
    package, _, _ = await _ensure_package(root, progress, host)
    trust_dir = root / "trusted"
    TrustStore.from_path(trust_dir, missing_ok=True).add(root / "keys" / "signing.key.pub")
    result = EvacuateDemoResult()
    progress("three node hosts and an etcd host (network namespaces on one switch); "
             f"a daemon on each node; {NODES[0]} watches GCP's metadata service "
             "(emulated at 169.254.169.254 in its namespace)")
    env = {"FERRY_TRUST_DIR": str(trust_dir),  # a VM that fits nowhere is packaged, signed
           "FERRY_SIGNING_KEY": str(root / "keys" / "signing.key")}
    with scratch_root("fevd-") as hosts_root:
        async with cluster_on_hosts(NODES, hosts_root, env,
                                    switch_tag="evdemo", vm_memory_mib=4096, max_incoming=2,
                                    spot={NODES[0]: PROVIDER}) as c:
            deadline = time.monotonic() + UP_TIMEOUT_S
            while not await all_alive(c, NODES[1]):
                if time.monotonic() > deadline:
                    raise TimeoutError("the demo's cluster did not come up")
                await asyncio.sleep(0.25)
            load = LoadedVMs(c, NODES[0], "evdemo-vm", VMS, port=REDIS_PORT,
                             client_host=c.etcd_host)
            try:
                await load.start(package, progress)
                progress(f"GCP preemption notice for {NODES[0]}: "
                         "instance/preempted = TRUE")
                ev = await evacuate_by_notice(c, NODES[0], PROVIDER)
                r = ev.result
                result.window_s = float(ev.notice["window_s"])
                result.notice_seen_s = ev.notice_seen_s
                result.notice_to_done_s = ev.notice_to_done_s
                result.moved, result.packaged, result.failed = (
                    r["moved"], r["packaged"], r["failed"])
                result.order, result.reason = r["order"], r["reason"]
                if len(ev.where) == VMS:
                    progress("every VM moved; the clients follow them and write on")
                    result.lost_writes = await load.finish(ev.where)
                result.acknowledged = sum(w.acknowledged_count
                                          for w in load.writers.values())
            finally:
                await load.discard()
    return result
