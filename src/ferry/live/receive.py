"""The live half of receiving a VM: link, launch exchange answers, QEMU config, the receive.

:mod:`ferry.node.arrival` decides where and as what the VM lands (paths,
name, forwards, access, records) and calls these with plain values::

    stream = await open_link(access, listen=(ADDR, PORT))         # or registry + package
    offer, boot_dir = await launch.receive_offer(stream, cache)   # manifest, forwards, boot
    async with incoming_vm(offer.manifest, boot_dir, ...) as incoming:
        report = await receive_vm(stream, incoming)               # ready, receive, report
    (any failure before the receive: await refuse(stream, exc))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ferry.errors import FerryError
from ferry.live import launch, report_exchange
from ferry.live.access import Access
from ferry.live.destination import IncomingVM, WrapArgv
from ferry.live.outgoing import options_for
from ferry.live.rampath import LINK_WINDOWS, RamPath, fit_link_windows
from ferry.live.report import DestinationReport
from ferry.migration.channel import StreamChannel
from ferry.transport.base import Stream
from ferry.transport.mux import Mux
from ferry.vm.devices import Bases
from ferry.vm.machine import machine_config
from ferry.vm.manifest import VMManifest


async def open_link(access: Access, *, listen: tuple[str, int] | None = None,
                    registry: tuple[str, int] | None = None, package: str | None = None,
                    on_listening: Callable[[tuple[str, int]], None] = lambda a: None) -> Stream:
    """The authenticated connection the VM arrives on: to ``registry`` asking for
    ``package``, or the first peer that authenticates on ``listen`` (others are dropped,
    see :meth:`~ferry.live.access.Access.accept`)."""
    if registry is not None:
        stream = await access.connect(*registry)
        await launch.send_frame(stream, {"package": package})
        return stream
    assert listen is not None
    async with await access.listen(*listen) as lst:
        on_listening(lst.address)
        return await access.accept(lst)


@contextlib.asynccontextmanager
async def incoming_vm(manifest: VMManifest, boot_dir: Path, *, vm_id: str, work_dir: Path,
                      tap: str, wrap_argv: WrapArgv | None,
                      precopy_only: bool, sandbox: bool,
                      ram: RamPath = RamPath.ENGINE,
                      bases: Bases | None = None) -> AsyncIterator[IncomingVM]:
    """An :class:`IncomingVM` for ``manifest`` (boot files in ``boot_dir``) on ``tap``;
    ``sandbox`` is the host's ``HostConfig.qemu_sandbox``; ``ram`` the offer's; ``bases``
    the device bases this host has (:class:`~ferry.vm.overlays.PackageBases`)."""
    boot = launch.boot_files(manifest, boot_dir)
    config = machine_config(manifest, boot["kernel"], boot["initramfs"], tap=tap,
                            sandbox=sandbox, vm=vm_id)
    async with IncomingVM(config, work_dir=work_dir, name=vm_id,
                          options=options_for(precopy_only, ram), bases=bases,
                          wrap_argv=wrap_argv) as incoming:
        yield incoming


async def refuse(stream: Stream, exc: BaseException) -> None:
    """Tell the source this host will not take the VM (best effort)."""
    with contextlib.suppress(FerryError):
        await launch.send_ready(stream, str(exc))


async def receive_vm(stream: Stream, incoming: IncomingVM, *,
                     agent_wait_s: float) -> DestinationReport:
    """Say ready, receive the VM, send the source this side's report; then wait up to
    ``agent_wait_s`` for the guest agent. Raises :class:`LiveMigrationError`."""
    await launch.send_ready(stream)
    if incoming.options.ram is not RamPath.QEMU:
        report = await incoming.receive(StreamChannel(stream))
        with contextlib.suppress(FerryError):
            await report_exchange.serve_report(stream, report)
        await stream.aclose()
    else:
        # The link is two substreams: the channel, and QEMU's RAM stream.
        async with Mux(stream, 2, window_frames=LINK_WINDOWS) as mux:
            fit_link_windows(mux, stream)
            report = await incoming.receive(StreamChannel(mux.sub(0)), ram_link=mux.sub(1))
            with contextlib.suppress(FerryError):
                await report_exchange.serve_report(mux.sub(0), report)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(agent_wait_s):
            await incoming.agent_ready.wait()
    return report
