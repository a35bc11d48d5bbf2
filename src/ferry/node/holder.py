"""The one process shape that holds a VM: run dir, record, control socket, watch, ending.

``ferry vm run`` (:mod:`ferry.node.supervisor`) and ``ferry vm receive``
(:mod:`ferry.node.arrival`) differ in how the VM comes up; once it runs, both
hold it the same way, through :func:`holding` and :class:`Holder`:

* the run dir ``<run root>/vms/<id>/`` (0700) with the record
  ``supervisor.json`` (:class:`~ferry.node.record.HolderRecord`) and the
  control socket (:mod:`ferry.node.control`);
* the ops: ``status``, ``exec`` (through the guest agent), ``stop`` (discard,
  or suspend where the VM has a state dir), ``migrate`` / ``migrate-cancel``
  (:class:`~ferry.node.outgoing.Outgoing`);
* the interactive streams (:meth:`Holder.stream`): ``session`` (``ferry vm exec
  -i/-t``, a streaming command through the agent) and ``attach`` (the serial
  console: QEMU's console socket, connected only while someone is attached, so
  an unattached guest never waits; QEMU itself keeps the console log);
* :meth:`Holder.watch`: until a stop request, the VM leaving (migrated or
  exported) or QEMU exiting by itself (an event from
  :meth:`~ferry.qemu.QemuVM.wait_crashed`, no polling);
* leaving :func:`holding` removes the run dir (after the caller's own
  cleanup: QEMU, FUSE mount, network) and only then answers a pending
  ``stop``, or a ``migrate`` that moved the VM away: when ``ferry vm stop`` or
  ``ferry vm migrate`` returns, nothing of the VM is left here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ferry.aio import cancel_and_wait
from ferry.guest.agent import AgentClient, AgentError, OutputStream
from ferry.live.outgoing import Movable
from ferry.node import control, interactive, vitals
from ferry.node.control import (
    AttachReply,
    AttachRequest,
    Channel,
    ClaimReply,
    ClaimRequest,
    ExecReply,
    ExecRequest,
    MigrateCancelRequest,
    MigrateRequest,
    Reply,
    Request,
    SessionReply,
    SessionRequest,
    StatusReply,
    StatusRequest,
    StopReply,
    StopRequest,
    StreamRequest,
)
from ferry.node.history import MigrationHistory
from ferry.node.outgoing import Outgoing
from ferry.node.record import HolderRecord, HolderState
from ferry.qemu import QemuVM
from ferry.vm.errors import ControlError, VMExistsError, VMLifecycleError
from ferry.vm.registry import VMPaths, live_supervisor, private_dir
from ferry.vm.runner import Claim
from ferry.vm.stopmode import StopMode

log = logging.getLogger(__name__)
T = TypeVar("T")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WarmStopped(VMLifecycleError):
    """A warm VM was stopped (or its daemon went) before it was claimed."""


SESSION_START_S = 30.0
"""How long a ``session`` waits for the agent to start its command."""
CONSOLE_CONNECT_S = 10.0
LEAVE_TIMEOUT_S = 30.0
"""How long a finished migration's reply waits for this host to let go of the VM."""


class ConsoleBusyError(ControlError):
    """Someone is attached to the VM's console already (one attacher at a time)."""


class Ending(enum.Enum):
    """How a held VM left its holder."""

    DISCARD = "discard"
    SUSPEND = "suspend"
    """Kept in the state dir; ``ferry vm run --name ID`` continues it."""
    MIGRATED = "migrated"
    """Moved to another host or into a package."""
    CRASHED = "crashed"
    """QEMU exited by itself; the VM was discarded."""

    @classmethod
    def of(cls, mode: StopMode) -> Ending:
        return cls.SUSPEND if mode is StopMode.SUSPEND else cls.DISCARD


@dataclass(frozen=True, slots=True)
class HeldVM:
    """A running VM as the holder's ops see it."""

    qemu: QemuVM
    agent: AgentClient | None
    movable: Movable
    can_suspend: bool = False
    counters: Callable[[], tuple[Mapping[str, int], Mapping[str, float]]] | None = None
    """Guest RAM read through FUSE and QEMU's CPU use so far (status: diagnosis, benches)."""
    volumes: tuple[str, ...] = ()
    """Volumes attached to it (:mod:`ferry.vm.volumes`): they stay on this host, so the
    VM is neither migrated nor suspended."""
    suspend_now: Callable[[], Awaitable[int]] | None = None
    """Suspends the VM into its state dir before the stop (a VM that arrived here, whose
    devices are not overlays in a state dir); returns the device state's size. A failure
    leaves the guest running and is the stop request's error."""


