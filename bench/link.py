#!/usr/bin/env python3
"""Benchmark: does the link emulator deliver the RTT and rate it is given, and at what cost?

    sudo .venv/bin/python bench/link.py --json                      # 100 ms, 1000 Mbit/s
    sudo .venv/bin/python bench/link.py --rtt-ms 20 --mbit 100 --loss 0.01 --json

Two namespace hosts on one switch (:func:`ferry.testing.hosts.host_namespaces`),
measured from sockets inside them (:mod:`ferry.testing.linkprobe`), in one run:

1. ``bridge``: the kernel bridge, no emulator: the same-run baseline;
2. ``ceiling``: through the relay with 1 ms RTT and no rate limit: the most
   the emulator itself carries (``ceiling_ratio`` = ceiling / bridge);
3. the configured link: ``rtt_ms`` (median of ``--pings`` round trips, with
   p10/p90) and ``mbit`` (wire rate: median of 250 ms bins after slow start,
   every segment's headers counted; ``goodput_mbit`` is the payload), their
   ratios to the configured values, the relay's CPU use while the rate ran
   (``relay_cpu_pct``, % of one core) and its drop counters;
4. ``ferry_buffers_mbit``: the same link with ferry's fixed socket buffers
   (:data:`ferry.transport.tuning.SOCKET_BUFFER_BYTES` on both ends, no
   autotuning): what one ferry connection with them could get from it;
5. ``ferry_fitted_mbit``: the same with the buffers ferry's VM links use now,
   fitted to the RTT the handshake measured (``TcpTuning(fit_to_link=True)``),
   and ``ferry_fitted_ratio`` against the autotuned rate of step 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from ferry.testing.hosts import host_namespaces
from ferry.testing.linkprobe import measure_rate, measure_rtt
from ferry.transport.tuning import SOCKET_BUFFER_BYTES, TcpTuning


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"lk{tag}a", f"lk{tag}b"
    with tempfile.TemporaryDirectory(prefix="ferry-link-") as run_dir:
        async with host_namespaces([a, b], switch_tag=tag, run_dir=run_dir) as hosts:
            bridge_rtt = statistics.median(await measure_rtt(hosts, a, b, samples=args.pings))
            bridge = await measure_rate(hosts, a, b, seconds=args.seconds, warmup_s=0.5)

            await hosts.set_link(a, b, rtt_ms=1.0)
            ceiling = await measure_rate(hosts, a, b, seconds=args.seconds, warmup_s=0.5)

            await hosts.set_link(a, b, rtt_ms=args.rtt_ms, mbit=args.mbit, loss=args.loss,
                                 jitter_ms=args.jitter_ms)
            before = await hosts.link_stats()
            rtts = await measure_rtt(hosts, a, b, samples=args.pings)
            pid = hosts.link_emulator_pid
            assert pid is not None
            cpu0, t0 = _cpu_s(pid), time.monotonic()
            rate = await measure_rate(hosts, a, b, seconds=args.seconds, warmup_s=args.warmup_s)
            cpu_pct = 100 * (_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
            after = await hosts.link_stats()
            fixed = await measure_rate(hosts, a, b, seconds=args.seconds,
                                       warmup_s=args.warmup_s, buffer_bytes=SOCKET_BUFFER_BYTES)
            fitted = await measure_rate(hosts, a, b, seconds=args.seconds,
                                        warmup_s=args.warmup_s,
                                        tuning=TcpTuning(dead_peer_s=None, fit_to_link=True))
    lane = f"{a}>{b}"
    delta = {k: after[lane][k] - before[lane][k] for k in after[lane]}
    rtt = statistics.median(rtts)
    return {
        "configured": {"rtt_ms": args.rtt_ms, "mbit": args.mbit, "loss": args.loss,
                       "jitter_ms": args.jitter_ms},
        "rtt_ms": round(rtt, 3),
        "rtt_ms_p10": round(_pct(rtts, 0.1), 3),
        "rtt_ms_p90": round(_pct(rtts, 0.9), 3),
        "mbit": round(rate.wire_mbit, 1),
        "goodput_mbit": round(rate.goodput_mbit, 1),
        "rtt_ratio": round(rtt / args.rtt_ms, 3) if args.rtt_ms else None,
        "mbit_ratio": round(rate.wire_mbit / args.mbit, 3),
        "relay_cpu_pct": round(cpu_pct, 1),
        "frames": delta["frames"],
        "lost": delta["lost"],
        "overflowed": delta["overflowed"],
        "bridge_rtt_ms": round(bridge_rtt, 3),
        "bridge_mbit": round(bridge.wire_mbit, 1),
        "ceiling_mbit": round(ceiling.wire_mbit, 1),
        "ceiling_ratio": round(ceiling.wire_mbit / bridge.wire_mbit, 3),
        "ferry_buffers_mbit": round(fixed.wire_mbit, 1),
        "ferry_buffer_bytes": SOCKET_BUFFER_BYTES,
        "ferry_fitted_mbit": round(fitted.wire_mbit, 1),
        "ferry_fitted_ratio": round(fitted.wire_mbit / rate.wire_mbit, 3),
        "mss_bytes": rate.mss_bytes,
        "bins_mbit": [round(x, 1) for x in rate.bins_mbit],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--mbit", type=float, default=1000.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--pings", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=4.0, help="rate measured after warm-up")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="slow start, left out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
