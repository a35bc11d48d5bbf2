"""``/v1/vms`` and ``/v1/receivers``: run, inspect, stop, continue, exec, logs, migrate,
snapshot, remove; wait for a VM migrating here.

Mutating requests on one VM are serialized by the VM's lock; long ones (run, continue,
migrate, snapshot) are operations (:mod:`ferry.daemon.operations`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Response

from ferry.daemon import models as m
from ferry.daemon.moves import migrate_out
from ferry.daemon.problems import Problem
from ferry.daemon.state import Daemon
from ferry.errors import FerryError
from ferry.live.access import Access, TLSFiles
from ferry.live.rampath import RamPath
from ferry.migration.autocompress import LinkCompression
from ferry.net import PortForward, Proto
from ferry.net.service import check_service_address
from ferry.node import listing, supervisor
from ferry.node.arrival import ArrivalRequest
from ferry.node.control import ExportReply, MigrateRequest
from ferry.node.process import launch_detached
from ferry.oci.guest import DEFAULT_MEMORY_MIB, RunOverrides
from ferry.package import TrustStore
from ferry.vm import labels, pkgcache, registry, userdata, volumes
from ferry.vm.errors import VMExistsError
from ferry.vm.oci import is_oci, oci_package
from ferry.vm.publish import parse_publish
from ferry.vm.stopmode import StopMode

if TYPE_CHECKING:
    from ferry.vm.mirroring import MirrorSpec

log = logging.getLogger(__name__)


def routes(d: Daemon) -> APIRouter:
    r = APIRouter(tags=["vms"])
    host = d.host

    @r.get("/v1/vms", response_model=list[m.VM])
    async def list_vms(
            label: Annotated[list[str] | None, Query(max_length=32)] = None) -> list[m.VM]:
        """``?label=KEY`` or ``?label=KEY=VALUE`` (repeatable: all must match)."""
        views = await asyncio.to_thread(d.views)
        return [v for v in views if all(labels.matches(v.labels, s) for s in label or [])]

    @r.get("/v1/vms/{vm_id}", response_model=m.VMDetail)
    async def inspect_vm(vm_id: str) -> m.VMDetail:
        """One VM: its listing, and while it runs its QEMU, CPU use, guest RAM read through
        FUSE and a running migration's progress (as ``ferry vm inspect``)."""
        detail = await listing.inspect(d.paths, vm_id)
        if detail is None:
            raise Problem(404, "vm-not-found", "VM not found", f"no VM {vm_id!r} on this node")
        return m.VMDetail(**detail)

    async def launch(op_id: str, request: supervisor.LaunchRequest) -> dict[str, Any]:
        try:
            return await launch_detached(request, holder=d.holders.take())
        finally:
            d.holders.refill()

    @r.post("/v1/vms", status_code=202, response_model=m.Operation)
    async def run_vm(body: m.RunVM) -> m.Operation:
        """Resume a signed package (verified against this host's trust list) as a new VM."""
        forwards = tuple(parse_publish(s) for s in body.publish)
        image = is_oci(body.package)
        overrides = _oci_overrides(body) if image else None
        if not image and (body.entrypoint or body.args or body.readiness or body.memory_mib):
            raise Problem(422, "invalid", "Invalid request", "entrypoint, args, "
                          "readiness and memory_mib are for oci:// images, not packages")
        if image and (body.user_data is not None or body.volumes):
            raise Problem(422, "invalid", "Invalid request", "user_data and volumes are for "
                          "packages, not oci:// images")
        env = {} if image else userdata.parse_env(body.env)
        if body.user_data is not None:
            userdata.parse_user_data(body.user_data)
        vols = volumes.parse_volume_args(body.volumes)
        mirror = _mirror_spec(body.mirror)
        plain = not (env or body.user_data is not None or vols or mirror)
        service_address = (None if body.service_address is None
                           else check_service_address(body.service_address))
        file = Path(body.package)
        if not image and not await asyncio.to_thread(file.is_file):
            raise Problem(400, "bad-request", "Bad request", f"no package file {file}")
        vm_id = registry.check_vm_id(body.name or f"vm-{os.urandom(4).hex()}")
        vm_labels = labels.check_labels(body.labels)

        async def package_dir(op_id: str) -> Path:
            if overrides is not None:  # the image cache's, which no prune touches
                made = await oci_package(body.package, overrides, host=host,
                                         progress=lambda line: d.ops.report(
                                             op_id, {"step": line}))
                return made.directory
            async with d.cache_lock:
                opened = await asyncio.to_thread(pkgcache.open_package, file,
                                                 TrustStore.for_host(host),
                                                 cache_dir=host.package_cache)
                d.pinned[opened.directory] += 1  # until its holder names it
                return opened.directory

        async def work(op_id: str) -> dict[str, Any]:
            async with d.lock(vm_id):
                if await asyncio.to_thread(registry.live_supervisor, d.paths, vm_id):
                    raise VMExistsError("is already running on this node", vm=vm_id)
                if mirror is not None:
                    await _check_prefix_free(mirror)
                directory = await package_dir(op_id)
                if overrides is not None:
                    d.pinned[directory] += 1
                try:
                    # A warm VM's network is made without a service address, and it
                    # resumed without this run's environment, user data and volumes.
                    ready = None if service_address is not None or not plain \
                        else await _claim_warm(d, directory, vm_id, forwards, vm_labels)
                    if ready is None:
                        ready = await launch(op_id, supervisor.LaunchRequest(
                            vm_id, directory, host, forwards, labels=vm_labels,
                            service_address=service_address, env=env,
                            user_data=body.user_data,
                            user_data_timeout_s=body.user_data_timeout_s, volumes=vols,
                            mirror=mirror))
                    # A replacement, or the first one: primed on this run's guest ports.
                    d.warm.want(directory, guest_ports=tuple(
                        f.guest_port for f in forwards if f.proto is Proto.TCP))
                    return ready
                finally:
                    d.pinned[directory] -= 1

        return d.ops.start("run", vm_id, work)

    @r.post("/v1/restores", status_code=202, response_model=m.Operation)
    async def restore_vm(body: m.RestoreVM) -> m.Operation:
        """Resume a mirrored VM here from the last complete checkpoint of its mirror
        (``ferry vm restore``): the guest runs first, its RAM and disks are fetched from
        the bucket as it reads them. The operation ends once it runs."""
        from ferry.s3.vmcheckpoint import load_record
        from ferry.vm.mirroring import MirrorSpec

        spec = MirrorSpec(body.url, endpoint_url=body.endpoint_url, region=body.region,
                          profile=body.profile)
        forwards = tuple(parse_publish(s) for s in body.publish)
        mirror = _mirror_spec(body.mirror)
        if mirror is not None and mirror.url.rstrip("/") == spec.url.rstrip("/"):
            raise Problem(422, "invalid", "Invalid request",
                          "mirror the restored VM to another prefix than the one it is "
                          "restored from")

        async def work(op_id: str) -> dict[str, Any]:
            vm_id = body.name
            if vm_id is None:
                record = await asyncio.to_thread(load_record, spec.store(), spec.layout())
                vm_id = record.vm_id
            vm_id = registry.check_vm_id(vm_id)
            async with d.lock(vm_id):
                if await asyncio.to_thread(registry.live_supervisor, d.paths, vm_id):
                    raise VMExistsError("is already running on this node", vm=vm_id)
                if mirror is not None:
                    await _check_prefix_free(mirror)
                return await launch(op_id, supervisor.LaunchRequest(
                    vm_id, None, host, forwards, labels={}, restore=spec, mirror=mirror))

        return d.ops.start("restore", body.name, work)

    @r.post("/v1/vms/{vm_id}/continue", status_code=202, response_model=m.Operation)
    async def continue_vm(vm_id: str, body: m.ContinueVM | None = None) -> m.Operation:
        """Continue a suspended VM (``ferry vm run --name ID``), with the forwards it had
        unless ``publish`` gives others."""
        registry.check_vm_id(vm_id)
        publish = (body or m.ContinueVM()).publish
        forwards = None if publish is None else tuple(parse_publish(s) for s in publish)
        if not any(v.vm_id == vm_id and v.status == "suspended"
                   for v in await asyncio.to_thread(d.vms)):
            raise Problem(404, "vm-not-found", "VM not found", f"no suspended VM {vm_id!r} here")

        async def work(op_id: str) -> dict[str, Any]:
            async with d.lock(vm_id):
                return await launch(op_id, supervisor.LaunchRequest(vm_id, None, host,
                                                                    forwards))

        return d.ops.start("continue", vm_id, work)

    @r.get("/v1/vms/{vm_id}/logs", response_class=Response)
    async def vm_logs(vm_id: str, offset: int = 0) -> Response:
        """The VM's serial console as text (at most its last MiB); ``X-Log-Offset`` is
        where to ask from next (``?offset=``) to follow it."""
        log = listing.console_log(d.paths, registry.check_vm_id(vm_id))
        if log is None:
            raise Problem(404, "vm-not-found", "VM not found", f"no VM {vm_id!r} runs here")
        data, end = await asyncio.to_thread(listing.read_log, log, offset=max(offset, 0))
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={"X-Log-Offset": str(end)})

    @r.post("/v1/vms/{vm_id}/stop", response_model=m.Stopped)
    async def stop_vm(vm_id: str, body: m.StopVM | None = None) -> m.Stopped:
        """Stop a VM: discard it, or suspend it (``POST /v1/vms/{id}/continue`` resumes
        it); answers once the VM, its run dir and network are gone."""
        mode = StopMode((body or m.StopVM()).mode.value)
        async with d.lock(vm_id):
            reply = await d.client(vm_id).stop(mode)
        return m.Stopped(vm_id=vm_id, mode=reply.mode.value, state_bytes=reply.state_bytes)

    @r.delete("/v1/vms/{vm_id}", response_model=m.Stopped)
    async def remove_vm(vm_id: str, force: bool = False) -> m.Stopped:
        """Remove a suspended VM; a running one only with ``?force=true`` (it is stopped,
        discarding its state), else 409."""
        registry.check_vm_id(vm_id)
        async with d.lock(vm_id):
            done = await listing.remove(d.paths, vm_id, force=force)
        return m.Stopped(vm_id=vm_id, mode="discard" if done == "stopped" else done)

    @r.post("/v1/vms/{vm_id}/exec", response_model=m.Executed)
    async def exec_vm(vm_id: str, body: m.ExecVM) -> m.Executed:
        reply = await d.client(vm_id).exec(body.argv, stdin=body.stdin.encode(),
                                           timeout_s=body.timeout_s)
        return m.Executed(exit_code=reply.exit_code, outcome=reply.outcome,
                          stdout=reply.stdout.decode(errors="replace"),
                          stderr=reply.stderr.decode(errors="replace"))

    @r.post("/v1/receivers", response_model=m.Receiving)
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

    @r.post("/v1/starts", status_code=202, response_model=m.Operation)
    async def start_from_registry(body: m.StartFromRegistry) -> m.Operation:
        """Start a VM from a registry's package (as ``ferry vm receive --registry``): it
        runs here once its device state arrived, the rest follows on demand (post-copy).
        The operation ends once it runs; its result is the ready report."""
        addr, _, port = body.registry.rpartition(":")
        forwards = None if body.publish is None else tuple(parse_publish(p)
                                                           for p in body.publish)
        access = Access(tls=_tls(body.tls_cert, body.tls_key, body.tls_ca), token=body.token)
        request = ArrivalRequest(host=host, access=access, registry=(addr, int(port)),
                                 package=body.package, name=body.name, forwards=forwards,
                                 precopy_only=body.precopy_only, report_until="ready")

        async def work(op_id: str) -> dict[str, Any]:
            try:
                return await launch_detached(request, holder=d.holders.take())
            finally:
                d.holders.refill()

        return d.ops.start("registry-start", body.name, work)

    @r.post("/v1/vms/{vm_id}/migrate", status_code=202, response_model=m.Operation)
    async def migrate_vm(vm_id: str, body: m.MigrateVM) -> m.Operation:
        """Live-migrate to a receiver; the operation ends once the VM left this node. The
        migration is also a record of ``/v1/migrations`` (kept across restarts)."""
        client = d.client(vm_id)
        addr, _, port = body.to.rpartition(":")
        access = Access(tls=_tls(body.tls_cert, body.tls_key, body.tls_ca), token=body.token)

        async def work(op_id: str) -> dict[str, Any]:
            return await migrate_out(d, vm_id, op_id, MigrateRequest(
                to=(addr, int(port)), access=access, precopy_only=body.precopy_only,
                ram=RamPath(body.ram), max_mbit=body.max_mbit, timeout_s=body.timeout_s,
                compression=LinkCompression(body.compression)))

        async def cancel() -> None:
            await client.migrate_cancel()

        return d.ops.start("migrate", vm_id, work, cancel=cancel)

    @r.post("/v1/vms/{vm_id}/snapshot", status_code=202, response_model=m.Operation)
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

    return r


