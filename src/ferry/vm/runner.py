"""Run a VM from an extracted package: overlays, network, QEMU resume, agent; stop or suspend.

::

    async with run_vm("web1", paths, package=opened, forwards=[fwd]) as vm:
        vm.timings                      # where the resume time went
        await vm.exec("redis-cli dbsize")
        await vm.suspend()              # optional: keep it for the next run of "web1"
    # leaving without suspend() discards the VM's overlays

Resume, in order (the first two run concurrently):

1. **network**: :class:`~ferry.net.VMNetwork` (namespace, tap ``ferry-tap0``,
   NAT, the port forwarders listening);
2. **devices**: copy-on-write :class:`~ferry.storage.OverlayDevice`\\ s in the
   VM's state dir over the package's memory and disk files (the package is
   never written, so any number of VMs run from it), the memory overlay
   mounted on FUSE and the disks exported over NBD by :class:`QemuVM`;
3. **spawn**: QEMU with ``-incoming defer`` inside the namespace, with the
   manifest's machine, CPU model, accelerator and exactly the snapshot's
   device set; until QMP answers;
4. **load**: the device state (the package's, or the VM's own after a suspend);
5. **cont**: the guest runs (this is the resume time);
6. **agent**: connect to the new agent socket, HELLO, ``after_resume``
   (guest clock := host clock, then the blueprint's hooks).

A suspended VM (:meth:`RunningVM.suspend`) keeps its overlays and its saved
device state in its state dir; the next :func:`run_vm` with the same id
continues from there. While a VM runs, its ``vm.json`` says ``running``: a
crash then leaves overlays that match no saved state, and the registry's
cleanup discards them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ferry.net import GUEST_IP, GUEST_MAC, PortForward, VMNetwork
from ferry.storage import FileDevice, OverlayDevice
from ferry.vm.agent import AgentClient, AgentError, ExecResult, connect_agent
from ferry.vm.errors import ManifestError, VMExistsError, VMLifecycleError, VMNotFoundError
from ferry.vm.image import Accel, TapNet
from ferry.vm.manifest import DeviceEntry, VMManifest
from ferry.vm.pkgcache import OpenedPackage, open_extracted
from ferry.vm.registry import VM_RECORD, VMPaths, read_json, write_json
from ferry.vm.runtime import DeviceStateStats, QemuVM, VMConfig

log = logging.getLogger(__name__)

STATE_FILE = "state.bin"
AGENT_TIMEOUT_S = 30.0


class StopMode(enum.Enum):
    """How a VM ends: its overlays deleted, or kept with its device state."""

    DISCARD = "discard"
    SUSPEND = "suspend"


@dataclass(frozen=True, slots=True)
class ResumeTimings:
    """Where a resume's time went, in seconds (network and devices overlap)."""

    network_s: float
    """Namespace, tap, NAT and port forwarders up."""
    devices_s: float
    """Overlays opened, FUSE mounted, NBD serving."""
    spawn_s: float
    """QEMU spawned until QMP answered."""
    load_s: float
    """Device state fed to QEMU."""
    cont_s: float
    """``cont`` until QEMU's RESUME event."""
    running_s: float
    """Launch until the guest ran: the resume time."""
    agent_s: float
    """Agent reconnect (HELLO) and after-resume (clock sync, hooks), after running."""
    total_s: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


class RunningVM:
    """A resumed VM inside :func:`run_vm`."""

    def __init__(self, vm_id: str, package: OpenedPackage, qemu: QemuVM, net: VMNetwork,
                 agent: AgentClient, timings: ResumeTimings, state_dir: Path) -> None:
        self.vm_id = vm_id
        self.package = package
        self.qemu = qemu
        self.net = net
        self.agent = agent
        self.timings = timings
        self.state_dir = state_dir
        self.suspended: DeviceStateStats | None = None

    @property
    def manifest(self) -> VMManifest:
        return self.package.manifest

    def forward_addresses(self) -> list[str]:
        """``host:port->guest/proto`` of every forward, with the real bound ports."""
        out = []
        for fwd in self.net.forwarders:
            host, port = fwd.local_address[:2]
            f = fwd.forward
            out.append(f"{host}:{port}->{f.guest_port}/{f.proto.value}")
        return out

    async def exec(self, argv: Sequence[str] | str, *, stdin: bytes = b"",
                   timeout_s: float = 30.0) -> ExecResult:
        """Run a command in the guest through the agent."""
        return await self.agent.exec(argv, stdin=stdin, timeout_s=timeout_s)

    async def suspend(self) -> DeviceStateStats:
        """Pause, flush RAM into the VM's memory overlay, save the device state, end QEMU.

        The overlays and the state are kept when :func:`run_vm` is left.
        """
        stats = await self.qemu.save_device_state(self.state_dir / f"{STATE_FILE}.new")
        await self.qemu.stop()
        self.suspended = stats
        return stats


def _overlay(package: OpenedPackage, entry: DeviceEntry, state_dir: Path) -> OverlayDevice:
    base = FileDevice(package.directory / entry.path, read_only=True,
                      name=f"{entry.name}-base")
    if base.size_bytes != entry.size_bytes:
        base.close_sync()
        raise ManifestError(f"{entry.path} has {base.size_bytes} bytes, the manifest says "
                            f"{entry.size_bytes}")
    try:
        return OverlayDevice(base, state_dir / f"{entry.name}.ovl",
                             block_size_bytes=entry.block_size_bytes,
                             base_id=f"{package.package_id[:64]}:{entry.name}".encode(),
                             name=entry.name)
    except BaseException:
        base.close_sync()
        raise


