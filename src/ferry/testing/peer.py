"""A ferry peer process for one host: holds at most one VM, boots, receives or migrates it.

Run it inside a host's network namespace (``HostNamespace.exec_argv``)::

    python -m ferry.testing.peer --name redis --work-dir /tmp/a --host-ns ferry-host-a \\
        --host-address 10.77.0.1 --kernel K --initramfs I --memory-mib 256 --forward 16379:6379

It is driven by JSON lines on stdin and answers with JSON lines on stdout
(:mod:`ferry.testing.peer_control` is the client). Commands::

    {"cmd": "boot", "rootfs": PATH}                   boot here; answer when the agent is ready
    {"cmd": "receive", "port": P}                     answer {"address": [h, p], "token": T}
                                                      at once, then events "running" and
                                                      "received" (T is null under --tls-dir)
    {"cmd": "migrate", "host": H, "port": P,          move the VM there (presenting the
     "token": T}                                      receiver's token); answer with the
                                                      source's report and the summary
    {"cmd": "exec", "command": "sh -c string"}        run in the guest through the agent
    {"cmd": "status"}                                 VM state and console path
    {"cmd": "quit"}                                   tear down and exit (also on EOF)

One VM per process, because pyfuse3 allows one FUSE session per process: a
peer that migrated its VM away exits after ``quit``; a later hop back to this
host uses a new peer. This is the seam the per-VM supervisor will replace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.guest.agent import AgentClient, connect_agent
from ferry.guest.files import MARKER_READY
from ferry.live import report_exchange
from ferry.live.access import Access, TLSFiles
from ferry.live.clock import ClockOffset
from ferry.live.destination import IncomingVM
from ferry.live.errors import LiveMigrationError
from ferry.live.report import DestinationReport
from ferry.live.source import LiveOptions, StateTransfer, migrate_out
from ferry.live.summary import MigrationSummary
from ferry.migration.channel import StreamChannel
from ferry.migration.policy import Mode
from ferry.net import PortForward, VMNetwork
from ferry.qemu import QemuVM, VMConfig
from ferry.qemu.argv import TapNet
from ferry.storage.providers.memory import MemoryDevice
from ferry.transport.tuning import DEFAULT_DEAD_PEER_S
from ferry.vm.devices import VMDevices, local_devices

log = logging.getLogger("ferry.testing.peer")

BOOT_TIMEOUT_S = 180.0


@dataclass(slots=True)
class _Held:
    """The VM this peer runs, whichever way it got here."""

    vm: QemuVM
    devices: VMDevices
    agent: AgentClient | None
    network: VMNetwork | None


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work_dir = Path(args.work_dir).absolute()
        self.options = LiveOptions(mode=Mode(args.mode),
                                   state_transfer=StateTransfer(args.state),
                                   record_digests=args.record_digests)
        self.tls: TLSFiles | None = None
        if args.tls_dir:
            d = Path(args.tls_dir)
            self.tls = TLSFiles(d / f"{args.tls_name}.pem", d / f"{args.tls_name}.key",
                                d / "ca.pem")
        self.held: _Held | None = None
        self.holder: asyncio.Task[None] | None = None
        self.release = asyncio.Event()
        self.write_lock = asyncio.Lock()

    # -- plumbing ----------------------------------------------------------------------

    async def emit(self, obj: dict[str, Any]) -> None:
        async with self.write_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def forwards(self) -> list[PortForward]:
        out = []
        for spec in self.args.forward:
            host_port, guest_port = spec.split(":")
            out.append(PortForward(self.args.host_address, int(host_port), int(guest_port)))
        return out

    async def network(self, stack: contextlib.AsyncExitStack) -> VMNetwork | None:
        if self.args.no_net:
            return None
        vm_id = f"{self.args.name}-{secrets.token_hex(3)}"
        net = VMNetwork(vm_id, self.forwards(), parent=self.args.host_ns,
                        clean_leftovers=False)
        await stack.enter_async_context(net)
        return net

    def config(self, net: VMNetwork | None) -> VMConfig:
        cfg = VMConfig(kernel=Path(self.args.kernel), initramfs=Path(self.args.initramfs),
                       memory_mib=self.args.memory_mib, agent=True)
        if net is not None:
            cfg = replace(cfg, net=TapNet(net.tap_name), kernel_args=(net.guest_kernel_args(),))
        return cfg

    # -- VM lifetime -------------------------------------------------------------------
    #
    # Every context a VM needs (network, FUSE mount, QEMU, agent) is entered and left
    # by one holder task, which lives until the VM leaves this peer (migrated away or
    # quit); the command handlers only talk to it.

    def _start_holder(self, body: Any) -> None:
        if self.holder is not None and not self.holder.done():
            raise FerryError("this peer already holds a VM")
        self.release = asyncio.Event()
        self.holder = asyncio.create_task(body)

    async def _release_vm(self) -> None:
        if self.holder is not None:
            self.release.set()
            if self.held is None:  # still booting or waiting for a VM: abandon that
                self.holder.cancel()
            await asyncio.gather(self.holder, return_exceptions=True)
            self.holder = None
        self.held = None

    async def boot(self, req: dict[str, Any]) -> dict[str, Any]:
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def body() -> None:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    net = await self.network(stack)
                    rootfs = await asyncio.to_thread(Path(req["rootfs"]).read_bytes)
                    disk = MemoryDevice(len(rootfs), name="root")
                    await disk.write_at(0, rootfs)
                    devices = local_devices(
                        MemoryDevice(self.args.memory_mib << 20, name="memory"), {"root": disk},
                        with_state=self.options.state_transfer is StateTransfer.DEVICE)
                    stack.push_async_callback(devices.close)
                    vm = QemuVM(self.config(net), work_dir=self.work_dir,
                                memory=devices.memory.vm_handle, disks=devices.vm_disks(),
                                name=self.args.name, wrap_argv=net.wrap_argv if net else None)
                    await stack.enter_async_context(vm)
                    await vm.start()
                    await vm.wait_for_console(MARKER_READY, timeout_s=BOOT_TIMEOUT_S)
                    agent = await stack.enter_async_context(connect_agent(vm.agent_socket))
                    await agent.wait_ready(60.0)
                    self.held = _Held(vm, devices, agent, net)
                    done.set_result({"console": str(vm.console_path)})
                    await self.release.wait()
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc)
                raise

        self._start_holder(body())
        try:
            return await done
        except BaseException:
            await self._release_vm()
            raise

    async def receive(self, req: dict[str, Any]) -> dict[str, Any]:
        bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        access = Access.listening(self.tls)

        async def body() -> None:
            incoming: IncomingVM | None = None
            try:
                async with contextlib.AsyncExitStack() as stack:
                    net = await self.network(stack)
                    listener = await stack.enter_async_context(await access.listen(
                        self.args.host_address, int(req.get("port", 0)),
                        dead_peer_s=self.args.dead_peer_s))
                    incoming = IncomingVM(self.config(net), work_dir=self.work_dir,
                                          name=self.args.name, options=self.options,
                                          wrap_argv=net.wrap_argv if net else None)
                    await stack.enter_async_context(incoming)
                    bound.set_result(listener.address)
                    stream = await access.accept(listener)
                    channel = StreamChannel(stream)
                    stack.push_async_callback(channel.aclose)
                    waiter = asyncio.create_task(self._announce_running(incoming))
                    try:
                        report = await incoming.receive(channel)
                    finally:
                        waiter.cancel()
                    with contextlib.suppress(FerryError):
                        await report_exchange.serve_report(stream, report)
                    await channel.aclose()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(60.0):
                            await incoming.agent_ready.wait()
                    self.held = _Held(incoming.vm, incoming.devices, incoming.agent, net)
                    await self.emit({"event": "received", "ok": True,
                                     "report": report.to_json(),
                                     "console": str(incoming.vm.console_path)})
                    await self.release.wait()
            except FerryError as exc:
                log.exception("receiving failed")
                if not bound.done():
                    bound.set_exception(exc)
                    return
                await self.emit({"event": "received", "ok": False, "error": str(exc),
                                 "handed_off": getattr(exc, "handed_off", False),
                                 "report": incoming.report.to_json() if incoming else None})
            except BaseException as exc:
                if not bound.done():
                    bound.set_exception(exc)
                raise
            finally:
                self.held = None

        self._start_holder(body())
        try:
            host, port = await bound
        except BaseException:
            await self._release_vm()
            raise
        return {"address": [host, port], "token": access.token}

    async def _announce_running(self, incoming: IncomingVM) -> None:
        await incoming.running.wait()
        await self.emit({"event": "running"})

    async def migrate(self, req: dict[str, Any]) -> dict[str, Any]:
        held = self.held
        if held is None:
            raise FerryError("this peer holds no VM")
        token = req.get("token")
        access = Access(tls=self.tls, token=str(token) if token else None)
        try:
            stream = await access.connect(req["host"], int(req["port"]),
                                          dead_peer_s=self.args.dead_peer_s)
        except FerryError as exc:
            raise LiveMigrationError(f"cannot reach the destination (failed before the "
                                     f"hand-off): {exc}", vm=self.args.name,
                                     handed_off=False) from exc
        channel = StreamChannel(stream)

        async def handed_off() -> None:
            if held.network is not None:
                await held.network.close()  # clients reconnect to the new host
            await self.emit({"event": "handed_off"})

        destination: DestinationReport | None = None
        clock: ClockOffset | None = None
        try:
            report = await migrate_out(held.vm, held.devices, channel, agent=held.agent,
                                       options=self.options, on_handed_off=handed_off)
            try:
                destination, clock = await report_exchange.fetch_report(stream)
            except FerryError as exc:
                log.warning("no report from the destination: %s", exc)
        except LiveMigrationError as exc:
            if exc.handed_off:
                await self._release_vm()
            raise
        finally:
            await channel.aclose()
        await self._release_vm()
        return {"report": report.to_json(),
                "summary": MigrationSummary.of(report, destination, clock).to_json()}

    async def exec(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.held is None or self.held.agent is None:
            raise FerryError("this peer has no VM with an agent")
        result = await self.held.agent.exec(req["command"], timeout_s=float(req.get("timeout_s",
                                                                                    30)))
        return {"exit_code": result.exit_code, "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace")}

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.held is None:
            return {"has_vm": False}
        return {"has_vm": True, "state": self.held.vm.state.value,
                "console": str(self.held.vm.console_path)}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        # SIGTERM is handled like Ctrl-C: cancellation, so a migration in flight fails
        # cleanly (the VM resumes here if the hand-off had not happened) and every
        # QEMU, mount and namespace is removed.
        main = asyncio.current_task()
        assert main is not None
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        handlers = {"boot": self.boot, "receive": self.receive, "migrate": self.migrate,
                    "exec": self.exec, "status": self.status}
        try:
            await self.emit({"event": "ready"})
            while line := await reader.readline():
                req = json.loads(line)
                cmd = req.get("cmd")
                if cmd == "quit":
                    break
                reply: dict[str, Any] = {"reply": cmd}
                try:
                    reply |= {"ok": True, **await handlers[cmd](req)}
                except (FerryError, KeyError, OSError) as exc:
                    log.exception("%s failed", cmd)
                    reply |= {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "handed_off": getattr(exc, "handed_off", False)}
                await self.emit(reply)
        finally:
            await self._release_vm()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferry.testing.peer")
    p.add_argument("--name", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--host-ns", required=True)
    p.add_argument("--host-address", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initramfs", required=True)
    p.add_argument("--memory-mib", type=int, required=True)
    p.add_argument("--forward", action="append", default=[], help="HOSTPORT:GUESTPORT")
    p.add_argument("--no-net", action="store_true")
    p.add_argument("--mode", default=Mode.HYBRID.value, choices=[m.value for m in Mode])
    p.add_argument("--state", default=StateTransfer.PAYLOAD.value,
                   choices=[s.value for s in StateTransfer])
    p.add_argument("--record-digests", action="store_true")
    p.add_argument("--dead-peer-s", type=float, default=DEFAULT_DEAD_PEER_S)
    p.add_argument("--tls-dir")
    p.add_argument("--tls-name")
    p.add_argument("--log-file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(filename=args.log_file, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(Peer(args).serve())


if __name__ == "__main__":
    main()
