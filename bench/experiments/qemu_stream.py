"""Design experiment, not a product path: QEMU's own migration stream through ferry's TLS.

    sudo PYTHONPATH=src .venv/bin/python bench/experiments/qemu_stream.py --hops 4 --json

The question (the issue "let QEMU's own migration stream carry guest RAM"):
what does QEMU's migration cost once ferry carries its stream, instead of
ferry's block pre-copy of RAM through its FUSE mount? On the same guest (the
signed Redis package, 256 MiB, restored into plain QEMU as
:mod:`ferry.testing.qemu_native` does), the same namespace hosts and the
same Redis writer, each variant moves the guest A -> B -> A ... with QEMU's
precopy (``downtime-limit`` 20 ms, no bandwidth cap) and with post-copy
from the start:

* ``tcp``: plain QEMU, ``migrate tcp:`` straight between the hosts (the
  reference, :data:`ferry.testing.qemu_native.TCP`);
* ``tls``: the source QEMU migrates to a UNIX socket (``migrate unix:``)
  where a relay process on the source host takes it and carries it over
  ferry's mutual-TLS transport (:class:`ferry.live.access.Access` with
  per-host certificates from one CA, as ``ferry vm migrate --tls-*`` opens
  its link) to a relay on the destination host, which feeds the
  destination QEMU's ``migrate-incoming unix:``. Both directions are
  relayed: post-copy's return path (page requests) rides the same link.
  The TLS link is up and authenticated before ``migrate`` is issued;
* ``tls-tmpfs``: as ``tls``, the destination's RAM a file on tmpfs
  (``memory-backend-file``, ``share=on``) instead of anonymous memory:
  where ferry could read RAM for snapshots and export without FUSE;
* ``tls-fuse``: as ``tls``, the destination's RAM the memory file of a
  ferry FUSE mount (:class:`ferry.expose.fuse.FuseMount` over the memory
  device stack ferry's runner uses), served by this process: what FUSE costs
  when the incoming migration writes every page. Post-copy needs
  userfaultfd on the RAM, which the kernel offers for anonymous memory,
  shmem and hugetlbfs only, so that combination is expected to fail (and is
  reported as such).

Variants are interleaved (per round: each mode, each variant) because the
machine is shared and noisy. Per variant: downtime (source ``STOP`` ->
destination ``RESUME``, QEMU's event timestamps on one clock) p50 and max,
QEMU's own downtime, total time (``migrate`` -> source ``completed``), the
RAM stream's bytes (``ram.transferred``) and, through the relay, the bytes
on the link each way, acknowledged and lost writes.
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
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import BrokenResourceError, ClosedResourceError, FerryError
from ferry.expose.fuse import FuseMount
from ferry.live.access import Access, TLSFiles
from ferry.storage.providers.memory import MemoryDevice
from ferry.testing.hosts import HostNamespace, host_namespaces
from ferry.testing.qemu_native import (
    MODES,
    TCP,
    Channel,
    DestinationRam,
    NativeGuest,
    NativeHops,
    NativeMode,
    run_native_hops,
)
from ferry.testing.redis_hops import GUEST_REDIS_PORT, REDIS_PORT
from ferry.transport.base import Stream
from ferry.transport.certs import create_ca, create_host_cert
from ferry.transport.streams import HalfCloseUnsupportedError
from ferry.transport.unix import connect_unix, listen_unix
from ferry.vm.devices import MEMORY, local_devices
from ferry.vm.pkgcache import OpenedPackage, open_extracted

HOSTS = ("qsa", "qsb", "qsc")
PORT = 7521
SCRIPT = os.path.abspath(__file__)
VARIANTS = ("tcp", "tls", "tls-tmpfs", "tls-fuse")
RELAY_CHUNK_BYTES = 256 * 1024
RELAY_READY_TIMEOUT_S = 30.0
RELAY_EXIT_TIMEOUT_S = 15.0
FUSE_EXIT_TIMEOUT_S = 60.0
DRAIN_S = 10.0
"""After one direction of a relay ended, how long the other may still run."""


# -- the relay (runs on a host, in its own process) -------------------------------


async def _pump(a: Stream, b: Stream, count: list[int]) -> None:
    """Copy ``a`` -> ``b`` until ``a`` ends, then end ``b``'s sending side (close it
    where half-close is impossible: TLS)."""
    try:
        while data := await a.receive_some(RELAY_CHUNK_BYTES):
            await b.send_all(data)
            count[0] += len(data)
    except (BrokenResourceError, ClosedResourceError):
        pass
    try:
        await b.send_eof()
    except HalfCloseUnsupportedError:
        await b.aclose()
    except (BrokenResourceError, ClosedResourceError):
        pass


async def _splice(qemu: Stream, link: Stream) -> dict[str, int]:
    """Both directions between QEMU's socket and the link; bytes each way."""
    out, back = [0], [0]
    tasks = [asyncio.create_task(_pump(qemu, link, out)),
             asyncio.create_task(_pump(link, qemu, back))]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_S)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await qemu.aclose()
        await link.aclose()
    return {"from_qemu": out[0], "to_qemu": back[0]}