def _prepare_state_dir(vm_id: str, paths: VMPaths,
                       package: OpenedPackage | None) -> tuple[OpenedPackage, Path, Path]:
    """Decide what to resume: a suspended VM of this id, or the package. Returns
    (package, state dir, device state file) and marks the VM as running."""
    state_dir = paths.state_dir(vm_id)
    record = read_json(state_dir / VM_RECORD)
    if record is not None and record.get("status") == "suspended":
        own = open_extracted(Path(record["package_dir"]))
        if package is not None and package.package_id != own.package_id:
            raise VMExistsError("is suspended from another package; stop it with "
                                "'ferry vm stop' (discard) first", vm=vm_id)
        package, state_file = own, state_dir / STATE_FILE
        log.info("vm %s: continuing a suspended VM", vm_id)
    elif record is not None:
        raise VMExistsError(f"state dir {state_dir} is in use", vm=vm_id)
    elif package is None:
        raise VMNotFoundError("is not suspended here; give a package to run", vm=vm_id)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)  # overlays without a record: stale
        state_dir.mkdir(parents=True, mode=0o700)
        state_file = package.directory / package.manifest.state
    write_json(state_dir / VM_RECORD, {"vm_id": vm_id, "status": "running",
                                      "package_dir": str(package.directory),
                                      "package_id": package.package_id})
    return package, state_dir, state_file


def _finish_state_dir(vm: RunningVM | None, state_dir: Path, record: dict[str, Any]) -> None:
    if vm is not None and vm.suspended is not None:
        os.replace(state_dir / f"{STATE_FILE}.new", state_dir / STATE_FILE)
        write_json(state_dir / VM_RECORD, {**record, "status": "suspended",
                                          "state_bytes": vm.suspended.state_bytes})
        log.info("vm %s: suspended into %s", vm.vm_id, state_dir)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def run_vm(
    vm_id: str,
    paths: VMPaths,
    *,
    package: OpenedPackage | None = None,
    forwards: Sequence[PortForward] = (),
    agent_timeout_s: float = AGENT_TIMEOUT_S,
) -> AsyncIterator[RunningVM]:
    """Resume ``package`` (or the suspended VM ``vm_id``) as VM ``vm_id``; see the module doc."""
    launched = time.monotonic()
    package, state_dir, state_file = _prepare_state_dir(vm_id, paths, package)
    record = read_json(state_dir / VM_RECORD) or {}
    manifest = package.manifest
    net_ok = manifest.network
    if (net_ok.ip, net_ok.mac) != (GUEST_IP, GUEST_MAC):
        raise ManifestError(f"the guest was snapshotted with {net_ok.ip}/{net_ok.mac}, this "
                            f"host gives guests {GUEST_IP}/{GUEST_MAC}", vm=vm_id)
    running: RunningVM | None = None
    clean_exit = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            net = VMNetwork(vm_id, forwards, run_dir=paths.net_run_dir)
            stack.push_async_callback(net.close)
            net_task = asyncio.create_task(_timed(net.start()), name=f"net-up {vm_id}")
            try:
                t0 = time.monotonic()
                memory = _overlay(package, manifest.memory, state_dir)
                stack.push_async_callback(memory.close)
                disks = {}
                for entry in manifest.disks:
                    disks[entry.name] = dev = _overlay(package, entry, state_dir)
                    stack.push_async_callback(dev.close)
                config = VMConfig(
                    kernel=package.directory / manifest.kernel,
                    initramfs=package.directory / manifest.initramfs,
                    memory_mib=manifest.machine.memory_mib, cpu_model=manifest.machine.cpu_model,
                    vcpus=manifest.machine.vcpus, accel=Accel(manifest.machine.accel),
                    agent=manifest.agent.enabled, net=TapNet("ferry-tap0", mac=GUEST_MAC),
                    kernel_args=(f"ferry.ip={net_ok.ip}/{net_ok.prefix_len}",
                                 f"ferry.gw={net_ok.gateway}"))
                qemu = QemuVM(config, work_dir=paths.run_dir(vm_id), memory=memory,
                              disks=disks, name=vm_id, wrap_argv=net.wrap_argv)
                await stack.enter_async_context(qemu)
                devices_s = time.monotonic() - t0
            finally:
                if not net_task.done():
                    await asyncio.wait([net_task])
            network_s = net_task.result()
            spawn_s = await qemu.start_incoming()
            loaded = await qemu.load_device_state(state_file)
            t1 = time.monotonic()
            await qemu.resume()
            cont_s = time.monotonic() - t1
            running_s = time.monotonic() - launched
            log.info("vm %s: running %.1f ms after launch", vm_id, running_s * 1e3)
            t2 = time.monotonic()
            agent = await stack.enter_async_context(
                connect_agent(qemu.agent_socket, connect_timeout_s=agent_timeout_s))
            try:
                await agent.after_resume(timeout_s=agent_timeout_s)
            except AgentError as exc:
                raise VMLifecycleError(f"the guest agent did not answer after resume: {exc}",
                                       vm=vm_id) from exc
            now = time.monotonic()
            timings = ResumeTimings(network_s=network_s, devices_s=devices_s, spawn_s=spawn_s,
                                    load_s=loaded.migrate_s, cont_s=cont_s,
                                    running_s=running_s, agent_s=now - t2,
                                    total_s=now - launched)
            running = RunningVM(vm_id, package, qemu, net, agent, timings, state_dir)
            yield running
        clean_exit = True
    finally:
        # Overlays are only worth keeping if everything reached them (clean unmount).
        _finish_state_dir(running if clean_exit else None, state_dir, record)


async def _timed(awaitable: Any) -> float:
    t0 = time.monotonic()
    await awaitable
    return time.monotonic() - t0
