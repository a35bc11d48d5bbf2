"""Live-migrate a running QEMU VM out of this host.

:func:`migrate_out` runs the :class:`~ferry.migration.source.Migrator` over
the VM's chainable device stacks (see :mod:`ferry.vm.devices`) while the
guest keeps running, with the VM plugged into the migrator's hooks:

* ``before_dirty_scan``: flush guest RAM through FUSE (the page cache holds
  the guest's latest writes until then);
* ``suspend``: the agent's before-suspend hooks (guest still running), then
  the downtime: QMP ``stop``, final flush, device state saved (into the
  HANDOFF payload);
* ``handoff_payload``: device state and the ring windows to warm;
* ``resume``: if anything fails before the hand-off is acknowledged, QMP
  ``cont``: the VM carries on here and nothing is lost (the migrator only
  ever reads the devices).

* ``after_handoff``: the destination acknowledged the hand-off, which it
  does once its guest runs: the downtime as the source sees it ends here.

Once the destination acknowledged the hand-off the source QEMU is stopped at
once (it must never run again) and ``on_handed_off`` runs (close the VM's
network and port forwards here so clients reconnect to the new host), while
post-copy keeps serving blocks from this host until the destination has all
of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry.aio import cancel_and_wait
from ferry.errors import MigrationError
from ferry.guest.agent import AgentClient, AgentError
from ferry.hostconfig import Accel
from ferry.live import payload as wire
from ferry.live import rampath
from ferry.live.errors import LiveMigrationError
from ferry.live.progress import MigrationProgress
from ferry.live.rampath import RamChoice, RamPath
from ferry.live.report import SourceReport
from ferry.live.timeline import Mark, Timeline
from ferry.migration.autocompress import AutoCompression, LinkCompression
from ferry.migration.channel import Channel
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.migration.source import MigrationHooks, Migrator
from ferry.qemu import DeviceStateStats, QemuVM, VMError, devstate
from ferry.qemu.argv import PrivateRam
from ferry.qemu.qmp import QMPError
from ferry.qemu.ramstream import RamOut
from ferry.storage.providers.memory import MemoryDevice
from ferry.transport.base import Stream
from ferry.vm.devices import VMDevices, wire_order

log = logging.getLogger(__name__)
T = TypeVar("T")

SCRATCH_STATE_BYTES = 8 * 1024 * 1024


FAST_POLICY = DirtyPolicy(max_dirty_blocks=64, min_cycles_below=2, max_cycles=10,
                          cycle_throttle_s=0.1)
"""Suspend once two scans 100 ms apart found at most 64 dirty 64-KiB blocks (4 MiB).

The storage default (500 ms between scans, 5 scans below 200 blocks) is made
for disks; guest RAM flushed through FUSE converges faster, and every dirty
block at the suspend point costs post-copy fetches, not downtime."""


@dataclass(frozen=True, slots=True)
class LiveOptions:
    """Settings of one live migration (both sides must agree on ``mode`` and ``ram``)."""

    mode: Mode = Mode.HYBRID
    ram: RamPath = RamPath.AUTO
    """How guest RAM moves (:class:`RamPath`, resolved by :func:`choose_ram` before
    :func:`migrate_out`); with QEMU's stream ``mode`` applies to the disks."""
    downtime_limit_ms: int = 8
    """QEMU's ``downtime-limit`` when RAM goes in its stream: the RAM tail QEMU leaves for
    the pause (raised if precopy does not converge, see :mod:`ferry.qemu.ramstream`)."""
    private_ram: PrivateRam = PrivateRam.ANONYMOUS
    """Where the destination's QEMU keeps RAM that arrived in its stream. Anonymous
    memory measured fastest; a shared memfd put 200-440 ms on some hops whose source
    held one (docs/live-migration.md)."""
    policy: DirtyPolicy = field(default_factory=lambda: FAST_POLICY)
    agent_hooks: bool = True
    max_bytes_per_s: float | None = None
    """A cap on the link's sending side (``--max-mbit``; :mod:`ferry.transport.ratelimit`):
    everything the source sends, boot files, blocks and QEMU's stream, shares it."""
    compression: LinkCompression = LinkCompression.AUTO
    """What goes compressed on the link (``--compression``), QEMU's stream and the
    blocks: by default, while that makes the link carry more
    (:mod:`ferry.migration.autocompress`)."""
    agent_timeout_s: float = 10.0
    concurrency: int = 4
    max_run_blocks: int = 16
    """Runs in flight x blocks per run: a block fetched on demand after the hand-off
    waits behind what is already in flight. 2 x 8 measured no better than 4 x 16 here."""


