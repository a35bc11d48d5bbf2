"""Run a VM from an extracted package: overlays, network, QEMU resume, agent; stop or suspend.

::

    async with run_vm("web1", paths, package=opened, forwards=[fwd], sandbox=True) as vm:
        vm.timings                      # where the resume time went
        await vm.exec("redis-cli dbsize")
        await vm.suspend()              # optional: keep it for the next run of "web1"
    # leaving without suspend() discards the VM's overlays

Resume, in order; what QEMU does not need to start runs alongside it::

    tap ─────┐                        uplink (veth, NAT, forwarders) ──┐
    devices ─┴─ spawn ── load ── cont ─────────────────────────────────┴─ open forwards ─ agent
             └─ preload (RAM → page cache) ─┘

1. **tap** (:meth:`VMNetwork.create_namespace`): namespace, bridge, tap
   ``ferry-tap0`` and a permanent neighbour entry for the guest, in two
   processes; alongside it **devices**: copy-on-write
   :class:`~ferry.storage.OverlayDevice`\\ s in the VM's state dir over the
   package's memory and disk files (the package is never written, so any
   number of VMs run from it), the memory overlay mounted on FUSE and the
   disks exported over NBD by :class:`QemuVM`;
2. **spawn**: QEMU with ``-incoming defer`` inside the namespace, with the
   manifest's machine, CPU model, accelerator and exactly the snapshot's
   device set, until QMP answers; alongside it the **uplink**
   (:meth:`VMNetwork.connect_uplink`: veth, NAT rules, the port forwarders
   listening but holding connections) and the **preload**: every chunk of
   guest RAM the package's block hashes say is non-zero (plus what this VM's
   overlay holds) is pushed into the FUSE file's page cache
   (:meth:`FuseMount.preload`), so the resumed guest does not fault its
   working set in through the daemon, one 1 MiB huge-page readahead at a
   time. It stops when QEMU is ready (what is left faults in as before) and
   ends before the state load, i.e. before anything writes guest RAM;
3. **load**: the device state (the package's, or the VM's own after a suspend);
4. **cont**: the guest runs (this is the resume time);
5. **open forwards**: connections that arrived meanwhile were held by the
   forwarders (not refused, and no SYN lost to a tap nobody read yet) and now
   reach the guest;
6. **agent**: connect to the new agent socket, HELLO, ``after_resume``
   (guest clock := host clock, then the blueprint's hooks). It does not hold
   up the forwards: Redis answers while the clock is being set.

A suspended VM (:meth:`RunningVM.suspend`) keeps its overlays and its saved
device state in its state dir; the next :func:`run_vm` with the same id
continues from there. While a VM runs, its ``vm.json`` says ``running``: a
crash then leaves overlays that match no saved state, and the registry's
cleanup discards them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import mmap
import os
import secrets
import shutil
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ferry.buffers import Buffer
from ferry.errors import FerryError
from ferry.expose.fuse import PRELOAD_CHUNK_BYTES, IoCounters, PreloadStats
from ferry.guest.agent import AgentClient, AgentError, ExecResult, connect_agent
from ferry.net import PortForward, VMNetwork
from ferry.qemu import DeviceStateStats, QemuVM, VMError
from ferry.qemu.version import host_qemu_version
from ferry.qemu.vm import MEMORY_FILE
from ferry.storage import OverlayDevice
from ferry.storage.device import Device
from ferry.storage.modules._forward import ForwardingDevice
from ferry.storage.modules.dirty import DirtyRemote, dirty_tracker
from ferry.storage.providers.file import FileDevice
from ferry.vm.devices import VMDevices, local_devices
from ferry.vm.errors import ManifestError, VMExistsError, VMLifecycleError, VMNotFoundError
from ferry.vm.machine import check_guest_network, machine_config
from ferry.vm.manifest import VMManifest
from ferry.vm.overlays import package_overlay
from ferry.vm.pkgcache import OpenedPackage, nonzero_blocks, open_extracted
from ferry.vm.prime import Primed, prime
from ferry.vm.registry import (
    VM_RECORD,
    VMPaths,
    private_dir,
    read_json,
    saved_labels,
    write_json,
)
from ferry.vm.userdata import apply_environment

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FILE = "state.bin"
AGENT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ResumeTimings:
    """Where a resume's time went, in seconds since launch or per step.

    Overlaps: ``tap_s`` runs alongside ``devices_s``; ``uplink_s`` alongside
    ``spawn_s`` + ``load_s`` + ``cont_s``; ``preload_s`` alongside ``spawn_s``.
    """

    launched_monotonic_s: float
    """``time.monotonic()`` at launch (system-wide clock: lets a client line up its own)."""
    setup_s: float
    """Launch until the resume proper began (the supervisor's leftover check, records)."""
    network_s: float
    """``tap_s`` + ``uplink_s`` (CPU spent on the network, mostly hidden)."""
    tap_s: float
    """Namespace, bridge, tap, guest neighbour entry: what QEMU needs to start."""
    uplink_s: float
    """Veth, NAT rules, port forwarders listening."""
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
    forwards_s: float
    """Launch until the port forwards pass connections to the guest."""
    agent_s: float
    """Agent reconnect (HELLO) and after-resume (clock sync, hooks), after the forwards open
    (before them for a primed warm VM, whose agent is connected: ``forwards_s`` includes it)."""
    total_s: float
    preload_s: float
    """Non-zero guest RAM pushed into the page cache (alongside ``spawn_s``, cut short
    when QEMU is ready)."""
    preload_bytes: int
    ram_reads_at_running: int
    """FUSE reads of guest RAM until ``running`` (QEMU's own, during start and load)."""
    ram_read_bytes_at_running: int
    qemu_at_running: dict[str, float] = dataclasses.field(default_factory=dict)
    """QEMU's :func:`process_usage` when the guest started running."""
    warm: bool = False
    """A warm VM: everything up to QEMU waiting for its state (``tap_s`` .. ``preload_s``)
    was done before the claim, and the rest counts from the claim."""
    primed_ports: tuple[int, ...] | None = None
    """A primed warm VM (:mod:`ferry.vm.prime`; its state load was before the claim,
    ``load_s`` is 0): the guest ports that took its probe connection. None: not primed."""

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float | int)
                else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}


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
        self.labels: dict[str, str] = {}
        """Its labels (a warm VM's come with its claim)."""
        self.live: VMDevices | None = None
        """The chainable device stacks QEMU writes through (what a live migration reads)."""
        self.mirror_sources: dict[str, DirtyRemote] = {}
        """With ``mirror_tracking``: each device's mirror tracker (every block tracked),
        by its name in the bucket (``memory``, ``disk.<name>``)."""

    @property
    def manifest(self) -> VMManifest:
        return self.package.manifest

    def memory_counters(self) -> IoCounters:
        """Reads and writes of guest RAM that went through the FUSE daemon so far."""
        return self.qemu.mount.counters(MEMORY_FILE)

    def qemu_usage(self) -> dict[str, float]:
        """QEMU's CPU time, run-queue wait and page faults so far (all threads; see
        :func:`process_usage`)."""
        pid = self.qemu.pid
        return process_usage(pid) if pid is not None else {}

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


