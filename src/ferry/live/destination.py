"""Receive a running VM: the destination side of a live migration.

:class:`IncomingVM` is an async context that owns everything the VM needs on
this host once it arrives: the chainable device stacks (waiting caches on
top, see :mod:`ferry.vm.devices`), the :class:`~ferry.qemu.QemuVM`
(RAM on this process's FUSE mount over the memory stack's waiting cache,
disks on NBD) and, after the resume, the agent connection.

Timeline of :meth:`IncomingVM.receive`:

1. The source's Hello names the devices; the factory builds the stacks,
   mounts them and spawns QEMU with ``-incoming defer`` *in the background*,
   so QEMU's start-up (40-80 ms) overlaps pre-copy instead of the downtime.
2. Pre-copy and dirty cycles fill the waiting caches.
3. HANDOFF. The receiver runs the hand-off hook in a task of its own and
   acknowledges the hand-off only when the hook returned, that is once the
   guest runs here (QEMU's RESUME event): the source's view of the downtime
   ends with that acknowledgement, and a failure before it leaves the VM on
   the source. In HYBRID mode loading the state already reads guest RAM
   (virtio rings) whose blocks of the final dirty list arrive while the hook
   runs (the receive loop keeps going); reads of absent blocks fetch them on
   demand. In PRECOPY_ONLY mode every block is present before the hook runs.
4. Post-copy: reads of absent blocks (FUSE reads of guest RAM, NBD reads)
   wait for NeedAt fetches; the rest streams in. The agent reconnects and
   runs its after-resume hooks (clock sync) outside the downtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ferry.aio import StackSafe
from ferry.errors import ConfigError, FerryError, MigrationError
from ferry.expose.fuse import FuseError
from ferry.guest.agent import AgentClient, AgentError, connect_agent
from ferry.latency import LatencyRecorder
from ferry.live import payload as wire
from ferry.live.errors import LiveMigrationError
from ferry.live.rampath import RamPath
from ferry.live.report import DestinationReport
from ferry.live.source import (
    DEFAULT_OPTIONS,
    RING_WINDOW_BYTES,
    LiveOptions,
)
from ferry.live.timeline import Mark
from ferry.migration.channel import Channel
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import Mode
from ferry.protocol.messages import DeviceInfo
from ferry.qemu import MEMORY_FILE, QemuVM, VMConfig
from ferry.qemu.ramstream import RAM_READY, RamIn
from ferry.transport.base import Stream
from ferry.vm.devices import Backing, Bases, VMDevices, incoming_devices, memory_backing
from ferry.vm.errors import DeviceSetError

log = logging.getLogger(__name__)

WrapArgv = Callable[[Sequence[str]], list[str]]


class IncomingVM:
    """A VM arriving on this host; after :meth:`receive` it runs here."""

    def __init__(self, config: VMConfig, *, work_dir: Path, name: str = "vm",
                 options: LiveOptions = DEFAULT_OPTIONS, backing: Backing = memory_backing,
                 bases: Bases | None = None, wrap_argv: WrapArgv | None = None) -> None:
        self.config = config
        self.work_dir = work_dir
        self.name = name
        self.options = options
        self._backing = backing
        self._bases = bases
        self._wrap_argv = wrap_argv
        self._ram_link: Stream | None = None
        self._ram_in: RamIn | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._vm: QemuVM | None = None
        self._devices: VMDevices | None = None
        self._spawn: asyncio.Task[float] | None = None
        self._closing = asyncio.Event()
        self.running = asyncio.Event()
        """Set once the guest runs here (downtime over)."""
        self.agent: AgentClient | None = None
        self.agent_ready = asyncio.Event()
        self.report = DestinationReport(vm=name)
        self._log = log.getChild(name)

    @property
    def vm(self) -> QemuVM:
        if self._vm is None:
            raise LiveMigrationError("no VM has arrived yet", vm=self.name, handed_off=False)
        return self._vm

    @property
    def devices(self) -> VMDevices:
        if self._devices is None:
            raise LiveMigrationError("no VM has arrived yet", vm=self.name, handed_off=False)
        return self._devices

    async def __aenter__(self) -> Self:
        self._tg = await self._stack.enter_async_context(StackSafe(asyncio.TaskGroup()))
        self._stack.callback(self._closing.set)  # runs before the TaskGroup exits
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing.set()
        if self._spawn is not None and not self._spawn.done():
            self._spawn.cancel()
        await self._stack.aclose()

    # -- the migration ---------------------------------------------------------------

    async def receive(self, channel: Channel, *,
                      ram_link: Stream | None = None) -> DestinationReport:
        """Receive the VM from the migrator at the other end of ``channel``.

        With ``options.ram`` QEMU, guest RAM arrives in QEMU's own stream on
        ``ram_link`` into the QEMU's private RAM (:mod:`ferry.qemu.ramstream`).

        Returns once every block arrived and was verified; the VM runs from
        the hand-off on. Raises :class:`LiveMigrationError` (``handed_off``
        says whether the VM had started here).
        """
        if self.options.ram is RamPath.QEMU and ram_link is None:
            raise ConfigError("RAM in QEMU's stream needs a link for it")
        self._ram_link = ram_link
        deferred = self.options.mode is Mode.HYBRID
        receiver = Receiver(channel, self._open_devices, mode=self.options.mode,
                            on_handoff=self._on_handoff)
        try:
            rreport = await receiver.run()
            if self._spawn is not None and deferred:
                await self.running.wait()
        except (MigrationError, FerryError) as exc:
            self.report.outcome = "failed"
            self.report.error = str(exc)
            self.report.receive = receiver.report
            self._report_faults()
            raise LiveMigrationError(f"receiving failed: {exc}", vm=self.name,
                                     handed_off=receiver.handed_off,
                                     phase=receiver.phase.value) from exc
        self.report.outcome = "completed"
        self.report.receive = rreport
        self._report_faults()
        return self.report

    def _report_faults(self) -> None:
        """The waits of the VM's reads for blocks still in flight, over every device."""
        if self._devices is None:
            return
        stalls = LatencyRecorder()
        for dev in self._devices.all():
            if dev.waiting_local is not None:
                stalls.merge(dev.waiting_local.stalls)
        for key, value in stalls.figures().items():
            setattr(self.report, key, value)

    async def _open_devices(self, infos: Sequence[DeviceInfo]) -> Sequence[DestinationDevice]:
        qemu_ram = self.options.ram is RamPath.QEMU
        try:
            devices, dest = await incoming_devices(infos, self._backing, self.name,
                                                   with_memory=not qemu_ram, bases=self._bases)
        except DeviceSetError as exc:
            raise LiveMigrationError(str(exc), vm=None, handed_off=False, phase="precopy") from exc
        self._devices = devices
        self._stack.push_async_callback(devices.close)
        memory = self.options.private_ram if devices.memory is None \
            else devices.memory.vm_handle
        vm = QemuVM(self.config, work_dir=self.work_dir, memory=memory,
                    disks=devices.vm_disks(), name=self.name, wrap_argv=self._wrap_argv)
        await self._stack.enter_async_context(vm)
        self._vm = vm
        assert self._tg is not None
        self._spawn = self._tg.create_task(self._start_qemu(vm), name=f"spawn {self.name}")
        return dest

    async def _start_qemu(self, vm: QemuVM) -> float:
        """Spawn the incoming QEMU; with RAM in QEMU's stream also start loading it and
        tell the source (one byte back on the RAM link) that the stream may flow."""
        spawn_s = await vm.start_incoming()
        if self._ram_link is not None and self.options.ram is RamPath.QEMU:
            self._ram_in = await RamIn.start(vm, self._ram_link)
            self._stack.push_async_callback(self._ram_in.aclose)
            await self._ram_link.send_all(RAM_READY)
        return spawn_s

    async def _wait_spawned(self) -> None:
        assert self._spawn is not None
        self.report.qemu_ready_before_handoff = self._spawn.done()
        self.report.qemu_spawn_ms = round(await self._spawn * 1e3, 3)

    async def _on_handoff(self, data: bytes) -> None:
        # In HYBRID mode the Receiver keeps processing events while this hook runs and
        # acknowledges the hand-off only when it returns, so loading state from blocks
        # that arrive after the HANDOFF works here, and a failure leaves the VM running
        # on A. In PRECOPY_ONLY mode every block is here before it runs.
        self.report.timeline.mark(Mark.HANDOFF_RECEIVED)
        p = self._take_payload(data)
        await self._wait_spawned()
        if self._ram_in is not None:
            await self._load_ram_stream()
        else:
            if not p.state:
                raise LiveMigrationError("the source sent no device state", vm=self.name,
                                         handed_off=True)
            await self._warm(p.prefetch)
            await self._load_state(p.state)
        await self._continue()

    async def _warm(self, offsets: Sequence[int]) -> None:
        """Put the source's ring windows into this mount's page cache before the load.

        Loading the state reads every ring (and RAM near them); through FUSE
        each window is a cold read (up to 1 MiB) served by this process's event loop
        between post-copy writes, one fault after the other. Instead the
        windows are read from the memory stack's waiting cache, all at once
        (absent blocks, such as the rings' own, dirty at the suspend point, are
        fetched on demand), and pushed into the page cache with
        FUSE_NOTIFY_STORE: no FUSE requests at all.

        Safe only from the hand-off on and before the guest runs here: no dirty
        list can make a block absent again, so what is stored is final, and
        nothing has written those pages through the mount (a store would
        replace a dirty page). If the kernel refuses a store, fall back to
        reading the windows through the mount.
        """
        if not offsets:
            return
        started = time.monotonic()
        counters = self.vm.mount.counters("memory")
        reads_before = counters.reads
        assert self.devices.memory is not None
        memory = self.devices.memory.vm_handle
        windows = [(off, min(RING_WINDOW_BYTES, memory.size_bytes - off))
                   for off in offsets if off < memory.size_bytes]
        datas = await asyncio.gather(*(memory.read_at(off, n) for off, n in windows))
        try:
            await self.vm.mount.preload(
                MEMORY_FILE, [(off, data) for (off, _), data in zip(windows, datas, strict=True)])
        except FuseError as exc:
            self._log.warning("page-cache preload refused (%s): reading through FUSE", exc)
            await self._warm_by_reading(offsets)
        self.report.prefetch_windows = len(windows)
        self.report.prefetch_ram_reads = counters.reads - reads_before
        self.report.prefetch_ms = round((time.monotonic() - started) * 1e3, 3)

    async def _warm_by_reading(self, offsets: Sequence[int]) -> None:
        """Fault the windows in through the mount, all at once (the slow path)."""
        path = os.fspath(self.vm.memory_path)
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await asyncio.gather(*(asyncio.to_thread(os.pread, fd, RING_WINDOW_BYTES, off)
                                   for off in offsets))
        finally:
            # close() of a FUSE file sends FLUSH to this very process: never on the loop.
            await asyncio.to_thread(os.close, fd)

    async def _load_state(self, state: bytes) -> None:
        """migrate-incoming; also count the guest RAM it pulls through FUSE (cold reads)."""
        counters = self.vm.mount.counters("memory")
        before_bytes, before_reads = counters.bytes_read, counters.reads
        await self.vm.load_device_state(state)
        self.report.timeline.mark(Mark.STATE_LOADED)
        self.report.state_load_ram_reads = counters.reads - before_reads
        self.report.state_load_ram_read_bytes = counters.bytes_read - before_bytes

    async def _load_ram_stream(self) -> None:
        """Wait until QEMU loaded the rest of its stream (last pages, device state)."""
        assert self._ram_in is not None
        await self._ram_in.wait_completed()
        self.report.timeline.mark(Mark.STATE_LOADED)
        self.report.ram_stream_bytes = self._ram_in.bytes_received

    def _take_payload(self, data: bytes) -> wire.HandoffPayload:
        p = wire.decode(data)
        self.report.state_bytes = len(p.state)
        self.report.handed_off = True
        return p

    async def _continue(self) -> None:
        # The guest runs from QEMU's RESUME event's own time (as the source's pause is
        # QEMU's STOP with RAM in its stream, and as the QEMU baseline measures both).
        if self.vm.private_ram is not None:
            resumed = await self.vm.resume()
        else:
            counters = self.vm.mount.counters("memory")
            before_bytes, before_reads = counters.bytes_read, counters.reads
            resumed = await self.vm.resume()
            self.report.cont_ram_reads = counters.reads - before_reads
            self.report.cont_ram_read_bytes = counters.bytes_read - before_bytes
        self.report.timeline.mark_at(Mark.RUNNING, resumed.at)
        self.report.cont_reply_ms = round(resumed.reply_s * 1e3, 3)
        self.running.set()
        self._log.info("running here %s ms after the hand-off arrived",
                       self.report.handoff_to_running_ms)
        if self.config.agent:
            assert self._tg is not None
            self._tg.create_task(self._hold_agent(), name=f"agent {self.name}")

    async def _hold_agent(self) -> None:
        """Reconnect the agent, sync the guest clock, keep the client until close."""
        started = time.monotonic()
        try:
            async with connect_agent(self.vm.agent_socket) as agent:
                await agent.wait_ready(self.options.agent_timeout_s)
                if self.options.agent_hooks:
                    result = await agent.after_resume(self.options.agent_timeout_s, check=False)
                    self.report.clock_offset_ns = result.clock_offset_ns
                self.report.after_resume_ms = round((time.monotonic() - started) * 1e3, 3)
                self.agent = agent
                self.agent_ready.set()
                await self._closing.wait()
                self.agent = None
        except (AgentError, TimeoutError) as exc:
            self._log.warning("agent after resume: %s", exc)




__all__ = ["IncomingVM", "Mode"]
