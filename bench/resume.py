"""Benchmark: Redis reachable on a forwarded port, cold boot vs resuming its package.

Setup (not timed): build the Redis blueprint, snapshot it (with a key
written), sign the package and verify/extract it into a private cache.
Then, ``--reps`` times each, alternating:

* **cold boot**: a supervisor-like child process (ferry already imported,
  as a node daemon would be) boots the blueprint with RAM on FUSE, root
  disk on NBD, its own network namespace and the port forward;
* **resume**: the same kind of child resumes the package
  (:func:`ferry.node.supervisor.supervise`, what ``ferry vm run`` runs).

The clock starts when the parent tells the warm child "go" and stops at the
first ``+PONG`` read from the forwarded port on 127.0.0.1. The client probes
like a user retrying (``--probe serial``, default): one connection at a
time, a refused one retried 5 ms after the previous attempt began, an
accepted one waited for (ferry holds it until the guest runs), with another
attempt joining every 50 ms while none is answered (a SYN sent to a guest
that is still booting is lost, and TCP would retry it only after 1 s).
``--probe flood`` opens a new attempt every 5 ms regardless (the old method:
every attempt made before the guest runs is one more connection it must
serve at once, and each lost SYN waits for TCP's retransmit).

The resume breakdown comes from the child's report (see
:class:`ferry.vm.runner.ResumeTimings` for what overlaps what); right after
the first PONG the parent asks the supervisor's control socket how much
guest RAM went through FUSE and how much CPU QEMU used, to tell where the
time between "running" and the PONG went. ``--cli-reps`` adds the time of
the whole ``ferry vm run --detach`` command, Python start included.

    .venv/bin/python bench/resume.py --reps 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

ATTEMPT_EVERY_S = 0.005
ATTEMPT_TIMEOUT_S = 2.0
STALL_S = 0.05
"""serial probing: an attempt still unanswered after this gets company (a SYN lost to a
guest still booting would otherwise cost TCP's 1 s retransmit; this bounds how late a
cold boot is seen to answer)."""
PING_DEADLINE_S = 240.0

CHILD = r"""
import asyncio, dataclasses, json, os, signal, sys
from pathlib import Path
from ferry.hostconfig import HostConfig
from ferry.net import PortForward
from ferry.storage import FileDevice
from ferry.vm.registry import VMPaths
from ferry.vm.snapshot import booted
from ferry.node.supervisor import LaunchRequest, supervise
from ferry.guest.image import build_blueprint

mode, root, port, vm_id = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host = dataclasses.replace(HostConfig.from_environ(os.environ), run_root=root / "run",
                           state_root=root / "state")
paths = VMPaths.of(host)
fwd = PortForward("127.0.0.1", port, 6379)

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

async def cold():
    image = build_blueprint("redis", root / vm_id, cache_dir=host.cache_root)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    say({"ready": True}); sys.stdin.readline()
    async with FileDevice(root / vm_id / "memory", size_bytes=image.blueprint.memory_mib << 20,
                          create=True) as mem, FileDevice(image.rootfs) as disk:
        async with booted("redis", mem, disk, work_dir=root / vm_id / "w", forwards=[fwd],
                          host=host, image=image) as b:
            say({"boot_to_agent_s": b.boot_to_agent_s, "ready_s": b.ready_s})
            await stop.wait()

async def resume():
    request = LaunchRequest(vm_id, Path(sys.argv[5]), host, (fwd,))
    say({"ready": True}); sys.stdin.readline()
    await supervise(request, on_ready=say)

asyncio.run(cold() if mode == "cold" else resume())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _ping_once(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await reader.readline()).startswith(b"+PONG")
    finally:
        writer.close()


