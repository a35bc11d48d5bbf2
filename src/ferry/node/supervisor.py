"""The per-VM supervisor: the one process that holds a running VM together.

pyfuse3 allows one FUSE session per process and a VM's RAM is served by its
FUSE mount, so every VM gets its own process. It owns the FUSE mount, the
NBD server, QEMU (which dies with it: PDEATHSIG), the VM's network and the
agent connection, records itself in ``<run dir>/supervisor.json`` and serves
the control socket (:mod:`ferry.node.control`) until a ``stop`` request,
SIGTERM/SIGINT (discard) or QEMU's unexpected exit (discard).

``ferry vm run`` runs :func:`supervise` in its own process (foreground, with
the guest console on stdout); ``ferry vm run --detach`` starts
``python -m ferry.node.supervisor`` with :func:`launch_detached`, which sends
the :class:`LaunchRequest` as one JSON line on stdin and waits for one JSON
line on stdout: the resume report, or the error that stopped the start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.errors import ConfigError, FerryError
from ferry.live.outgoing import MIGRATE_OPS, Movable, Outgoing
from ferry.net import PortForward, Proto
from ferry.net.state import process_start_time
from ferry.node import control
from ferry.qemu import VMState
from ferry.vm.errors import VMExistsError, VMLifecycleError
from ferry.vm.pkgcache import open_extracted
from ferry.vm.registry import (
    SUPERVISOR_RECORD,
    VMPaths,
    check_vm_id,
    cleanup_leftovers,
    live_supervisor,
    private_dir,
    this_process,
    write_json,
)
from ferry.vm.runner import RunningVM, StopMode, run_vm

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
DETACHED_START_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """What to run: a VM id, an extracted package (None: continue the suspended VM), forwards."""

    vm_id: str
    package_dir: Path | None
    paths: VMPaths
    forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id,
                "package_dir": str(self.package_dir) if self.package_dir else None,
                "run_root": str(self.paths.run_root), "state_root": str(self.paths.state_root),
                "forwards": [[f.host, f.host_port, f.guest_port, f.proto.value,
                              f.allow_wildcard] for f in self.forwards]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchRequest:
        try:
            return cls(vm_id=data["vm_id"],
                       package_dir=Path(data["package_dir"]) if data["package_dir"] else None,
                       paths=VMPaths(Path(data["run_root"]), Path(data["state_root"])),
                       forwards=tuple(PortForward(h, hp, gp, Proto(p), allow_wildcard=w)
                                      for h, hp, gp, p, w in data["forwards"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid launch request: {exc!r}") from exc


class _Session:
    """The state the control handler sees."""

    def __init__(self, request: LaunchRequest) -> None:
        self.request = request
        self.vm: RunningVM | None = None
        self.stop: asyncio.Future[StopMode] = asyncio.get_running_loop().create_future()
        self.stopped: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.record: dict[str, Any] = {}
        self.outgoing = Outgoing(self._movable)
        self.signal: int | None = None  # the signal that asked this VM to stop, if any

    def on_signal(self, signum: int) -> None:
        self.signal = self.signal or signum
        self.request_stop(StopMode.DISCARD)

    def _movable(self) -> Movable | None:
        vm = self.vm
        if vm is None or vm.live is None:
            return None
        return Movable(vm.vm_id, vm.qemu, vm.live, vm.agent, vm.net, vm.manifest,
                       vm.package.directory, self.request.forwards)

    def request_stop(self, mode: StopMode) -> None:
        if not self.stop.done():
            self.stop.set_result(mode)

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.record, **self.io_counters()}
        if op == "stop":
            self.request_stop(StopMode(req.get("mode", "discard")))
            return {"ok": True, **await asyncio.shield(self.stopped)}
        if op == "exec":
            if self.vm is None:
                raise VMLifecycleError("the VM is not running", vm=self.request.vm_id)
            stdin = base64.b64decode(req.get("stdin", ""))
            timeout_s = float(req.get("timeout_s", 30.0))
            argv: list[str] | str = req["shell"] if "shell" in req else list(req["argv"])
            result = await self.vm.exec(argv, stdin=stdin, timeout_s=timeout_s)
            return {"ok": True, **control.encode_exec(result)}
        if op in MIGRATE_OPS:
            reply = await self.outgoing.handle(req)
            if self.outgoing.gone:  # migrated or exported: nothing left to hold
                self.request_stop(StopMode.DISCARD)
            return reply
        raise ConfigError(f"unknown op {op!r}")

    def io_counters(self) -> dict[str, Any]:
        """Guest RAM read through FUSE and QEMU's CPU use so far (diagnosis, benches)."""
        vm = self.vm
        if vm is None:
            return {}
        return {"memory_io": dataclasses.asdict(vm.memory_counters()),
                "qemu_usage": vm.qemu_usage()}

    def write_record(self, **changes: Any) -> None:
        self.record.update(changes)
        write_json(self.request.paths.run_dir(self.request.vm_id) / SUPERVISOR_RECORD,
                   self.record)


