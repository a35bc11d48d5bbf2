"""Move a supervised VM: to another host (live), or into a package on disk.

The process that holds a VM (the per-VM supervisor of ``ferry vm run``, or
the receiving process of ``ferry vm receive`` after a VM arrived) serves two
control-socket ops through :class:`ferry.node.outgoing.Outgoing`::

    → {"op": "migrate", "to": [HOST, PORT], "precopy_only": false,
       "access": {"tls": {cert,key,ca} | null, "token": HEX | null, "insecure": false}}
    → {"op": "migrate", "package": FILE, "key": KEYFILE | null}
    ← {"ok": true, "summary": {...}, "source": {...}, "destination": {...}}
    ← {"ok": false, "error": "...", "kind": "LiveMigrationError", "handed_off": false}
    → {"op": "migrate-cancel"}          (Ctrl-C on the client: cancel unless handed off)

A live migration connects to ``ferry vm receive`` on the destination, runs
the launch exchange (:mod:`ferry.live.launch`: manifest, forwards, boot
files), then :func:`~ferry.live.migrate_out`, then the report exchange
(:mod:`ferry.live.report_exchange`: clocks compared, the destination's report
fetched) that the summary's downtime figures come from. Before the hand-off any
failure (destination killed, link cut, cancel) resumes the VM here; the VM
leaves this process only after post-copy completed. An export pauses the
guest, saves its device state, writes memory, disks and state into a new
package directory, signs it into ``FILE`` and only then stops the VM (on
failure the guest continues here).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError, FerryError
from ferry.guest.agent import AgentClient
from ferry.live import launch, report_exchange
from ferry.live.access import Access
from ferry.live.clock import ClockOffset
from ferry.live.errors import LiveMigrationError
from ferry.live.progress import MigrationProgress
from ferry.live.rampath import LINK_WINDOWS, RamPath, fit_link_windows
from ferry.live.ramsink import ram_in_sink
from ferry.live.report import DestinationReport, SourceReport
from ferry.live.source import DEFAULT_OPTIONS, LiveOptions, choose_ram, migrate_out
from ferry.live.summary import MigrationSummary
from ferry.migration.autocompress import LinkCompression
from ferry.migration.channel import StreamChannel
from ferry.migration.policy import Mode
from ferry.net import PortForward, VMNetwork
from ferry.net.errors import NetError
from ferry.package import commands as pkg
from ferry.qemu import QemuVM
from ferry.storage.device import Device
from ferry.transport.base import Stream
from ferry.transport.mux import Mux
from ferry.transport.ratelimit import RateLimited
from ferry.vm import pkgcache
from ferry.vm.devices import VMDevices
from ferry.vm.manifest import STATE_PATH, VMManifest
from ferry.vm.registry import VM_RECORD, write_json
from ferry.vm.runner import STATE_FILE
from ferry.vm.snapshot import write_block_hashes

log = logging.getLogger(__name__)

EXPORT_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Movable:
    """What moving a VM needs from the process that holds it."""

    vm_id: str
    qemu: QemuVM
    devices: VMDevices
    agent: AgentClient | None
    network: VMNetwork | None
    manifest: VMManifest
    boot_dir: Path
    """The directory ``manifest.kernel`` / ``manifest.initramfs`` are relative to."""
    forwards: tuple[PortForward, ...]
    package_id: str | None = None
    """The package the VM's devices overlay (:attr:`launch.Offer.package`), if known."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Its labels: they travel with it (:attr:`launch.Offer.labels`)."""


@dataclass(frozen=True, slots=True)
class Moved:
    """A finished live migration: the summary a user reads and both sides' reports."""

    summary: MigrationSummary
    source: dict[str, Any]
    """The source's report (:meth:`SourceReport.to_json`)."""
    destination: dict[str, Any] | None
    """The destination's report (None: it did not come back)."""


def options_for(precopy_only: bool, ram: RamPath = RamPath.AUTO,
                max_mbit: float | None = None,
                compression: LinkCompression = LinkCompression.AUTO) -> LiveOptions:
    return LiveOptions(mode=Mode.PRECOPY_ONLY if precopy_only else Mode.HYBRID, ram=ram,
                       max_bytes_per_s=None if max_mbit is None else max_mbit * 1e6 / 8,
                       compression=compression)


def summarize(source: SourceReport, destination: DestinationReport | None,
              clock: ClockOffset | None) -> MigrationSummary:
    """The figures a user reads (see :class:`~ferry.live.summary.MigrationSummary`)."""
    return MigrationSummary.of(source, destination, clock)


