"""QEMU's own live migration of a package's guest: the baseline ferry is measured against.

A user who runs QEMU could move the same guest with QEMU alone. This module
does that on the same namespace hosts, from the same signed package, with
the same Redis client, so ``bench/live_migrate.py`` can print both sides of
one run:

* **the guest**: the package's kernel, initramfs and machine (CPU model,
  vCPUs, memory), its RAM image and device state restored into a plain QEMU
  on the first host: RAM in a file on tmpfs (``memory-backend-file``,
  ``share=on``) and an ``x-ignore-shared`` restore of the device state, as
  ferry restores it, but with no FUSE, no NBD and no ferry process. Every
  QEMU it then migrates to has anonymous RAM, as plain QEMU would;
* **the disk**: the package's root disk copied once into a file every host
  opens (shared storage, which QEMU's migration assumes);
* **the network**: what the snapshot's virtio-net state needs (a tap with
  ``vnet_hdr``, so not user-net): on each host a tap in a bridge that is the
  guest's gateway (10.0.2.2, ferry's gateway MAC, so the guest's ARP entry
  stays valid) and a kernel DNAT of the host's Redis port to the guest, the
  cheapest forward there is;
* **the migration**: ``migrate`` over TCP between the hosts' addresses, the
  destination started with ``-incoming defer`` and no ``-S`` (it runs the
  moment the migration completes, QEMU's fastest hand-off). Precopy uses a
  ``downtime-limit`` and no bandwidth cap; post-copy sets ``postcopy-ram`` on
  both sides and calls ``migrate-start-postcopy`` right after ``migrate``.
  Once the source reports ``completed`` it is quit, as a user would.
  A hop's link (:class:`Channel`, default :data:`TCP`) and the destination's RAM
  (``dst_ram``, default anonymous) can be swapped for design experiments
  (``bench/experiments/qemu_stream.py``: the stream through a relay).

Downtime has ferry's definition, source paused -> destination running, read
from QEMU's own events: the source's ``STOP`` and the destination's
``RESUME``. Both timestamps come from one kernel's ``CLOCK_REALTIME`` (the
namespace hosts share a machine), so their difference needs no offset
correction. QEMU's own ``downtime`` (the source's view) is kept beside it.
Bytes are the source's ``ram.transferred`` (the RAM stream, page headers
included; the device state adds about 70 KB), ``dirty_syncs`` its
``ram.dirty-sync-count`` (the dirty-bitmap passes precopy made).

Other loads (:class:`~ferry.testing.workload.HopLoad`, a page writer) can run
beside the Redis writer, as in :func:`ferry.testing.redis_hops.run_redis_hops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ferry.errors import FerryError
from ferry.hostconfig import Accel
from ferry.net import GATEWAY_MAC, links, nft
from ferry.qemu.argv import AgentChannel, FileDisk, QemuConfig, SerialToFile, TapNet, argv_for
from ferry.qemu.qmp import QMPClient
from ferry.testing.hosts import HostNamespace, HostSet
from ferry.testing.workload import HopLoad, Load, RedisWriter, end_loads, start_loads
from ferry.vm.pkgcache import OpenedPackage

TAP = "fq-tap0"
BRIDGE = "fq-br0"
NAT_TABLE = "ferry_native"
MAX_BANDWIDTH_BYTES_S = 100 * 2**30
"""``max-bandwidth`` for "no cap" (QEMU 7.2's default is 128 MiB/s)."""
POLL_S = 0.01
MIGRATION_TIMEOUT_S = 120.0
WRITES_TIMEOUT_S = 120.0
QMP_TIMEOUT_S = 30.0


class NativeMigrationError(FerryError):
    """QEMU's own migration of the baseline guest failed."""


@dataclass(frozen=True, slots=True)
class NativeMode:
    """One setting of QEMU's migration."""

    name: str
    postcopy: bool = False
    downtime_limit_ms: int | None = None


PRECOPY = NativeMode("precopy", downtime_limit_ms=20)
POSTCOPY = NativeMode("postcopy", postcopy=True)
MODES = (PRECOPY, POSTCOPY)


class Channel(Protocol):
    """How one hop's two QEMUs meet: the destination's ``migrate-incoming`` URI, and
    (around the migration) what the source's ``migrate`` uses."""

    def incoming_uri(self, dst: HostNamespace, name: str, port: int) -> str: ...

    def outgoing(self, src: HostNamespace, dst: HostNamespace, name: str,
                 port: int) -> AbstractAsyncContextManager[str]:
        """Entered once the destination listens; yields the source's ``migrate`` URI and
        is left after the source reported ``completed`` (or on failure)."""
        ...


class TcpChannel:
    """QEMU to QEMU over TCP between the hosts' addresses (the baseline)."""

    def incoming_uri(self, dst: HostNamespace, name: str, port: int) -> str:
        return f"tcp:{dst.address}:{port}"

    @contextlib.asynccontextmanager
    async def outgoing(self, src: HostNamespace, dst: HostNamespace, name: str,
                       port: int) -> AsyncIterator[str]:
        yield self.incoming_uri(dst, name, port)


TCP = TcpChannel()

DestinationRam = Callable[[HostNamespace, str], AbstractAsyncContextManager[Path | None]]
"""A destination QEMU's RAM: entered before it is spawned with that file (None:
anonymous), left once that QEMU has been stopped."""


@dataclass(frozen=True, slots=True)
class NativeHop:
    src: str
    dst: str
    downtime_ms: float
    """Source ``STOP`` -> destination ``RESUME`` (QEMU's event timestamps)."""
    qemu_downtime_ms: float | None
    """QEMU's own ``downtime`` from the source's ``query-migrate``."""
    total_s: float
    """``migrate`` -> the source's ``completed`` (wall time, as measured here)."""
    bytes_sent: int
    dirty_syncs: int | None = None
    """QEMU's ``ram.dirty-sync-count``: dirty-bitmap passes (1: no re-send at all)."""
    writes_during: int = 0
    loads: dict[str, Any] = field(default_factory=dict)
    """What the loads beside the writer said about this hop."""


@dataclass(slots=True)
class NativeHops:
    mode: NativeMode
    hops: list[NativeHop] = field(default_factory=list)
    acknowledged: int = 0
    lost: list[int] = field(default_factory=list)
    client_max_stall_ms: float = 0.0
    client_reconnects: int = 0


@dataclass(frozen=True, slots=True)
class NativeGuest:
    """A package's guest laid out for plain QEMU under ``work`` (RAM files under ``shm``)."""

    package: OpenedPackage
    work: Path
    shm: Path
    disk: Path
    redis_port: int
    guest_port: int

    @classmethod
    def prepare(cls, package: OpenedPackage, work: Path, *, redis_port: int,
                guest_port: int) -> NativeGuest:
        """Copy the root disk (sparse) into ``work`` and make a RAM directory on tmpfs."""
        work.mkdir(parents=True, exist_ok=True)
        if len(package.manifest.disks) != 1:
            raise NativeMigrationError("the baseline expects a package with one root disk")
        disk = work / "root.img"
        sparse_copy(package.directory / package.manifest.disks[0].path, disk)
        shm = Path(_mkdtemp_shm())
        return cls(package, work, shm, disk, redis_port, guest_port)

    def cleanup(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)

    def argv(self, host: HostNamespace, name: str, ram: Path | None) -> list[str]:
        run_dir = self.work / name
        run_dir.mkdir(exist_ok=True)
        return host.exec_argv(package_argv(
            self.package, disk=self.disk, memory_path=ram, run_dir=run_dir,
            net=TapNet(TAP, mac=self.package.manifest.network.mac), incoming="defer"))

    async def route_redis(self, host: HostNamespace, *, here: bool) -> None:
        """DNAT ``host``'s Redis port to the guest; once the guest has left (``here``
        False), reset the connections still DNATed to it so the client moves on at
        once instead of waiting out its reply timeout (ferry's forwarder closes them)."""
        g = self.package.manifest.network
        gone = (f"    ip daddr {g.ip} tcp dport {self.guest_port} reject with tcp reset"
                if not here else "")
        await nft.load(host.namespace, "\n".join([
            f"table ip {NAT_TABLE} {{}}", f"flush table ip {NAT_TABLE}",
            f"table ip {NAT_TABLE} {{",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip daddr {host.address} tcp dport {self.redis_port} "
            f"dnat to {g.ip}:{self.guest_port}",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            gone,
            "  }",
            "}", ""]))

    @contextlib.asynccontextmanager
    async def network(self, host: HostNamespace) -> AsyncIterator[None]:
        """The guest's gateway bridge, tap and Redis DNAT on ``host`` while the block runs."""
        g = self.package.manifest.network
        ns = host.namespace
        await links.batch(ns, [
            f"link add {BRIDGE} address {GATEWAY_MAC} type bridge",
            f"addr add {g.gateway}/{g.prefix_len} dev {BRIDGE}", f"link set {BRIDGE} up",
            f"tuntap add dev {TAP} mode tap", f"link set {TAP} master {BRIDGE}",
            f"link set {TAP} up",
            f"neigh replace {g.ip} lladdr {g.mac} dev {BRIDGE} nud permanent"])
        try:
            await host.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            await self.route_redis(host, here=True)
            yield
        finally:
            with contextlib.suppress(Exception):
                await host.run(["nft", "delete", "table", "ip", NAT_TABLE])
            with contextlib.suppress(Exception):
                await links.batch(ns, [f"link del {TAP}", f"link del {BRIDGE}"])


def package_argv(package: OpenedPackage, *, disk: Path, memory_path: Path | None,
                 run_dir: Path, net: TapNet, incoming: str, paused: bool = False) -> list[str]:
    """Plain QEMU for a package's guest: its machine exactly as ferry's runner starts it
    (device set, CPU model, accelerator, kernel command line) with plain files instead of
    FUSE and NBD. ``memory_path`` None: anonymous RAM, under the same RAM block name
    (``mem``) as the shared file the package's state was saved from (a migration stream
    names its RAM blocks). ``run_dir`` gets ``qmp.sock``, ``agent.sock`` and
    ``console.log``; ``paused`` adds ``-S`` (the guest waits for ``cont``)."""
    m = package.manifest
    extra = ["-S"] if paused else []
    if memory_path is None:
        extra += ["-object", f"memory-backend-ram,id=mem,size={m.machine.memory_mib}M",
                  "-M", "memory-backend=mem"]
    return argv_for(package.directory / m.kernel, package.directory / m.initramfs, QemuConfig(
        machine=m.machine.shape,
        cmdline=m.kernel_cmdline, memory_path=memory_path,
        disks=(FileDisk(disk),), serial=SerialToFile(run_dir / "console.log"),
        qmp_socket=run_dir / "qmp.sock", accel=Accel(m.machine.accel), incoming=incoming,
        net=net, agent=AgentChannel(run_dir / "agent.sock") if m.agent.enabled else None,
        extra_args=tuple(extra)))


def _mkdtemp_shm() -> str:
    return tempfile.mkdtemp(prefix="ferry-native-", dir="/dev/shm")


def sparse_copy(src: Path, dst: Path) -> None:
    """A sparse copy (``cp --sparse=always``): a mostly empty disk or RAM image stays small."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


class PlainQemu:
    """One plain QEMU process on a namespace host, driven over QMP."""

    def __init__(self, name: str, host: HostNamespace, proc: asyncio.subprocess.Process,
                 qmp: QMPClient, ram: Path | None, log: Path,
                 resources: contextlib.AsyncExitStack | None = None) -> None:
        self.name = name
        self.host = host
        self.proc = proc
        self.qmp = qmp
        self.ram = ram
        self.log = log
        self.resources = resources
        """Closed after QEMU has gone (then ``ram`` is theirs to remove, not ours)."""

    @classmethod
    async def spawn(cls, guest: NativeGuest, host: HostNamespace, name: str, *,
                    ram: Path | None = None,
                    resources: contextlib.AsyncExitStack | None = None) -> PlainQemu:
        """Start QEMU on ``host`` waiting for an incoming migration (``-incoming defer``),
        its RAM anonymous or the file ``ram``."""
        log = guest.work / f"{name}.qemu.log"
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                *guest.argv(host, name, ram), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out)
        finally:
            os.close(out)
        try:
            qmp = await QMPClient.connect_unix(guest.work / name / "qmp.sock", name=name,
                                               timeout_s=QMP_TIMEOUT_S)
        except BaseException:
            await _kill(proc)
            raise NativeMigrationError(f"QEMU {name} did not start: {_tail(log)}") from None
        return cls(name, host, proc, qmp, ram, log, resources)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments, timeout_s=QMP_TIMEOUT_S)

    async def capabilities(self, **caps: bool) -> None:
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name.replace("_", "-"), "state": on} for name, on in caps.items()]})

    async def wait_migration(self) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; the final info."""
        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            while True:
                info: dict[str, Any] = await self.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return info
                # postcopy-paused: the destination failed after the switch-over (it
                # could be recovered, but not by this baseline).
                if status in ("failed", "cancelled", "postcopy-paused"):
                    raise NativeMigrationError(
                        f"QEMU {self.name}: migration {status}: "
                        f"{info.get('error-desc', 'no reason given')}")
                await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.execute("quit")
        # A QEMU that does not exit on ``quit`` (a source stuck in postcopy-paused) is
        # killed before the QMP connection is closed: closing waits for QEMU's side.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.proc.wait()
        await _kill(self.proc)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.qmp.close()
        if self.resources is not None:
            await self.resources.aclose()
        elif self.ram is not None:
            self.ram.unlink(missing_ok=True)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _tail(log: Path) -> str:
    try:
        return log.read_bytes()[-1500:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


async def restore(guest: NativeGuest, host: HostNamespace, name: str) -> PlainQemu:
    """The package's guest running in plain QEMU on ``host``: its RAM image copied to
    tmpfs (not timed by callers that measure hops), its device state loaded with
    ``x-ignore-shared``, then ``cont``. Every QEMU it migrates to has anonymous RAM."""
    m = guest.package.manifest
    ram = guest.shm / f"{name}.ram"
    await asyncio.to_thread(sparse_copy, guest.package.directory / m.memory.path, ram)
    vm = await PlainQemu.spawn(guest, host, name, ram=ram)
    try:
        await vm.capabilities(x_ignore_shared=True)
        state = guest.package.directory / m.state
        await vm.execute("migrate-incoming", {"uri": f"exec:cat {state}"})
        await vm.wait_migration()
        status = await vm.execute("query-status")
        if status.get("status") != "running":
            await vm.execute("cont")
        # From here the guest's RAM is ordinary RAM to migrate.
        await vm.capabilities(x_ignore_shared=False)
    except BaseException:
        await vm.stop()
        raise
    return vm


async def hop(guest: NativeGuest, src: PlainQemu, dst_host: HostNamespace, name: str,
              mode: NativeMode, port: int, *, channel: Channel = TCP,
              dst_ram: DestinationRam | None = None) -> tuple[PlainQemu, NativeHop]:
    """Migrate ``src`` to a new QEMU on ``dst_host`` with QEMU's own migration over
    ``channel``, the new QEMU's RAM from ``dst_ram`` (default anonymous); the source is
    quit once it reports ``completed``."""
    await guest.route_redis(dst_host, here=True)
    resources = contextlib.AsyncExitStack()
    try:
        ram_file = (await resources.enter_async_context(dst_ram(dst_host, name))
                    if dst_ram is not None else None)
        dst = await PlainQemu.spawn(guest, dst_host, name, ram=ram_file, resources=resources)
    except BaseException:
        await resources.aclose()
        raise
    try:
        caps: dict[str, bool] = {"postcopy_ram": mode.postcopy}
        await dst.capabilities(**caps)
        await dst.execute("migrate-incoming",
                          {"uri": channel.incoming_uri(dst_host, name, port)})
        await src.capabilities(**caps)
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH_BYTES_S}
        if mode.downtime_limit_ms is not None:
            params["downtime-limit"] = mode.downtime_limit_ms
        await src.execute("migrate-set-parameters", params)
        async with channel.outgoing(src.host, dst_host, name, port) as uri:
            src_mark = src.qmp.event_mark()
            dst_mark = dst.qmp.event_mark()
            started = time.monotonic()
            await src.execute("migrate", {"uri": uri})
            if mode.postcopy:
                await src.execute("migrate-start-postcopy")
            info = await src.wait_migration()
            total_s = time.monotonic() - started
        stopped = await src.qmp.wait_event("STOP", since=src_mark, timeout_s=QMP_TIMEOUT_S)
        resumed = await dst.qmp.wait_event("RESUME", since=dst_mark,
                                           timeout_s=QMP_TIMEOUT_S)
    except BaseException:
        await dst.stop()
        raise
    await src.stop()
    await guest.route_redis(src.host, here=False)
    ram = info.get("ram") or {}
    downtime = info.get("downtime")
    syncs = ram.get("dirty-sync-count")
    return dst, NativeHop(
        src=src.host.name, dst=dst_host.name,
        downtime_ms=round((resumed.event.timestamp_s - stopped.event.timestamp_s) * 1e3, 3),
        qemu_downtime_ms=float(downtime) if downtime is not None else None,
        total_s=round(total_s, 3), bytes_sent=int(ram.get("transferred", 0)),
        dirty_syncs=int(syncs) if syncs is not None else None)


@contextlib.asynccontextmanager
async def _running(vm: list[PlainQemu]) -> AsyncIterator[None]:
    """Stop whichever QEMU holds the guest when the block ends (``vm`` holds it)."""
    try:
        yield
    finally:
        for q in vm:
            await q.stop()


async def run_native_hops(hosts: HostSet, guest: NativeGuest, route: Sequence[str],
                          mode: NativeMode, *, port: int, client_host: str,
                          writes_between: int = 100, loads: Sequence[HopLoad] = (),
                          channel: Channel = TCP,
                          dst_ram: DestinationRam | None = None) -> NativeHops:
    """Restore the guest on ``route[0]`` and migrate it along ``route`` with QEMU's own
    migration (over ``channel``, each destination's RAM from ``dst_ram``: see
    :func:`hop`) while a :class:`RedisWriter` on ``client_host`` writes (and ``loads``
    run beside it); every acknowledged write is read back at the end."""
    if len(route) < 2:
        raise NativeMigrationError("a route needs at least two hosts")
    names = (f"{mode.name}{i}" for i in itertools.count())
    result = NativeHops(mode)
    async with contextlib.AsyncExitStack() as stack:
        for h in dict.fromkeys(route):
            await stack.enter_async_context(guest.network(hosts[h]))
        current = [await restore(guest, hosts[route[0]], next(names))]
        await stack.enter_async_context(_running(current))
        writer = RedisWriter([(hosts[h].address, guest.redis_port)
                              for h in dict.fromkeys(route)],
                             namespace=hosts[client_host].namespace, prefix=f"q{mode.name}")
        stop = asyncio.Event()
        everyone: list[Load] = [*loads, writer]
        tasks: list[asyncio.Task[None]] = []
        try:
            await start_loads(everyone, stop, tasks, writes_between=writes_between,
                              timeout_s=WRITES_TIMEOUT_S)
            for _src, dst in itertools.pairwise(route):
                before = len(writer.acknowledged)
                for extra in loads:
                    extra.hop_started()
                vm, record = await hop(guest, current[0], hosts[dst], next(names), mode, port,
                                       channel=channel, dst_ram=dst_ram)
                current[0] = vm
                said: dict[str, Any] = {}
                for w in everyone:
                    w.preferred = list(dict.fromkeys(route)).index(dst)
                for extra in loads:
                    async with asyncio.timeout(WRITES_TIMEOUT_S):
                        said.update(await extra.hop_done())
                async with asyncio.timeout(WRITES_TIMEOUT_S):
                    await writer.wait_acknowledged(len(writer.acknowledged) + writes_between)
                result.hops.append(dataclasses.replace(
                    record, writes_during=len(writer.acknowledged) - before, loads=said))
        finally:
            stop.set()
            await end_loads(tasks)
        result.lost = await writer.lost()
    result.acknowledged = len(writer.acknowledged)
    result.client_max_stall_ms = round(writer.max_stall_s * 1e3, 1)
    result.client_reconnects = writer.reconnects
    return result
