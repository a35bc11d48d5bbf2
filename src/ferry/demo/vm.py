"""The VM demo: a Redis VM snapshotted into a signed package and resumed from it.

Steps (each one a library call a user could make with the CLI):

1. a demo signing key, trusted only by the demo's own trust list;
2. the Redis blueprint booted once, a key written into it, snapshotted and signed
   into one package file (kept for the next run, re-verified every time);
3. the package resumed as a VM in its own network namespace with Redis published
   on a loopback port; the time from launch to the first PONG is measured;
4. a client talks to Redis on that port and reads the key written before the
   snapshot, then the VM is stopped and discarded.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.hostconfig import HostConfig
from ferry.net.forward import PortForward
from ferry.node import supervisor
from ferry.node.control import ControlClient
from ferry.node.process import launch_detached
from ferry.package.commands import package_create
from ferry.package.keys import generate_key
from ferry.package.trust import TrustStore
from ferry.qemu.accel import cache_key
from ferry.qemu.argv import QEMU_BINARY
from ferry.testing.workload import command
from ferry.vm import pkgcache, registry, snapshot

GREETING = "hello from a ferry snapshot"
PING_TIMEOUT_S = 30.0

Progress = Callable[[str], None]


@dataclass(slots=True)
class VMDemoResult:
    package: Path
    package_bytes: int
    package_reused: bool
    vm_id: str
    port: int
    launch_to_pong_ms: float
    resume: dict[str, Any] = field(default_factory=dict)
    greeting: str = ""
    set_get_ok: bool = False

    @property
    def ok(self) -> bool:
        return self.greeting == GREETING and self.set_get_ok


def demo_dir(host: HostConfig) -> Path:
    return host.cache_root / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def redis_command(port: int, *args: str, timeout_s: float = 5.0) -> bytes:
    """Send one RESP command to Redis on 127.0.0.1:port and return the raw reply line(s)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(command(*args))
            await writer.drain()
            first = await reader.readline()
            if first.startswith(b"$") and first[1:3] != b"-1":
                first += await reader.readexactly(int(first[1:].strip()) + 2)
            return first
        finally:
            writer.close()


async def wait_for_pong(port: int, timeout_s: float = PING_TIMEOUT_S) -> float:
    """Poll PING until +PONG; returns the monotonic time of the first PONG."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await redis_command(port, "PING", timeout_s=1.0)).startswith(b"+PONG"):
                return time.monotonic()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        if time.monotonic() > deadline:
            raise FerryError(f"Redis did not answer PING on port {port} in {timeout_s} s")
        await asyncio.sleep(0.005)


async def _ensure_package(root: Path, progress: Progress,
                          host: HostConfig) -> tuple[Path, TrustStore, bool]:
    key = root / "keys" / "signing.key"
    if not key.exists():
        generate_key(key, comment="ferry demo")
    trust = TrustStore.of().add(key.with_name(key.name + ".pub"))
    package = root / "redis.ferry"
    # A package's device state only loads into the QEMU that saved it (QEMU 7.2's state
    # does not load into QEMU 10: "Size mismatch: pc.bios"): rebuild when QEMU changed.
    made_by = root / "redis.ferry.qemu"
    qemu = json.dumps(cache_key(QEMU_BINARY, "")["qemu"])
    if package.exists() and made_by.exists() and made_by.read_text() == qemu:
        return package, trust, True
    work = root / "redis-snapshot"
    await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    progress("booting the Redis blueprint once (TCG: several seconds) and snapshotting it")
    await snapshot.snapshot(
        "redis",
        work,
        prepare=[f"redis-cli set greeting '{GREETING}'"],
        host=host,
        progress=progress,
    )
    progress("signing the snapshot into one package file")
    tmp = package.with_suffix(".tmp")
    await asyncio.to_thread(functools.partial(package_create, work, tmp, key_path=key,
                                              overwrite=True))
    os.replace(tmp, package)
    made_by.write_text(qemu)
    await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    return package, trust, False


async def run_vm_demo(progress: Progress, host: HostConfig) -> VMDemoResult:
    root = demo_dir(host)
    root.mkdir(parents=True, exist_ok=True)
    paths = registry.VMPaths.of(host)
    await registry.cleanup_leftovers(paths)
    package, trust, reused = await _ensure_package(root, progress, host)
    progress(f"verifying {package.name} and extracting it into the package cache")
    opened = await asyncio.to_thread(functools.partial(
        pkgcache.open_package, package, trust, cache_dir=host.package_cache))
    port = _free_port()
    vm_id = f"demo-{snapshot.short_id()}"
    request = supervisor.LaunchRequest(
        vm_id, opened.directory, host, (PortForward("127.0.0.1", port, 6379),)
    )
    progress(f"resuming the package as VM {vm_id}, Redis published on 127.0.0.1:{port}")
    started = time.monotonic()
    report = await launch_detached(request)
    try:
        pong = await wait_for_pong(port)
        greeting = await redis_command(port, "GET", "greeting")
        set_ok = (await redis_command(port, "SET", "resumed", "yes")).startswith(b"+OK")
        get_ok = (await redis_command(port, "GET", "resumed")).endswith(b"yes\r\n")
    finally:
        await ControlClient(paths.control_socket(vm_id), vm_id).stop()
    text = greeting.split(b"\r\n")[1].decode(errors="replace") if b"\r\n" in greeting else ""
    return VMDemoResult(
        package,
        package.stat().st_size,
        reused,
        vm_id,
        port,
        (pong - started) * 1e3,
        report.get("resume", {}),
        text,
        set_ok and get_ok,
    )
