"""One QEMU VM whose RAM and disks are ferry devices.

::

    async with QemuVM(config, work_dir=d, memory=mem_dev, disks={"root": disk_dev}) as vm:
        await vm.start()
        await vm.wait_for_console(MARKER_READY, timeout_s=120)
        stats = await vm.save_device_state(d / "state.bin")   # pause + flush + migrate
        await vm.stop()
        await vm.start_incoming()                              # new QEMU, same RAM
        await vm.load_device_state(d / "state.bin")
        await vm.resume()

Entering the context mounts ``memory`` at ``work_dir/mnt/memory`` (FUSE) and
serves ``disks`` over NBD on ``work_dir/nbd.sock`` (the first disk is the
guest's ``/dev/vda``); leaving it stops QEMU and unmounts (with a final
flush). Each QEMU spawned in between is a *generation*: its console goes to
``work_dir/console.N.log`` and its stdout/stderr to ``work_dir/qemu.N.log``.

A watcher task reaps QEMU as soon as it exits. An exit nobody asked for
(a crash, ``kill``, guest poweroff) moves the VM to STOPPED and every later
call, and any QMP call in flight, raises :class:`VMExitedError` with the exit
status and the end of QEMU's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from ferry.aio import cancel_and_wait, wait_briefly
from ferry.errors import ConfigError
from ferry.expose.fuse import FlushStats, FuseMount
from ferry.expose.nbd.server import Export, NBDServer
from ferry.hostconfig import Accel
from ferry.qemu import devstate
from ferry.qemu.accel import choose_accel
from ferry.qemu.argv import (
    AgentChannel,
    NbdDisk,
    PrivateRam,
    QemuConfig,
    SerialToSocket,
    argv_for,
    host_tsc_khz,
    kernel_cmdline,
)
from ferry.qemu.config import VMConfig
from ferry.qemu.devstate import DeviceStateStats
from ferry.qemu.errors import DeviceStateError, VMError, VMExitedError, VMStateError
from ferry.qemu.qmp import QMPClient, QMPConnectionError
from ferry.qemu.sandbox import sandbox_option
from ferry.qemu.state import CAN_SPAWN, HAS_PROCESS, VMState
from ferry.storage.device import Device

logger = logging.getLogger(__name__)
T = TypeVar("T")

MEMORY_FILE = "memory"
MIGRATION_POLL_S = 0.002
"""query-migrate poll interval: the device-state stream takes ~15 ms, so a
coarser poll would dominate the measured time."""
_UNIX_PATH_MAX = 107
_STDERR_TAIL_BYTES = 2000
_SETPRIV = shutil.which("setpriv")
"""util-linux's ``setpriv --pdeathsig`` sets QEMU's parent-death signal without a preexec_fn."""


class _Generation:
    """One spawned QEMU process and its QMP connection."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process, stderr_log: Path) -> None:
        self.number = number
        self.proc = proc
        self.stderr_log = stderr_log
        self.qmp: QMPClient | None = None
        self.expected_exit = False
        self.watcher: asyncio.Task[None] | None = None
        self.spawned_at = time.monotonic()


def event_monotonic(timestamp_s: float) -> float:
    """A QMP event's time (QEMU stamps events with CLOCK_REALTIME) on this process's
    monotonic clock, as of now (same host, so only a clock step in between skews it)."""
    return timestamp_s - time.time() + time.monotonic()


@dataclass(frozen=True, slots=True)
class Resumed:
    """What :meth:`QemuVM.resume` saw."""

    reply_s: float
    """``cont`` until QEMU answered (0 if the guest was running): QEMU's main loop may
    answer well after it restarted the vCPUs (TCG: 10-25 ms measured)."""
    at: float
    """When QEMU resumed the guest (its RESUME event's own time), monotonic."""


