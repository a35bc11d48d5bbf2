#!/usr/bin/env python3
"""Benchmark: the node daemon's resume against the CLI's, and ``ferry vm ls`` as a process.

Setup (not timed): a Redis package made as users make it (``ferry key create
--trust``, ``ferry vm snapshot redis --package``), a ``ferry daemon`` process on
private directories, and one untimed run of the package through each path so
the package cache is warm for both.

Then ``--reps`` times each, with the same first-PONG probe as ``bench/resume.py``
(:func:`ferry.testing.probe.first_pong`):

* ``api``: ``POST /v1/vms`` on the daemon's UNIX socket (what a scheduler or
  dashboard does), clock from the request to the first ``+PONG`` on the forwarded
  port; stopped with ``POST /v1/vms/{id}/stop``. Measured on a daemon with
  ``--warm-vms N`` (default 1: each run claims a VM of the package resumed ahead of
  need and primed, and the next rep starts once the replacement is ready, as on a host
  that runs one package again and again), on one whose warm VMs are not primed
  (``--no-warm-prime``: ``api_resume_unprimed_ms``), and on one without warm VMs
  (``api_resume_cold_ms``).
* ``cli``: ``ferry vm run FILE --detach -p ...`` as a process (today's user path),
  clock from the spawn to the first ``+PONG``; stopped with ``ferry vm stop``; alternating
  with the cold API runs, on the daemon without warm VMs.

``cli_ls_ms``: wall time of ``ferry vm ls`` as a whole process while the daemon runs
(the ``ferry`` script's entry, which asks the daemon), median of ``--reps``.
``warm_pool``: whether ``api_resume_ms`` ran with warm VMs (``--warm-vms`` > 0);
``warm_holders``: holder processes the daemon keeps started (``--warm-holders``).

Usage: ``sudo .venv/bin/python bench/daemon.py [--reps 5] [--warm-vms 1] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.daemon.client import DaemonClient
from ferry.testing.packages import FERRY, Signer
from ferry.testing.probe import first_pong

STOP_TIMEOUT_S = 120.0
STEPS = ("setup_s", "load_s", "cont_s", "running_s", "forwards_s", "agent_s", "total_s")
"""Steps of the holder's resume timings (``resume`` in the run's result) reported, median ms."""
WARM_HOLDERS = 1
"""``ferry daemon --warm-holders``: holder processes started ahead of need (its default)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Bench:
    def __init__(self, root: Path, signer: Signer) -> None:
        self.root = root
        self.env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(root / "run"),
                    "FERRY_STATE_DIR": str(root / "state"),
                    "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
        self.daemon: subprocess.Popen[str] | None = None
        self.api = DaemonClient.unix(root / "run" / "ferryd.sock")
        self.steps: dict[str, list[dict[str, float]]] = {}
        """Per label: each run's resume steps (ms), as the holder timed them."""

    def start_daemon(self, warm_vms: int = 0, *, prime: bool = True) -> None:
        self.daemon = subprocess.Popen([*FERRY, "daemon", "--json", "--warm-holders",
                                        str(WARM_HOLDERS), "--warm-vms", str(warm_vms),
                                        *(() if prime else ("--no-warm-prime",))],
                                       env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
        assert self.daemon.stdout is not None
        line = self.daemon.stdout.readline()
        if not line or json.loads(line).get("event") != "listening":
            raise SystemExit("bench/daemon.py: the daemon did not start")

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=60)
            self.daemon = None

    def ferry(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FERRY, *args], env=self.env, capture_output=True, text=True,
                              timeout=STOP_TIMEOUT_S, check=True)

    async def api_resume(self, package: Path, name: str, label: str = "") -> float:
        port = _free_port()
        t0 = time.monotonic()
        op = await asyncio.to_thread(self.api.call, "POST", "/v1/vms", {
            "package": str(package), "name": name, "publish": [f"127.0.0.1:{port}:6379"]})
        pong = asyncio.create_task(first_pong(port))
        op = await asyncio.to_thread(self.api.wait, op)
        if op["state"] != "succeeded":
            pong.cancel()
            raise SystemExit(f"bench/daemon.py: run failed: {op}")
        await pong
        ms = (time.monotonic() - t0) * 1e3
        resume = op["result"].get("resume") or {}
        steps = {k: resume[k] * 1e3 for k in STEPS if isinstance(resume.get(k), float | int)}
        if isinstance(resume.get("launched_monotonic_s"), float):
            # The holder's launch (the claim, for a warm VM) on the same monotonic clock.
            steps["launched_after_post"] = (resume["launched_monotonic_s"] - t0) * 1e3
        steps["pong"] = ms
        self.steps.setdefault(label, []).append(steps)
        await asyncio.to_thread(self.api.call, "POST", f"/v1/vms/{name}/stop", {})
        return ms

    async def wait_warm(self, want: int) -> None:
        """Until the daemon has ``want`` warm VMs ready (a replacement started after the
        last run), so a timed run neither races nor waits for it."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            node = await asyncio.to_thread(self.api.call, "GET", "/v1/node")
            if node["warm_vms"] >= want:
                return
            await asyncio.sleep(0.1)
        raise SystemExit("bench/daemon.py: no warm VM became ready")

    async def cli_resume(self, package: Path, name: str) -> float:
        port = _free_port()
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *FERRY, "vm", "run", str(package), "--name", name, "--detach",
            "-p", f"127.0.0.1:{port}:6379", env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await first_pong(port)
        ms = (time.monotonic() - t0) * 1e3
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench/daemon.py: ferry vm run failed: {err.decode()[-500:]}")
        await asyncio.to_thread(self.ferry, "vm", "stop", name)
        return ms

    def cli_ls(self) -> float:
        """``ferry vm ls`` as the ``ferry`` script runs it (:mod:`ferry.cli.entry`)."""
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "ferry.cli.entry", "vm", "ls"], env=self.env,
                       capture_output=True, timeout=60, check=True)
        return (time.monotonic() - t0) * 1e3

    def cleanup(self) -> None:
        """Stop every VM a failed rep left (their holders clean up), then the daemon."""
        for rec in (self.root / "run" / "vms").glob("*/supervisor.json"):
            with contextlib.suppress(Exception):
                pid = json.loads(rec.read_text())["pid"]
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.stop_daemon()


async def run(reps: int, warm_vms: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fbd-"))
    signer = Signer(root / "signer")
    t0 = time.monotonic()
    package = await asyncio.to_thread(signer.package, "redis")
    package_s = time.monotonic() - t0
    bench = Bench(root, signer)
    try:
        bench.start_daemon()
        await bench.api_resume(package, "first-api")  # untimed: extracts the package
        await bench.cli_resume(package, "first-cli")
        cold_ms: list[float] = []
        cli_ms: list[float] = []
        ls_ms: list[float] = []
        api_ms: list[float] = []
        for i in range(reps):
            cold_ms.append(await bench.api_resume(package, f"cold-{i}", "cold"))
            cli_ms.append(await bench.cli_resume(package, f"cli-{i}"))
            ls_ms.append(await asyncio.to_thread(bench.cli_ls))
        node = await asyncio.to_thread(bench.api.call, "GET", "/v1/node")
        bench.stop_daemon()
        unprimed_ms: list[float] = []
        if warm_vms > 0:
            for prime, into, label in ((False, unprimed_ms, "unprimed"), (True, api_ms, "api")):
                bench.start_daemon(warm_vms, prime=prime)
                await bench.api_resume(package, "first-warm")  # untimed: the pool fills after
                for i in range(reps):
                    await bench.wait_warm(1)
                    into.append(await bench.api_resume(package, f"api-{i}", label))
                bench.stop_daemon()
        else:
            api_ms = cold_ms
    finally:
        bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    api, cli = statistics.median(api_ms), statistics.median(cli_ms)
    return {
        "reps": reps,
        "api_resume_ms": round(api, 1),
        "api_resume_cold_ms": round(statistics.median(cold_ms), 1),
        "api_resume_unprimed_ms": round(statistics.median(unprimed_ms), 1)
        if unprimed_ms else None,
        "cli_resume_ms": round(cli, 1),
        "api_vs_cli": round(api / cli, 2),
        "cli_ls_ms": round(statistics.median(ls_ms), 1),
        "warm_pool": warm_vms > 0,
        "warm_vms": warm_vms,
        "warm_holders": WARM_HOLDERS,
        "api_resume_ms_all": [round(v, 1) for v in api_ms],
        "api_resume_cold_ms_all": [round(v, 1) for v in cold_ms],
        "api_resume_unprimed_ms_all": [round(v, 1) for v in unprimed_ms],
        "cli_resume_ms_all": [round(v, 1) for v in cli_ms],
        "cli_ls_ms_all": [round(v, 1) for v in ls_ms],
        "resume_steps_ms": {label: {k: round(statistics.median(r.get(k, 0.0) for r in runs), 1)
                                    for k in ("launched_after_post", *STEPS, "pong")}
                            for label, runs in bench.steps.items() if label},
        "accel": node["accelerator"]["accel"],
        "package_s": round(package_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warm-vms", type=int, default=1,
                        help="the daemon's --warm-vms for api_resume_ms (0: no warm pool)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/daemon.py needs root (network namespaces, FUSE)")
    result = asyncio.run(run(args.reps, args.warm_vms))
    if args.json:
        print(json.dumps(result))
        return
    print(f"resume to first PONG, median of {args.reps}: API {result['api_resume_ms']} ms "
          f"(warm pool: {result['warm_pool']}; unprimed: {result['api_resume_unprimed_ms']} "
          f"ms; without: {result['api_resume_cold_ms']} ms), "
          f"CLI {result['cli_resume_ms']} ms (API/CLI {result['api_vs_cli']}); "
          f"`ferry vm ls` {result['cli_ls_ms']} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