async def supervise(
    request: LaunchRequest,
    *,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    on_console: Callable[[bytes], None] | None = None,
    log_file: bool = False,
) -> dict[str, Any]:
    """Run one VM until it is stopped; returns the stop report.

    ``on_ready`` gets the resume report once the VM runs and the control
    socket listens; ``on_console`` gets the guest console's bytes as they
    come; ``log_file`` sends this process's stderr (logging) to
    ``<run dir>/supervisor.log``.
    """
    launched = time.monotonic()
    paths, vm_id = request.paths, request.vm_id
    await cleanup_leftovers(paths)
    if live_supervisor(paths, vm_id) is not None:
        raise VMExistsError("is already running", vm=vm_id)
    run_dir = paths.run_dir(vm_id)
    private_dir(run_dir.parent)
    run_dir.mkdir(mode=0o700)
    session = _Session(request)
    loop = asyncio.get_running_loop()
    try:
        if log_file:
            _redirect_stderr(run_dir / "supervisor.log")
        session.write_record(vm_id=vm_id, status="starting", **this_process(),
                             package_dir=str(request.package_dir or ""),
                             forwards=[str(f) for f in request.forwards],
                             started_at=time.time())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, session.on_signal, sig)
        package = open_extracted(request.package_dir) if request.package_dir else None
        async with control.serve_control(paths.control_socket(vm_id), session.handle):
            report = await _run(session, package_dir=package, on_ready=on_ready,
                                on_console=on_console, launched=launched)
        if session.signal is not None:
            report["signal"] = session.signal
        return report
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if not session.stopped.done():
            session.stopped.set_result({"mode": "failed"})
        shutil.rmtree(run_dir, ignore_errors=True)


async def _run(session: _Session, *, package_dir: Any,
               on_ready: Callable[[dict[str, Any]], None] | None,
               on_console: Callable[[bytes], None] | None,
               launched: float) -> dict[str, Any]:
    request = session.request
    mode = StopMode.DISCARD
    stop_report: dict[str, Any] = {}
    async with run_vm(request.vm_id, request.paths, package=package_dir,
                      forwards=request.forwards, launched=launched) as vm:
        session.vm = vm
        pid = vm.qemu.pid
        session.write_record(status="running", qemu_pid=pid,
                             qemu_start=process_start_time(pid) if pid else None,
                             package_dir=str(vm.package.directory),
                             package_id=vm.package.package_id,
                             forwards=vm.forward_addresses(), resume=vm.timings.to_json())
        ready = {"vm_id": request.vm_id, "pid": os.getpid(), "qemu_pid": pid,
                 "forwards": vm.forward_addresses(), "resume": vm.timings.to_json(),
                 "console": str(vm.qemu.console_path)}
        if on_ready is not None:
            on_ready(ready)
        async with _follow_console(vm, on_console):
            mode = await _wait_for_stop(session, vm)
        session.write_record(status="stopping")
        if mode is StopMode.SUSPEND:
            stats = await vm.suspend()
            stop_report = {"state_bytes": stats.state_bytes,
                           "flush_bytes": stats.flush_bytes}
        session.vm = None
    report = {"mode": mode.value, **stop_report}
    session.stopped.set_result(report)
    return report


async def _wait_for_stop(session: _Session, vm: RunningVM) -> StopMode:
    """The requested stop mode, or DISCARD as soon as QEMU is gone by itself."""
    while True:
        done, _ = await asyncio.wait({session.stop}, timeout=WATCH_INTERVAL_S)
        if done:
            return session.stop.result()
        if vm.qemu.state is VMState.STOPPED and not session.outgoing.active:
            log.error("vm %s: QEMU exited by itself; discarding the VM", vm.vm_id)
            return StopMode.DISCARD


@contextlib.asynccontextmanager
async def _follow_console(vm: RunningVM, sink: Callable[[bytes], None] | None) -> Any:
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


async def launch_detached(request: LaunchRequest, *,
                          timeout_s: float = DETACHED_START_TIMEOUT_S) -> dict[str, Any]:
    """Start a supervisor process for ``request``; return its ready report once the VM runs.

    Raises :class:`VMLifecycleError` with the supervisor's error if it could not start.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.node.supervisor",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(json.dumps(request.to_json()).encode() + b"\n")
    await proc.stdin.drain()
    proc.stdin.close()
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise VMLifecycleError(f"the supervisor did not report within {timeout_s} s",
                               vm=request.vm_id) from exc
    reply: dict[str, Any] = {"ok": False, "error": "it exited silently"}
    try:
        if line:
            reply = json.loads(line)
    except ValueError:
        reply = {"ok": False, "error": f"unreadable report {line[:200]!r}"}
    if not reply.get("ok"):
        await proc.wait()
        raise VMLifecycleError(f"the supervisor failed to start the VM: {reply.get('error')}",
                               vm=request.vm_id)
    report: dict[str, Any] = reply["report"]
    return report


def main() -> int:
    """``python -m ferry.node.supervisor``: one JSON LaunchRequest on stdin, see the module doc."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # nothing else may write into the launcher's pipe

    def ready(report: dict[str, Any]) -> None:
        out.write(json.dumps({"ok": True, "report": report}) + "\n")
        out.close()

    try:
        request = LaunchRequest.from_json(json.loads(sys.stdin.readline()))
        asyncio.run(supervise(request, on_ready=ready, log_file=True))
    except (FerryError, ValueError, OSError) as exc:
        log.error("supervisor failed: %s", exc)
        if not out.closed:
            out.write(json.dumps({"ok": False, "error": str(exc),
                                  "kind": type(exc).__name__}) + "\n")
            out.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
