"""The node daemon's HTTP API (FastAPI): every route calls what the CLI calls.

A VM is held by its own process (:mod:`ferry.node.process`, as ``ferry vm run
--detach`` starts it) and controlled over its control socket
(:mod:`ferry.node.control`), so the VMs outlive the daemon: a restarted daemon
lists them from the host's run directory. Mutating requests on one VM are
serialized per VM. See ``docs/daemon.md`` for the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ferry
from ferry.aio import cancel_and_wait
from ferry.daemon import models as m
from ferry.daemon import problems
from ferry.daemon.metrics import Metrics
from ferry.daemon.operations import Events, Operations
from ferry.daemon.problems import Problem
from ferry.daemon.warm import HolderPool
from ferry.errors import FerryError
from ferry.hostconfig import HostConfig
from ferry.live.access import Access, TLSFiles
from ferry.live.rampath import RamPath
from ferry.live.summary import MigrationSummary
from ferry.node import listing, supervisor
from ferry.node.arrival import ArrivalRequest
from ferry.node.control import ControlClient, ExportReply, MigrateRequest
from ferry.node.process import launch_detached
from ferry.package import TrustStore
from ferry.qemu.accel import host_accel
from ferry.qemu.version import host_qemu_version
from ferry.vm import pkgcache, registry
from ferry.vm.publish import parse_publish
from ferry.vm.runner import StopMode, process_usage

API_VERSION = "v1"
DASHBOARD = (importlib.resources.files("ferry.daemon") / "dashboard.html").read_text()
MAX_BODY_BYTES = 2 * 1024 * 1024
VM_WATCH_S = 0.5
"""How often the daemon looks for VMs that came or went (for ``vm`` events)."""


class Daemon:
    """What the routes share: the host, the operations, the events, the metrics."""

    def __init__(self, host: HostConfig, *, warm_holders: int = 1) -> None:
        self.host = host
        self.holders = HolderPool(warm_holders)
        self.paths = registry.VMPaths.of(host)
        self.events = Events()
        self.metrics = Metrics(self.samples, self.committed_bytes)
        self.memory_io: dict[str, dict[str, int]] = {}
        """Each running VM's guest-RAM FUSE counters from its holder's last status."""
        self.locks: dict[str, asyncio.Lock] = {}
        self._ops: Operations | None = None

    @property
    def ops(self) -> Operations:
        assert self._ops is not None, "the daemon's lifespan has not started"
        return self._ops

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self.locks.setdefault(vm_id, asyncio.Lock())

    def vms(self) -> list[registry.VMInfo]:
        return registry.list_vms(self.paths)

    def views(self) -> list[m.VM]:
        return [m.VM(**view) for view in listing.vm_views(self.paths)]

    def samples(self) -> list[dict[str, Any]]:
        """The VMs for the metrics (:data:`ferry.daemon.metrics.VMSample`)."""
        out = []
        for view in listing.vm_views(self.paths):
            rec = registry.live_supervisor(self.paths, view["vm_id"]) \
                if view["status"] != "suspended" else None
            qemu_pid = (rec or {}).get("qemu_pid")
            out.append({**view, "memory_io": self.memory_io.get(view["vm_id"], {}),
                        "qemu": process_usage(qemu_pid) if isinstance(qemu_pid, int) else {}})
        return out

    def committed_bytes(self) -> int:
        """Guest RAM of the VMs whose QEMU runs here (the listing reads each QEMU's ``-m``)."""
        return sum(v["memory_bytes"] or 0 for v in listing.vm_views(self.paths))

    def client(self, vm_id: str) -> ControlClient:
        registry.check_vm_id(vm_id)
        return ControlClient(self.paths.control_socket(vm_id), vm_id)

    async def wait_gone(self, vm_id: str, timeout_s: float = 60.0) -> None:
        """Until the holder of ``vm_id`` has exited (at most ``timeout_s``)."""
        rec = await asyncio.to_thread(registry.live_supervisor, self.paths, vm_id)
        if rec is not None and isinstance(rec.get("pid"), int):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await _process_exit(rec["pid"])

    async def watch_vms(self) -> None:
        """Announce VMs that appear, change state or go (polling the run directory)."""
        seen: dict[str, str] = {}
        while True:
            now = {v["vm_id"]: v["status"]
                   for v in await asyncio.to_thread(listing.vm_views, self.paths)}
            for vm_id, status in now.items():
                if seen.get(vm_id) != status:
                    self.events.publish("vm", vm_id=vm_id, status=status)
            for vm_id in seen.keys() - now.keys():
                self.events.publish("vm", vm_id=vm_id, status="gone")
            seen = now
            await self._poll_counters([v for v, s in now.items() if s == "running"])
            await asyncio.sleep(VM_WATCH_S)

    async def _poll_counters(self, running: list[str]) -> None:
        async def one(vm_id: str) -> None:
            with contextlib.suppress(FerryError, TimeoutError):
                async with asyncio.timeout(VM_WATCH_S):
                    status = await self.client(vm_id).status()
                self.memory_io[vm_id] = dict(status.memory_io)

        await asyncio.gather(*(one(v) for v in running))
        for gone in self.memory_io.keys() - set(running):
            del self.memory_io[gone]


async def _process_exit(pid: int) -> None:
    """Until process ``pid`` (not our child) exits: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _vm_view(v: registry.VMInfo, rec: dict[str, Any] | None = None) -> m.VM:
    return m.VM(**listing.vm_view(v, rec))


def _memory() -> tuple[int, int]:
    total = avail = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    return total, avail


def create_app(host: HostConfig, *, warm_holders: int = 1) -> FastAPI:
    """The daemon's application for ``host`` (its directories and QEMU choices), keeping
    ``warm_holders`` holder processes started ahead of need (:mod:`ferry.daemon.warm`)."""
    d = Daemon(host, warm_holders=warm_holders)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as tg:
            d._ops = Operations(tg, d.events, on_finish=lambda op: d.metrics.operations.labels(
                op.kind, op.state.value).inc())
            watcher = tg.create_task(d.watch_vms(), name="watch vms")
            filler = tg.create_task(d.holders.keep_filled(), name="spare holders")
            try:
                yield
            finally:
                watcher.cancel()
                filler.cancel()
                await d.holders.close()
                d.events.close()
                for op in d.ops.all():
                    if op.state is m.OpState.RUNNING:
                        await d.ops.cancel(op.id)

    app = FastAPI(title="ferry node daemon", version=ferry.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.daemon = d
    problems.install(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        # Every body states its length, and it is bounded before a byte is read: a
        # chunked body has no length to check (HTTP/1.1 servers may answer 411).
        length = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:
            return problems.problem_response(411, "length-required", "Length required",
                                             "send the body with a Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return problems.problem_response(413, "too-large", "Request too large",
                                             f"bodies are at most {MAX_BODY_BYTES} bytes")
        response: Response = await call_next(request)
        return response

    # -- the node ---------------------------------------------------------------------

    @app.get("/v1/node", response_model=m.Node, tags=["node"])
    async def node() -> m.Node:
        choice = await host_accel(host)
        total, avail = _memory()
        vms = await asyncio.to_thread(d.vms)
        return m.Node(name=socket.gethostname(), version=ferry.__version__,
                      qemu=await host_qemu_version() or "unknown",
                      accelerator=m.Accelerator(accel=choice.accel.value, reason=choice.reason),
                      capacity=m.Capacity(cpus=os.cpu_count() or 1, memory_bytes=total,
                                          memory_available_bytes=avail),
                      vms=len(vms),
                      memory_committed_bytes=await asyncio.to_thread(d.committed_bytes))

    # -- VMs --------------------------------------------------------------------------

    @app.get("/v1/vms", response_model=list[m.VM], tags=["vms"])
    async def list_vms() -> list[m.VM]:
        return await asyncio.to_thread(d.views)

    @app.get("/v1/vms/{vm_id}", response_model=m.VMDetail, tags=["vms"])
    async def inspect_vm(vm_id: str) -> m.VMDetail:
        found = {v.vm_id: v for v in await asyncio.to_thread(d.vms)}.get(vm_id)
        if found is None:
            raise Problem(404, "vm-not-found", "VM not found", f"no VM {vm_id!r} on this node")
        view = _vm_view(found, await asyncio.to_thread(registry.live_supervisor, d.paths,
                                                       vm_id))
        if found.status == "suspended":
            return m.VMDetail(**view.model_dump())
        status = await d.client(vm_id).status()
        return m.VMDetail(**{**view.model_dump(), "status": status.state.value},
                          qemu_pid=status.qemu_pid, memory_io=dict(status.memory_io),
                          qemu_usage=dict(status.qemu_usage))

    @app.post("/v1/vms", status_code=202, response_model=m.Operation, tags=["vms"])
    async def run_vm(body: m.RunVM) -> m.Operation:
        forwards = tuple(parse_publish(s) for s in body.publish)
        file = Path(body.package)
        if not await asyncio.to_thread(file.is_file):
            raise Problem(400, "bad-request", "Bad request", f"no package file {file}")
        vm_id = registry.check_vm_id(body.name or f"vm-{os.urandom(4).hex()}")

        async def work(op_id: str) -> dict[str, Any]:
            async with d.lock(vm_id):
                trust = TrustStore.for_host(host)
                opened = await asyncio.to_thread(pkgcache.open_package, file, trust,
                                                 cache_dir=host.package_cache)
                request = supervisor.LaunchRequest(vm_id, opened.directory, host, forwards)
                try:
                    return await launch_detached(request, holder=d.holders.take())
                finally:
                    d.holders.refill()

        return d.ops.start("run", vm_id, work)

    @app.get("/v1/vms/{vm_id}/logs", tags=["vms"], response_class=Response)
    async def vm_logs(vm_id: str, offset: int = 0) -> Response:
        """The VM's serial console as text (at most its last MiB); ``X-Log-Offset`` is
        where to ask from next (``?offset=``) to follow it."""
        log = listing.console_log(d.paths, registry.check_vm_id(vm_id))
        if log is None:
            raise Problem(404, "vm-not-found", "VM not found", f"no VM {vm_id!r} runs here")
        data, end = await asyncio.to_thread(listing.read_log, log, offset=max(offset, 0))
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={"X-Log-Offset": str(end)})

    @app.post("/v1/vms/{vm_id}/stop", response_model=m.Stopped, tags=["vms"])
    async def stop_vm(vm_id: str, body: m.StopVM | None = None) -> m.Stopped:
        mode = StopMode((body or m.StopVM()).mode.value)
        async with d.lock(vm_id):
            reply = await d.client(vm_id).stop(mode)
        return m.Stopped(vm_id=vm_id, mode=reply.mode.value, state_bytes=reply.state_bytes)

    @app.delete("/v1/vms/{vm_id}", response_model=m.Stopped, tags=["vms"])
    async def remove_vm(vm_id: str, force: bool = False) -> m.Stopped:
        """Remove a suspended VM; a running one only with ``?force=true`` (it is stopped,
        discarding its state), else 409."""
        registry.check_vm_id(vm_id)
        async with d.lock(vm_id):
            if await asyncio.to_thread(registry.live_supervisor, d.paths, vm_id):
                if not force:
                    raise Problem(409, "vm-running", "VM is running",
                                  f"{vm_id} runs: stop it, or remove it with ?force=true")
                reply = await d.client(vm_id).stop(StopMode.DISCARD)
                return m.Stopped(vm_id=vm_id, mode=reply.mode.value)
            if await asyncio.to_thread(registry.remove_suspended, d.paths, vm_id):
                return m.Stopped(vm_id=vm_id, mode="removed")
            if force and await asyncio.to_thread(listing.cancel_receiver, d.paths, vm_id):
                return m.Stopped(vm_id=vm_id, mode="cancelled")
            raise Problem(404, "vm-not-found", "VM not found",
                          f"no suspended VM {vm_id!r} here" + ("" if force else
                          " (a waiting receiver is ended with ?force=true)"))

    @app.post("/v1/vms/{vm_id}/exec", response_model=m.Executed, tags=["vms"])
    async def exec_vm(vm_id: str, body: m.ExecVM) -> m.Executed:
        reply = await d.client(vm_id).exec(body.argv, stdin=body.stdin.encode(),
                                           timeout_s=body.timeout_s)
        return m.Executed(exit_code=reply.exit_code, outcome=reply.outcome,
                          stdout=reply.stdout.decode(errors="replace"),
                          stderr=reply.stderr.decode(errors="replace"))

    @app.post("/v1/receivers", response_model=m.Receiving, tags=["vms"])
    async def receive_vm(body: m.ReceiveVM) -> m.Receiving:
        """Start a receiver for one incoming VM; answers once it listens. The token it
        returns is what ``POST /v1/vms/{id}/migrate`` on the source presents."""
        addr, _, port = body.listen.rpartition(":")
        forwards = None if body.publish is None else tuple(parse_publish(p)
                                                           for p in body.publish)
        access = Access.listening(_tls(body.tls_cert, body.tls_key, body.tls_ca))
        request = ArrivalRequest(host=host, access=access, listen=(addr, int(port)),
                                 name=body.name, forwards=forwards,
                                 precopy_only=body.precopy_only, report_until="listening")
        try:
            event = await launch_detached(request, holder=d.holders.take())
        finally:
            d.holders.refill()
        return m.Receiving(address=list(event["address"]), pid=int(event["pid"]),
                           token=access.token)

    @app.post("/v1/vms/{vm_id}/migrate", status_code=202, response_model=m.Operation,
              tags=["vms"])
    async def migrate_vm(vm_id: str, body: m.MigrateVM) -> m.Operation:
        client = d.client(vm_id)
        addr, _, port = body.to.rpartition(":")
        access = Access(tls=_tls(body.tls_cert, body.tls_key, body.tls_ca), token=body.token)
        req = MigrateRequest(to=(addr, int(port)), access=access,
                             precopy_only=body.precopy_only, ram=RamPath(body.ram))

        async def work(op_id: str) -> dict[str, Any]:
            async with d.lock(vm_id):
                # Owned here and always awaited: cancelled once the migration ended.
                watch = asyncio.create_task(_watch_progress(client, d.ops, op_id))
                try:
                    reply = await client.migrate(req)
                finally:
                    await cancel_and_wait(watch, swallow_errors=True)
                assert not isinstance(reply, ExportReply)
                _observe(d.metrics, reply.summary)
                # The operation ends once the VM has left this node (its holder answers
                # before its own cleanup is done).
                await d.wait_gone(vm_id)
            return {"summary": reply.summary.to_json()}

        async def cancel() -> None:
            await client.migrate_cancel()

        return d.ops.start("migrate", vm_id, work, cancel=cancel)

    @app.post("/v1/vms/{vm_id}/snapshot", status_code=202, response_model=m.Operation,
              tags=["vms"])
    async def snapshot_vm(vm_id: str, body: m.SnapshotVM) -> m.Operation:
        """Stop the VM into a signed package (the host's signing key); ``ferry vm run
        FILE`` or ``POST /v1/vms`` resumes it."""
        client = d.client(vm_id)
        file = Path(body.file)
        if not file.is_absolute() or not host.signing_key.is_absolute():
            raise Problem(400, "bad-request", "Bad request",
                          "the package file (and the host's signing key) must be absolute "
                          "paths")
        req = MigrateRequest(package=file, key=host.signing_key, overwrite=body.overwrite)

        async def work(op_id: str) -> dict[str, Any]:
            async with d.lock(vm_id):
                reply = await client.migrate(req)
                await d.wait_gone(vm_id)
            assert isinstance(reply, ExportReply)
            return {"package": reply.package, "key_id": reply.key_id,
                    "state_bytes": reply.state_bytes, "paused_s": reply.paused_s}

        return d.ops.start("snapshot", vm_id, work)

    # -- operations -------------------------------------------------------------------

    @app.get("/v1/operations", response_model=list[m.Operation], tags=["operations"])
    async def list_operations() -> list[m.Operation]:
        return d.ops.all()

    @app.get("/v1/operations/{op_id}", response_model=m.Operation, tags=["operations"])
    async def get_operation(op_id: str, wait_s: float = 0.0) -> m.Operation:
        """``?wait_s=N`` (at most 60) answers as soon as the operation finished."""
        op = await d.ops.wait(op_id, min(max(wait_s, 0.0), 60.0))
        if op is None:
            raise Problem(404, "operation-not-found", "Operation not found",
                          f"no operation {op_id!r}")
        return op

    @app.delete("/v1/operations/{op_id}", response_model=m.Operation, tags=["operations"])
    async def cancel_operation(op_id: str) -> m.Operation:
        op = await d.ops.cancel(op_id)
        if op is None:
            raise Problem(404, "operation-not-found", "Operation not found",
                          f"no operation {op_id!r}")
        return op

    # -- packages ---------------------------------------------------------------------

    @app.get("/v1/packages", response_model=list[m.Package], tags=["packages"])
    async def list_packages() -> list[m.Package]:
        return [_package_view(p) for p in await asyncio.to_thread(
            pkgcache.cached_packages, host.package_cache)]

    @app.post("/v1/packages", response_model=m.Package, tags=["packages"])
    async def add_package(body: m.AddPackage) -> m.Package:
        file = Path(body.file)
        if not await asyncio.to_thread(file.is_file):
            raise Problem(400, "bad-request", "Bad request", f"no package file {file}")
        opened = await asyncio.to_thread(pkgcache.open_package, file,
                                         TrustStore.for_host(host),
                                         cache_dir=host.package_cache)
        return _package_view(opened)

    # -- events and metrics -----------------------------------------------------------

    @app.get("/v1/events", tags=["events"], response_class=StreamingResponse)
    async def events() -> StreamingResponse:
        """Server-sent events, one JSON object each: first ``subscribed`` (the VMs here
        now), then ``vm`` (a VM appeared, changed state or went) and ``operation`` (an
        operation started or finished)."""
        async def stream() -> AsyncIterator[bytes]:
            async with d.events.subscribe() as queue:
                # First what is here now, so a subscriber starts from a known state.
                vms = [v.model_dump(mode="json") for v in await asyncio.to_thread(d.views)]
                hello = {"seq": 0, "kind": "subscribed", "vms": vms}
                yield f"data: {json.dumps(hello)}\n\n".encode()
                while True:
                    event = await queue.get()
                    if event is None:
                        return
                    yield f"data: {json.dumps(event)}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/ui", tags=["dashboard"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The dashboard: one static page, no data in it; its script reads everything
        through the API with the token from the URL's fragment (``/ui#token=...``)."""
        return HTMLResponse(DASHBOARD)

    @app.get("/metrics", tags=["metrics"], response_class=Response)
    async def metrics() -> Response:
        data = await asyncio.to_thread(generate_latest, d.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return app


PROGRESS_EVERY_S = 0.25


async def _watch_progress(client: ControlClient, ops: Operations, op_id: str) -> None:
    """Report the holder's migration progress on the operation until cancelled."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        with contextlib.suppress(FerryError):
            status = await client.status()
            if status.migration is not None:
                ops.report(op_id, dict(status.migration))


def _tls(cert: str | None, key: str | None, ca: str | None) -> TLSFiles | None:
    if not (cert or key or ca):
        return None
    if not (cert and key and ca):
        raise Problem(400, "bad-request", "Bad request", "TLS needs tls_cert, tls_key and tls_ca")
    return TLSFiles(Path(cert), Path(key), Path(ca))


def _observe(metrics: Metrics, summary: MigrationSummary) -> None:
    ms = summary.downtime.corrected_ms if summary.downtime.corrected_ms is not None \
        else summary.downtime.source_view_ms
    if ms is not None:
        metrics.migration_downtime.observe(ms / 1e3)
    if summary.bytes_total is not None:
        metrics.migration_bytes.inc(summary.bytes_total)
    if summary.postcopy_fetches is not None:
        metrics.postcopy_fetches.inc(summary.postcopy_fetches)


def _package_view(p: pkgcache.OpenedPackage) -> m.Package:
    return m.Package(package_id=p.package_id, name=p.manifest.name, directory=str(p.directory),
                     memory_mib=p.manifest.machine.memory_mib,
                     disks=[e.name for e in p.manifest.disks])