class Holder:
    """The state behind one VM's control socket; made by :func:`holding`."""

    def __init__(self, paths: VMPaths, record: HolderRecord) -> None:
        self.paths = paths
        self.record = record
        self.run_dir = paths.run_dir(record.vm_id)
        """Fixed at the start: a warm VM keeps its placeholder's directory once named."""
        self.vm: HeldVM | None = None
        self.signal: int | None = None
        """The signal that asked this VM to stop, if one did."""
        self.outcome = StopReply(StopMode.DISCARD)
        """What a pending ``stop`` request is answered once the VM is gone."""
        loop = asyncio.get_running_loop()
        self._stop: asyncio.Future[Ending] = loop.create_future()
        self._ended: asyncio.Future[StopReply] = loop.create_future()
        self._claim: asyncio.Future[Claim] = loop.create_future()
        self._claimed: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.outgoing = Outgoing(lambda: self.vm.movable if self.vm is not None else None,
                                 on_active=self._migrating,
                                 history=MigrationHistory(paths.state_root))
        self.vitals = vitals.Vitals()
        self._attached = False
        self.mirror_status: Callable[[], dict[str, Any]] | None = None
        """The VM's mirror to S3, if it has one (:class:`~ferry.s3.mirror.MirrorStatus`)."""

    @property
    def vm_id(self) -> str:
        return self.record.vm_id

    def update(self, **changes: Any) -> None:
        """Change record fields and rewrite ``supervisor.json``."""
        for name, value in changes.items():
            setattr(self.record, name, value)
        self.record.write(self.run_dir)

    async def wait_claim(self) -> Claim:
        """A warm VM waits here for its claim (:class:`ClaimRequest`); a stop request
        meanwhile raises :class:`WarmStopped`."""
        waiting: list[asyncio.Future[Any]] = [self._claim, self._stop]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not self._claim.done():
            raise WarmStopped("stopped before anyone claimed it", vm=self.vm_id)
        return self._claim.result()

    async def unless_stopped(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None if a stop request (``vm stop``, SIGTERM) came first:
        then ``work`` is cancelled, and the caller goes on to :meth:`watch`, which returns
        the stop at once (the VM's user data does not hold up a stop)."""
        task = asyncio.ensure_future(work)
        waiting: list[asyncio.Future[Any]] = [task, self._stop]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                await cancel_and_wait(task, swallow_errors=True)
        return None if task.cancelled() or not task.done() else task.result()

    def claimed(self, ready: dict[str, Any]) -> None:
        """The claimed VM runs: answer the claim with its ready report."""
        if not self._claimed.done():
            self._claimed.set_result(ready)

    def _migrating(self, active: bool) -> None:
        if self.record.state in (HolderState.RUNNING, HolderState.MIGRATING):
            # Called when a migration task ends, possibly as the run dir is being removed.
            with contextlib.suppress(OSError):
                self.update(state=HolderState.MIGRATING if active else HolderState.RUNNING)

    def request_stop(self, ending: Ending) -> None:
        if not self._stop.done():
            self._stop.set_result(ending)

    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: discard the VM (the first signal is reported)."""
        self.signal = self.signal or signum
        self.request_stop(Ending.DISCARD)

    @contextlib.contextmanager
    def signals_stop(self) -> Iterator[None]:
        """While inside: SIGTERM/SIGINT ask for a discard stop, exactly as ``ferry vm
        stop`` does, so the VM is torn down in order and not by cancelling whatever
        is awaiting. On the way out a further signal cancels the calling task (a
        teardown that hangs can still be interrupted)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, task.cancel)

    async def handle(self, req: Request) -> Reply:
        match req:
            case StatusRequest():
                return self._status()
            case StopRequest(mode=mode):
                if self.record.state is HolderState.RECEIVING:
                    raise VMLifecycleError("the VM is still arriving; stop its 'ferry vm "
                                           "receive' (Ctrl-C or SIGTERM) to abort",
                                           vm=self.vm_id)
                vm = self.vm
                if mode is StopMode.SUSPEND and vm is None:
                    raise VMLifecycleError("the VM is not running (yet): nothing to suspend",
                                           vm=self.vm_id)
                if mode is StopMode.SUSPEND and vm is not None and vm.volumes:
                    raise VMLifecycleError(f"a VM with volumes ({', '.join(vm.volumes)}) is "
                                           "not suspended: stop it (the volumes keep their "
                                           "data)", vm=self.vm_id)
                if mode is StopMode.SUSPEND and vm is not None and not vm.can_suspend:
                    raise VMLifecycleError("this VM cannot be suspended here; export it with "
                                           "'ferry vm migrate ID --to-package FILE'",
                                           vm=self.vm_id)
                if mode is StopMode.SUSPEND and vm is not None and vm.suspend_now is not None:
                    if self.outgoing.active or self._stop.done():
                        raise VMLifecycleError("is migrating or stopping: not suspended",
                                               vm=self.vm_id)
                    state_bytes = await vm.suspend_now()
                    self.outcome = StopReply(StopMode.SUSPEND, state_bytes=state_bytes)
                self.request_stop(Ending.of(mode))
                return await asyncio.shield(self._ended)
            case ExecRequest():
                agent = self.vm.agent if self.vm is not None else None
                if agent is None:
                    raise VMLifecycleError("the VM is not running (or has no agent)",
                                           vm=self.vm_id)
                return ExecReply.of(await agent.exec(req.command, stdin=req.stdin,
                                                     timeout_s=req.timeout_s))
            case MigrateRequest():
                if self.vm is not None and self.vm.volumes:
                    raise VMLifecycleError(
                        f"has volumes ({', '.join(self.vm.volumes)}), which stay on this "
                        "host: a VM with volumes is not migrated (stop it; the volumes keep "
                        "their data)", vm=self.vm_id)
                try:
                    reply = await self.outgoing.migrate(req)
                finally:
                    if self.outgoing.gone:
                        self.request_stop(Ending.MIGRATED)
                # The VM left: answer once this host has let go of it too (QEMU, mount,
                # network, run dir), as a stop is answered, so that a move straight back
                # here finds its name free.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LEAVE_TIMEOUT_S):
                        await asyncio.shield(self._ended)
                return reply
            case MigrateCancelRequest():
                return self.outgoing.cancel(req)
            case ClaimRequest():
                if self.record.state is not HolderState.WARM or self._claim.done():
                    raise VMLifecycleError("is not a warm VM waiting to be claimed",
                                           vm=self.vm_id)
                self._claim.set_result(Claim(req.vm_id, req.forwards, req.labels))
                return ClaimReply(await asyncio.shield(self._claimed))
            case SessionRequest() | AttachRequest():
                raise ControlError(f"{req.op.value} is a stream (Holder.stream)", vm=self.vm_id)

    async def stream(self, req: StreamRequest, channel: Channel) -> None:
        """Serve an interactive ``session`` or ``attach`` until either side ends it."""
        match req:
            case SessionRequest():
                await self._session(req, channel)
            case AttachRequest():
                await self._attach(channel)

    async def _session(self, req: SessionRequest, channel: Channel) -> None:
        agent = self.vm.agent if self.vm is not None else None
        if agent is None:
            raise VMLifecycleError("the VM is not running (or has no agent)", vm=self.vm_id)
        async with agent.session(req.command, tty=req.tty, rows=req.rows, cols=req.cols,
                                 term=req.term, timeout_s=SESSION_START_S) as session:
            await channel.accept(SessionReply(session.pid or 0))

            async def output() -> None:
                while (chunk := await session.read()) is not None:
                    await channel.send(interactive.Output(chunk.stream, chunk.data))
                ended = await session.wait()
                await channel.send(interactive.Exit(ended.exit_code, ended.outcome))

            async def requests() -> None:
                while (event := await channel.receive()) is not None:
                    match event:
                        case interactive.Input(data=data):
                            await session.write(data)
                        case interactive.Eof():
                            await session.close_stdin()
                        case interactive.Resize(rows=rows, cols=cols):
                            await session.resize(rows, cols)
                        case interactive.Signal(signal=signum):
                            await session.signal(signum)
                        case _:
                            raise interactive.StreamProtocolError(
                                f"a client sent {type(event).__name__}")

            try:
                await _first_of(output(), requests())  # the client leaving ends the session
            except AgentError as exc:
                await channel.send(interactive.Error(f"the guest agent failed: {exc}"))

    async def _attach(self, channel: Channel) -> None:
        vm = self.vm
        if vm is None:
            raise VMLifecycleError("the VM is not running: no console to attach to",
                                   vm=self.vm_id)
        if self._attached:
            raise ConsoleBusyError("someone is attached to the console already (one at a "
                                   "time); their detach key is Ctrl-]", vm=self.vm_id)
        self._attached = True
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(vm.qemu.console_socket)),
                    CONSOLE_CONNECT_S)
            except (OSError, TimeoutError) as exc:
                raise ControlError(f"cannot reach the VM's console: {exc}",
                                   vm=self.vm_id) from exc
            try:
                await channel.accept(AttachReply())

                async def output() -> None:
                    while data := await reader.read(interactive.MAX_DATA_BYTES):
                        await channel.send(interactive.Output(OutputStream.STDOUT,
                                                              data))
                    await channel.send(interactive.Error("the VM's console closed"))

                async def requests() -> None:
                    while (event := await channel.receive()) is not None:
                        if isinstance(event, interactive.Input):
                            writer.write(event.data)
                            await writer.drain()

                await _first_of(output(), requests())
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        finally:
            self._attached = False

    def _status(self) -> StatusReply:
        r = self.record
        memory_io: Mapping[str, int] = {}
        qemu_usage: Mapping[str, float] = {}
        if self.vm is not None and self.vm.counters is not None:
            memory_io, qemu_usage = self.vm.counters()
        disk_io = self.vm.qemu.disk_counters() if self.vm is not None else {}
        return StatusReply(r.vm_id, r.state, r.pid, r.qemu_pid, r.forwards, memory_io,
                           qemu_usage, self.outgoing.progress(), disk_io,
                           self.vitals.to_json() if self.vm is not None else None,
                           self.mirror_status() if self.mirror_status is not None else None)

    async def watch(self, vm: HeldVM) -> Ending:
        """Hold ``vm`` until a stop request, its leaving, or QEMU's own exit (meanwhile its
        vitals are probed, :mod:`ferry.node.vitals`)."""
        self.vm = vm
        probe = asyncio.create_task(vitals.watch(self.vitals, vm.qemu, vm.agent,
                                                 busy=lambda: self.outgoing.active),
                                    name=f"vitals {self.vm_id}")
        try:
            return await self._watch(vm)
        finally:
            await cancel_and_wait(probe, swallow_errors=True)

    async def _watch(self, vm: HeldVM) -> Ending:
        while True:
            crashed = asyncio.ensure_future(vm.qemu.wait_crashed())
            waiting: set[asyncio.Future[Any]] = {self._stop, crashed}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(crashed)
            if self._stop.done():
                return self._stop.result()
            if self.outgoing.active:  # a migration stops QEMU; it decides where the VM is
                await self.outgoing.idle.wait()
                if self.outgoing.gone:
                    return Ending.MIGRATED
                continue
            log.error("vm %s: QEMU exited by itself; discarding the VM", self.vm_id)
            return Ending.CRASHED

    def _finish(self) -> None:
        if not self._ended.done():
            self._ended.set_result(self.outcome)
        if self._claim.done() and not self._claimed.done():
            self._claimed.set_exception(VMLifecycleError(
                "the warm VM failed to resume (see its holder's log)", vm=self.vm_id))
            self._claimed.exception()  # retrieved: the claim's handler may be gone