async def migrate_to_host(
    m: Movable, host: str, port: int, *, access: Access,
    options: LiveOptions = DEFAULT_OPTIONS,
    on_handed_off: Callable[[], Awaitable[None]] | None = None,
    progress: MigrationProgress | None = None,
) -> Moved:
    """Live-migrate ``m`` to the ``ferry vm receive`` listening on ``host:port``.

    ``access`` says how to authenticate to it (TLS, its token, or ``insecure``).
    Returns the summary and both reports once post-copy completed.
    Raises :class:`LiveMigrationError` (``handed_off`` says where the VM runs).
    """
    try:
        stream = await access.connect(host, port)
    except FerryError as exc:
        raise LiveMigrationError(f"cannot reach the destination {host}:{port}: {exc}",
                                 vm=m.vm_id, handed_off=False) from exc
    if options.max_bytes_per_s is not None:
        stream = RateLimited(stream, options.max_bytes_per_s)
    mux: Mux | None = None
    try:
        choice = await choose_ram(m.qemu, m.devices, options.ram)
        ram = choice.path
        log.info("vm %s: guest RAM moves %s: %s", m.vm_id,
                 "in QEMU's stream" if ram is RamPath.QEMU else "as a ferry device",
                 choice.reason)
        options = dataclasses.replace(options, ram=ram)
        files = launch.boot_files(m.manifest, m.boot_dir)
        offer = launch.Offer(m.vm_id, m.manifest, m.forwards,
                             await asyncio.to_thread(launch.describe_boot, files), ram=ram,
                             package=m.package_id, labels=dict(m.labels),
                             service_address=None if m.network is None
                             else m.network.service_address)
        try:
            await launch.send_offer(stream, offer, files)
        except FerryError as exc:
            raise LiveMigrationError(f"the destination did not take the VM: {exc}",
                                     vm=m.vm_id, handed_off=False) from exc
        link: Stream = stream
        ram_link: Stream | None = None
        if ram is RamPath.QEMU:
            # One authenticated link, two substreams: the channel, and QEMU's RAM stream.
            mux = Mux(stream, 2, window_frames=LINK_WINDOWS)
            mux.start()
            fit_link_windows(mux, stream)
            link, ram_link = mux.sub(0), mux.sub(1)
        channel = StreamChannel(link)

        async def handed_off() -> None:
            if m.network is not None:
                await m.network.close()  # clients reconnect to the new host
            if on_handed_off is not None:
                await on_handed_off()

        async def paused() -> None:
            if m.network is not None:
                # Packets to the service address that reach this host from now on go on
                # to the destination, where they wait for the guest in its tap.
                try:
                    await m.network.redirect_service(host)
                except NetError as exc:  # then clients retransmit once B announces
                    log.warning("vm %s: cannot route its service address to %s: %s",
                                m.vm_id, host, exc)

        async def resumed() -> None:
            if m.network is not None:
                m.network.announce_service()  # the guest runs on here after all

        report = await migrate_out(m.qemu, m.devices, channel, agent=m.agent, options=options,
                                   on_handed_off=handed_off, ram_link=ram_link,
                                   progress=progress, on_paused=paused, on_resumed=resumed)
        report.ram_path_reason = choice.reason
        destination: DestinationReport | None = None
        clock: ClockOffset | None = None
        try:
            destination, clock = await report_exchange.fetch_report(link)
        except FerryError as exc:
            log.info("vm %s: no report from the destination (%s)", m.vm_id, exc)
        return Moved(summarize(report, destination, clock), report.to_json(),
                     None if destination is None else destination.to_json())
    finally:
        if mux is not None:
            await mux.aclose()
        await stream.aclose()


async def export_to_package(m: Movable, file: Path, *, key: Path | None = None,
                            overwrite: bool = False) -> dict[str, Any]:
    """Pause ``m``, write it into a package at ``file`` signed with ``key``, then stop it.

    ``key`` is the caller's choice (the CLI sends ``--key`` or the host's
    ``HostConfig.signing_key``); None is refused: a holder has no default.

    If anything fails before the package is complete, the guest continues.
    """
    if key is None:
        raise ConfigError("an export needs a signing key")
    if await asyncio.to_thread(file.exists) and not overwrite:
        raise ConfigError(f"{file} already exists")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".ferry-export-", dir=file.parent))
    out = work / "pkg"
    try:
        out.mkdir()
        paused = time.monotonic()
        try:
            state_bytes, manifest = await _write_vm(m, out)
            info = await asyncio.to_thread(pkg.package_create, out, file, key_path=key,
                                           overwrite=overwrite)
        except BaseException:
            log.warning("vm %s: export failed; the guest continues here", m.vm_id)
            await m.qemu.resume()
            raise
        await m.qemu.stop()
        return {"package": str(file), "key_id": info.key_id, "state_bytes": state_bytes,
                "paused_s": round(time.monotonic() - paused, 3),
                "total_s": round(time.monotonic() - started, 3), "name": manifest.name}
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