async def relay(args: argparse.Namespace) -> None:
    """``--connect``: the source side (link first, then QEMU's ``migrate unix:``);
    ``--listen``: the destination side (accept the link, then QEMU's incoming socket)."""
    access = Access(tls=TLSFiles(Path(args.cert), Path(args.key), Path(args.ca)))
    host, _, port = (args.connect or args.listen).rpartition(":")
    if args.connect:
        link = await access.connect(host, int(port))
        listener = await listen_unix(args.unix)
        print("ready", flush=True)
        async with listener:
            qemu = await listener.accept()
    else:
        tcp = await access.listen(host, int(port))
        print("ready", flush=True)
        async with tcp:
            link = await access.accept(tcp)
        qemu = await connect_unix(args.unix)
    started = time.monotonic()
    counts = await _splice(qemu, link)
    print(json.dumps({**counts, "seconds": round(time.monotonic() - started, 3)}), flush=True)


# -- the link: a relay on each host -------------------------------------------------


@dataclass(slots=True)
class TlsRelayChannel:
    """A hop's QEMUs joined by two relay processes and ferry's mutual-TLS link."""

    directory: Path
    tls: dict[str, TLSFiles]
    links: list[dict[str, Any]] = field(default_factory=list)
    """Per hop, what the source relay counted (``from_qemu``: the migration stream)."""

    def incoming_uri(self, dst: HostNamespace, name: str, port: int) -> str:
        return f"unix:{self.directory / f'{name}.in.sock'}"

    def _argv(self, host: HostNamespace, unix: Path, flag: str, where: str) -> list[str]:
        t = self.tls[host.name]
        return host.exec_argv([sys.executable, SCRIPT, "relay",
                               "--unix", str(unix), flag, where, "--cert", str(t.cert),
                               "--key", str(t.key), "--ca", str(t.ca)])

    @contextlib.asynccontextmanager
    async def outgoing(self, src: HostNamespace, dst: HostNamespace, name: str,
                       port: int) -> AsyncIterator[str]:
        out = self.directory / f"{name}.out.sock"
        procs: list[asyncio.subprocess.Process] = []
        try:
            for argv in (self._argv(dst, self.directory / f"{name}.in.sock", "--listen",
                                    f"{dst.address}:{port}"),
                         self._argv(src, out, "--connect", f"{dst.address}:{port}")):
                log = os.open(self.directory / f"{name}.relay.log",
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv, stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE, stderr=log)
                finally:
                    os.close(log)
                procs.append(proc)
                assert proc.stdout is not None
                async with asyncio.timeout(RELAY_READY_TIMEOUT_S):
                    line = await proc.stdout.readline()
                if line.strip() != b"ready":
                    raise FerryError(f"relay for {name} did not start (see its log)")
            yield f"unix:{out}"
            with contextlib.suppress(TimeoutError, ValueError):
                async with asyncio.timeout(RELAY_EXIT_TIMEOUT_S):
                    assert procs[1].stdout is not None
                    self.links.append(json.loads(await procs[1].stdout.readline()))
        finally:
            for proc in procs:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELAY_EXIT_TIMEOUT_S):
                        await proc.wait()
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


def make_certs(directory: Path, hosts: Sequence[HostNamespace]) -> dict[str, TLSFiles]:
    create_ca(directory / "ca")
    files = {}
    for h in hosts:
        c = create_host_cert(directory / "ca", directory / h.name, h.name, [h.address])
        files[h.name] = TLSFiles(c.cert_path, c.key_path, c.ca_path)
    return files


# -- the destination's RAM ----------------------------------------------------------


def tmpfs_ram(guest: NativeGuest) -> DestinationRam:
    @contextlib.asynccontextmanager
    async def place(host: HostNamespace, name: str) -> AsyncIterator[Path | None]:
        path = guest.shm / f"{name}.in.ram"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
    return place