async def first_pong(port: int, probe: str = "serial") -> float:
    """Seconds until a PING on ``port`` is answered.

    ``serial`` (default): one client at a time, like a user retrying: a refused
    connection is retried 5 ms after the previous attempt began; an accepted one
    is waited for (ferry holds it until the guest runs), with a second attempt
    joining every ``STALL_S`` while none answers. ``flood``: a new attempt
    every 5 ms regardless, each one more connection the guest must serve.
    """
    t0 = time.monotonic()
    won: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def attempt() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                if await _ping_once(port) and not won.done():
                    won.set_result(time.monotonic() - t0)

    tasks: set[asyncio.Task[None]] = set()
    try:
        while not won.done():
            if time.monotonic() - t0 > PING_DEADLINE_S:
                raise TimeoutError(f"no PONG on port {port} within {PING_DEADLINE_S} s")
            started = time.monotonic()
            task = asyncio.create_task(attempt())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if probe == "flood":
                await asyncio.wait([won], timeout=ATTEMPT_EVERY_S)
                continue
            pending: list[asyncio.Future[Any]] = [won, task]
            await asyncio.wait(pending, timeout=STALL_S, return_when=asyncio.FIRST_COMPLETED)
            pause = ATTEMPT_EVERY_S - (time.monotonic() - started)
            if task.done() and not won.done() and pause > 0:
                await asyncio.wait([won], timeout=pause)
        return won.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _redis_get(port: int, key: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {key}\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[1]


async def one_run(mode: str, root: Path, vm_id: str, package_dir: Path | None,
                  check_key: bool, probe: str = "serial") -> dict[str, Any]:
    port = _free_port()
    args = [sys.executable, "-c", CHILD, mode, str(root), str(port), vm_id]
    if package_dir is not None:
        args.append(str(package_dir))
    proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert json.loads(await proc.stdout.readline()) == {"ready": True}
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        go = time.monotonic()
        seconds = await first_pong(port, probe)
        pong = time.monotonic()
        at_pong = await _status(root, vm_id) if mode == "resume" else {}
        t0 = time.monotonic()
        warm_ok = await _ping_once(port)
        warm_ms = (time.monotonic() - t0) * 1e3
        report = json.loads(await proc.stdout.readline())
        result = {"ms": seconds * 1e3, "report": report, "at_pong": at_pong,
                  "next_ping_ms": warm_ms if warm_ok else None}
        resume = report.get("resume")
        if resume:
            # CLOCK_MONOTONIC is system-wide: the child's instants line up with ours.
            launched = resume["launched_monotonic_s"]
            result["go_to_launch_ms"] = (launched - go) * 1e3
            result["running_to_pong_ms"] = (pong - launched - resume["running_s"]) * 1e3
        if check_key:
            result["key"] = await asyncio.to_thread(_redis_get, port, "snapshotted")
        return result
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _status(root: Path, vm_id: str) -> dict[str, Any]:
    """The supervisor's live counters: guest RAM read through FUSE, QEMU's CPU use."""
    from ferry.node.control import ControlClient
    from ferry.vm.registry import VMPaths

    paths = VMPaths(root / "run", root / "state")
    try:
        reply = await ControlClient(paths.control_socket(vm_id), vm_id).status()
    except Exception as exc:  # diagnosis only: the bench result does not depend on it
        return {"error": str(exc)}
    return {**reply.memory_io, "qemu": dict(reply.qemu_usage)}


async def cli_run(root: Path, package: Path, env: dict[str, str], probe: str) -> float:
    port = _free_port()
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.cli.main", "vm", "run", "--detach", "--name", "cli",
        "-p", f"127.0.0.1:{port}:6379", str(package), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await first_pong(port, probe)
        return (time.monotonic() - t0) * 1e3
    finally:
        await proc.wait()
        stop = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ferry.cli.main", "vm", "stop", "cli", env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await stop.wait()


async def bench(reps: int, cli_reps: int, progress: bool, probe: str) -> dict[str, Any]:
    from ferry.hostconfig import HostConfig
    from ferry.package import TrustStore, generate_key, load_private_key, write_package
    from ferry.vm.manifest import VMManifest
    from ferry.vm.pkgcache import open_package
    from ferry.vm.snapshot import snapshot

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="fbr-"))
    try:
        say("snapshotting redis")
        t0 = time.monotonic()
        host = dataclasses.replace(HostConfig.from_environ(os.environ), run_root=root / "run",
                                   state_root=root / "state")
        snap = await snapshot("redis", root / "pkg", prepare=["redis-cli set snapshotted yes"],
                              host=host)
        snapshot_s = time.monotonic() - t0
        generate_key(root / "k.key")
        trust = TrustStore.from_path(root / "trust", missing_ok=True).add(root / "k.key.pub")
        info = write_package(root / "pkg", root / "redis.ferry", load_private_key(root / "k.key"),
                             manifest=VMManifest.load(root / "pkg").to_json())
        opened = open_package(root / "redis.ferry", trust, cache_dir=root / "pkgcache")
        cold: list[dict[str, Any]] = []
        resumed: list[dict[str, Any]] = []
        for i in range(reps):
            say(f"rep {i + 1}/{reps}: cold boot")
            cold.append(await one_run("cold", root, f"cold{i}", None, False, probe))
            say(f"rep {i + 1}/{reps}: resume ({cold[-1]['ms']:.0f} ms cold)")
            resumed.append(await one_run("resume", root, f"res{i}", opened.directory, True,
                                         probe))
            say(f"           resumed in {resumed[-1]['ms']:.0f} ms")
        cli_ms: list[float] = []
        env = {**os.environ, "FERRY_RUN_DIR": str(root / "run"),
               "FERRY_STATE_DIR": str(root / "state"), "FERRY_TRUST_DIR": str(root / "trust"),
               "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
        for i in range(cli_reps):
            say(f"cli rep {i + 1}/{cli_reps}")
            cli_ms.append(await cli_run(root, root / "redis.ferry", env, probe))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cold_ms = statistics.median(r["ms"] for r in cold)
    resume_ms = statistics.median(r["ms"] for r in resumed)
    fields = [k for k in resumed[0]["report"]["resume"]
              if k.endswith("_s") and k != "launched_monotonic_s"]
    breakdown = {f"{k.removesuffix('_s')}_ms": round(statistics.median(
        r["report"]["resume"][k] for r in resumed) * 1e3, 1) for k in fields}
    breakdown["running_to_pong_ms"] = _median(r.get("running_to_pong_ms") for r in resumed)
    return {
        "reps": reps,
        "probe": probe,
        "cold_boot_ms": round(cold_ms, 1),
        "resume_ms": round(resume_ms, 1),
        "speedup": round(cold_ms / resume_ms, 1),
        "redis_ok": all(r["key"] == b"yes" for r in resumed),
        "cold_boot_ms_all": [round(r["ms"], 1) for r in cold],
        "resume_ms_all": [round(r["ms"], 1) for r in resumed],
        "resume_breakdown_ms": breakdown,
        "after_running": _after_running(resumed),
        "next_ping_ms": _median(r.get("next_ping_ms") for r in resumed),
        "resume_cli_ms": round(statistics.median(cli_ms), 1) if cli_ms else None,
        "snapshot_s": round(snapshot_s, 2),
        "state_bytes": snap.device_state.state_bytes,
        "package_bytes": info.compressed_bytes,
        "memory_mib": snap.manifest.machine.memory_mib,
        "accel": snap.manifest.machine.accel,
    }


def _median(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _after_running(resumed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of what happened between "running" and the first PONG (diagnosis)."""
    reads, mib, cpu, wait, minflt = [], [], [], [], []
    for r in resumed:
        at_pong, resume = r.get("at_pong", {}), r["report"]["resume"]
        if "reads" in at_pong:
            reads.append(at_pong["reads"] - resume["ram_reads_at_running"])
            mib.append((at_pong["bytes_read"] - resume["ram_read_bytes_at_running"]) / 2**20)
        q0, q1 = resume.get("qemu_at_running") or {}, at_pong.get("qemu") or {}
        if q0 and q1:
            cpu.append((q1["cpu_s"] - q0["cpu_s"]) * 1e3)
            wait.append((q1["runqueue_wait_s"] - q0["runqueue_wait_s"]) * 1e3)
            minflt.append(q1["minflt"] - q0["minflt"])
    return {"fuse_reads": _median(reads), "fuse_read_mib": _median(mib),
            "qemu_cpu_ms": _median(cpu), "qemu_runqueue_wait_ms": _median(wait),
            "qemu_minor_faults": _median(minflt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cli-reps", type=int, default=2,
                        help="also time the whole 'ferry vm run --detach' command")
    parser.add_argument("--probe", choices=("serial", "flood"), default="serial",
                        help="how the client looks for the first PONG (see the module doc)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(bench(args.reps, args.cli_reps, progress=not args.json,
                               probe=args.probe))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
