"""A package registry that starts VMs remotely by pure post-copy (``ferry vm registry``).

A host serves the signed packages in a directory. A destination connects,
names a package (``{"package": FILE-NAME}``, see :mod:`ferry.live.launch`)
and the registry becomes the *migration source* of that package's devices:
guest RAM and every disk, read-only over the package's files, with the device
state in the HANDOFF payload, in pure post-copy mode (``Mode.POSTCOPY``): no
block is sent before the hand-off, the destination resumes as soon as the
state arrives and fetches any block it touches first on demand, while the rest
streams in.

Trust model: the registry verifies each package's signature against its trust
list before serving it (and refuses it otherwise); the link is mutual TLS when
configured, so the destination knows it talks to the registry it trusts; the
migration protocol checks every block the destination receives against the
hash the registry computed from the verified files, and reads every block back
before it reports the device complete. The destination does not re-verify the
signature itself (it never holds the whole package).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path

from ferry.errors import ConfigError, FerryError
from ferry.live import launch, report_exchange
from ferry.live import payload as wire
from ferry.live.access import HANDSHAKE_TIMEOUT_S, Access
from ferry.migration.channel import StreamChannel
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.migration.source import MigrationHooks, Migrator
from ferry.package import TrustStore
from ferry.storage import FileDevice
from ferry.transport import auth
from ferry.transport.base import Stream
from ferry.vm import pkgcache
from ferry.vm.devices import local_devices, wire_order
from ferry.vm.safepath import safe_join
from ferry.vm.snapshot import short_id

log = logging.getLogger(__name__)

POSTCOPY_POLICY = DirtyPolicy(max_cycles=0)
"""No dirty cycles: a package never changes, so the hand-off can follow at once."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(FerryError):
    """A package could not be served."""


def _vm_id_for(name: str) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:30] or "vm"
    return f"{base}-{short_id()}"


async def serve_package(stream: Stream, directory: Path, trust: TrustStore, *,
                        cache_dir: Path) -> None:
    """Serve one (authenticated) destination on ``stream``: one package, pure post-copy.

    A request the registry cannot serve (no such package, an untrusted one, a
    malformed request) is answered with a refusal frame, which the destination
    raises as :class:`~ferry.live.errors.RefusedError`. The stream is always
    closed when this returns.
    """
    try:
        await _serve_package(stream, directory, trust, cache_dir)
    finally:
        await stream.aclose()


async def _serve_package(stream: Stream, directory: Path, trust: TrustStore,
                         cache_dir: Path) -> None:
    try:
        request = await launch.receive_frame(stream)
    except FerryError as exc:
        log.warning("registry: %s: %s", stream.peer, exc)
        return
    name = request.get("package")
    try:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistryError(f"bad package name {name!r:.80}")
        path = safe_join(directory, name)
        if not await asyncio.to_thread(path.is_file):
            raise RegistryError(f"no package {name!r} here")
        opened = await asyncio.to_thread(
            functools.partial(pkgcache.open_package, path, trust, cache_dir=cache_dir))
        manifest = opened.manifest
        files = launch.boot_files(manifest, opened.directory)
        offer = launch.Offer(_vm_id_for(manifest.name), manifest, (),
                             await asyncio.to_thread(launch.describe_boot, files),
                             origin="registry")
        state = await asyncio.to_thread(
            safe_join(opened.directory, manifest.state).read_bytes)
    except FerryError as exc:
        log.warning("registry: %s: refused: %s", stream.peer, exc)
        with contextlib.suppress(FerryError, OSError):
            await launch.send_refusal(stream, f"registry: {exc}")
        return
    try:
        await launch.send_offer(stream, offer, files)
    except FerryError as exc:
        log.warning("registry: %s: %s", stream.peer, exc)
        return
    memory = FileDevice(safe_join(opened.directory, manifest.memory.path), read_only=True,
                        name="memory")
    disks = {e.name: FileDevice(safe_join(opened.directory, e.path), read_only=True,
                                name=e.name)
             for e in manifest.disks}
    devices = local_devices(memory, disks, block_size_bytes=manifest.memory.block_size_bytes)
    channel = StreamChannel(stream)

    async def payload() -> bytes:
        return wire.encode(wire.HandoffPayload(offer.vm_id, state))

    migrator = Migrator([d.source_device() for d in wire_order(devices)], channel,
                        policy=POSTCOPY_POLICY, mode=Mode.POSTCOPY, concurrency=4,
                        max_run_blocks=16, hooks=MigrationHooks(handoff_payload=payload))
    try:
        report = await migrator.run()
        log.info("registry: %s started %s from %s: %.1f MiB in %.2f s, %d post-copy fetches",
                 stream.peer, offer.vm_id, name,
                 report.to_json()["bytes_total"] / 2**20, report.total_s,
                 report.postcopy_fetches)
        with contextlib.suppress(FerryError):
            arrived, _ = await report_exchange.fetch_report(stream)
            log.info("registry: %s runs %s, %s ms after its hand-off arrived", stream.peer,
                     offer.vm_id, arrived.handoff_to_running_ms)
    except FerryError as exc:
        log.warning("registry: %s: serving %s failed: %s", stream.peer, name, exc)
    finally:
        await channel.aclose()
        await devices.close()


def check_directory(directory: Path) -> None:
    """ConfigError unless ``directory`` is a directory (before listening on anything)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory of packages")


async def serve_registry(directory: Path, host: str, port: int, *, trust: TrustStore,
                         cache_dir: Path, access: Access,
                         on_listening: Callable[[tuple[str, int]], None] = lambda a: None,
                         max_unauthenticated: int = auth.MAX_UNAUTHENTICATED,
                         handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                         ) -> None:
    """Serve the packages in ``directory`` on ``host:port`` until cancelled.

    Packages are verified against ``trust`` and extracted into ``cache_dir``
    (the host's ``HostConfig.package_cache``) once.

    Every connection authenticates first (``access``: mutual TLS, the
    registry's token, or nobody with ``insecure``) within
    ``handshake_timeout_s``; at most
    ``max_unauthenticated`` connections are being vetted at once (more wait
    in the kernel's backlog). The rest of each request has idle deadlines.
    """
    check_directory(directory)
    authenticate = access.authenticator()
    vetting = asyncio.Semaphore(max_unauthenticated)

    async def serve_one(stream: Stream) -> None:
        try:
            async with asyncio.timeout(handshake_timeout_s):
                await authenticate(stream)
        except (FerryError, TimeoutError) as exc:
            log.warning("registry: %s: not authenticated: %s", stream.peer,
                        exc or "handshake timed out")
            await stream.aclose()
            return
        finally:
            vetting.release()
        await serve_package(stream, directory, trust, cache_dir=cache_dir)

    async with await access.listen(host, port) as listener, \
            asyncio.TaskGroup() as tg:
        on_listening(listener.address)
        while True:
            await vetting.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                vetting.release()
                raise
            tg.create_task(serve_one(stream))