@contextlib.asynccontextmanager
async def holding(paths: VMPaths, record: HolderRecord) -> AsyncIterator[Holder]:
    """Create ``record.vm_id``'s run dir, write its record, serve its control socket.

    On leaving, the run dir goes (the block must have released QEMU, the mount
    and the network by then) and only then does a pending ``stop`` get its reply.
    Raises :class:`VMExistsError` if a live holder has the id.
    """
    vm_id = record.vm_id
    if live_supervisor(paths, vm_id) is not None:
        raise VMExistsError("is already running on this host", vm=vm_id)
    run_dir = paths.run_dir(vm_id)
    if run_dir.is_symlink():
        run_dir.unlink()  # the name of a warm VM that ended without cleaning up
    shutil.rmtree(run_dir, ignore_errors=True)
    private_dir(run_dir.parent)
    run_dir.mkdir(mode=0o700)
    holder = Holder(paths, record)
    try:
        holder.update()
        async with control.serve_control(paths.control_socket(vm_id), holder.handle,
                                         holder.stream):
            try:
                yield holder
            finally:
                await asyncio.to_thread(shutil.rmtree, run_dir, True)
                holder._finish()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        holder._finish()


async def _first_of(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` until the first returns (or raises); cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            await cancel_and_wait(task, swallow_errors=True)


def stop_report(ending: Ending, outcome: StopReply) -> dict[str, Any]:
    """How the VM ended, as the CLI prints it and ``--json`` shows it."""
    extra = {k: v for k, v in dataclasses.asdict(outcome).items()
             if k.endswith("_bytes") and v is not None}
    return {"mode": ending.value, **extra}