def fuse_ram(guest: NativeGuest, directory: Path) -> DestinationRam:
    """RAM on a ferry FUSE mount, served by a process of its own per QEMU (as a host's
    engine would; pyfuse3 serves one mount per process)."""
    size = guest.package.manifest.machine.memory_mib * 2**20

    @contextlib.asynccontextmanager
    async def place(host: HostNamespace, name: str) -> AsyncIterator[Path | None]:
        mnt = directory / f"{name}.mnt"
        await asyncio.to_thread(mnt.mkdir, parents=True, exist_ok=True)
        log = os.open(directory / f"{name}.fuse.log", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, SCRIPT, "fuse", "--mount", str(mnt),
                "--size", str(size), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log)
        finally:
            os.close(log)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(RELAY_READY_TIMEOUT_S):
                line = await proc.stdout.readline()
            if line.strip() != b"ready":
                raise FerryError(f"FUSE memory mount for {name} did not start (see its log)")
            yield mnt / MEMORY
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FUSE_EXIT_TIMEOUT_S):
                    await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(mnt.rmdir)
    return place


async def serve_fuse(args: argparse.Namespace) -> None:
    """Serve a memory device (ferry's local stack over a MemoryDevice) as ``MOUNT/memory``
    until stdin closes."""
    devices = local_devices(MemoryDevice(args.size, name=MEMORY))
    assert devices.memory is not None
    loop = asyncio.get_running_loop()
    try:
        async with FuseMount(args.mount, {MEMORY: devices.memory.vm_handle}):
            print("ready", flush=True)
            await loop.run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await devices.close()


# -- the measurement ----------------------------------------------------------------


