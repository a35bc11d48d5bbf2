"""``ferry vm receive``: decide where an arriving VM lands here, then hold it.

One process per arriving VM (pyfuse3 allows one FUSE session per process,
and the VM's RAM is this process's mount). This module decides: the VM's id
(``name`` or the source's), its run dir and records, its network with its
port forwards (given, or the source's rehomed by :func:`rehome`), how the
peer authenticates; :mod:`ferry.live.receive` does the moving with those
plain values (link, launch exchange, :class:`~ferry.live.IncomingVM`,
receive). From the hand-off on the VM is held by :mod:`ferry.node.holder`
like any VM, so ``ferry vm list|exec|stop|migrate`` treat it the same.
Migrating it on (B -> C) is done by this process; the VM then leaves it and
the process exits, so every hop lands in a fresh process.

Detached (``ferry vm receive --detach``): :mod:`ferry.node.process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.errors import ConfigError, FerryError, MigrationError
from ferry.hostconfig import HostConfig
from ferry.live import launch, receive
from ferry.live.access import Access
from ferry.live.bootcache import BootCache
from ferry.live.errors import LiveMigrationError
from ferry.live.outgoing import Movable, suspend_into
from ferry.net import PortForward, VMNetwork
from ferry.node import listing
from ferry.node.holder import Ending, HeldVM, holding
from ferry.node.record import HolderRecord, HolderState
from ferry.vm import pkgcache
from ferry.vm.overlays import PackageBases
from ferry.vm.registry import VMPaths, check_vm_id, cleanup_leftovers, private_dir

log = logging.getLogger(__name__)

MAX_IDLE_TIMEOUT_S = 3600.0

BOOT_CACHE = "boot-cache"
OVERLAYS = "overlays"
"""In the VM's run dir: its devices' overlays over a package's files, when this host has it."""
AGENT_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class ArrivalRequest:
    """Where the VM comes from and how it is set up here."""

    host: HostConfig
    access: Access
    """How the peer authenticates (TLS, a token, or insecure); see :mod:`ferry.live.access`."""
    listen: tuple[str, int] | None = None
    registry: tuple[str, int] | None = None
    package: str | None = None
    name: str | None = None
    forwards: tuple[PortForward, ...] | None = None
    """None: the source's forwards, on this host (see :func:`rehome`)."""
    precopy_only: bool = False
    report_until: str = "ready"
    """The event a detached launch waits for: ``listening`` or ``ready``."""
    idle_timeout_s: float = launch.IDLE_TIMEOUT_S
    """How long the source may send nothing while it offers the VM (``--idle-timeout``)."""

    def __post_init__(self) -> None:
        if not 0 < self.idle_timeout_s <= MAX_IDLE_TIMEOUT_S:
            raise ConfigError(f"the idle timeout must be in (0, {MAX_IDLE_TIMEOUT_S:.0f}] s, "
                              f"not {self.idle_timeout_s}")
        if (self.listen is None) == (self.registry is None):
            raise ConfigError("give exactly one of listen or registry")
        if self.registry is not None and not self.package:
            raise ConfigError("a registry start needs a package name")
        if self.name is not None:
            check_vm_id(self.name)
        if self.report_until not in ("listening", "ready"):
            raise ConfigError(f"report_until must be listening or ready, not "
                              f"{self.report_until!r}")

    @property
    def paths(self) -> VMPaths:
        return VMPaths.of(self.host)


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a received VM left: its ending, and the signal that stopped it if one did."""

    ending: Ending
    signal: int | None = None


async def _announce_when_running(running: asyncio.Event, net: VMNetwork) -> None:
    await running.wait()
    net.announce_service()


def rehome(forwards: tuple[PortForward, ...], listen_host: str | None) -> tuple[PortForward, ...]:
    """The source's forwards on this host: loopback stays loopback, any other address
    becomes the address this host listens on for migrations (its address on that network)."""
    out = []
    for f in forwards:
        host = f.host if f.host in ("127.0.0.1", "::1") or not listen_host else listen_host
        out.append(PortForward(host, f.host_port, f.guest_port, f.proto,
                               allow_wildcard=host in ("0.0.0.0", "::")))
    return tuple(out)


async def arrive(request: ArrivalRequest, *,
                 on_listening: Callable[[tuple[str, int]], None] = lambda a: None,
                 on_ready: Callable[[dict[str, Any]], None] = lambda r: None) -> Arrival:
    """Receive one VM and hold it until it is stopped, migrated on, or QEMU exits.

    Once the VM runs, SIGTERM/SIGINT stop it as ``ferry vm stop`` would
    (:meth:`Holder.signals_stop`); before that they cancel the receive.

    Raises :class:`LiveMigrationError` if it never started here.
    """
    started = time.monotonic()
    paths = request.paths
    await cleanup_leftovers(paths)
    waiting = listing.receiver_record(paths)

    def listening(address: tuple[str, int]) -> None:
        # Until a source connects, this receiver is a VM-to-be: `vm ls` shows it waiting.
        listing.write_receiver(waiting, address, request.name)
        on_listening(address)

    try:
        stream = await receive.open_link(request.access, listen=request.listen,
                                         registry=request.registry, package=request.package,
                                         on_listening=listening)
    finally:
        waiting.unlink(missing_ok=True)
    vm_id = request.name
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(stream.aclose)
            cache = BootCache(paths.state_root / BOOT_CACHE)
            stack.callback(cache.release)
            offer, boot_dir = await launch.receive_offer(
                stream, cache, idle_timeout_s=request.idle_timeout_s)
            try:
                vm_id = check_vm_id(request.name or offer.vm_id)
                holder = await stack.enter_async_context(holding(
                    paths, HolderRecord.for_this_process(vm_id, HolderState.RECEIVING,
                                                         origin=offer.origin)))
                forwards = (request.forwards if request.forwards is not None
                            else rehome(offer.forwards, request.listen[0] if request.listen
                                        else None))
                # A host-unique network id: the VM's own id may still name the source's
                # namespace when both "hosts" are namespaces of one machine.
                net = VMNetwork(f"{vm_id[:33]}-{secrets.token_hex(3)}", forwards,
                                run_dir=paths.net_run_dir,
                                service_address=offer.service_address)
                await stack.enter_async_context(net)
                # The devices' bases, if this host has the VM's package: then only
                # what the VM changed travels (ferry.vm.overlays).
                cached = (pkgcache.find_cached(request.host.package_cache, offer.package)
                          if offer.package is not None else None)
                bases = None
                if cached is not None:
                    bases = PackageBases(cached, private_dir(holder.run_dir / OVERLAYS))
                incoming = await stack.enter_async_context(receive.incoming_vm(
                    offer.manifest, boot_dir, vm_id=vm_id, work_dir=holder.run_dir,
                    tap=net.tap_name, wrap_argv=net.wrap_argv,
                    precopy_only=request.precopy_only, sandbox=request.host.qemu_sandbox,
                    ram=offer.ram, bases=bases))
            except FerryError as exc:
                await receive.refuse(stream, exc)
                raise
            # Clients of the service address are sent here once the guest runs here.
            announcing = asyncio.create_task(_announce_when_running(incoming.running, net))
            stack.push_async_callback(cancel_and_wait, announcing)
            report = await receive.receive_vm(stream, incoming, agent_wait_s=AGENT_WAIT_S)
            running_s = round(time.monotonic() - started, 3)
            movable = Movable(
                vm_id, incoming.vm, incoming.devices, incoming.agent, net, offer.manifest,
                boot_dir, forwards, cached.package_id if cached is not None else None,
                labels=offer.labels)

            async def suspend_now() -> int:
                return await suspend_into(movable, paths.state_dir(vm_id),
                                          [f.to_json() for f in forwards])

            held = holder.vm = HeldVM(incoming.vm, incoming.agent, movable,
                                      can_suspend=True, suspend_now=suspend_now)
            pid = incoming.vm.pid
            fwd_text = [f"{h}:{p}->{f.forward.guest_port}/{f.forward.proto.value}"
                        for f in net.forwarders for h, p in [f.local_address[:2]]]
            holder.record.set_qemu(pid)
            holder.update(state=HolderState.RUNNING, forwards=tuple(fwd_text),
                          labels=dict(offer.labels),
                          package_dir=str(cached.directory) if cached is not None else None,
                          arrival={"handoff_to_running_ms": report.handoff_to_running_ms,
                                   "running_s": running_s})
            on_ready({"vm_id": vm_id, "pid": os.getpid(), "qemu_pid": pid,
                      "forwards": fwd_text, "origin": offer.origin,
                      "running_s": running_s, "report": report.to_json()})
            with holder.signals_stop():
                ending = await holder.watch(held)
            holder.update(state=HolderState.STOPPING)
            return Arrival(ending, holder.signal)
    except FerryError as exc:
        if isinstance(exc, LiveMigrationError):
            raise
        text = str(exc) if isinstance(exc, MigrationError) else f"receiving failed: {exc}"
        raise LiveMigrationError(text, vm=vm_id, handed_off=False) from exc


__all__ = ["Arrival", "ArrivalRequest", "arrive", "rehome"]