async def _claim_warm(d: Daemon, package_dir: Path, vm_id: str,
                      forwards: tuple[PortForward, ...],
                      vm_labels: dict[str, str]) -> dict[str, Any] | None:
    """Run ``vm_id`` by claiming a warm VM of the package, if one waits and the name is
    free (else the caller launches as usual: it reports a taken name the usual way).
    A claim that fails leaves nothing: the warm VM is discarded by its holder."""
    if await asyncio.to_thread(_name_taken, d, vm_id):
        return None
    warm = d.warm.take(package_dir)
    if warm is None:
        return None
    try:
        reply = await d.warm.control(warm).claim(vm_id, forwards, vm_labels)
    except FerryError as exc:
        log.warning("claiming warm vm %s as %s failed (%s): starting it as usual",
                    warm.warm_id, vm_id, exc)
        return None
    finally:
        if warm.proc.stdin is not None:
            warm.proc.stdin.close()  # claimed (or gone): it no longer watches the pipe
    return {**reply.ready, "warm": True}


def _oci_overrides(body: m.RunVM) -> RunOverrides:
    return RunOverrides(entrypoint=body.entrypoint, args=tuple(body.args), env=tuple(body.env),
                        readiness=body.readiness,
                        memory_mib=body.memory_mib or DEFAULT_MEMORY_MIB)


def _name_taken(d: Daemon, vm_id: str) -> bool:
    return any(p.exists() or p.is_symlink()
               for p in (d.paths.run_dir(vm_id), d.paths.state_dir(vm_id)))


def _mirror_spec(body: m.MirrorTo | None) -> MirrorSpec | None:
    """A request's mirror as the holder takes it (ConfigError: a bad prefix)."""
    if body is None:
        return None
    from ferry.vm.mirroring import MirrorSpec

    return MirrorSpec(body.url, body.interval_s, body.endpoint_url, body.region, body.profile)


async def _check_prefix_free(mirror: MirrorSpec) -> None:
    from ferry.s3.mirror import check_prefix_free

    await check_prefix_free(mirror.store(), mirror.layout())


def _tls(cert: str | None, key: str | None, ca: str | None) -> TLSFiles | None:
    if not (cert or key or ca):
        return None
    if not (cert and key and ca):
        raise Problem(400, "bad-request", "Bad request", "TLS needs tls_cert, tls_key and tls_ca")
    return TLSFiles(Path(cert), Path(key), Path(ca))
