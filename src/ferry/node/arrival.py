"""Receive a VM on this host and hold it like a supervisor (``ferry vm receive``).

One process per arriving VM (pyfuse3 allows one FUSE session per process,
and the VM's RAM is this process's mount): it listens for one migration
(``listen``) or fetches a package from a registry (``registry`` +
``package``: pure post-copy), runs the launch exchange
(:mod:`ferry.live.launch`), builds the VM's network here with its port
forwards, receives the VM with :class:`~ferry.live.IncomingVM` and from
then on is the VM's supervisor: ``supervisor.json`` in the run dir and the
control socket (status, exec, stop, migrate), so ``ferry vm list|exec|stop``
and ``ferry vm migrate`` treat it like any VM. Migrating it on (B -> C) is
done by this process; the VM then leaves it and the process exits, so every
hop lands in a fresh process (the peer's approach to chains).

``python -m ferry.node.arrival`` takes one JSON :class:`ArrivalRequest`
on stdin and writes JSON lines (``listening``, ``ready`` or an error) on
stdout until the event named by ``report_until``, then closes stdout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError, FerryError, MigrationError
from ferry.live import launch, report_exchange
from ferry.live.access import Access
from ferry.live.bootcache import BootCache
from ferry.live.destination import IncomingVM
from ferry.live.errors import LiveMigrationError
from ferry.live.outgoing import MIGRATE_OPS, Movable, Outgoing, options_for
from ferry.migration.channel import StreamChannel
from ferry.net import GUEST_IP, GUEST_MAC, PortForward, Proto, VMNetwork
from ferry.net.state import process_start_time
from ferry.node import control
from ferry.qemu import VMConfig, VMState
from ferry.qemu.argv import Accel, TapNet
from ferry.transport.base import Stream
from ferry.vm.errors import ManifestError, VMExistsError, VMLifecycleError
from ferry.vm.manifest import VMManifest
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

log = logging.getLogger(__name__)

BOOT_CACHE = "boot-cache"
AGENT_WAIT_S = 60.0
WATCH_INTERVAL_S = 0.2
LAUNCH_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ArrivalRequest:
    """Where the VM comes from and how it is set up here."""

    paths: VMPaths
    access: Access
    """How the peer authenticates (TLS, a token, or insecure); see :mod:`.access`."""
    listen: tuple[str, int] | None = None
    registry: tuple[str, int] | None = None
    package: str | None = None
    name: str | None = None
    forwards: tuple[PortForward, ...] | None = None
    """None: the source's forwards, on this host (see :func:`rehome`)."""
    precopy_only: bool = False
    report_until: str = "ready"

    def __post_init__(self) -> None:
        if (self.listen is None) == (self.registry is None):
            raise ConfigError("give exactly one of listen or registry")
        if self.registry is not None and not self.package:
            raise ConfigError("a registry start needs a package name")
        if self.name is not None:
            check_vm_id(self.name)

    def to_json(self) -> dict[str, Any]:
        return {"run_root": str(self.paths.run_root), "state_root": str(self.paths.state_root),
                "listen": self.listen, "registry": self.registry, "package": self.package,
                "name": self.name, "precopy_only": self.precopy_only,
                "access": self.access.to_json(),
                "report_until": self.report_until,
                "forwards": None if self.forwards is None else [
                    [f.host, f.host_port, f.guest_port, f.proto.value, f.allow_wildcard]
                    for f in self.forwards]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArrivalRequest:
        try:
            fwd = d.get("forwards")
            return cls(
                paths=VMPaths(Path(d["run_root"]), Path(d["state_root"])),
                listen=(str(d["listen"][0]), int(d["listen"][1])) if d.get("listen") else None,
                registry=((str(d["registry"][0]), int(d["registry"][1]))
                          if d.get("registry") else None),
                package=d.get("package"), name=d.get("name"),
                precopy_only=bool(d.get("precopy_only")),
                access=Access.from_json(d.get("access")),
                report_until=str(d.get("report_until", "ready")),
                forwards=None if fwd is None else tuple(
                    PortForward(h, hp, gp, Proto(p), allow_wildcard=w) for h, hp, gp, p, w in fwd))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"invalid receive request: {exc!r}") from exc


def rehome(forwards: tuple[PortForward, ...], listen_host: str | None) -> tuple[PortForward, ...]:
    """The source's forwards on this host: loopback stays loopback, any other address
    becomes the address this host listens on for migrations (its address on that network)."""
    out = []
    for f in forwards:
        host = f.host if f.host in ("127.0.0.1", "::1") or not listen_host else listen_host
        out.append(PortForward(host, f.host_port, f.guest_port, f.proto,
                               allow_wildcard=host in ("0.0.0.0", "::")))
    return tuple(out)