DEFAULT_OPTIONS = LiveOptions()


RING_WINDOW_BYTES = 256 * 1024
"""RAM warmed around each virtio ring before the state load (aligned to this size).
Measured on the Redis guest (bench/live_migrate.py, 10 hops each): 1 MiB windows left
no FUSE read in the load but the warm-up itself took 13-55 ms; 64 KiB windows took
6-13 ms but the load then faulted ~15 cold pages through FUSE; 256 KiB (20 windows)
leave no read in the load and take 9-36 ms (downtime p50 ~47-49 ms against ~58-66)."""


async def ring_windows(vm: QemuVM) -> tuple[int, ...]:
    """The RAM windows holding the guest's virtio rings (memory-file offsets).

    Loading the device state on the destination reads every ring, each a cold
    1 MiB FUSE read done one after the other inside the downtime. Rings stay
    where the guest driver put them, so the source looks them up while the
    guest runs (QMP ``x-query-virtio*``; an empty answer where unsupported) and
    the destination warms those windows in parallel before the load. On
    microvm, guest-physical addresses below the RAM size are file offsets.
    """
    windows: set[int] = set()
    try:
        for dev in await vm.qmp.execute("x-query-virtio"):
            path = dev["path"]
            status = await vm.qmp.execute("x-query-virtio-status", {"path": path})
            for queue in range(int(status.get("num-vqs", 0))):
                q = await vm.qmp.execute("x-query-virtio-queue-status",
                                         {"path": path, "queue": queue})
                for key in ("vring-desc", "vring-avail", "vring-used"):
                    addr = int(q.get(key, 0))
                    if 0 < addr < vm.config.memory_bytes:
                        windows.add(addr // RING_WINDOW_BYTES * RING_WINDOW_BYTES)
    except (QMPError, KeyError, TypeError, ValueError) as exc:
        log.info("no virtio ring addresses (%s): the destination will not prefetch", exc)
        return ()
    return tuple(sorted(windows))


async def choose_ram(vm: QemuVM, devices: VMDevices, requested: RamPath) -> RamChoice:
    """The RAM path for moving ``vm`` (:func:`ferry.live.rampath.choose` on its QEMU's
    version and accelerator); LiveMigrationError where the one asked for is unsafe."""
    try:
        return rampath.choose(requested, accel=vm.accel or Accel.TCG,
                              qemu_version=await vm.qemu_version(),
                              ram_is_device=devices.memory is not None)
    except rampath.UnsafeRamPathError as exc:
        raise LiveMigrationError(str(exc), vm=vm.name, handed_off=False) from exc


async def _timed(aw: Awaitable[T], timeline: Timeline, mark: Mark) -> T:
    result = await aw
    timeline.mark(mark)
    return result


async def migrate_out(
    vm: QemuVM,
    devices: VMDevices,
    channel: Channel,
    *,
    agent: AgentClient | None = None,
    options: LiveOptions = DEFAULT_OPTIONS,
    on_handed_off: Callable[[], Awaitable[None]] | None = None,
    ram_link: Stream | None = None,
    progress: MigrationProgress | None = None,
    on_paused: Callable[[], Coroutine[Any, Any, None]] | None = None,
    on_resumed: Callable[[], Awaitable[None]] | None = None,
) -> SourceReport:
    """Move the running ``vm`` to the receiver at the other end of ``channel``.

    With ``options.ram`` QEMU, guest RAM goes in QEMU's own stream over
    ``ram_link`` (the link's second substream) and the migrator moves the disks.
    ``progress``, if given, can be read while it runs.

    ``on_paused`` runs once the guest stopped here for the switch-over, beside the
    downtime's steps (a task, not awaited by them: the VM's service address is
    re-routed to the destination meanwhile); ``on_resumed`` runs after it if the
    migration then fails before the hand-off and the guest runs on here.

    Returns when post-copy has completed and the destination verified every
    block. Raises :class:`LiveMigrationError`: with ``handed_off`` False the VM
    still runs here; with True it runs on the destination.
    """
    if options.ram is RamPath.AUTO:
        raise LiveMigrationError("the RAM path must be chosen first (choose_ram)",
                                 vm=vm.name, handed_off=False)
    report = SourceReport(vm=vm.name, ram_path=options.ram.value,
                          memory_bytes=vm.config.memory_bytes)
    t = report.timeline
    state_bytes = b""
    vlog = log.getChild(vm.name)
    qemu_ram = options.ram is RamPath.QEMU
    if qemu_ram and ram_link is None:
        raise LiveMigrationError("RAM in QEMU's stream needs a link for it", vm=vm.name,
                                 handed_off=False)
    if not qemu_ram and devices.memory is None:
        raise LiveMigrationError("guest RAM is private to QEMU here: it can only move in "
                                 "QEMU's stream (--ram qemu)", vm=vm.name, handed_off=False)
    ram_out: asyncio.Task[RamOut] | None = None
    paused_hook: asyncio.Task[None] | None = None

    def paused() -> None:
        nonlocal paused_hook
        if on_paused is not None:
            paused_hook = leaving.create_task(on_paused(), name=f"paused {vm.name}")

    async def before_scan() -> None:
        if not qemu_ram:
            await vm.flush_memory()

    async def save_state() -> DeviceStateStats:
        nonlocal state_bytes
        scratch = MemoryDevice(SCRATCH_STATE_BYTES, name="state-scratch")
        stats = await vm.save_device_state(scratch, flush=False)
        state_bytes = await devstate.load(scratch, vm=vm.name)
        return stats

    async def suspend() -> None:
        suspend_at = t.mark(Mark.SUSPEND)
        if agent is not None and options.agent_hooks:
            await agent.before_suspend(options.agent_timeout_s)
            report.before_suspend_ms = (time.monotonic() - suspend_at) * 1e3
        if qemu_ram:
            await wait_switchover()
            paused()
            return
        # Flush while the guest still runs, so the flush inside the downtime only
        # carries what the guest dirtied in the last few milliseconds.
        await vm.flush_memory()
        t.mark(Mark.PAUSE)
        await vm.pause()
        t.mark(Mark.PAUSED)
        paused()
        # The final flush and the device-state save are independent (the state has no
        # RAM in it: x-ignore-shared), so they overlap.
        async with asyncio.TaskGroup() as tg:
            flush = tg.create_task(_timed(vm.flush_memory(), t, Mark.FLUSHED))
            save = tg.create_task(_timed(save_state(), t, Mark.STATE_SAVED))
        t.mark(Mark.SUSPENDED)
        report.flush_bytes = flush.result().bytes_written
        stats = save.result()
        report.state_bytes = stats.state_bytes

    async def wait_switchover() -> None:
        # QEMU pauses the guest itself once its precopy converged (its block layer is
        # drained and flushed then): the disks' final dirty blocks go out after this hook.
        assert ram_out is not None
        out = await ram_out
        paused_at = await out.wait_switchover()
        t.mark_at(Mark.PAUSE, paused_at)
        t.mark_at(Mark.PAUSED, paused_at)
        report.downtime_limit_raised_to_ms = out.downtime_limit_raised_to_ms
        t.mark(Mark.SUSPENDED)

    async def start_ram() -> RamOut:
        assert ram_link is not None
        return await RamOut.start(vm, ram_link, downtime_limit_ms=options.downtime_limit_ms,
                                  compression=options.compression)

    async def handoff_payload() -> bytes:
        t.mark(Mark.DIRTY_ACKED)
        if ram_out is not None:
            # Only now QEMU sends its last pages and the device state: on the one link
            # the disks' final dirty list would otherwise queue behind them (measured:
            # final_dirty_list 14-25 ms instead of ~1 ms).
            await ram_out.result().switch_over()
        return wire.encode(wire.HandoffPayload(vm.name, state_bytes, prefetch))

    ram_stopped = False

    def started_ram() -> RamOut | None:
        """QEMU's migration, once it started (None: not yet, or its start failed)."""
        if ram_out is None or not ram_out.done() or ram_out.cancelled() \
                or ram_out.exception() is not None:
            return None
        return ram_out.result()

    async def stop_ram() -> None:
        """Before the hand-off: end QEMU's migration, so the guest runs on here."""
        nonlocal ram_stopped
        if ram_out is None or ram_stopped:
            return
        ram_stopped = True
        if (out := started_ram()) is not None:
            await out.cancel()
        else:
            await cancel_and_wait(ram_out, swallow_errors=True)
        await vm.refresh_state()

    async def resume() -> None:
        vlog.warning("migration failed before the hand-off: resuming the VM here")
        await stop_ram()
        await vm.resume()
        if paused_hook is not None:
            await cancel_and_wait(paused_hook, swallow_errors=True)
            if on_resumed is not None:
                await on_resumed()
        if agent is not None and options.agent_hooks:
            with contextlib.suppress(AgentError, TimeoutError):
                await agent.after_resume(options.agent_timeout_s, check=False)

    async def leave() -> None:
        if ram_out is not None:
            # The destination runs, so QEMU's stream is complete here: take its figures
            # before QEMU quits.
            out = ram_out.result()
            try:
                info = await out.wait_completed()
                downtime = info.get("downtime")
                report.qemu_downtime_ms = float(downtime) if downtime is not None else None
            except (VMError, QMPError) as exc:
                vlog.warning("no figures from QEMU's finished migration: %s", exc)
            report.ram_stream_bytes = out.bytes_sent
            report.ram_wire_bytes = out.wire_bytes
            report.ram_compression = {"mode": options.compression.value,
                                      **out.compression.stats.as_dict()}
        vlog.info("hand-off acknowledged; stopping the source QEMU")
        await vm.stop()
        if on_handed_off is not None:
            await on_handed_off()

    leaving = asyncio.TaskGroup()

    async def after_handoff() -> None:
        # The destination runs the guest now. The migrator awaits this hook before
        # post-copy, and stopping QEMU (QMP quit, up to its stop timeout) or closing the
        # network must not hold back post-copy and every device's completion, so the
        # hook only records the moment and spawns the rest in ``leaving``, which
        # migrate_out leaves only once that is done.
        t.mark(Mark.HANDOFF_ACKED)
        report.handed_off = True
        leaving.create_task(leave(), name=f"leave {vm.name}")

    prefetch = () if qemu_ram else await ring_windows(vm)
    moved = [d for d in wire_order(devices) if not (qemu_ram and d is devices.memory)]
    migrator = Migrator(
        [d.source_device() for d in moved], channel, policy=options.policy,
        mode=options.mode, concurrency=options.concurrency,
        max_run_blocks=options.max_run_blocks,
        auto_compression=AutoCompression(options.compression),
        hooks=MigrationHooks(before_dirty_scan=before_scan, suspend=suspend, resume=resume,
                             handoff_payload=handoff_payload, after_handoff=after_handoff))
    failure: BaseException | None = None
    if progress is not None:
        progress.attach(migrator.progress,
                        lambda: out.bytes_sent if (out := started_ram()) is not None else 0)
    if qemu_ram:
        ram_out = asyncio.create_task(start_ram(), name=f"ram-start {vm.name}")
    succeeded = False
    try:
        async with leaving:
            try:
                await migrator.run()
                succeeded = True
            except (MigrationError, VMError, AgentError, QMPError) as exc:
                failure = exc  # but let a source QEMU that is being stopped finish stopping
    except* (MigrationError, VMError, AgentError, QMPError) as group:
        failure = failure or group.exceptions[0]
    finally:
        if ram_out is not None:
            if not succeeded and not migrator.handed_off:
                # Failed or cancelled before the hand-off (perhaps before the suspend
                # point, with QEMU's precopy still running): the guest stays here.
                with contextlib.suppress(VMError, QMPError):
                    await stop_ram()
            if (out := started_ram()) is not None:
                await out.aclose()
            else:
                await cancel_and_wait(ram_out, swallow_errors=True)
    report.migration = migrator.report
    if failure is not None:
        report.outcome = "failed"
        report.error = str(failure)
        report.handed_off = migrator.handed_off
        raise LiveMigrationError(f"live migration failed: {failure}", vm=vm.name,
                                 handed_off=migrator.handed_off,
                                 phase=migrator.phase.value) from failure
    report.outcome = "completed"
    return report