SUSPENDED_IMAGE = "image"
"""In a suspended arrived VM's state dir: the package directory it continues from."""


async def suspend_into(m: Movable, state_dir: Path, forwards: list[list[Any]]) -> int:
    """Suspend a VM that arrived here (its devices are not overlays in a state dir, as a
    ``ferry vm run`` VM's are): pause it, write it as a package directory into
    ``state_dir/image`` (device state, RAM, disks, boot files; not signed: it never
    leaves this host) and record it as suspended, so ``ferry vm run --name ID`` continues
    it like any suspended VM. Returns the device state's size. If anything fails before
    the record is written, the guest continues and the state dir is removed."""
    if await asyncio.to_thread(state_dir.exists):
        raise ConfigError(f"{state_dir} exists: a suspended VM of this id is kept here "
                          "already ('ferry vm rm' it first)")
    image = state_dir / SUSPENDED_IMAGE
    try:
        await asyncio.to_thread(image.mkdir, parents=True, mode=0o700)
        state_bytes, manifest = await _write_vm(m, image)
        package_id = f"suspended-{uuid.uuid4().hex}"
        await asyncio.to_thread(pkgcache.adopt, image, package_id)
        await asyncio.to_thread(shutil.copyfile, image / manifest.state, state_dir / STATE_FILE)
        write_json(state_dir / VM_RECORD, {
            "vm_id": m.vm_id, "status": "suspended", "package_dir": str(image),
            "package_id": package_id, "forwards": forwards, "state_bytes": state_bytes,
            "labels": dict(m.labels)})
    except BaseException:
        log.warning("vm %s: suspend failed; the guest continues here", m.vm_id)
        await asyncio.to_thread(shutil.rmtree, state_dir, True)
        await m.qemu.resume()
        raise
    await m.qemu.stop()
    return state_bytes


async def _write_vm(m: Movable, out: Path) -> tuple[int, VMManifest]:
    """Pause ``m`` (after its before-suspend hooks) and write it into the package directory
    ``out``: its device state, RAM, disks and boot files. The guest stays paused."""
    if m.agent is not None:
        with contextlib.suppress(FerryError, TimeoutError):
            await m.agent.before_suspend(30.0)
    if m.devices.memory is not None:
        stats = await m.qemu.save_device_state(out / STATE_PATH)  # pauses, flushes
        return stats.state_bytes, await _write_package_dir(m, out, stats.state_bytes,
                                                           m.devices.memory.stack.remote)
    # RAM private to QEMU (it arrived in QEMU's stream): through a sink QEMU.
    async with ram_in_sink(
            m.qemu, disks=m.devices.vm_disks(), work_dir=m.qemu.work_dir / "sink",
            namespace=None if m.network is None else m.network.namespace,
            wrap_argv=None if m.network is None else m.network.wrap_argv
    ) as (sink, memory):
        stats = await sink.save_device_state(out / STATE_PATH)
        return stats.state_bytes, await _write_package_dir(m, out, stats.state_bytes, memory)


async def _write_package_dir(m: Movable, out: Path, state_bytes: int,
                             memory: Device) -> VMManifest:
    manifest = dataclasses.replace(m.manifest, state_bytes=state_bytes)
    for name, src in launch.boot_files(m.manifest, m.boot_dir).items():
        rel = manifest.kernel if name == "kernel" else manifest.initramfs
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, src, out / rel)
    entries = [(manifest.memory, memory)]
    for entry in manifest.disks:
        entries.append((entry, m.devices.disks[entry.name].stack.remote))
    for entry, device in entries:
        await _dump(device, out / entry.path)
        (out / entry.hashes_path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_block_hashes, out / entry.path, out / entry.hashes_path,
                                entry.block_size_bytes)
    manifest.write(out)
    return manifest


async def _dump(device: Device, path: Path) -> None:
    """Copy a device into a sparse file (all-zero chunks become holes)."""
    size = device.size_bytes
    f = await asyncio.to_thread(_create_sparse, path, size)
    try:
        for offset in range(0, size, EXPORT_CHUNK_BYTES):
            data = bytes(await device.read_at(offset, min(EXPORT_CHUNK_BYTES, size - offset)))
            if data.count(0) != len(data):
                await asyncio.to_thread(os.pwrite, f, data, offset)
    finally:
        os.close(f)


def _create_sparse(path: Path, size_bytes: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size_bytes)
    return fd