def process_usage(pid: int) -> dict[str, float]:
    """CPU seconds on a core, seconds waiting for one, minor and major page faults of
    every thread of ``pid`` (``/proc``), for telling guest work from host contention."""
    cpu_ns = wait_ns = minflt = majflt = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{task.path}/schedstat") as f:
                    run, wait = f.read().split()[:2]
                with open(f"{task.path}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu_ns += int(run)
                wait_ns += int(wait)
                minflt += int(fields[7])
                majflt += int(fields[9])
    except OSError:
        return {}
    return {"cpu_s": cpu_ns / 1e9, "runqueue_wait_s": wait_ns / 1e9, "minflt": minflt,
            "majflt": majflt}


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a warm VM becomes: its id and forwards (see :func:`run_vm`'s ``claim``)."""

    vm_id: str
    forwards: tuple[PortForward, ...] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


Claimer = Callable[[], Awaitable[Claim]]


def saved_forwards(paths: VMPaths, vm_id: str) -> tuple[PortForward, ...]:
    """The forwards the suspended VM ``vm_id`` was running with (none if it is not
    suspended, or was suspended by a ferry that did not record them)."""
    record = read_json(paths.state_dir(vm_id) / VM_RECORD) or {}
    if record.get("status") != "suspended":
        return ()
    try:
        return tuple(PortForward.from_json(f) for f in record.get("forwards") or ())
    except (TypeError, ValueError, FerryError) as exc:
        log.warning("vm %s: unreadable forwards in its record (%s): none kept", vm_id, exc)
        return ()


def _prepare_state_dir(vm_id: str, paths: VMPaths, package: OpenedPackage | None,
                       forwards: Sequence[PortForward], labels: Mapping[str, str],
                       ) -> tuple[OpenedPackage, Path, Path]:
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
        private_dir(state_dir.parent)
        state_dir.mkdir(mode=0o700)
        state_file = package.directory / package.manifest.state
    write_json(state_dir / VM_RECORD, {"vm_id": vm_id, "status": "running",
                                      "package_dir": str(package.directory),
                                      "package_id": package.package_id,
                                      "forwards": [f.to_json() for f in forwards],
                                      "labels": dict(labels)})
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
    sandbox: bool,
    agent_timeout_s: float = AGENT_TIMEOUT_S,
    launched: float | None = None,
    claim: Claimer | None = None,
    labels: Mapping[str, str] | None = None,
    service_address: str | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Mapping[str, Path] | None = None,
    providers: Providers | None = None,
    mirror_tracking: bool = False,
    prime_ports: Sequence[int] | None = None,
) -> AsyncIterator[RunningVM]:
    """Resume ``package`` (or the suspended VM ``vm_id``) as VM ``vm_id``; see the module doc.

    ``sandbox``: QEMU under its seccomp sandbox (the host's ``HostConfig.qemu_sandbox``).

    ``launched`` is the ``time.monotonic()`` the launch began (the supervisor's
    start); the timings count from it. Default: now.

    With ``claim`` the VM is *warm*: ``vm_id`` is a placeholder (``warm-...``), the
    resume goes as far as QEMU waiting for its state with all of guest RAM preloaded
    and the network up without forwards, and then waits for ``claim()``. The claim
    names the VM (``<run root>/vms/<id>`` and ``<state root>/vms/<id>`` become symlinks
    to the placeholder's directories, so the VM's name finds its control socket, console
    and state while every open path stays valid), publishes its forwards, and the resume
    goes on from the state load, with the timings counted from the claim. A suspended
    claimed VM's state dir is moved to its own name when it stops. With ``prime_ports``
    (a warm VM only) the warm VM is primed before it waits (:mod:`ferry.vm.prime`: its
    state loaded, run until its agent answers and each of those guest ports took a
    connection, then paused): the claim then only continues it.

    ``env`` (checked by :func:`ferry.vm.userdata.check_env`) is written to the guest's
    ``/run/ferry/env`` before the after-resume hooks, so they and every later command
    the agent starts see it (:mod:`ferry.vm.userdata`).

    ``volumes`` maps extra disks of the package to volume files (held by the caller,
    :mod:`ferry.vm.volumes`) that take their place, same size; the guest then drops its
    clean caches so nothing read from the package's disk hides the volume.

    ``providers`` replaces the package's overlays as guest RAM and disks (a VM restored
    from a bucket, :mod:`ferry.vm.restore`: its devices fetch objects lazily); there is
    no preload then, and the VM cannot be suspended. ``mirror_tracking`` puts a dirty
    tracker of its own in front of every device QEMU uses
    (:attr:`RunningVM.mirror_sources`, what :mod:`ferry.vm.mirroring` copies out).
    """
    entered = time.monotonic()
    launched = entered if launched is None else launched
    package, state_dir, state_file = _prepare_state_dir(
        vm_id, paths, package, forwards,
        saved_labels(paths, vm_id) if labels is None else labels)
    record = read_json(state_dir / VM_RECORD) or {}
    manifest = package.manifest
    check_guest_network(manifest, vm=vm_id)
    running: RunningVM | None = None
    clean_exit = False
    claimed: _Claimed | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            # A restore (providers given) may run where the VM's own id still names a
            # network: that of the holder that died, or of the dead node's VM when
            # both "nodes" are namespaces of one machine. Its network gets an id of its own.
            net_id = vm_id if providers is None else f"{vm_id[:33]}-{secrets.token_hex(3)}"
            net = VMNetwork(net_id, forwards, run_dir=paths.net_run_dir, hold_forwards=True,
                            service_address=service_address)
            stack.push_async_callback(net.close)
            # QEMU opens the tap when it starts: only the namespace and tap must
            # exist before the spawn; the uplink (veth, NAT, forwarders) follows
            # concurrently with QEMU's start and the state load.
            async with _alongside(net.create_namespace(), f"netns {vm_id}") as tap_step:
                t0 = time.monotonic()
                memory: Device
                disks: dict[str, Device] = {}
                if providers is None:
                    memory = overlay = package_overlay(package, manifest.memory, state_dir)
                    stack.push_async_callback(memory.close)
                    for entry in manifest.disks:
                        dev: Device
                        if entry.name in (volumes or {}):
                            disks[entry.name] = dev = _volume_device(
                                (volumes or {})[entry.name], entry.name, entry.size_bytes,
                                vm_id)
                        else:
                            disks[entry.name] = dev = package_overlay(package, entry,
                                                                      state_dir)
                        stack.push_async_callback(dev.close)
                else:
                    overlay = None
                    memory, disks = await providers(stack)
                # Dirty-tracked stacks over the overlays, so the VM can be live-migrated
                # out (ferry.live.outgoing); the overlays stay what the callbacks close.
                live = local_devices(memory, disks)
                assert live.memory is not None
                vm_memory: Device = live.memory.vm_handle
                vm_disks = live.vm_disks()
                mirror_sources: dict[str, DirtyRemote] = {}
                if mirror_tracking:
                    vm_memory, mirror_sources[MIRROR_MEMORY] = _tracked(vm_memory, manifest
                                                                        .memory.block_size_bytes)
                    for entry in manifest.disks:
                        vm_disks[entry.name], mirror_sources[MIRROR_DISK + entry.name] = \
                            _tracked(vm_disks[entry.name], entry.block_size_bytes)
                config = machine_config(manifest, package.directory / manifest.kernel,
                                        package.directory / manifest.initramfs,
                                        tap=net.tap_name, sandbox=sandbox, vm=vm_id)
                qemu = QemuVM(config, work_dir=paths.run_dir(vm_id),
                              memory=vm_memory, disks=vm_disks, name=vm_id,
                              wrap_argv=net.wrap_argv)
                await stack.enter_async_context(qemu)
                devices_s = time.monotonic() - t0
                # While QEMU starts, push the guest's non-zero RAM into the page cache
                # so the resumed guest does not fault it in through the daemon. It
                # must end before the state load, so before anything writes guest RAM.
                enough = threading.Event()
                preload = _preload_memory(qemu, package, overlay, enough) \
                    if overlay is not None else _no_preload()
                preload_step = await stack.enter_async_context(_alongside(
                    preload, f"preload {vm_id}"))
            async with _alongside(net.connect_uplink(), f"uplink {vm_id}") as uplink_step:
                spawn_s = await qemu.start_incoming()
                # QEMU is ready: the chunks not stored yet fault in through the daemon
                # instead of delaying the resume (on a busy host the preload is partial).
                # A warm VM has time: its preload runs to the end.
                if claim is None:
                    enough.set()
                await preload_step.wait()
                primed: Primed | None = None
                if claim is not None:
                    await uplink_step.wait()
                    if prime_ports is not None:
                        primed = await prime(qemu, state_file, net, stack,
                                             guest_ports=prime_ports,
                                             agent_timeout_s=agent_timeout_s)
                    claimed = await _claim(claim, paths, vm_id, state_dir, record, net)
                    vm_id, record = claimed.vm_id, claimed.record
                    launched = entered = time.monotonic()
                if primed is not None:
                    loaded = dataclasses.replace(primed.loaded, migrate_s=0.0)
                else:
                    try:
                        loaded = await qemu.load_device_state(state_file)
                    except VMError as exc:
                        raise await _explain_load_failure(exc, manifest, vm_id) from exc
                t1 = time.monotonic()
                await qemu.resume()
                cont_s = time.monotonic() - t1
                running_s = time.monotonic() - launched
                ram_at_running = dataclasses.replace(qemu.mount.counters(MEMORY_FILE))
                qemu_at_running = process_usage(qemu.pid) if qemu.pid is not None else {}
            async def settle() -> AgentClient:
                """The agent back (HELLO), the environment, the clock and after-resume
                hooks."""
                agent = primed.agent if primed is not None else \
                    await stack.enter_async_context(
                        connect_agent(qemu.agent_socket, connect_timeout_s=agent_timeout_s))
                try:
                    if env:
                        await apply_environment(agent, env, timeout_s=agent_timeout_s)
                    await agent.after_resume(timeout_s=agent_timeout_s)
                    if volumes:
                        await agent.exec(
                            ["/bin/sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"],
                            timeout_s=agent_timeout_s)
                except AgentError as exc:
                    raise VMLifecycleError(
                        f"the guest agent did not answer after resume: {exc}", vm=vm_id
                    ) from exc
                return agent

            t2 = time.monotonic()
            if primed is not None:
                # A primed VM's agent is connected and answers at once: its clock is set
                # before the first client is let in, rather than beside it on the vCPU.
                agent = await settle()
            # Clients that connected meanwhile were held, not refused: the guest runs now.
            net.open_forwards()
            net.announce_service()
            forwards_s = time.monotonic() - launched
            log.info("vm %s: running %.1f ms after launch, forwards open at %.1f ms",
                     vm_id, running_s * 1e3, forwards_s * 1e3)
            if primed is None:
                t2 = time.monotonic()
                agent = await settle()
            now = time.monotonic()
            timings = ResumeTimings(
                launched_monotonic_s=launched, setup_s=entered - launched,
                network_s=tap_step.seconds + uplink_step.seconds, tap_s=tap_step.seconds,
                uplink_s=uplink_step.seconds, devices_s=devices_s, spawn_s=spawn_s,
                load_s=loaded.migrate_s, cont_s=cont_s, running_s=running_s,
                forwards_s=forwards_s, agent_s=now - t2, total_s=now - launched,
                preload_s=preload_step.seconds,
                preload_bytes=preload_step.value.bytes_stored if preload_step.value else 0,
                ram_reads_at_running=ram_at_running.reads,
                ram_read_bytes_at_running=ram_at_running.bytes_read,
                qemu_at_running=qemu_at_running, warm=claimed is not None,
                primed_ports=None if primed is None else primed.accepted)
            running = RunningVM(vm_id, package, qemu, net, agent, timings, state_dir)
            running.live = live
            running.mirror_sources = mirror_sources
            running.labels = dict(record.get("labels") or {})
            yield running
        clean_exit = True
    finally:
        # Overlays are only worth keeping if everything reached them (clean unmount).
        _finish_state_dir(running if clean_exit else None, state_dir, record)
        if claimed is not None:
            claimed.release(kept=running is not None and clean_exit
                            and running.suspended is not None)


def _volume_device(path: Path, disk: str, size_bytes: int, vm_id: str) -> FileDevice:
    """The volume file that takes the place of the package's disk ``disk``."""
    dev = FileDevice(path, name=f"volume {path.parent.name}")
    if dev.size_bytes != size_bytes:
        dev.close_sync()
        raise VMLifecycleError(
            f"volume {path.parent.name} has {dev.size_bytes} bytes, the package's disk "
            f"{disk} {size_bytes}: create the volume with --size {size_bytes // 2**20}",
            vm=vm_id)
    return dev


@dataclass(slots=True)
class _Claimed:
    """A warm VM's name: the symlinks that make it, and the record under it."""

    vm_id: str
    record: dict[str, Any]
    run_link: Path
    state_link: Path
    state_dir: Path

    def release(self, *, kept: bool) -> None:
        """The VM ended: drop the names; a suspended VM's state dir takes its name."""
        self.run_link.unlink(missing_ok=True)
        if kept and self.state_link.is_symlink():
            self.state_link.unlink()
            os.rename(self.state_dir, self.state_link)
        else:
            self.state_link.unlink(missing_ok=True)


async def _claim(claim: Claimer, paths: VMPaths, warm_id: str, state_dir: Path,
                 record: dict[str, Any], net: VMNetwork) -> _Claimed:
    """Wait for the claim, then name the warm VM and publish its forwards."""
    got = await claim()
    vm_id = got.vm_id
    run_link, state_link = paths.run_dir(vm_id), paths.state_dir(vm_id)
    for link in (run_link, state_link):
        if link.is_symlink() and not link.exists():
            link.unlink()  # a dangling name left by a crashed warm VM
        if link.exists() or link.is_symlink():
            raise VMExistsError("is already taken on this host (running, suspended or "
                                "starting)", vm=vm_id)
    private_dir(run_link.parent)
    private_dir(state_link.parent)
    os.symlink(warm_id, run_link)
    try:
        os.symlink(warm_id, state_link)
    except BaseException:
        run_link.unlink(missing_ok=True)
        raise
    claimed = _Claimed(vm_id, {**record, "vm_id": vm_id,
                               "forwards": [f.to_json() for f in got.forwards],
                               "labels": dict(got.labels)},
                       run_link, state_link, state_dir)
    try:
        write_json(state_dir / VM_RECORD, claimed.record)
        await net.add_forwards(got.forwards)
    except BaseException:
        claimed.release(kept=False)
        raise
    log.info("warm vm %s claimed as %s", warm_id, vm_id)
    return claimed


Providers = Callable[[contextlib.AsyncExitStack], Awaitable[tuple[Device, dict[str, Device]]]]
"""Makes guest RAM and the disks (by manifest name), registering their closing on the stack."""

MIRROR_MEMORY = "memory"
MIRROR_DISK = "disk."


def _tracked(device: Device, block_size_bytes: int) -> tuple[Device, DirtyRemote]:
    """A dirty tracker over ``device`` with every block tracked: (what QEMU writes, what
    the mirror takes dirty blocks from). Closing QEMU's handle closes nothing below:
    the stacks under it are closed by their own owners."""
    local, remote = dirty_tracker(_NoClose(device), block_size_bytes)
    remote.track_all()
    return local, remote


class _NoClose(ForwardingDevice):
    async def close(self) -> None:
        pass


async def _no_preload() -> PreloadStats:
    return PreloadStats(MEMORY_FILE, 0, 0, 0.0)


def _preload_chunks(package: OpenedPackage, memory: OverlayDevice) -> list[int]:
    """Offsets of the :data:`PRELOAD_CHUNK_BYTES` chunks of guest RAM worth preloading:
    those with a block the package's hashes say is non-zero, or one this VM's overlay
    holds (a suspended VM). Whole chunks: a few zero blocks cost less than more calls."""
    geometry = memory.geometry
    blocks = nonzero_blocks(package, package.manifest.memory)
    if blocks is None:
        blocks = list(range(geometry.block_count))  # the mount skips all-zero chunks
    per_chunk = max(1, PRELOAD_CHUNK_BYTES // geometry.block_size_bytes)
    chunk_bytes = per_chunk * geometry.block_size_bytes
    return sorted({b // per_chunk * chunk_bytes for b in set(blocks) | memory.overlay_blocks()})


async def _preload_memory(qemu: QemuVM, package: OpenedPackage, memory: OverlayDevice,
                          enough: threading.Event) -> PreloadStats:
    """Push the guest's non-zero RAM into the page cache of QEMU's memory file,
    in address order, until done or ``enough`` is set.

    Chunks the VM never wrote come straight from a read-only mapping of the
    package's memory file (the kernel copies from its page cache: no copy
    through Python); chunks the overlay holds are read through the device.
    """
    size = memory.size_bytes
    geometry = memory.geometry
    held_blocks = memory.overlay_blocks()
    offsets = _preload_chunks(package, memory)
    own: dict[int, bytes] = {}
    for offset in offsets:
        n = min(PRELOAD_CHUNK_BYTES, size - offset)
        if any(b in held_blocks for b in geometry.blocks_touching(offset, n)):
            own[offset] = await memory.read_at(offset, n)
    with _mapped(package.directory / package.manifest.memory.path, size) as mapped:

        def chunks() -> Generator[tuple[int, Buffer], None, None]:
            with memoryview(mapped) as whole:
                for offset in offsets:
                    if enough.is_set():
                        return
                    if offset in own:
                        yield offset, own[offset]
                        continue
                    with whole[offset:offset + PRELOAD_CHUNK_BYTES] as view:
                        yield offset, view

        source = chunks()
        try:
            return await qemu.mount.preload(MEMORY_FILE, source)
        finally:
            source.close()  # releases the views before the mapping closes


@contextlib.contextmanager
def _mapped(path: Path, size_bytes: int) -> Iterator[mmap.mmap]:
    """A read-only mapping of the immutable package file ``path``."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        if len(mapped) != size_bytes:
            raise ManifestError(f"{path} has {len(mapped)} bytes, the manifest says "
                                f"{size_bytes}")
        yield mapped


class _Step(Generic[T]):
    """A step run by :func:`_alongside`: its result once done, and how long it took."""

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.seconds = 0.0
        self.value: T | None = None

    async def wait(self) -> None:
        """Wait for the step; raises its error."""
        await asyncio.shield(self.task)


@contextlib.asynccontextmanager
async def _alongside(step: Coroutine[Any, Any, T], name: str) -> AsyncIterator[_Step[T]]:
    """Run ``step`` while the block runs; leaving waits for it and raises its error.

    If the block fails, the step is still awaited (not cancelled: a half-made
    network is undone by its own close, and a preload by the unmount, neither
    of which may race the step).
    """
    async def timed() -> None:
        t0 = time.monotonic()
        timing.value = await step
        timing.seconds = time.monotonic() - t0

    timing: _Step[T] = _Step(asyncio.create_task(timed(), name=name))
    try:
        yield timing
    except BaseException:
        await asyncio.wait([timing.task])
        if not timing.task.cancelled() and timing.task.exception() is not None:
            log.debug("%s also failed: %r", name, timing.task.exception())
        raise
    await timing.task


async def _explain_load_failure(exc: VMError, manifest: VMManifest,
                                vm_id: str) -> FerryError:
    """A failed state load, with the likely reason when the package was saved by another
    QEMU version (7.2's state does not load into 10: "Size mismatch: pc.bios")."""
    saved = manifest.machine.qemu
    here = await host_qemu_version()
    if saved and here and saved != here:
        return VMLifecycleError(
            f"{exc}; this package was saved by QEMU {saved} and this host runs QEMU {here}: "
            "a device state does not always load into another QEMU version, rebuild the "
            "package on this host (ferry vm snapshot)", vm=vm_id)
    return exc