def qemu_config(manifest: VMManifest, kernel: Path, initramfs: Path, tap: str) -> VMConfig:
    """The manifest's machine exactly (the same config :mod:`ferry.vm.runner` resumes with)."""
    g = manifest.network
    if (g.ip, g.mac) != (GUEST_IP, GUEST_MAC):
        raise ManifestError(f"the guest was snapshotted with {g.ip}/{g.mac}, this host gives "
                            f"guests {GUEST_IP}/{GUEST_MAC}")
    m = manifest.machine
    return VMConfig(kernel=kernel, initramfs=initramfs, memory_mib=m.memory_mib,
                    cpu_model=m.cpu_model, vcpus=m.vcpus, accel=Accel(m.accel),
                    agent=manifest.agent.enabled, net=TapNet(tap, mac=GUEST_MAC),
                    kernel_args=(f"ferry.ip={g.ip}/{g.prefix_len}", f"ferry.gw={g.gateway}"))


class _Held:
    """The arrived VM as the control handler sees it."""

    def __init__(self, request: ArrivalRequest) -> None:
        self.request = request
        self.vm_id = "?"
        self.incoming: IncomingVM | None = None
        self.movable: Movable | None = None
        self.record: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.stop = asyncio.Event()
        self.outgoing = Outgoing(lambda: self.movable)

    def write_record(self, **changes: Any) -> None:
        self.record.update(changes)
        if self.run_dir is not None:
            write_json(self.run_dir / SUPERVISOR_RECORD, self.record)

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.record}
        if op == "stop":
            if req.get("mode", "discard") != "discard":
                raise VMLifecycleError("a received VM cannot be suspended here; export it "
                                       "with 'ferry vm migrate ID --to-package FILE'",
                                       vm=self.vm_id)
            self.stop.set()
            return {"ok": True, "mode": "discard"}
        if op == "exec":
            agent = self.incoming.agent if self.incoming is not None else None
            if agent is None:
                raise VMLifecycleError("the VM is not running (or has no agent)", vm=self.vm_id)
            argv: list[str] | str = req["shell"] if "shell" in req else list(req["argv"])
            result = await agent.exec(argv, stdin=base64.b64decode(req.get("stdin", "")),
                                      timeout_s=float(req.get("timeout_s", 30.0)))
            return {"ok": True, **control.encode_exec(result)}
        if op in MIGRATE_OPS:
            reply = await self.outgoing.handle(req)
            if self.outgoing.gone:
                self.stop.set()
            return reply
        raise ConfigError(f"unknown op {op!r}")


async def _open_stream(request: ArrivalRequest,
                       on_listening: Callable[[tuple[str, int]], None]) -> Stream:
    """The authenticated connection the VM arrives on: to the registry, or the first peer
    that authenticates on the listening address (others are dropped, see accept_peer)."""
    access = request.access
    if request.registry is not None:
        host, port = request.registry
        stream = await access.connect(host, port)
        await launch.send_frame(stream, {"package": request.package})
        return stream
    assert request.listen is not None
    async with await access.listen(*request.listen) as lst:
        on_listening(lst.address)
        return await access.accept(lst)


