"""Benchmark: an OCI image's Redis, from a registry to the first ``PONG``.

Setup (not timed): a local registry (Debian's docker-registry on loopback) and the
``redis`` test image built from Debian packages and pushed to it
(:mod:`ferry.testing.oci_images`); a private cache whose Debian packages, kernel and
agent come from the host's cache (so nothing is downloaded), but with no pulled image,
guest or snapshot in it.

* ``pull_and_first_start_s``: ``ferry vm run oci://REF --detach -p ...`` as a user runs it
  on that empty cache (pull, unpack, ext4, guest initramfs, boot until ready, snapshot,
  resume), from the process start to the first ``+PONG`` on the published port.
* ``cold_boot_ms`` (the baseline): the image cached, its guest booted from scratch (RAM on
  FUSE, disk on NBD, its own network namespace and port forward, as a snapshot boot is)
  by a warm child process, from "go" to the first ``+PONG``.
* ``resume_ms``: the snapshot of the ready application resumed by the same kind of child
  (:func:`ferry.node.supervisor.supervise`, what ``ferry vm run`` runs), "go" to the
  first ``+PONG``.
* ``speedup``: ``cold_boot_ms / resume_ms`` (medians, the same run); ``goal_met``: the
  issue's ``resume_ms <= 150`` under TCG.

Each of ``--reps`` rounds runs one cold boot then one resume, so drift on the shared
machine hits both alike. The probe connects every 5 ms (a refused connection) or waits
on an accepted one (ferry holds connections until the guest runs) and sends ``PING``.
Prints one line per measurement, or one JSON document with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
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

from ferry.hostconfig import HostConfig
from ferry.testing.oci_images import build_and_push
from ferry.testing.registry import local_registry

PROBE_EVERY_S = 0.005
PROBE_WAIT_S = 0.5  # on an accepted connection, before trying a new one
GOAL_RESUME_MS = 150.0
CHILD = """
import asyncio, dataclasses, json, os, signal, sys
from pathlib import Path
from ferry.hostconfig import HostConfig
from ferry.net import PortForward
from ferry.storage import FileDevice
from ferry.oci import pull
from ferry.oci.guest import RunOverrides, guest_image
from ferry.vm.snapshot import booted
from ferry.node.supervisor import LaunchRequest, supervise

mode, root, port, vm_id, arg = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
host = dataclasses.replace(HostConfig.from_environ(os.environ), run_root=root / "run",
                           state_root=root / "state")
fwd = PortForward("127.0.0.1", port, 6379)

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\\n"); sys.stdout.flush()

async def cold():
    image = await pull(arg, cache_dir=host.cache_root)  # by digest: a cache hit
    built = guest_image(image, RunOverrides(), cache_dir=host.cache_root, disk_dir=root / vm_id)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    say({"ready": True}); sys.stdin.readline()
    async with FileDevice(root / vm_id / "memory", size_bytes=built.blueprint.memory_mib << 20,
                          create=True) as mem, FileDevice(built.rootfs) as disk:
        async with booted(built.blueprint, mem, disk, work_dir=root / vm_id / "w",
                          forwards=[fwd], host=host, image=built) as b:
            say({"ready_s": b.ready_s})
            await stop.wait()

async def resume():
    request = LaunchRequest(vm_id, Path(arg), host, (fwd,))
    say({"ready": True}); sys.stdin.readline()
    await supervise(request, on_ready=say)

asyncio.run(cold() if mode == "cold" else resume())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_WAIT_S) as s:
            s.settimeout(PROBE_WAIT_S)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def first_pong(port: int, timeout_s: float) -> None:
    """Return at the first ``+PONG`` from 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        if await asyncio.to_thread(_ping, port):
            return
        await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - started)))
    raise TimeoutError(f"no PONG on port {port} within {timeout_s} s")


async def first_start(env: dict[str, str], ref: str, port: int) -> float:
    """``ferry vm run oci://REF --detach`` on an empty image cache, to the first PONG."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.cli.main", "vm", "run", f"oci://{ref}", "--name", "first",
        "--detach", "-p", f"127.0.0.1:{port}:6379", "--no-progress", env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await first_pong(port, 600.0)
        seconds = time.monotonic() - t0
    finally:
        _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ferry vm run failed: {err.decode().strip()}")
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ferry.cli.main", "vm", "stop",
                            "first"], env=env, capture_output=True, check=True, timeout=120)
    return seconds