def _p50(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def summarize(variant: str, runs: list[tuple[NativeHops | None, list[dict[str, Any]], str]],
              mode: NativeMode) -> dict[str, Any]:
    hops: list[dict[str, Any]] = []
    errors: list[str] = []
    ack = lost = 0
    stall = 0.0
    for result, links, error in runs:
        if error:
            errors.append(error)
        if result is None:
            continue
        for i, h in enumerate(result.hops):
            hops.append({**dataclasses.asdict(h),
                         "link": links[i] if i < len(links) else None})
        ack += result.acknowledged
        lost += len(result.lost)
        stall = max(stall, result.client_max_stall_ms)
    downtimes = [h["downtime_ms"] for h in hops]
    wire = [h["link"]["from_qemu"] for h in hops if h["link"]]
    return {
        "variant": variant, "mode": mode.name, "hops": len(hops),
        "downtime_ms_p50": _p50(downtimes), "downtime_ms_max": max(downtimes, default=None),
        "qemu_downtime_ms_p50": _p50([h["qemu_downtime_ms"] for h in hops
                                      if h["qemu_downtime_ms"] is not None]),
        "total_s_p50": _p50([h["total_s"] for h in hops]),
        "ram_bytes_p50": _p50([h["bytes_sent"] for h in hops]),
        "link_bytes_p50": _p50(wire),
        "acknowledged_writes": ack, "lost_writes": lost, "client_max_stall_ms": stall,
        "errors": errors, "per_hop": hops,
    }


async def one_run(hosts: Any, guest: NativeGuest, variant: str, mode: NativeMode,
                  route: list[str], links_dir: Path,
                  tls: dict[str, TLSFiles]) -> tuple[NativeHops | None, list[dict[str, Any]],
                                                     str]:
    await asyncio.to_thread(links_dir.mkdir, parents=True)
    channel: Channel = TCP
    relay: TlsRelayChannel | None = None
    if variant != "tcp":
        relay = TlsRelayChannel(links_dir, tls)
        channel = relay
    dst_ram: DestinationRam | None = None
    if variant == "tls-tmpfs":
        dst_ram = tmpfs_ram(guest)
    elif variant == "tls-fuse":
        dst_ram = fuse_ram(guest, links_dir)
    try:
        result = await run_native_hops(hosts, guest, route, mode, port=PORT,
                                       client_host=HOSTS[2], channel=channel,
                                       dst_ram=dst_ram)
    except (FerryError, OSError, TimeoutError) as exc:
        return None, relay.links if relay else [], f"{type(exc).__name__}: {exc}"[:500]
    return result, relay.links if relay else [], ""


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fqs-"))  # short: UNIX socket paths
    try:
        package = await asyncio.to_thread(_package, args, work)
        guest = await asyncio.to_thread(NativeGuest.prepare, package, work / "g",
                                        redis_port=REDIS_PORT, guest_port=GUEST_REDIS_PORT)
        route = [HOSTS[i % 2] for i in range(args.hops + 1)]
        modes = [m for m in MODES if m.name in args.modes]
        runs: dict[tuple[str, str], list[tuple[NativeHops | None, list[dict[str, Any]],
                                               str]]] = {}
        try:
            async with host_namespaces(list(HOSTS), switch_tag="qs") as hosts:
                tls = await asyncio.to_thread(make_certs, work / "tls",
                                              [hosts[h] for h in HOSTS[:2]])
                for rnd in range(args.rounds):
                    for mode in modes:
                        for variant in args.variants:
                            t0 = time.monotonic()
                            r = await one_run(hosts, guest, variant, mode, route,
                                              work / "l" / f"{variant}-{mode.name}-{rnd}", tls)
                            runs.setdefault((variant, mode.name), []).append(r)
                            hops = " ".join(f"{h.downtime_ms:.1f}" for h in r[0].hops) \
                                if r[0] else ""
                            print(f"round {rnd} {mode.name:8} {variant:9} "
                                  f"{time.monotonic() - t0:5.1f} s {hops} {r[2]}",
                                  file=sys.stderr, flush=True)
        finally:
            guest.cleanup()
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    table = [summarize(v, runs[(v, m.name)], m)
             for m in modes for v in args.variants if (v, m.name) in runs]
    return {"package": str(package.directory), "hops_per_run": args.hops,
            "rounds": args.rounds, "downtime_limit_ms": MODES[0].downtime_limit_ms,
            "results": table,
            "ok": all(r["lost_writes"] == 0 for r in table)}


def _package(args: argparse.Namespace, work: Path) -> OpenedPackage:
    if args.package:
        return open_extracted(Path(args.package))
    from ferry.package import TrustStore
    from ferry.testing.packages import Signer
    from ferry.vm.pkgcache import open_package
    signer = Signer(work / "signer")
    file = signer.package("redis")
    return open_package(file, TrustStore.from_path(signer.trust_dir),
                        cache_dir=work / "packages")


def _table(r: dict[str, Any]) -> str:
    lines = ["| mode | variant | hops | downtime p50 / max (ms) | QEMU's view p50 (ms) "
             "| total p50 (s) | RAM stream p50 (MiB) | link p50 (MiB) | writes ack / lost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        def mib(v: float | None) -> str:
            return f"{v / 2**20:.1f}" if v is not None else "-"
        lines.append(
            f"| {x['mode']} | {x['variant']} | {x['hops']} | {x['downtime_ms_p50']} / "
            f"{x['downtime_ms_max']} | {x['qemu_downtime_ms_p50']} | {x['total_s_p50']} | "
            f"{mib(x['ram_bytes_p50'])} | {mib(x['link_bytes_p50'])} | "
            f"{x['acknowledged_writes']} / {x['lost_writes']} |"
            + (f" failed: {x['errors'][0][:120]}" if x["errors"] else ""))
    return "\n".join(lines) + "\n"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`bench`, cancelled (so every QEMU, namespace and file is cleaned up) on
    SIGTERM or SIGINT; SIGUSR1 prints where every task waits (stderr)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    def where() -> None:
        for t in asyncio.all_tasks():
            t.print_stack(limit=12, file=sys.stderr)
    loop.add_signal_handler(signal.SIGUSR1, where)
    return await bench(args)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("relay", help="(internal) one end of the TLS link, run on a host")
    r.add_argument("--unix", required=True)
    side = r.add_mutually_exclusive_group(required=True)
    side.add_argument("--connect", metavar="HOST:PORT")
    side.add_argument("--listen", metavar="HOST:PORT")
    for f in ("--cert", "--key", "--ca"):
        r.add_argument(f, required=True)
    fz = sub.add_parser("fuse", help="(internal) serve a FUSE memory mount until stdin closes")
    fz.add_argument("--mount", required=True)
    fz.add_argument("--size", type=int, required=True)
    p.add_argument("--package", help="an extracted Redis package (default: build one)")
    p.add_argument("--hops", type=int, default=4, help="hops per run, A -> B, B -> A ...")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--modes", nargs="+", default=[m.name for m in MODES],
                   choices=[m.name for m in MODES])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args()
    if args.command == "relay":
        asyncio.run(relay(args))
        return
    if args.command == "fuse":
        asyncio.run(serve_fuse(args))
        return
    result = asyncio.run(_main(args))
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(_table(result))


if __name__ == "__main__":
    main()