async def arrive(request: ArrivalRequest, *,
                 on_listening: Callable[[tuple[str, int]], None] = lambda a: None,
                 on_ready: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Receive one VM and hold it until it is stopped or migrated on; see the module doc.

    Returns how the VM left (``{"mode": "discard" | "migrated" | ...}``).
    Raises :class:`LiveMigrationError` if it never started here.
    """
    started = time.monotonic()
    paths = request.paths
    await cleanup_leftovers(paths)
    held = _Held(request)
    stream = await _open_stream(request, on_listening)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(stream.aclose)
            cache = BootCache(paths.state_root / BOOT_CACHE)
            stack.callback(cache.release)
            offer, boot_dir = await launch.receive_offer(stream, cache)
            try:
                vm_id = held.vm_id = check_vm_id(request.name or offer.vm_id)
                if live_supervisor(paths, vm_id) is not None:
                    raise VMExistsError("is already running on this host", vm=vm_id)
                run_dir = paths.run_dir(vm_id)
                shutil.rmtree(run_dir, ignore_errors=True)
                private_dir(run_dir.parent)
                run_dir.mkdir(mode=0o700)
                stack.callback(shutil.rmtree, run_dir, True)
                held.run_dir = run_dir
                boot = launch.boot_files(offer.manifest, boot_dir)
                held.write_record(vm_id=vm_id, status="receiving", **this_process(),
                                  origin=offer.origin, package_dir=None, started_at=time.time())
                forwards = (request.forwards if request.forwards is not None
                            else rehome(offer.forwards, request.listen[0] if request.listen
                                        else None))
                # A host-unique network id: the VM's own id may still name the source's
                # namespace when both "hosts" are namespaces of one machine.
                net = VMNetwork(f"{vm_id[:33]}-{secrets.token_hex(3)}", forwards,
                                run_dir=paths.net_run_dir)
                await stack.enter_async_context(net)
                config = qemu_config(offer.manifest, boot["kernel"], boot["initramfs"],
                                     net.tap_name)
                incoming = IncomingVM(config, work_dir=run_dir, name=vm_id,
                                      options=options_for(request.precopy_only),
                                      wrap_argv=net.wrap_argv)
                await stack.enter_async_context(incoming)
                held.incoming = incoming
                await stack.enter_async_context(
                    control.serve_control(paths.control_socket(vm_id), held.handle))
            except FerryError as exc:
                with contextlib.suppress(FerryError):
                    await launch.send_ready(stream, str(exc))
                raise
            await launch.send_ready(stream)
            channel = StreamChannel(stream)
            report = await incoming.receive(channel)
            with contextlib.suppress(FerryError):
                await report_exchange.serve_report(stream, report)
            await channel.aclose()
            running_s = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(AGENT_WAIT_S):
                    await incoming.agent_ready.wait()
            held.movable = Movable(vm_id, incoming.vm, incoming.devices, incoming.agent, net,
                                   offer.manifest, boot_dir, forwards)
            pid = incoming.vm.pid
            fwd_text = [f"{h}:{p}->{f.forward.guest_port}/{f.forward.proto.value}"
                        for f in net.forwarders for h, p in [f.local_address[:2]]]
            held.write_record(status="running", qemu_pid=pid,
                              qemu_start=process_start_time(pid) if pid else None,
                              forwards=fwd_text, origin=offer.origin,
                              arrival={"handoff_to_running_ms": report.handoff_to_running_ms,
                                       "running_s": round(running_s, 3)})
            on_ready({"vm_id": vm_id, "pid": os.getpid(), "qemu_pid": pid,
                      "forwards": fwd_text, "origin": offer.origin,
                      "running_s": round(running_s, 3), "report": report.to_json()})
            return await _hold(held, incoming)
    except FerryError as exc:
        if isinstance(exc, LiveMigrationError):
            raise
        text = str(exc) if isinstance(exc, MigrationError) else f"receiving failed: {exc}"
        raise LiveMigrationError(text, vm=held.vm_id, handed_off=False) from exc


async def _hold(held: _Held, incoming: IncomingVM) -> dict[str, Any]:
    """Until a stop, a migration away, or QEMU's own exit."""
    while not held.stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCH_INTERVAL_S):
                await held.stop.wait()
        if incoming.vm.state is VMState.STOPPED and not held.outgoing.active \
                and not held.outgoing.gone:
            log.error("vm %s: QEMU exited by itself; discarding the VM", held.vm_id)
            return {"mode": "discard", "reason": "qemu exited"}
    held.write_record(status="stopping")
    return {"mode": "migrated" if held.outgoing.gone else "discard"}


# -- the detached process ------------------------------------------------------------------

async def launch_detached(request: ArrivalRequest, *,
                          timeout_s: float = LAUNCH_TIMEOUT_S) -> dict[str, Any]:
    """Start ``python -m ferry.node.arrival`` in its own session; return the event named
    by ``request.report_until`` (``listening``: the bound address; ``ready``: the VM runs)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.node.arrival", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(json.dumps(request.to_json()).encode() + b"\n")
    await proc.stdin.drain()
    proc.stdin.close()
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
            if not line:
                raise LiveMigrationError("the receiving process exited silently", vm=None,
                                         handed_off=False)
            event = json.loads(line)
            if not event.get("ok", True):
                raise LiveMigrationError(str(event.get("error")), vm=None,
                                         handed_off=bool(event.get("handed_off")))
            if event.get("event") == request.report_until:
                event["pid"] = proc.pid
                return dict(event)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise LiveMigrationError(f"the receiving process did not report within {timeout_s} s",
                                 vm=None, handed_off=False) from exc


def main() -> int:
    """``python -m ferry.node.arrival``: see the module doc."""
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    try:
        request = ArrivalRequest.from_json(json.loads(sys.stdin.readline()))
    except (ConfigError, ValueError) as exc:
        out.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        return 2
    log_path = request.paths.run_root / "vms" / f".receive-{os.getpid()}.log"
    private_dir(log_path.parent)
    logging.basicConfig(level=logging.INFO, filename=log_path,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(obj: dict[str, Any]) -> None:
        if out.closed:
            return
        out.write(json.dumps(obj) + "\n")
        out.flush()
        if obj.get("event") == request.report_until:
            out.close()

    async def run() -> dict[str, Any]:
        main_task = asyncio.current_task()
        assert main_task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main_task.cancel)
        return await arrive(
            request, on_listening=lambda a: emit({"event": "listening", "address": list(a)}),
            on_ready=lambda r: emit({"event": "ready", **r}))

    code = 0
    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        code = 130
    except (FerryError, OSError) as exc:
        log.error("receiving failed: %s", exc)
        emit({"ok": False, "error": str(exc), "kind": type(exc).__name__,
              "handed_off": bool(getattr(exc, "handed_off", False))})
        code = 1
    if code == 0:
        with contextlib.suppress(OSError):
            log_path.unlink()
    return code


__all__ = ["ArrivalRequest", "arrive", "launch_detached", "rehome"]

if __name__ == "__main__":
    sys.exit(main())