class QemuVM:
    """A QEMU process (or a sequence of them) on ferry-served RAM and disks."""

    def __init__(self, config: VMConfig, *, work_dir: Path, memory: Device | PrivateRam,
                 disks: Mapping[str, Device] | None = None, name: str = "vm",
                 wrap_argv: Callable[[Sequence[str]], list[str]] | None = None) -> None:
        """``memory``: the device guest RAM is served from (a FUSE file QEMU maps), or a
        :class:`PrivateRam` kind: RAM only QEMU holds, which arrives in QEMU's own
        migration stream (:mod:`ferry.qemu.ramstream`)."""
        if isinstance(memory, PrivateRam):
            pass
        elif memory.size_bytes != config.memory_bytes:
            raise ConfigError(f"memory device has {memory.size_bytes} bytes, the VM "
                              f"needs {config.memory_bytes} ({config.machine.memory_mib} MiB)")
        self.config = config
        self.name = name
        self.work_dir = Path(work_dir).absolute()
        # ``wrap_argv`` runs QEMU through a launcher, e.g. inside a network
        # namespace (``VMNetwork.wrap_argv``); the launcher must exec QEMU.
        self._wrap_argv = wrap_argv
        for sock in ("qmp.sock", "nbd.sock", "agent.sock", "migrate-out.sock",
                     "migrate-in.sock"):
            if len(os.fsencode(self.work_dir / sock)) > _UNIX_PATH_MAX:
                raise ConfigError(f"work_dir {self.work_dir} is too long for UNIX sockets")
        self.log = logger.getChild(name)
        self._memory = memory
        self._disks = dict(disks or {})
        self._state = VMState.CREATED
        self._stack = contextlib.AsyncExitStack()
        self._mount: FuseMount | None = None
        self._nbd: NBDServer | None = None
        self._gen: _Generation | None = None
        self._generations = 0
        self._exit_error: VMExitedError | None = None
        self._crashed = asyncio.Event()
        self.accel: Accel | None = config.accel
        self.kernel_cmdline: str | None = None
        """The guest kernel command line the last QEMU spawned was given (None before the
        first): the one place it is assembled, and what a package records."""

    # -- properties ----------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def memory_path(self) -> Path:
        return self.work_dir / "mnt" / MEMORY_FILE

    @property
    def nbd_socket(self) -> Path:
        return self.work_dir / "nbd.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.work_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's socket (QEMU listens) when ``config.agent`` is set."""
        return self.work_dir / "agent.sock"

    @property
    def console_socket(self) -> Path:
        """The serial console's socket (QEMU listens; the log is written either way)."""
        return self.work_dir / "console.sock"

    @property
    def console_path(self) -> Path:
        """The serial console log of the current (or last) QEMU generation."""
        return self.work_dir / f"console.{max(self._generations, 1)}.log"

    @property
    def qemu_log_path(self) -> Path:
        return self.work_dir / f"qemu.{max(self._generations, 1)}.log"

    @property
    def pid(self) -> int | None:
        return self._gen.proc.pid if self._gen is not None else None

    @property
    def qmp(self) -> QMPClient:
        """The live QMP connection (VMStateError without a QEMU process)."""
        self._require(HAS_PROCESS, "use QMP")
        assert self._gen is not None
        assert self._gen.qmp is not None
        return self._gen.qmp

    @property
    def mount(self) -> FuseMount:
        if self._mount is None:
            raise VMStateError("the VM context is not entered, or its RAM is not a "
                               "ferry memory file", vm=self.name)
        return self._mount

    @property
    def private_ram(self) -> PrivateRam | None:
        """The kind of RAM only QEMU holds; None when RAM is a ferry memory file."""
        return self._memory if isinstance(self._memory, PrivateRam) else None

    def disk_counters(self) -> dict[str, dict[str, int]]:
        """Per disk: the NBD reads, writes (and bytes) and flushes QEMU sent so far."""
        return self._nbd.counters() if self._nbd is not None else {}

    async def wait_crashed(self) -> VMExitedError:
        """Wait until QEMU exits by itself (not through :meth:`stop` or a hand-off);
        returns why. A later start clears it: it waits for that generation's exit."""
        await self._crashed.wait()
        return self._exited()

    # -- context -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # Probe the sandbox (once per process) while the mount and NBD come up.
        probe = asyncio.create_task(asyncio.to_thread(sandbox_option)) \
            if self.config.sandbox else None
        if not self.config.sandbox:
            self.log.warning("QEMU runs without a seccomp sandbox (turned off: "
                             "VMConfig.sandbox, from FERRY_QEMU_SANDBOX=off)")
        try:
            await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
            if not isinstance(self._memory, PrivateRam):
                await asyncio.to_thread((self.work_dir / "mnt").mkdir, exist_ok=True)
                self._mount = await self._stack.enter_async_context(
                    FuseMount(self.work_dir / "mnt", {MEMORY_FILE: self._memory}))
            if self._disks:
                server = self._nbd = NBDServer({n: Export(d) for n, d in self._disks.items()})
                await self._stack.enter_async_context(server.serve_unix(self.nbd_socket))
            if probe is not None:
                await probe
        except BaseException:
            if probe is not None and not probe.done():
                probe.cancel()
                with contextlib.suppress(BaseException):
                    await probe
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self.stop()
        finally:
            self._mount = None
            await self._stack.aclose()

    # -- lifecycle -----------------------------------------------------------------

    def _require(self, allowed: frozenset[VMState] | set[VMState], action: str) -> None:
        if self._state in allowed:
            return
        if self._state is VMState.STOPPED and self._exit_error is not None:
            raise self._exited()
        raise VMStateError(f"cannot {action} in state {self._state.value}", vm=self.name)

    async def start(self) -> None:
        """Boot a fresh guest. Returns once QMP answers; watch the console for readiness."""
        self._require(CAN_SPAWN, "start")
        await self._spawn(incoming=False)
        self._state = VMState.RUNNING

    async def start_incoming(self) -> float:
        """Spawn QEMU with ``-incoming defer -S`` on the same memory and disks.

        With a ferry memory file RAM is already there (``x-ignore-shared``: the
        stream carries device state only); with private RAM the stream carries RAM too.
        Returns seconds from spawn until QMP was ready for ``migrate-incoming``.
        """
        self._require(CAN_SPAWN, "start an incoming QEMU")
        await self._spawn(incoming=True)
        self._state = VMState.INCOMING
        await self._call("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": self.private_ram is None}]})
        assert self._gen is not None
        return time.monotonic() - self._gen.spawned_at

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``); guest RAM stays in the mount's page cache."""
        self._require({VMState.RUNNING, VMState.PAUSED}, "pause")
        if self._state is VMState.RUNNING:
            await self._call("stop")
            self._state = VMState.PAUSED

    async def resume(self) -> Resumed:
        """Run the vCPUs again (QMP ``cont``) and wait for QEMU's RESUME event.

        Returns when QEMU answered and when it resumed the guest (see :class:`Resumed`)."""
        self._require({VMState.RUNNING, VMState.PAUSED}, "resume")
        if self._state is not VMState.PAUSED:
            now = time.monotonic()
            return Resumed(0.0, now)
        mark = self.qmp.event_mark()
        started = time.monotonic()
        await self._call("cont")
        replied = time.monotonic() - started
        event = await self._guard(self.qmp.wait_event("RESUME", since=mark,
                                                      timeout_s=self.config.qmp_timeout_s))
        self._state = VMState.RUNNING
        return Resumed(replied, event_monotonic(event.event.timestamp_s))

    def note_paused(self) -> None:
        """QEMU paused the guest itself (a migration reached its switch-over)."""
        if self._state is VMState.RUNNING:
            self._state = VMState.PAUSED

    async def qemu_version(self) -> tuple[int, int, int]:
        """QEMU's (major, minor, micro) version, from QMP ``query-version``."""
        q = (await self._call("query-version"))["qemu"]
        return int(q["major"]), int(q["minor"]), int(q["micro"])

    async def refresh_state(self) -> None:
        """Take the run state from QEMU (after QEMU paused or resumed the guest itself)."""
        self._require({VMState.RUNNING, VMState.PAUSED}, "query its state")
        self._state = VMState.RUNNING if await self.query_status() == "running" \
            else VMState.PAUSED

    def note_loaded(self) -> None:
        """An incoming migration completed: the guest is loaded and paused (``-S``)."""
        self._require({VMState.INCOMING}, "finish an incoming migration")
        self._state = VMState.PAUSED

    async def measure_dirty_rate(self, *, calc_time_s: int = 1,
                                 sample_pages: int = 512) -> float:
        """Guest RAM's dirty rate in MiB/s, measured by QEMU over ``calc_time_s`` by hashing
        ``sample_pages`` sampled pages per GiB twice (``calc-dirty-rate``, page-sampling:
        works under TCG and KVM, and costs a few hashes). Raises :class:`VMError` (through
        QMP) where QEMU refuses (another measurement running)."""
        self._require({VMState.RUNNING}, "measure the dirty rate")
        await self._call("calc-dirty-rate", {"calc-time": calc_time_s,
                                             "sample-pages": sample_pages})
        await asyncio.sleep(calc_time_s)
        for _ in range(50):
            got = await self._call("query-dirty-rate")
            if got.get("status") == "measured":
                return float(got.get("dirty-rate", 0)) * 1e6 / (1 << 20)  # QEMU gives MB/s
            await asyncio.sleep(0.1)
        raise VMError("QEMU's dirty-rate measurement did not finish", vm=self.name)

    async def query_status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``postmigrate``, ``inmigrate`` ...)."""
        result = await self._call("query-status")
        return str(result["status"])

    async def flush_memory(self) -> FlushStats:
        """Write every dirty guest page back into the memory device (the msync)."""
        return await self.mount.flush(MEMORY_FILE)

    async def save_device_state(self, dest: Path | Device, *,
                                flush: bool = True) -> DeviceStateStats:
        """Pause, flush RAM into the memory device, and save the device state.

        The state (CPU registers, device models; no RAM thanks to
        ``x-ignore-shared``) is migrated to a UNIX socket ferry listens on and
        stored in ``dest``: a file, or a device (framed, see
        :mod:`~ferry.qemu.devstate`). The VM stays PAUSED (QEMU is
        ``postmigrate``): :meth:`resume` continues it here, :meth:`stop` ends it.
        """
        self._require({VMState.RUNNING, VMState.PAUSED}, "save device state")
        if self.private_ram is PrivateRam.ANONYMOUS:
            raise DeviceStateError("guest RAM is private to QEMU: a device-state save "
                                   "would carry all of it", vm=self.name)
        started = time.monotonic()
        await self.pause()
        flushed = await self.flush_memory() if flush and self._mount is not None else None
        await self._call("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        sock = self.work_dir / "migrate-out.sock"
        async with devstate.receive_stream(sock, vm=self.name) as receiver:
            t0 = time.monotonic()
            await self._call("migrate", {"uri": f"unix:{sock}"})
            await self._wait_migration("save")
            migrate_s = time.monotonic() - t0
            data = await self._guard(receiver.result(self.config.qmp_timeout_s))
        await devstate.store(dest, data, vm=self.name)
        stats = DeviceStateStats(
            state_bytes=len(data), migrate_s=migrate_s,
            flush_bytes=flushed.bytes_written if flushed else 0,
            flush_s=flushed.duration_s if flushed else 0.0,
            total_s=time.monotonic() - started)
        self.log.info("device state saved: %d bytes, migrate %.1f ms, flush %d bytes "
                      "in %.1f ms", stats.state_bytes, migrate_s * 1e3, stats.flush_bytes,
                      stats.flush_s * 1e3)
        return stats

    async def load_device_state(self, src: Path | Device | bytes) -> DeviceStateStats:
        """Feed a saved device state to the incoming QEMU; the VM ends PAUSED."""
        self._require({VMState.INCOMING}, "load device state")
        data = await devstate.load(src, vm=self.name)
        sock = self.work_dir / "migrate-in.sock"
        devstate.unlink_quietly(sock)
        t0 = time.monotonic()
        await self._call("migrate-incoming", {"uri": f"unix:{sock}"})
        await self._guard(devstate.send_stream(sock, data, vm=self.name,
                                               timeout_s=self.config.qmp_timeout_s))
        await self._wait_migration("load")
        stats = DeviceStateStats(state_bytes=len(data), migrate_s=time.monotonic() - t0,
                                 total_s=time.monotonic() - t0)
        self._state = VMState.PAUSED
        self.log.info("device state loaded: %d bytes in %.1f ms", len(data),
                      stats.migrate_s * 1e3)
        return stats

    async def migrate_to(self, uri: str, *, what: str) -> None:
        """Migrate the paused guest to ``uri`` (another QEMU on this host) and wait until
        QEMU completed; the VM stays PAUSED (``postmigrate``): :meth:`resume` continues it."""
        self._require({VMState.PAUSED}, what)
        await self._call("migrate", {"uri": uri})
        await self._wait_migration(what)

    async def wait_incoming(self, what: str) -> None:
        """Wait until an incoming migration (``migrate-incoming`` sent) completed."""
        self._require({VMState.INCOMING}, what)
        await self._wait_migration(what)
        self._state = VMState.PAUSED

    async def stop(self) -> None:
        """End QEMU: QMP ``quit``, SIGKILL after ``stop_timeout_s``; always reaped.

        Idempotent; the VM is STOPPED afterwards (and may be started again).
        """
        gen = self._gen
        if gen is None:
            if self._state is not VMState.CREATED:
                self._state = VMState.STOPPED
            return
        gen.expected_exit = True
        try:
            if gen.proc.returncode is None and gen.qmp is not None:
                with contextlib.suppress(Exception):
                    await gen.qmp.execute("quit", timeout_s=self.config.stop_timeout_s)
            try:
                await asyncio.wait_for(asyncio.shield(gen.proc.wait()),
                                       self.config.stop_timeout_s)
            except TimeoutError:
                self.log.warning("QEMU %d did not quit in %.0f s, killing", gen.proc.pid,
                                 self.config.stop_timeout_s)
        finally:
            await self._reap(gen)

    # -- console -------------------------------------------------------------------

    async def wait_for_console(self, marker: str, *, timeout_s: float, start: int = 0) -> int:
        """Wait until ``marker`` appears in the current console log at or after
        byte ``start``; returns the offset just past it. Raises
        :class:`VMExitedError` if QEMU exits first, TimeoutError after ``timeout_s``."""
        needle = marker.encode()
        path = self.console_path
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    data = await asyncio.to_thread(_read_or_empty, path)
                    idx = data.find(needle, start)
                    if idx >= 0:
                        return idx + len(needle)
                    if self._state is VMState.STOPPED or self._gen is None:
                        self._require(HAS_PROCESS, f"wait for {marker!r}")
                    await asyncio.sleep(0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"vm {self.name}: no {marker!r} on the console within "
                               f"{timeout_s} s") from exc

    # -- internals -----------------------------------------------------------------

    def _kernel_cmdline(self) -> str:
        cfg = self.config
        return kernel_cmdline(tsc_khz=host_tsc_khz(), quiet=cfg.quiet_kernel,
                              root="/dev/vda" if self._disks else None, net=cfg.net,
                              extra=cfg.kernel_args)

    def _argv(self, generation: int, *, cmdline: str, incoming: bool) -> list[str]:
        cfg = self.config
        assert self.accel is not None, "resolved in _spawn"
        disks = [NbdDisk(self.nbd_socket, export=name) for name in self._disks]
        extra = list(cfg.extra_qemu_args)
        if incoming:
            extra.append("-S")
        return argv_for(cfg.kernel, cfg.initramfs, QemuConfig(
            machine=cfg.machine, cmdline=cmdline,
            memory_path=None if self.private_ram else self.memory_path,
            private_ram=self.private_ram, disks=tuple(disks),
            serial=SerialToSocket(self.console_socket,
                                  log=self.work_dir / f"console.{generation}.log"),
            qmp_socket=self.qmp_socket, accel=self.accel,
            incoming="defer" if incoming else None, net=cfg.net,
            agent=AgentChannel(self.agent_socket) if cfg.agent else None,
            sandbox=sandbox_option() if cfg.sandbox else None, extra_args=tuple(extra)))

    async def _spawn(self, *, incoming: bool) -> None:
        number = self._generations + 1
        if self.accel is None:
            self.accel = (await choose_accel()).accel
        cmdline = self._kernel_cmdline()
        argv = self._argv(number, cmdline=cmdline, incoming=incoming)
        self.kernel_cmdline = cmdline
        if self._wrap_argv is not None:
            argv = self._wrap_argv(argv)
        self._generations = number
        self._exit_error = None
        self._crashed.clear()
        devstate.unlink_quietly(self.qmp_socket)
        stderr_log = self.work_dir / f"qemu.{number}.log"
        self.log.info("spawning QEMU #%d: %s", number, " ".join(argv))
        out = _open_log(stderr_log)
        try:
            if _SETPRIV is not None:
                # The same PDEATHSIG through a launcher: without a preexec_fn Python
                # spawns with vfork instead of copying this process (3-4 ms saved).
                proc = await asyncio.create_subprocess_exec(
                    _SETPRIV, "--pdeathsig", "KILL", "--", *argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
            else:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=_die_with_parent)
        finally:
            os.close(out)
        gen = _Generation(number, proc, stderr_log)
        self._gen = gen
        gen.watcher = asyncio.create_task(self._watch(gen), name=f"qemu-watch {self.name}")
        try:
            gen.qmp = await self._connect_or_exit(gen)
        except BaseException:
            gen.expected_exit = True
            await self._reap(gen)
            raise

    async def _connect_or_exit(self, gen: _Generation) -> QMPClient:
        """Connect QMP, or fail fast with VMExitedError if QEMU dies while starting."""
        assert gen.watcher is not None
        connect = asyncio.create_task(QMPClient.connect_unix(
            self.qmp_socket, name=f"{self.name}.{gen.number}",
            timeout_s=self.config.qmp_timeout_s))
        try:
            await asyncio.wait({connect, gen.watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connect.done():
                await cancel_and_wait(connect, swallow_errors=True)
        if self._exit_error is not None:
            if not connect.cancelled() and connect.exception() is None:
                await connect.result().close()
            raise self._exited()
        return connect.result()

    async def _watch(self, gen: _Generation) -> None:
        returncode = await gen.proc.wait()
        if gen.expected_exit:
            return
        tail = _tail(gen.stderr_log)
        self.log.error("QEMU #%d (pid %d) exited unexpectedly with %s: %s", gen.number,
                       gen.proc.pid, returncode, tail)
        self._exit_error = VMExitedError("QEMU exited unexpectedly", vm=self.name,
                                         returncode=returncode, stderr_tail=tail)
        if self._gen is gen:
            self._state = VMState.STOPPED
            self._crashed.set()
        if gen.qmp is not None:
            await gen.qmp.close()

    def _exited(self) -> VMExitedError:
        """A fresh copy of the recorded exit error.

        Raising one stored exception object from several places links it into
        its own ``__context__`` chain; contextlib's exit stacks then loop
        forever walking that cycle (seen as a 100% CPU hang on Ctrl-C).
        """
        err = self._exit_error
        assert err is not None
        return VMExitedError("QEMU exited unexpectedly", vm=self.name,
                             returncode=err.returncode, stderr_tail=err.stderr_tail)

    async def _reap(self, gen: _Generation) -> None:
        """Kill (if needed) and wait for ``gen``'s process; close its QMP; never raises."""
        gen.expected_exit = True
        try:
            if gen.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    gen.proc.kill()
            await asyncio.shield(gen.proc.wait())
        finally:
            if gen.watcher is not None:
                await cancel_and_wait(gen.watcher)
            if gen.qmp is not None:
                await gen.qmp.close()
            if self._gen is gen:
                self._gen = None
                self._state = VMState.STOPPED
            self.log.info("QEMU #%d (pid %d) ended with %s", gen.number, gen.proc.pid,
                          gen.proc.returncode)

    async def _call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._guard(self.qmp.execute(command, arguments,
                                                  timeout_s=self.config.qmp_timeout_s))

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; if QEMU died meanwhile, raise VMExitedError instead."""
        try:
            return await awaitable
        except (QMPConnectionError, DeviceStateError) as exc:
            gen = self._gen
            if gen is not None and gen.watcher is not None:
                # Give the watcher a moment to reap a dying QEMU and record why.
                await wait_briefly(gen.watcher, 2.0)
            if self._exit_error is not None:
                raise self._exited() from exc
            raise

    async def _wait_migration(self, what: str) -> None:
        deadline = time.monotonic() + self.config.qmp_timeout_s
        while True:
            info = await self._call("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise DeviceStateError(f"{what}: migration {status}: "
                                       f"{info.get('error-desc', 'no reason given')}",
                                       vm=self.name)
            if time.monotonic() > deadline:
                raise DeviceStateError(f"{what}: migration still {status} after "
                                       f"{self.config.qmp_timeout_s} s", vm=self.name)
            await asyncio.sleep(MIGRATION_POLL_S)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child: SIGKILL QEMU when this process dies.

    QEMU's RAM and disks are served by this process (FUSE, NBD): without it
    QEMU can only hang on its next page fault. The setting survives the
    exec of QEMU (and of a launcher such as ``ip netns exec`` that execs it).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _STDERR_TAIL_BYTES))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
