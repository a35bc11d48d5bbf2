#!/usr/bin/env python3
"""Benchmark: a Redis VM live-migrating over an emulated long link, on the user path.

    sudo .venv/bin/python bench/wan.py --json                     # 100 ms, 1000 Mbit/s
    sudo .venv/bin/python bench/wan.py --rtt-ms 20 --mbit 100 --loss 0.01 --json

Three namespace hosts (:func:`ferry.testing.hosts.host_namespaces`); the link between
``wna`` and ``wnb`` is emulated (:meth:`~ferry.testing.hosts.HostSet.set_link`:
``--rtt-ms``, ``--mbit``, ``--loss``, ``--jitter-ms``), ``wnc`` (the client) reaches
both unslowed. First the link is measured from sockets in the two hosts
(:mod:`ferry.testing.linkprobe`): ``rtt_ms`` (median of 20 round trips) and ``mbit``
(wire rate of one autotuned connection), and ``link_fitted_mbit``, one connection with
the socket buffers ferry's VM links fit to the link.

Then the signed Redis package runs on ``wna`` (``ferry vm run --detach``) while a
client on ``wnc`` writes ``SET`` continuously, following the VM; ``--runs`` hops
alternate ``wna -> wnb``, ``wnb -> wna``, each ``ferry vm receive --detach`` plus
``ferry vm migrate --json`` (:mod:`ferry.testing.redis_hops`). Reported: ``downtime_ms_p50``
and ``downtime_ms_max`` (source paused -> destination running, offset-corrected, as
``ferry vm migrate`` reports it), ``total_s`` (p50 of the migrations' total time),
``bytes_sent`` (p50 of the bytes on the wire per hop: disks and guest RAM),
``lost_writes`` (acknowledged writes not read back at the end), ``ram_path`` (how guest
RAM moved: ``qemu``, in QEMU's precopy stream beside the disks, or ``engine``, as a ferry
device with post-copy faults), and the destination's waiting cache:
``fault_latency_ms_p50`` and ``faults`` (reads of the guest that waited for a block
still in flight; on the ``qemu`` path only the disks can fault: guest RAM is complete
when QEMU resumes, so faults are few or none and the p50 may be null).

Baseline, same run, same hosts, same link and client: the same guest moved along the
same route with QEMU's own migration (:mod:`ferry.testing.qemu_native`: precopy at
``downtime-limit`` 20 ms, and post-copy), root disk as shared storage.
``downtime_ratio`` is ferry's p50 over the best QEMU p50. ``--no-qemu`` skips it.

Compression: ``--compression`` (default ``auto``) is ``ferry vm migrate --compression``,
what QEMU's RAM stream compresses on the link; each hop's ``ram_compression`` says what
was chosen and measured (link rate, compressibility). ``--compare-compression`` runs
the same hops again with ``--compression none`` (the baseline: the stream as QEMU
writes it) and reports ``compression_total_s_ratio`` (total time with compression
over without; below 1 is faster) and ``compression_bytes_ratio``.

``goal_downtime_ms`` is the issue's goal, 1.5 x RTT + 40 ms of the measured RTT, and
``goal_met`` whether ``downtime_ms_p50`` is within it.
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

from ferry.package import TrustStore
from ferry.testing.hosts import host_namespaces
from ferry.testing.linkprobe import measure_rate, measure_rtt
from ferry.testing.packages import Signer
from ferry.testing.qemu_native import MODES, NativeGuest, NativeHops, run_native_hops
from ferry.testing.redis_hops import GUEST_REDIS_PORT, REDIS_PORT, Hop, run_redis_hops
from ferry.testing.site import Site, downtime
from ferry.transport.tuning import TcpTuning
from ferry.vm.pkgcache import open_package

HOSTS = ("wna", "wnb", "wnc")
MIGRATE_PORT = 7541


def _p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _hop(h: Hop) -> dict[str, Any]:
    s = h.summary
    d = downtime(s)
    return {
        "from": h.src, "to": h.dst,
        "downtime_ms": d.ms, "downtime_uncertainty_ms": d.uncertainty_ms,
        "downtime_source_view_ms": d.source_view_ms, "downtime_steps_ms": d.steps_ms,
        "total_s": s.total_s, "precopy_s": s.precopy_s, "postcopy_s": s.postcopy_s,
        "command_s": h.command_s, "bytes_sent": s.wire_bytes, "cycles": s.cycles,
        "stop_reason": None if s.stop_reason is None else s.stop_reason.value,
        "postcopy_fetches": s.postcopy_fetches, "verified": s.verified,
        "ram_path": h.reply["source"].get("ram_path"),
        "ram_compression": h.reply["source"].get("ram_compression"),
        "faults": s.faults, "fault_latency_ms_p50": s.fault_latency_ms_p50,
        "fault_latency_ms_p90": s.fault_latency_ms_p90,
        "fault_latency_ms_max": s.fault_latency_ms_max,
        "writes_during": h.writes_during,
    }


def _native(r: NativeHops) -> dict[str, Any]:
    downtimes = [h.downtime_ms for h in r.hops]
    return {
        "mode": r.mode.name, "downtime_limit_ms": r.mode.downtime_limit_ms,
        "downtime_ms_p50": _p50(downtimes), "downtime_ms_max": max(downtimes, default=None),
        "total_s": _p50([h.total_s for h in r.hops]),
        "bytes_sent": _p50([h.bytes_sent for h in r.hops]),
        "lost_writes": len(r.lost), "acknowledged_writes": r.acknowledged,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fwn-"))  # short: UNIX socket paths
    a, b, c = HOSTS
    try:
        signer = Signer(work / "signer")
        package = await asyncio.to_thread(signer.package, "redis")
        route = [HOSTS[i % 2] for i in range(args.runs + 1)]
        async with host_namespaces(list(HOSTS), switch_tag="wn") as hosts:
            await hosts.set_link(a, b, rtt_ms=args.rtt_ms, mbit=args.mbit, loss=args.loss,
                                 jitter_ms=args.jitter_ms)
            rtt_ms = statistics.median(await measure_rtt(hosts, a, b, samples=20))
            rate = await measure_rate(hosts, a, b, seconds=3.0, warmup_s=2.0)
            fitted = await measure_rate(hosts, a, b, seconds=3.0, warmup_s=2.0,
                                        tuning=TcpTuning(dead_peer_s=None, fit_to_link=True))
            runs = [args.compression]
            if args.compare_compression and args.compression != "none":
                runs.append("none")
            results = {}
            for i, compression in enumerate(runs):
                site = Site(hosts, work / f"hosts{i}", signer.env)
                try:
                    results[compression] = await run_redis_hops(
                        site, package, route, vm=f"wan{i}", migrate_port=MIGRATE_PORT,
                        client_host=c, writes_between=50,
                        migrate_extra=["--ram", args.ram, "--compression", compression])
                    await site.ferry(route[-1], "vm", "stop", f"wan{i}")
                finally:
                    await site.stop_all()
            result = results[args.compression]
            native: list[NativeHops] = []
            if args.qemu:
                opened = await asyncio.to_thread(
                    open_package, package, TrustStore.from_path(signer.trust_dir),
                    cache_dir=work / "native-packages")
                guest = await asyncio.to_thread(
                    NativeGuest.prepare, opened, work / "native", redis_port=REDIS_PORT,
                    guest_port=GUEST_REDIS_PORT)
                try:
                    for mode in MODES:
                        native.append(await run_native_hops(hosts, guest, route, mode,
                                                            port=MIGRATE_PORT, client_host=c))
                finally:
                    guest.cleanup()
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    hops = [_hop(h) for h in result.hops]
    compared: dict[str, Any] = {}
    if "none" in results and args.compression != "none":
        base = [_hop(h) for h in results["none"].hops]
        t, t0 = _p50([h["total_s"] for h in hops]), _p50([h["total_s"] for h in base])
        n, n0 = _p50([h["bytes_sent"] for h in hops]), _p50([h["bytes_sent"] for h in base])
        compared = {
            "uncompressed": {"total_s": t0, "bytes_sent": n0,
                             "downtime_ms_p50": _p50([h["downtime_ms"] for h in base]),
                             "lost_writes": len(results["none"].lost)},
            "compression_total_s_ratio": round(t / t0, 3) if t and t0 else None,
            "compression_bytes_ratio": round(n / n0, 3) if n and n0 else None,
        }
    downtimes = [h["downtime_ms"] for h in hops]
    faults = [h["fault_latency_ms_p50"] for h in hops if h["fault_latency_ms_p50"] is not None]
    qemu = [_native(r) for r in native]
    best = min(qemu, key=lambda q: q["downtime_ms_p50"], default=None)
    p50 = _p50(downtimes)
    goal = round(1.5 * rtt_ms + 40, 1)
    return {
        "configured": {"rtt_ms": args.rtt_ms, "mbit": args.mbit, "loss": args.loss,
                       "jitter_ms": args.jitter_ms},
        "rtt_ms": round(rtt_ms, 2),
        "mbit": round(rate.wire_mbit, 1),
        "link_fitted_mbit": round(fitted.wire_mbit, 1),
        "hops": len(hops),
        "ram_path": sorted({str(h["ram_path"]) for h in hops}),
        "downtime_ms_p50": p50,
        "downtime_ms_max": max(downtimes, default=None),
        "goal_downtime_ms": goal,
        "goal_met": p50 is not None and p50 <= goal,
        "total_s": _p50([h["total_s"] for h in hops]),
        "bytes_sent": _p50([h["bytes_sent"] for h in hops]),
        "acknowledged_writes": result.acknowledged,
        "lost_writes": len(result.lost),
        "client_max_stall_ms": result.client_max_stall_ms,
        "faults": sum(h["faults"] or 0 for h in hops),
        "fault_latency_ms_p50": _p50(faults),
        "qemu_best_mode": best["mode"] if best else None,
        "qemu_downtime_ms_p50": best["downtime_ms_p50"] if best else None,
        "downtime_ratio": round(p50 / best["downtime_ms_p50"], 3)
        if best and p50 is not None and best["downtime_ms_p50"] else None,
        "compression": args.compression,
        **compared,
        "qemu": {q["mode"]: q for q in qemu},
        "per_hop": hops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--mbit", type=float, default=1000.0)
    p.add_argument("--loss", type=float, default=0.0, help="per segment, e.g. 0.01")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--runs", type=int, default=2, help="hops, alternating A -> B, B -> A")
    p.add_argument("--ram", default="auto", choices=["auto", "qemu", "engine"],
                   help="how ferry moves guest RAM (ferry vm migrate --ram)")
    p.add_argument("--compression", default="auto", choices=["auto", "none", "zstd"],
                   help="ferry vm migrate --compression (QEMU's RAM stream on the link)")
    p.add_argument("--compare-compression", action="store_true",
                   help="run the hops again with --compression none, the baseline")
    p.add_argument("--no-qemu", dest="qemu", action="store_false",
                   help="skip the same-run baseline of QEMU's own migration")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    t0 = time.monotonic()
    r = asyncio.run(bench(args))
    r["wall_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    w = sys.stdout.write
    w(f"link: {r['rtt_ms']} ms RTT, {r['mbit']} Mbit/s (one connection with ferry's fitted "
      f"buffers: {r['link_fitted_mbit']} Mbit/s)\n")
    w(f"{r['hops']} hops, RAM via {', '.join(r['ram_path'])}: downtime p50 "
      f"{r['downtime_ms_p50']} ms, max {r['downtime_ms_max']} ms (goal "
      f"{r['goal_downtime_ms']} ms: {'met' if r['goal_met'] else 'NOT met'}); total p50 "
      f"{r['total_s']} s; {(r['bytes_sent'] or 0) / 2**20:.1f} MiB per hop; lost "
      f"{r['lost_writes']} of {r['acknowledged_writes']} writes; {r['faults']} faults, "
      f"p50 {r['fault_latency_ms_p50']} ms\n")
    for h in r["per_hop"]:
        w(f"  {h['from']} -> {h['to']}: downtime {h['downtime_ms']} ms "
          f"{h['downtime_steps_ms']}\n")
    for q in r["qemu"].values():
        w(f"QEMU {q['mode']}: downtime p50 {q['downtime_ms_p50']} ms, max "
          f"{q['downtime_ms_max']} ms; total {q['total_s']} s; lost {q['lost_writes']}\n")
    if r["qemu"]:
        w(f"ferry / best QEMU ({r['qemu_best_mode']}): downtime ratio {r['downtime_ratio']}\n")


if __name__ == "__main__":
    main()
