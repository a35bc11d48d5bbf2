"""Crash recovery: a VM resumed from the last complete checkpoint of its mirror in a bucket.

``ferry vm restore s3://BUCKET/PREFIX`` on any host:

1. reads the newest VM checkpoint record (:mod:`ferry.s3.vmcheckpoint`): which
   device checkpoints, device state, kernel and initramfs make that instant;
2. fetches the small files (kernel, initramfs, device state: each checked
   against its SHA-256) into a directory shaped like an extracted package;
3. opens guest RAM and each disk as an :class:`~ferry.s3.device.S3Device` at
   the record's sequences: nothing of them is fetched yet;
4. resumes the VM (:func:`ferry.vm.runner.run_vm` with these providers): the
   guest runs first, and each object of RAM or disk is fetched when first read
   (through a bytes-bounded cache; written objects stay in local staging).

``ferry vm restore --mirror s3://BUCKET/OTHER`` mirrors the restored VM to another prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ferry.s3 import vmcheckpoint as vmc
from ferry.s3.cache import ObjectCache
from ferry.s3.device import Layout, S3Device
from ferry.s3.store import ObjectStore
from ferry.storage.device import Device
from ferry.vm.errors import ManifestError
from ferry.vm.manifest import VMManifest
from ferry.vm.pkgcache import OpenedPackage, adopt, open_extracted
from ferry.vm.runner import MIRROR_DISK, MIRROR_MEMORY, Providers

RESTORE_CACHE_BYTES = 256 << 20
"""Objects of a restored VM kept in memory: a 256 MiB guest's RAM fits whole, so an
object fetched once is not fetched again while the guest faults its pages in."""


@dataclass(frozen=True, slots=True)
class RestorePoint:
    """A VM checkpoint chosen for a restore, and the local directory it was made into."""

    store: ObjectStore
    layout: Layout
    record: vmc.VMCheckpoint
    package: OpenedPackage


async def prepare(store: ObjectStore, layout: Layout, directory: Path, *,
                  sequence: int | None = None) -> RestorePoint:
    """Read the newest (or ``sequence``) VM checkpoint and fetch its small files into
    ``directory`` (made here). The devices are not fetched."""
    record = await asyncio.to_thread(vmc.load_record, store, layout, sequence)
    manifest = VMManifest.from_json(record.manifest)
    if MIRROR_MEMORY not in record.devices or any(
            MIRROR_DISK + d.name not in record.devices for d in manifest.disks):
        raise ManifestError(f"VM checkpoint {record.sequence} lacks a device of its manifest "
                            f"(has {sorted(record.devices)})")
    await asyncio.to_thread(directory.mkdir, mode=0o700, parents=True, exist_ok=False)

    async def fetch(what: str, rel: str) -> None:
        data = await asyncio.to_thread(vmc.get_blob, store, layout, record.files[what])
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, data)

    await asyncio.gather(fetch("kernel", manifest.kernel),
                         fetch("initramfs", manifest.initramfs),
                         fetch("state", manifest.state))
    manifest.write(directory)
    adopt(directory, record.package_id)
    return RestorePoint(store, layout, record, open_extracted(directory))


def providers(point: RestorePoint, *, staging_dir: Path) -> Providers:
    """RAM and disks of ``point`` as lazy S3 devices (for ``run_vm(providers=)``)."""
    cache = ObjectCache(RESTORE_CACHE_BYTES)

    async def make(stack: contextlib.AsyncExitStack) -> tuple[Device, dict[str, Device]]:
        async def open_one(name: str) -> S3Device:
            dev = await S3Device.open(point.store, name, layout=point.layout,
                                      sequence=point.record.devices[name],
                                      staging_dir=staging_dir, cache=cache)
            stack.push_async_callback(dev.close, checkpoint=False)
            return dev

        memory = await open_one(MIRROR_MEMORY)
        disks: dict[str, Device] = {}
        for entry in point.package.manifest.disks:
            disks[entry.name] = await open_one(MIRROR_DISK + entry.name)
        return memory, disks

    return make
