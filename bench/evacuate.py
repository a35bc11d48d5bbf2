#!/usr/bin/env python3
"""Benchmark: evacuating a node (``POST /v1/node/drain``) against moving its VMs one by one.

Setup (not timed): three namespace hosts with a ``ferry daemon --cluster`` each and an
etcd on a fourth (:func:`ferry.testing.cluster.cluster_on_hosts`), a signed Redis
package (256 MiB guests), and ``--vms`` VMs of it on ``evac1``, each with Redis published on
``evac1``'s address and a client (:class:`~ferry.testing.workload.RedisWriter`, on the etcd
host) writing to it without pause.

* ``evacuate``: the notice is ``POST /v1/node/drain {"deadline_s": WINDOW}`` on ``evac1``;
  ``notice_to_done_s`` runs from that request to the evacuation's end (every VM runs on
  another node). ``downtime_ms``: each VM's, as its migration measured it.
* ``baseline``: what a user scripting today's API would do, one VM at a time: for each,
  ``POST /v1/receivers`` on a target (``evac2``, ``evac3`` in turn) and ``POST
  /v1/vms/{id}/migrate`` on ``evac1``, waiting for each before the next; fresh VMs under
  the same load, same run.

``lost_writes``: acknowledged writes that cannot be read back after the move, over all
VMs (must be 0). ``ratio``: baseline time / evacuation time.

Usage: ``sudo .venv/bin/python bench/evacuate.py [--vms 4] [--window 30] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.testing.cluster import ClusterSite, all_alive, cluster_on_hosts
from ferry.testing.packages import Signer
from ferry.testing.site import scratch_root
from ferry.testing.workload import RedisWriter

NODES = ["evac1", "evac2", "evac3"]
REDIS_PORT = 16400
WRITES_BETWEEN = 50
LOAD_TIMEOUT_S = 120.0


def log(msg: str) -> None:
    print(f"evacuate: {msg}", file=sys.stderr, flush=True)


async def _until(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not come up")
        await asyncio.sleep(0.25)


class Loaded:
    """``n`` Redis VMs on n1, a writer on each."""

    def __init__(self, c: ClusterSite, prefix: str, n: int) -> None:
        self.c = c
        self.vms = [f"{prefix}{i}" for i in range(n)]
        self.writers: dict[str, RedisWriter] = {}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, package: Path) -> None:
        c = self.c
        for i, vm in enumerate(self.vms):
            port = REDIS_PORT + i
            op = await c.call("evac1", "POST", "/v1/vms", {
                "package": str(package), "name": vm,
                "publish": [f"{c.site.address('evac1')}:{port}:6379"]})
            done = await c.wait("evac1", op)
            if done["state"] != "succeeded":
                raise RuntimeError(f"run {vm}: {done}")
            w = RedisWriter([(c.site.address(h), port) for h in NODES],
                            namespace=c.site.hosts[c.etcd_host].namespace, prefix=vm)
            self.writers[vm] = w
            self.tasks.append(asyncio.create_task(w.run(self.stop)))
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                await w.wait_acknowledged(WRITES_BETWEEN)

    async def finish(self, where: dict[str, str]) -> int:
        """Writes continue on each VM's new node; then stop and count the lost ones."""
        for vm, w in self.writers.items():
            w.preferred = NODES.index(where[vm])
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                await w.wait_acknowledged(w.acknowledged_count + WRITES_BETWEEN)
        self.stop.set()
        await asyncio.gather(*self.tasks)
        lost = 0
        for w in self.writers.values():
            lost += len(await w.lost())
        return lost

    async def discard(self, where: dict[str, str]) -> None:
        for vm in self.vms:
            await self.c.call(where[vm], "POST", f"/v1/vms/{vm}/stop", {})


async def baseline(c: ClusterSite, package: Path, n: int) -> dict[str, Any]:
    load = Loaded(c, "bl", n)
    await load.start(package)
    where: dict[str, str] = {}
    downtimes = []
    started = time.monotonic()
    for i, vm in enumerate(load.vms):
        target = NODES[1 + i % 2]
        recv = await c.call(target, "POST", "/v1/receivers",
                            {"listen": f"{c.site.address(target)}:0", "name": vm})
        host, port = recv["address"]
        op = await c.call("evac1", "POST", f"/v1/vms/{vm}/migrate",
                          {"to": f"{host}:{port}", "token": recv["token"]})
        done = await c.wait("evac1", op)
        if done["state"] != "succeeded":
            raise RuntimeError(f"migrate {vm}: {done}")
        s = done["result"]["summary"]
        downtimes.append(s["downtime_corrected_ms"] or s["downtime_source_view_ms"])
        where[vm] = target
    took = time.monotonic() - started
    lost = await load.finish(where)
    await load.discard(where)
    return {"sequential_s": round(took, 3), "downtime_ms": downtimes, "lost_writes": lost}


async def evacuation(c: ClusterSite, package: Path, n: int, window_s: float,
                     ) -> dict[str, Any]:
    await c.call("evac1", "POST", "/v1/node/uncordon")
    load = Loaded(c, "ev", n)
    await load.start(package)
    started = time.monotonic()
    op = await c.call("evac1", "POST", "/v1/node/drain", {"deadline_s": window_s})
    done = await c.wait("evac1", op)
    took = time.monotonic() - started
    result = done["result"] or {}
    if done["state"] != "succeeded" or not result.get("complete"):
        raise RuntimeError(f"drain: {done}")
    where = {m["vm"]: m["to"] for m in result["moved"]}
    lost = await load.finish(where) if len(where) == n else -1
    await load.discard(where)
    downtimes = [m["downtime_ms"] for m in result["moved"]]
    return {"notice_to_done_s": round(took, 3), "vms_evacuated": len(result["moved"]),
            "vms_packaged": len(result["packaged"]), "order": result["order"],
            "targets": sorted(where.values()), "downtime_ms": downtimes,
            "downtime_ms_max": max(downtimes, default=None), "lost_writes": lost,
            "within_window": took <= window_s}


async def run(n: int, window_s: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fbev-"))
    try:
        signer = Signer(root / "signer")
        log("building the Redis package (once)")
        package = await asyncio.to_thread(signer.package, "redis")
        with scratch_root("fbe-") as hosts_root:
            async with cluster_on_hosts(NODES, hosts_root, signer.env, switch_tag="evac",
                                        vm_memory_mib=4096, max_incoming=2) as c:
                await _until(lambda: all_alive(c, "evac2"))
                log(f"baseline: {n} VMs moved one at a time")
                base = await baseline(c, package, n)
                log(f"evacuation: {n} VMs, window {window_s:g} s")
                evac = await evacuation(c, package, n, window_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"window_s": window_s, **evac,
            "baseline_sequential_s": base["sequential_s"],
            "baseline_downtime_ms": base["downtime_ms"],
            "baseline_lost_writes": base["lost_writes"],
            "ratio": round(base["sequential_s"] / evac["notice_to_done_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--window", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    result = asyncio.run(run(args.vms, args.window))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
        print(f"evacuation {result['notice_to_done_s']} s vs one by one "
              f"{result['baseline_sequential_s']} s: {result['ratio']}x")


if __name__ == "__main__":
    main()
