#!/usr/bin/env python3
"""Benchmark: evacuating a node on a GCP preemption notice against moving its VMs one by one.

Setup (not timed): three namespace hosts with a ``ferry daemon --cluster`` each and an
etcd on a fourth (:func:`ferry.testing.cluster.cluster_on_hosts`); ``evac1``'s daemon also
runs ``--spot-watch gcp`` against GCP's metadata service, emulated at 169.254.169.254 in
``evac1``'s namespace (:mod:`ferry.testing.metadata`). A signed Redis package (256 MiB
guests), and ``--vms`` VMs of it on ``evac1``, each with Redis published on ``evac1``'s
address and a client (:class:`~ferry.testing.workload.RedisWriter`, on the etcd host)
writing to it without pause (:class:`ferry.testing.evacuation.LoadedVMs`).

* ``evacuate``: the notice is ``instance/preempted`` turning ``TRUE`` in the emulator
  (the real user path: the daemon's watcher sees it on its hanging GET, the node cordons
  itself and evacuates before the notice's deadline, 30 s for GCP: ``window_s``).
  ``notice_to_done_s`` runs from the injection to the evacuation's end (every VM runs on
  another node), as the node's event stream says. ``downtime_ms``: each VM's, as its
  migration measured it.
* ``baseline``: what a user scripting today's API would do, one VM at a time: for each,
  ``POST /v1/receivers`` on a target (``evac2``, ``evac3`` in turn) and ``POST
  /v1/vms/{id}/migrate`` on ``evac1``, waiting for each before the next; fresh VMs under
  the same load, same run.

``lost_writes``: acknowledged writes that cannot be read back after the move, over all
VMs (must be 0). ``ratio``: baseline time / evacuation time.

Usage: ``sudo .venv/bin/python bench/evacuate.py [--vms 4] [--json]``.
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
from ferry.testing.evacuation import LoadedVMs, evacuate_by_notice
from ferry.testing.packages import Signer
from ferry.testing.site import scratch_root

NODES = ["evac1", "evac2", "evac3"]
REDIS_PORT = 16400


def log(msg: str) -> None:
    print(f"evacuate: {msg}", file=sys.stderr, flush=True)


async def _until(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not come up")
        await asyncio.sleep(0.25)


async def baseline(c: ClusterSite, package: Path, n: int) -> dict[str, Any]:
    load = LoadedVMs(c, "evac1", "bl", n, port=REDIS_PORT, client_host=c.etcd_host)
    try:
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
            load.where[vm] = target
        took = time.monotonic() - started
        lost = await load.finish(where)
    finally:
        await load.discard()
    return {"sequential_s": round(took, 3), "downtime_ms": downtimes, "lost_writes": lost}


async def evacuation(c: ClusterSite, package: Path, n: int) -> dict[str, Any]:
    load = LoadedVMs(c, "evac1", "ev", n, port=REDIS_PORT, client_host=c.etcd_host)
    try:
        await load.start(package)
        ev = await evacuate_by_notice(c, "evac1", "gcp")
        result = ev.result
        where = ev.where
        lost = await load.finish(where) if len(where) == n else -1
    finally:
        await load.discard()
    downtimes = [m["downtime_ms"] for m in result["moved"]]
    return {"window_s": ev.notice["window_s"], "notice_to_done_s": round(ev.notice_to_done_s, 3),
            "notice_seen_s": round(ev.notice_seen_s, 3), "reason": result["reason"],
            "vms_evacuated": len(result["moved"]), "vms_packaged": len(result["packaged"]),
            "order": result["order"], "targets": sorted(where.values()),
            "downtime_ms": downtimes, "downtime_ms_max": max(downtimes, default=None),
            "lost_writes": lost,
            "within_window": bool(result["within_deadline"])
            and ev.notice_to_done_s <= ev.notice["window_s"]}


async def run(n: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fbev-"))
    try:
        signer = Signer(root / "signer")
        log("building the Redis package (once)")
        package = await asyncio.to_thread(signer.package, "redis")
        with scratch_root("fbe-") as hosts_root:
            async with cluster_on_hosts(NODES, hosts_root, signer.env, switch_tag="evac",
                                        vm_memory_mib=4096, max_incoming=2,
                                        spot={"evac1": "gcp"}) as c:
                await _until(lambda: all_alive(c, "evac2"))
                log(f"baseline: {n} VMs moved one at a time")
                base = await baseline(c, package, n)
                log(f"evacuation: {n} VMs, on a GCP preemption notice")
                evac = await evacuation(c, package, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**evac,
            "baseline_sequential_s": base["sequential_s"],
            "baseline_downtime_ms": base["downtime_ms"],
            "baseline_lost_writes": base["lost_writes"],
            "ratio": round(base["sequential_s"] / evac["notice_to_done_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    result = asyncio.run(run(args.vms))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
        print(f"evacuation {result['notice_to_done_s']} s vs one by one "
              f"{result['baseline_sequential_s']} s: {result['ratio']}x")


if __name__ == "__main__":
    main()
