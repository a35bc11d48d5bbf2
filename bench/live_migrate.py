"""Live-migrate a Redis VM under write load between two namespace hosts, back and forth.

    sudo .venv/bin/python bench/live_migrate.py --runs 6 --json

Measures what users run: the signed Redis package (256 MiB guest) is made
with ``ferry key create`` and ``ferry vm snapshot --package``; on namespace
hosts ``lba`` and ``lbb`` (:func:`ferry.testing.hosts.host_namespaces`)
``ferry vm run --detach`` starts it on ``lba`` with Redis published, and each
hop is ``ferry vm receive --detach --listen`` on the destination plus ``ferry
vm migrate VM --to HOST:PORT --json`` on the source (:mod:`ferry.testing.site`),
A -> B, B -> A, ... for ``--runs`` hops. A client on host ``lbc`` writes
``SET`` continuously to the VM's published port, following it from host to
host (:mod:`ferry.testing.redis_hops`).

Per hop: downtime (source paused -> destination running, as ``ferry vm
migrate`` reports it: ``downtime_ms`` is the offset-corrected figure with its
``downtime_uncertainty_ms``, ``downtime_source_view_ms`` the source's own view
up to the destination's "running" acknowledgement), its steps, the migration's total time and the
command's wall time, bytes moved (per device and phase), dirty cycles,
post-copy fetches, writes acknowledged during the hop. Overall: downtime p50
and max, acknowledged and lost writes, the longest stall the client saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.testing.hosts import host_namespaces
from ferry.testing.packages import Signer
from ferry.testing.redis_hops import Hop, run_redis_hops
from ferry.testing.site import Site, downtime

HOSTS = ("lba", "lbb", "lbc")
MIGRATE_PORT = 7511


def _p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _hop(h: Hop) -> dict[str, Any]:
    s = h.summary
    d = downtime(s)
    dst = h.reply.get("destination") or {}
    return {
        "from": h.src, "to": h.dst,
        "downtime_ms": d.ms, "downtime_uncertainty_ms": d.uncertainty_ms,
        "downtime_source_view_ms": d.source_view_ms,
        "downtime_steps_ms": d.steps_ms,
        "total_s": s.total_s, "precopy_s": s.precopy_s, "postcopy_s": s.postcopy_s,
        "command_s": h.command_s,
        "cycles": s.cycles, "stop_reason": None if s.stop_reason is None
        else s.stop_reason.value, "postcopy_fetches": s.postcopy_fetches,
        "bytes_total": s.bytes_total, "wire_bytes": s.wire_bytes,
        "bytes_by_device": {n: dev.bytes_by_phase for n, dev in s.devices.items()},
        "verified": s.verified,
        "writes_during": h.writes_during,
        # Inside the destination's state_load step: warming the ring windows (absent
        # blocks are fetched on demand) before QEMU loads the state; and the guest RAM
        # the load and the cont still read cold through FUSE.
        "destination_prefetch_ms": dst.get("prefetch_ms"),
        "destination_prefetch_windows": dst.get("prefetch_windows"),
        "destination_load_ram_reads": dst.get("state_load_ram_reads"),
        "destination_cont_ram_reads": dst.get("cont_ram_reads"),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="flb-"))  # short: UNIX socket paths
    try:
        signer = Signer(work / "signer")
        t0 = time.monotonic()
        package = await asyncio.to_thread(signer.package, "redis")
        package_s = time.monotonic() - t0
        route = [HOSTS[i % 2] for i in range(args.runs + 1)]
        extra = ["--precopy-only"] if args.mode == "precopy-only" else []
        async with host_namespaces(list(HOSTS), switch_tag="lb") as hosts:
            site = Site(hosts, work / "hosts", signer.env)
            try:
                t0 = time.monotonic()
                result = await run_redis_hops(site, package, route, vm="redis",
                                              migrate_port=MIGRATE_PORT, migrate_extra=extra,
                                              client_host="lbc", writes_between=100)
                wall_s = time.monotonic() - t0
                await site.ferry(route[-1], "vm", "stop", "redis")
            finally:
                await site.stop_all()
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    hops = [_hop(h) for h in result.hops]
    downtimes = [h["downtime_ms"] for h in hops]
    return {
        "hops": len(hops), "mode": args.mode, "package_s": round(package_s, 1),
        "downtime_ms_p50": _p50(downtimes),
        "downtime_ms_max": max(downtimes, default=None),
        "downtime_source_view_ms_p50": _p50([h["downtime_source_view_ms"] for h in hops]),
        "downtime_source_view_ms_max": max((h["downtime_source_view_ms"] for h in hops),
                                           default=None),
        "total_s_p50": _p50([h["total_s"] for h in hops]),
        "command_s_p50": _p50([h["command_s"] for h in hops]),
        "bytes_total_p50": _p50([h["bytes_total"] for h in hops]),
        "wall_s": round(wall_s, 1),
        "acknowledged_writes": result.acknowledged,
        "lost_writes": len(result.lost),
        "client_max_stall_ms": result.client_max_stall_ms,
        "client_reconnects": result.client_reconnects,
        "ok": not result.lost and all(h["verified"] for h in hops),
        "per_hop": hops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", type=int, default=6, help="hops, alternating A -> B, B -> A")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "precopy-only"])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    r = asyncio.run(bench(args))
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    w = sys.stdout.write
    w(f"{r['hops']} hops ({r['mode']}): downtime p50 {r['downtime_ms_p50']} ms, max "
      f"{r['downtime_ms_max']} ms (offset-corrected; source's view p50 "
      f"{r['downtime_source_view_ms_p50']} ms, max {r['downtime_source_view_ms_max']} ms); "
      f"migration total p50 {r['total_s_p50']} s (command {r['command_s_p50']} s)\n")
    for h in r["per_hop"]:
        w(f"  {h['from']} -> {h['to']}: downtime {h['downtime_ms']:8.1f} ms  total "
          f"{h['total_s']:6.2f} s  command {h['command_s']:6.2f} s  "
          f"{h['bytes_total'] / 2**20:7.1f} MiB  {h['cycles']} cycles  "
          f"{h['postcopy_fetches']} fetches  {h['writes_during']} writes\n")
    w(f"writes acknowledged {r['acknowledged_writes']}, lost {r['lost_writes']}; longest "
      f"client stall {r['client_max_stall_ms']} ms\n")


if __name__ == "__main__":
    main()
