"""``ferry vm run``: resume a package (or continue a suspended VM) and hold it.

pyfuse3 allows one FUSE session per process and a VM's RAM is served by its
FUSE mount, so every VM gets its own process. It owns the FUSE mount, the
NBD server, QEMU (which dies with it: PDEATHSIG), the VM's network and the
agent connection, and holds the VM through :mod:`ferry.node.holder` until a
``stop`` request, SIGTERM/SIGINT (discard), a migration away or QEMU's
unexpected exit (discard).

``ferry vm run`` runs :func:`supervise` in its own process (foreground, with
the guest console on stdout); ``ferry vm run --detach`` starts it in a
holder process with :func:`ferry.node.process.launch_detached`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.aio import cancel_and_wait
from ferry.errors import ConfigError
from ferry.hostconfig import HostConfig
from ferry.live.outgoing import Movable
from ferry.net import PortForward
from ferry.node.holder import Ending, HeldVM, Holder, WarmStopped, holding, stop_report
from ferry.node.record import HolderRecord, HolderState
from ferry.vm import volumes
from ferry.vm.labels import check_labels
from ferry.vm.pkgcache import OpenedPackage, open_extracted
from ferry.vm.registry import VMPaths, check_vm_id, cleanup_leftovers, saved_labels
from ferry.vm.runner import (
    Claim,
    Claimer,
    Providers,
    RunningVM,
    run_vm,
    saved_forwards,
)
from ferry.vm.stopmode import StopMode
from ferry.vm.userdata import (
    DEFAULT_USER_DATA_TIMEOUT_S,
    check_env,
    parse_user_data,
    run_user_data,
)
from ferry.vm.volumes import check_volume_name

if TYPE_CHECKING:  # imported when used: boto3 costs every holder ~0.25 s of start-up
    from ferry.s3.mirror import Mirror
    from ferry.vm.mirroring import MirrorSpec
    from ferry.vm.restore import RestorePoint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """What to run: a VM id, an extracted package (None: continue the suspended VM), forwards
    (None: the ones the suspended VM had)."""

    vm_id: str
    package_dir: Path | None
    host: HostConfig
    forwards: tuple[PortForward, ...] | None = ()
    labels: Mapping[str, str] | None = None
    """The VM's labels (None: a continued VM keeps the ones it had; a package run has none)."""
    warm: bool = False
    """Resume ``package_dir`` ahead of need under the placeholder ``vm_id`` and wait to be
    claimed (:class:`~ferry.node.control.ClaimRequest`; see :func:`ferry.vm.runner.run_vm`)."""
    service_address: str | None = None
    """An address that follows the VM from host to host (docs/networking.md)."""
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The VM's environment (:mod:`ferry.vm.userdata`; a package run only)."""
    user_data: str | None = None
    """A ``#!`` script or ``#cloud-config`` run once after the resume (a package run only)."""
    user_data_timeout_s: float = DEFAULT_USER_DATA_TIMEOUT_S
    volumes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Volumes to attach: {volume: package disk it replaces, or "" for the next free one}
    (:mod:`ferry.vm.volumes`; a package run only)."""
    mirror: MirrorSpec | None = None
    """Mirror the running VM to this bucket prefix (:mod:`ferry.vm.mirroring`)."""
    restore: MirrorSpec | None = None
    """Resume the VM from the last checkpoint of this mirror instead of a package
    (:mod:`ferry.vm.restore`)."""
    prime_ports: tuple[int, ...] | None = None
    """A warm VM only: prime it before it waits, probing these guest TCP ports
    (:mod:`ferry.vm.prime`; None: not primed, QEMU waits for the state)."""

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)
        if self.labels is not None:
            check_labels(self.labels)
        check_env(self.env)
        if self.user_data is not None:
            parse_user_data(self.user_data)
        for name in self.volumes:
            check_volume_name(name)
        if (self.env or self.user_data is not None or self.volumes) and (
                self.package_dir is None or self.warm):
            raise ConfigError("an environment, user data and volumes are given to a VM run "
                              "from a package; a continued VM keeps the environment it had")
        if self.warm and (self.package_dir is None or self.forwards):
            raise ValueError("a warm VM needs a package and takes its forwards when claimed")
        if self.restore is not None and (self.package_dir is not None or self.warm):
            raise ValueError("a restore takes neither a package nor a warm start")
        if self.prime_ports is not None:
            if not self.warm:
                raise ValueError("only a warm VM is primed")
            if not all(0 < p < 65536 for p in self.prime_ports):
                raise ConfigError(f"prime ports must be TCP ports: {self.prime_ports}")

    @property
    def paths(self) -> VMPaths:
        return VMPaths.of(self.host)


async def supervise(
    request: LaunchRequest,
    *,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    on_console: Callable[[bytes], None] | None = None,
    log_file: bool = False,
    on_warm: Callable[[dict[str, Any]], None] | None = None,
    parent_gone: Awaitable[object] | None = None,
) -> dict[str, Any]:
    """Run one VM until it is stopped; returns the stop report (``mode``, and ``signal``
    if SIGTERM/SIGINT stopped it).

    ``on_ready`` gets the resume report once the VM runs and the control
    socket listens; ``on_console`` gets the guest console's bytes as they
    come; ``log_file`` sends this process's stderr (logging) to
    ``<run dir>/supervisor.log``.

    A warm request (``request.warm``) calls ``on_warm`` once the VM waits for its
    claim; the claim is answered with the ready report (``on_ready`` is not called).
    Until then, ``parent_gone`` finishing (the daemon that wanted it went away) or a
    stop request discards it.
    """
    launched = time.monotonic()
    paths, vm_id = request.paths, request.vm_id
    await cleanup_leftovers(paths)
    forwards = request.forwards if request.forwards is not None \
        else saved_forwards(paths, vm_id)
    labels = dict(request.labels) if request.labels is not None \
        else saved_labels(paths, vm_id)
    record = HolderRecord.for_this_process(
        vm_id, HolderState.WARM if request.warm else HolderState.STARTING,
        package_dir=str(request.package_dir or ""), forwards=tuple(str(f) for f in forwards),
        labels=labels)
    async with holding(paths, record) as holder:
        if log_file:
            _redirect_stderr(holder.run_dir / "supervisor.log")
        claim: Claimer | None = None
        if request.warm:
            claim = _claimer(holder, on_warm, parent_gone)
        with holder.signals_stop():
            try:
                ending = await _run(holder, request, forwards, on_ready=on_ready,
                                    on_console=on_console, launched=launched, claim=claim,
                                    labels=labels)
            except WarmStopped:
                log.info("warm vm %s: stopped before it was claimed", vm_id)
                ending = Ending.DISCARD
    report = stop_report(ending, holder.outcome)
    if holder.signal is not None:
        report["signal"] = holder.signal
    return report


def _held(vm: RunningVM, forwards: tuple[PortForward, ...],
          attached: tuple[str, ...] = (), *, can_suspend: bool = True) -> HeldVM:
    assert vm.live is not None

    def counters() -> tuple[Mapping[str, int], Mapping[str, float]]:
        return dataclasses.asdict(vm.memory_counters()), vm.qemu_usage()

    return HeldVM(vm.qemu, vm.agent,
                  Movable(vm.vm_id, vm.qemu, vm.live, vm.agent, vm.net, vm.manifest,
                          vm.package.directory, forwards, vm.package.package_id,
                          labels=vm.labels),
                  can_suspend=can_suspend and not attached, counters=counters,
                  volumes=attached)


def _claimer(holder: Holder, on_warm: Callable[[dict[str, Any]], None] | None,
             parent_gone: Awaitable[object] | None) -> Claimer:
    async def claim() -> Claim:
        watch = None
        if parent_gone is not None:
            async def discard_when_gone() -> None:
                await parent_gone
                log.info("warm vm %s: its daemon went away", holder.vm_id)
                holder.request_stop(Ending.DISCARD)
            watch = asyncio.create_task(discard_when_gone(), name="parent gone")
        if on_warm is not None:
            on_warm({"vm_id": holder.vm_id, "pid": os.getpid()})
        try:
            return await holder.wait_claim()
        finally:
            if watch is not None:
                await cancel_and_wait(watch, swallow_errors=True)

    return claim


async def _run(holder: Holder, request: LaunchRequest, forwards: tuple[PortForward, ...], *,
               on_ready: Callable[[dict[str, Any]], None] | None,
               on_console: Callable[[bytes], None] | None, launched: float,
               claim: Claimer | None = None, labels: Mapping[str, str]) -> Ending:
    package = open_extracted(request.package_dir) if request.package_dir else None
    providers = None
    point: RestorePoint | None = None
    if request.restore is not None:
        from ferry.vm import restore

        spec = request.restore
        point = await restore.prepare(spec.store(), spec.layout(), holder.run_dir / "restored")
        package = point.package
        # Its writes are staged on disk, in the state dir run_vm makes before the devices.
        providers = restore.providers(point,
                                      staging_dir=request.paths.state_dir(request.vm_id))
        log.info("vm %s: restoring %s from checkpoint %d of %s", request.vm_id, spec.url,
                 point.record.sequence, _iso(point.record.created_unix_s))
    with contextlib.ExitStack() as held_volumes:
        images: dict[str, Path] = {}
        if request.volumes and package is not None:
            extra = [d.name for d in package.manifest.disks[1:]]
            for disk, name in volumes.assign_disks(dict(request.volumes), extra).items():
                images[disk] = held_volumes.enter_context(
                    volumes.attached(request.host.state_root, name)).image
        return await _run_held(holder, request, package, forwards, images, providers, point,
                               on_ready=on_ready, on_console=on_console, launched=launched,
                               claim=claim, labels=labels)


async def _run_held(holder: Holder, request: LaunchRequest, package: OpenedPackage | None,
                    forwards: tuple[PortForward, ...], images: Mapping[str, Path],
                    providers: Providers | None, point: RestorePoint | None, *,
                    on_ready: Callable[[dict[str, Any]], None] | None,
                    on_console: Callable[[bytes], None] | None, launched: float,
                    claim: Claimer | None, labels: Mapping[str, str]) -> Ending:
    async with run_vm(request.vm_id, request.paths, package=package,
                      forwards=forwards, sandbox=request.host.qemu_sandbox,
                      launched=launched, claim=claim, labels=labels,
                      service_address=request.service_address, env=request.env,
                      volumes=images, providers=providers,
                      mirror_tracking=request.mirror is not None,
                      prime_ports=request.prime_ports if request.warm else None) as vm:
        pid = vm.qemu.pid
        holder.record.set_qemu(pid)
        forwards = vm.net.forwards  # a warm VM's came with its claim
        holder.update(vm_id=vm.vm_id, state=HolderState.RUNNING, labels=vm.labels,
                      package_dir=str(vm.package.directory),
                      package_id=vm.package.package_id,
                      forwards=tuple(vm.forward_addresses()), resume=vm.timings.to_json())
        ready: dict[str, Any] = {
            "vm_id": vm.vm_id, "pid": os.getpid(), "qemu_pid": pid,
            "forwards": vm.forward_addresses(), "resume": vm.timings.to_json(),
            "console": str(vm.qemu.console_path),
            "env": sorted(request.env), "user_data": None,
            "volumes": {disk: path.parent.name for disk, path in images.items()}}
        if point is not None and request.restore is not None:
            ready["restored_from"] = {
                "url": request.restore.url, "sequence": point.record.sequence,
                "checkpoint_unix_s": point.record.created_unix_s,
                "checkpoint": _iso(point.record.created_unix_s),
                "age_s": round(time.time() - point.record.created_unix_s, 3)}
        if request.user_data is not None:
            # Once, before the VM is reported ready: its outcome is part of the report.
            holder.update(user_data={"status": "running"})
            result = await holder.unless_stopped(run_user_data(
                vm.agent, parse_user_data(request.user_data),
                timeout_s=request.user_data_timeout_s))
            ready["user_data"] = {"status": "stopped"} if result is None \
                else result.to_json()
            holder.update(user_data=ready["user_data"])
        holder.vm = held = _held(vm, forwards, tuple(p.parent.name for p in images.values()),
                                 can_suspend=point is None)
        mirror = None
        if request.mirror is not None:
            from ferry.vm import mirroring

            mirror = mirroring.mirror_of(vm, request.mirror, work_dir=holder.run_dir,
                                         busy=lambda: holder.outgoing.active)
            holder.mirror_status = mirror.status.to_json
            holder.update(mirror_to=request.mirror.to_json())
            ready["mirror"] = {"url": request.mirror.url,
                               "interval_s": request.mirror.interval_s}
        if claim is not None:
            holder.claimed(ready)
        elif on_ready is not None:
            on_ready(ready)
        async with _follow_console(vm, on_console), _mirroring(mirror):
            ending = await holder.watch(held)
        holder.update(state=HolderState.STOPPING)
        if ending is Ending.SUSPEND:
            stats = await vm.suspend()
            holder.outcome = dataclasses.replace(holder.outcome, mode=StopMode.SUSPEND,
                                                 state_bytes=stats.state_bytes,
                                                 flush_bytes=stats.flush_bytes)
        holder.vm = None
    return ending


@contextlib.asynccontextmanager
async def _mirroring(mirror: Mirror | None) -> AsyncIterator[None]:
    if mirror is None:
        yield
        return
    from ferry.s3.mirror import running

    async with running(mirror):
        yield


def _iso(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat(
        timespec="milliseconds")


@contextlib.asynccontextmanager
async def _follow_console(vm: RunningVM,
                          sink: Callable[[bytes], None] | None) -> AsyncIterator[None]:
    if sink is None:
        yield
        return

    async def follow() -> None:
        offset = 0
        while True:
            data = _read_from(vm.qemu.console_path, offset)
            if data:
                offset += len(data)
                sink(data)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(follow(), name=f"console {vm.vm_id}")
    try:
        yield
    finally:
        await cancel_and_wait(task)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


def _redirect_stderr(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