async def one(mode: str, root: Path, vm_id: str, arg: str, env: dict[str, str]) -> float:
    """One cold boot or resume in a warm child: "go" to the first PONG, in ms."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, mode, str(root), str(port), vm_id, arg, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert json.loads(await proc.stdout.readline()) == {"ready": True}
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        go = time.monotonic()
        await first_pong(port, 300.0)
        return (time.monotonic() - go) * 1e3
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        shutil.rmtree(root / vm_id, ignore_errors=True)


def cleanup(root: Path) -> None:
    """Whatever a failed rep left (a network, a mount), then the directory."""
    subprocess.run([sys.executable, "-c",
                    "import asyncio,sys; from pathlib import Path; "
                    "from ferry.vm.registry import VMPaths, cleanup_leftovers; "
                    "asyncio.run(cleanup_leftovers(VMPaths(Path(sys.argv[1]), "
                    "Path(sys.argv[2]))))", str(root / "run"), str(root / "state")],
                   check=False, timeout=60, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


async def bench(reps: int, say: Any) -> dict[str, Any]:
    shared = HostConfig.from_environ(os.environ).cache_root
    root = Path(tempfile.mkdtemp(prefix="fboci-"))
    try:
        cache = root / "cache"
        cache.mkdir()
        for name in ("debs", "agent"):
            (shared / name).mkdir(parents=True, exist_ok=True)
            (cache / name).symlink_to(shared / name)
        env = {**os.environ, "FERRY_CACHE_DIR": str(cache), "FERRY_RUN_DIR": str(root / "run"),
               "FERRY_STATE_DIR": str(root / "state")}
        with local_registry(root / "registry") as reg:
            ref = build_and_push("redis", reg.address, cache_dir=shared, work_dir=root)
            first_s = await first_start(env, ref, free_port())
            say(f"pull_and_first_start_s {first_s:.2f}")
            image = json.loads(next((cache / "oci" / "images").glob("*/image.json")).read_text())
            (package,) = (cache / "oci" / "packages").iterdir()
            pinned = f"{ref.rsplit(':', 1)[0]}@{image['digest']}"
            cold: list[float] = []
            resumed: list[float] = []
            for i in range(reps):
                cold.append(await one("cold", root, f"cold-{i}", pinned, env))
                say(f"cold_boot_ms {cold[-1]:.0f}")
                resumed.append(await one("resume", root, f"resume-{i}", str(package), env))
                say(f"resume_ms {resumed[-1]:.0f}")
    finally:
        await asyncio.to_thread(cleanup, root)
    cold_ms, resume_ms = statistics.median(cold), statistics.median(resumed)
    return {"pull_and_first_start_s": first_s, "cold_boot_ms": cold_ms, "resume_ms": resume_ms,
            "speedup": cold_ms / resume_ms, "goal_resume_ms": GOAL_RESUME_MS,
            "goal_met": resume_ms <= GOAL_RESUME_MS, "reps": reps,
            "cold_boot_ms_all": cold, "resume_ms_all": resumed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="cold boots and resumes (3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    result = asyncio.run(bench(args.reps, say))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"speedup {result['speedup']:.1f}x (cold boot {result['cold_boot_ms']:.0f} ms / "
              f"resume {result['resume_ms']:.0f} ms, medians of {args.reps}); goal "
              f"resume <= {GOAL_RESUME_MS:.0f} ms {'met' if result['goal_met'] else 'missed'}")


if __name__ == "__main__":
    main()
