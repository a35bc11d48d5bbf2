"""Live-migrate a Redis VM under write load between two namespace hosts, back and forth.

    sudo .venv/bin/python bench/live_migrate.py --runs 5 --json

Hosts ``lba`` and ``lbb`` run ferry peers (one process per hop, see
ferry.testing.peer); a client on host ``lbc`` writes ``SET`` continuously to
the VM's forwarded port, reconnecting to whichever host serves it. Reports
downtime (source paused -> destination running: the source's view, ended by
the destination's "running" acknowledgement, and the offset-corrected figure
with its uncertainty, see ferry.live.downtime), its step-by-step breakdown,
totals, bytes, post-copy fetches, acknowledged and lost writes, and the
longest stall the client saw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.guest.image import build_blueprint, load_blueprint
from ferry.live.downtime import STEPS
from ferry.net import cleanup_leftovers
from ferry.testing.hosts import host_namespaces
from ferry.testing.peer_control import PeerProcess
from ferry.testing.workload import RedisWriter

HOSTS = ("lba", "lbb", "lbc")
MIGRATE_PORT = 7511
REDIS_PORT = 16379


def _p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else float("nan")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ferry-live-bench-"))
    img = await asyncio.to_thread(build_blueprint, load_blueprint("redis"), work / "img")
    base = ["--name", "redis", "--kernel", str(img.kernel), "--initramfs", str(img.initramfs),
            "--memory-mib", str(img.blueprint.memory_mib), "--forward", f"{REDIS_PORT}:6379",
            "--mode", args.mode, "--state", args.state]
    runs: list[dict[str, Any]] = []
    async with host_namespaces(list(HOSTS), switch_tag="lb") as hosts, \
            contextlib.AsyncExitStack() as stack:
        counter = iter(range(10_000))

        async def start_peer(host: str) -> PeerProcess:
            d = work / f"peer{next(counter)}-{host}"
            d.mkdir()
            return await stack.enter_async_context(
                PeerProcess.start(hosts[host], [*base, "--work-dir", str(d)], d / "peer.log"))

        try:
            here = "lba"
            src = await start_peer(here)
            t0 = time.monotonic()
            await src.request({"cmd": "boot", "rootfs": str(img.rootfs)})
            boot_s = time.monotonic() - t0
            writer = RedisWriter([(hosts[h].address, REDIS_PORT) for h in HOSTS[:2]],
                                 namespace=hosts["lbc"].namespace)
            stop = asyncio.Event()
            load = asyncio.create_task(writer.run(stop))
            await writer.wait_acknowledged(200)
            chain_ok = True
            for _ in range(args.runs):
                there = "lbb" if here == "lba" else "lba"
                dst = await start_peer(there)
                listening = await dst.request({"cmd": "receive", "port": MIGRATE_PORT})
                acked_before = len(writer.acknowledged)
                out = await src.request({"cmd": "migrate", "host": hosts[there].address,
                                         "port": MIGRATE_PORT, "token": listening["token"]})
                received = await dst.next_event("received")
                chain_ok &= bool(received["ok"]) and out["report"]["outcome"] == "completed"
                rep = received.get("report") or {}
                mig = out["report"]["migration"]
                summary = out["summary"]
                runs.append({
                    "from": here, "to": there,
                    "downtime_corrected_ms": summary["downtime_corrected_ms"],
                    "downtime_corrected_uncertainty_ms":
                        summary["downtime_corrected_uncertainty_ms"],
                    "downtime_steps_ms": summary["downtime_steps_ms"],
                    "downtime_source_view_ms": summary["downtime_source_view_ms"],
                    "total_s": round(mig["total_s"], 3),
                    "precopy_s": round(mig["precopy_s"], 3),
                    "postcopy_s": round(mig["postcopy_s"], 3),
                    "cycles": mig["cycles"],
                    "postcopy_fetches": mig["postcopy_fetches"],
                    "bytes_total": mig["bytes_total"], "wire_bytes": mig["wire_bytes"],
                    "bytes_by_device": {d["name"]: d["bytes_by_phase"] for d in mig["devices"]},
                    "dirty_blocks_by_cycle": {d["name"]: d["dirty_blocks_by_cycle"]
                                              for d in mig["devices"]},
                    "state_bytes": out["report"]["state_bytes"],
                    "final_flush_bytes": out["report"]["flush_bytes"],
                    "qemu_ready_before_handoff": rep.get("qemu_ready_before_handoff"),
                    "after_resume_ms": rep.get("after_resume_ms"),
                    "prefetch_windows": rep.get("prefetch_windows"),
                    "prefetch_ms": rep.get("prefetch_ms"),
                    "prefetch_ram_reads": rep.get("prefetch_ram_reads"),
                    "state_load_ram_reads": rep.get("state_load_ram_reads"),
                    "state_load_ram_read_bytes": rep.get("state_load_ram_read_bytes"),
                    "cont_ram_reads": rep.get("cont_ram_reads"),
                    "cont_ram_read_bytes": rep.get("cont_ram_read_bytes"),
                    "writes_during": len(writer.acknowledged) - acked_before,
                })
                await src.close()
                src, here = dst, there
                await writer.wait_acknowledged(len(writer.acknowledged) + 100)
            stop.set()
            await load
            lost = await writer.lost()
        finally:
            await stack.aclose()
            await cleanup_leftovers()
            await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    downtimes = [r["downtime_corrected_ms"] for r in runs
                 if r["downtime_corrected_ms"] is not None]
    steps = {s: _p50([r["downtime_steps_ms"][s] for r in runs
                      if s in (r["downtime_steps_ms"] or {})]) for s in STEPS}
    return {
        "runs": len(runs), "mode": args.mode, "state_transfer": args.state,
        "memory_mib": img.blueprint.memory_mib, "boot_s": round(boot_s, 2),
        "downtime_corrected_ms": downtimes,
        "downtime_corrected_ms_p50": _p50(downtimes),
        "downtime_corrected_ms_max": max(downtimes) if downtimes else None,
        "downtime_source_view_ms_p50": _p50([r["downtime_source_view_ms"] for r in runs
                                             if r["downtime_source_view_ms"] is not None]),
        "downtime_steps_ms_p50": steps,
        "total_s_p50": _p50([r["total_s"] for r in runs]),
        "acknowledged_writes": len(writer.acknowledged),
        "lost_writes": len(lost),
        "client_max_stall_ms": round(writer.max_stall_s * 1e3, 1),
        "client_reconnects": writer.reconnects,
        "chain_ok": chain_ok and not lost,
        "per_run": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "precopy-only"])
    p.add_argument("--state", default="payload", choices=["payload", "device"])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args()
    result = asyncio.run(bench(args))
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    sys.stdout.write(f"downtime (offset-corrected) p50 {result['downtime_corrected_ms_p50']} ms, "
                     f"max {result['downtime_corrected_ms_max']} ms over {result['runs']} runs; "
                     f"source's view p50 {result['downtime_source_view_ms_p50']} ms\n")
    for step, ms in result["downtime_steps_ms_p50"].items():
        sys.stdout.write(f"  {step:<18} {ms:8.2f} ms\n")
    sys.stdout.write(f"total p50 {result['total_s_p50']} s; writes acknowledged "
                     f"{result['acknowledged_writes']}, lost {result['lost_writes']}; longest "
                     f"client stall {result['client_max_stall_ms']} ms\n")


if __name__ == "__main__":
    main()
