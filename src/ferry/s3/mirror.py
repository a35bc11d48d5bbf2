"""Continuous mirroring of a running VM's devices into a bucket, with consistent checkpoints.

Theory of operation. The VM's devices (guest RAM, disks) each have a dirty
tracker of the mirror's own (:class:`TrackedSource`: a device whose written
blocks are remembered until taken), and each has an :class:`S3Device` under
the VM's prefix whose staging file the mirror fills. Every ``interval_s`` one
*cycle* runs:

1. **copy, running**: the VM's RAM is flushed through FUSE (the msync of this
   design), the dirty blocks are taken, and the objects that hold them are
   copied whole into the S3 devices' staging files (local disk, no S3);
2. **copy, paused**: the VM is paused, RAM flushed again, its device state
   saved (:meth:`VMSide.paused`); the blocks dirtied since step 1 are copied
   (few: the time since step 1); the VM continues. The staging files now hold
   exactly the VM of the pause: every object that changed since it was last
   copied was dirty, and was copied while the VM could not write;
3. **upload, running**: each S3 device checkpoints (dirty objects uploaded
   under their SHA-256, then its manifest), the device state is stored as an
   object, and *last* the VM checkpoint record naming all of them is written
   create-only (:mod:`ferry.s3.vmcheckpoint`).

The pause holds only local work (a flush, a device-state save, a local copy of
what changed in the last fraction of a second), never a request to S3. Uploads
run in the S3 devices' threads (``concurrency`` objects in flight each) while
the VM runs; the local staging is bounded by the devices' sizes.

If S3 fails (unreachable, errors after botocore's retries), the cycle's record
is not written: the last complete checkpoint stays the newest, the recovery
point (its age) grows, a warning says so, the VM keeps running, and the next
cycle retries after a backoff (doubling up to ``retry_max_s``). The staging
files keep what was not uploaded; the S3 devices keep it dirty; nothing of a
failed cycle is lost or half-taken.

Cycles never overlap: a cycle's copy into staging happens only between two
checkpoints of the S3 devices, so a checkpoint's objects are those of its
pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ferry.errors import ConfigError, FerryError
from ferry.s3 import vmcheckpoint as vmc
from ferry.s3.cache import ObjectCache
from ferry.s3.device import Layout, S3Device, list_checkpoints
from ferry.s3.errors import (
    CheckpointConflictError,
    CheckpointNotFoundError,
    S3DeviceError,
    S3Error,
)
from ferry.s3.store import ObjectStore
from ferry.storage.device import Geometry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
"""A checkpoint every 2 s: the issue's recovery-point goal (p50 <= 2 s) with one
pause (tens of ms) per interval."""
DEFAULT_OBJECT_SIZE_BYTES = 1 << 20
"""1 MiB objects for mirrored devices (S3Device's default is 4 MiB): a guest's
writes are scattered over RAM, and each dirty object is uploaded whole, so
smaller objects upload fewer bytes per written page, at more requests."""
DEFAULT_RETRY_MAX_S = 30.0
"""After failures, cycles back off (doubling from the interval) up to this."""


class TrackedSource(Protocol):
    """A device the VM writes, whose written blocks are remembered until taken
    (:class:`~ferry.storage.modules.dirty.DirtyRemote`, every block tracked)."""

    @property
    def size_bytes(self) -> int: ...

    @property
    def geometry(self) -> Geometry: ...

    async def read_at(self, offset: int, length: int) -> bytes: ...

    def take_dirty(self) -> list[int]: ...


class VMSide(Protocol):
    """What the mirror needs of the VM."""

    async def flush(self) -> None:
        """Push written guest RAM into the device stacks (the VM keeps running)."""

    def paused(self) -> AbstractAsyncContextManager[bytes]:
        """Pause the VM, flush, save its device state (yielded); continue it on exit."""


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    interval_s: float = DEFAULT_INTERVAL_S
    object_size_bytes: int = DEFAULT_OBJECT_SIZE_BYTES
    concurrency: int = 8
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    staging_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.interval_s <= 3600:
            raise ConfigError("mirror interval must be in (0, 3600] s")
        if self.retry_max_s < self.interval_s:
            raise ConfigError("mirror retry_max_s must be >= interval_s")


@dataclass(frozen=True, slots=True)
class VMIdentity:
    """What a restore needs besides the devices: the VM manifest and its boot files."""

    vm_id: str
    package_id: str
    manifest: dict[str, Any]
    kernel: bytes
    initramfs: bytes


@dataclass(slots=True)
class MirrorStatus:
    """The mirror as ``ferry vm inspect`` and the daemon's /metrics show it."""

    url: str
    state: str = "starting"
    """``starting`` (no checkpoint yet), ``mirroring``, ``failing`` (S3 errors: the
    recovery point grows), ``stopped`` (a fatal error, e.g. another writer)."""
    started_unix_s: float = field(default_factory=time.time)
    checkpoints: int = 0
    sequence: int = 0
    last_checkpoint_unix_s: float | None = None
    """When the VM was paused for the newest complete checkpoint (its recovery point)."""
    last_pause_ms: float | None = None
    max_pause_ms: float | None = None
    last_upload_s: float | None = None
    bytes_uploaded: int = 0
    failures: int = 0
    last_error: str | None = None

    def recovery_point_s(self, now_unix_s: float | None = None) -> float:
        """Age of the last complete checkpoint (since the mirror started, if none yet)."""
        now = time.time() if now_unix_s is None else now_unix_s
        since = self.last_checkpoint_unix_s if self.last_checkpoint_unix_s is not None \
            else self.started_unix_s
        return max(0.0, now - since)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "checkpoints": self.checkpoints,
                "sequence": self.sequence, "started_unix_s": self.started_unix_s,
                "last_checkpoint_unix_s": self.last_checkpoint_unix_s,
                "recovery_point_s": round(self.recovery_point_s(), 3),
                "last_pause_ms": self.last_pause_ms, "max_pause_ms": self.max_pause_ms,
                "last_upload_s": self.last_upload_s, "bytes_uploaded": self.bytes_uploaded,
                "failures": self.failures, "last_error": self.last_error}


class MirrorError(FerryError):
    """Mirroring cannot go on (another writer took the prefix, a bad configuration)."""


class MirrorSkipped(FerryError):
    """This cycle was given up before the pause (the VM is busy); the next one retries."""


class Mirror:
    """Mirrors ``sources`` (device name -> tracked device) of one VM under ``layout``."""

    def __init__(self, store: ObjectStore, layout: Layout, sources: Mapping[str, TrackedSource],
                 vm: VMSide, identity: VMIdentity, *, url: str,
                 config: MirrorConfig = MirrorConfig(),
                 clock_ns: Callable[[], int] = time.time_ns,
                 busy: Callable[[], bool] = lambda: False) -> None:
        """``busy()`` true: skip this cycle (a live migration has the VM)."""
        self.store = store
        self.layout = layout
        self.sources = dict(sources)
        self.vm = vm
        self.identity = identity
        self.config = config
        self.status = MirrorStatus(url)
        self._clock_ns = clock_ns
        self._busy = busy
        self._log = log.getChild(identity.vm_id)
        self._devices: dict[str, S3Device] = {}
        self._files: dict[str, vmc.FileRef] = {}
        self._pending: dict[str, set[int]] = {}
        """Objects to copy into staging besides the dirty blocks' (all of them at first)."""
        self._cache = ObjectCache(0)  # the mirror writes whole objects: it never reads S3
        for name, src in self.sources.items():
            Layout().manifest_prefix(name)  # a valid device name
            if config.object_size_bytes % src.geometry.block_size_bytes:
                raise ConfigError(f"mirror object size must be a multiple of {name}'s "
                                  f"block size {src.geometry.block_size_bytes}")
            self._pending[name] = self._all_objects(name)
        self._unsure_devices: set[str] = set()
        self._unsure: vmc.VMCheckpoint | None = None
        """A record whose write was reported failed (it may have landed all the same)."""

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Cycle every ``interval_s`` until cancelled; S3 trouble only delays cycles."""
        delay = self.config.interval_s
        try:
            while True:
                started = time.monotonic()
                if self._busy():
                    await asyncio.sleep(self.config.interval_s)
                    continue
                try:
                    await self.cycle()
                    delay = self.config.interval_s
                except MirrorSkipped:
                    pass
                except CheckpointConflictError as exc:
                    self.status.state = "stopped"
                    self.status.last_error = str(exc)
                    raise MirrorError(f"{self.status.url}: another writer: {exc}") from exc
                except (S3Error, S3DeviceError) as exc:
                    self.status.state = "failing"
                    self.status.failures += 1
                    self.status.last_error = str(exc)
                    self._log.warning("mirror %s: checkpoint failed, the recovery point is "
                                      "now %.1f s old (the VM keeps running; retry in %.0f "
                                      "s): %s", self.status.url,
                                      self.status.recovery_point_s(), delay, exc)
                    delay = min(delay * 2, self.config.retry_max_s)
                    await asyncio.sleep(delay)
                    continue
                await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
        finally:
            await self.close()

    async def close(self) -> None:
        devices, self._devices = self._devices, {}
        for dev in devices.values():
            await dev.close(checkpoint=False)

    # -- one cycle ---------------------------------------------------------------------

    async def cycle(self) -> vmc.VMCheckpoint:
        """Copy, pause and copy, upload, write the record. Raises S3 errors (nothing
        is taken as a checkpoint then)."""
        await self._ensure_devices()
        await self.vm.flush()
        await self._copy()
        if self._busy():  # a live migration began meanwhile: it has the VM, not us
            raise MirrorSkipped("a live migration has the VM")
        paused_at = time.monotonic()
        async with self.vm.paused() as state:
            created = self._clock_ns()
            await self._copy()
        pause_ms = (time.monotonic() - paused_at) * 1e3
        self.status.last_pause_ms = round(pause_ms, 3)
        self.status.max_pause_ms = round(max(pause_ms, self.status.max_pause_ms or 0.0), 3)
        t0 = time.monotonic()
        names = list(self._devices)
        results = await asyncio.gather(*(self._devices[n].checkpoint() for n in names),
                                       return_exceptions=True)
        failed: BaseException | None = None
        for name, r in zip(names, results, strict=True):
            if isinstance(r, CheckpointConflictError):
                # Our own manifest landed though its PUT was reported failed (a timeout
                # after the write): this prefix has no other writer (checked at start).
                # Continue from the device's newest checkpoint, copying every object again
                # (locally; unchanged ones are found in the bucket, not uploaded).
                await self._devices.pop(name).close(checkpoint=False)
                self._pending[name] = self._all_objects(name)
                failed = failed or S3DeviceError(f"reopening after {r}", device=name)
            elif isinstance(r, BaseException):
                self._unsure_devices.add(name)  # its manifest may have landed all the same
                failed = failed or r
            else:
                self.status.bytes_uploaded += r.bytes_uploaded
        if failed is not None:
            raise failed
        files = dict(self._files)
        files["state"] = await asyncio.to_thread(vmc.put_blob, self.store, self.layout, state)
        await self._settle_unsure()
        record = vmc.VMCheckpoint(
            self.status.sequence + 1, created, self.identity.vm_id, self.identity.package_id,
            self.identity.manifest, files,
            {name: dev.manifest.sequence for name, dev in self._devices.items()})
        try:
            await asyncio.to_thread(vmc.write_record, self.store, self.layout, record)
        except CheckpointConflictError:
            raise  # (an S3DeviceError too) another writer's record: not ours, see run()
        except (S3Error, S3DeviceError):
            self._unsure = record  # it may have landed all the same: see _settle_unsure
            raise
        self.status.last_upload_s = round(time.monotonic() - t0, 3)
        self._completed(record)
        if self.status.state != "mirroring":
            self._log.info("mirror %s: checkpoint %d complete%s", self.status.url,
                           record.sequence, " (S3 is back)" if self.status.failures else "")
        self.status.state = "mirroring"
        self._log.debug("mirror checkpoint %d: pause %.1f ms, upload %.2f s", record.sequence,
                        pause_ms, self.status.last_upload_s)
        return record

    async def _settle_unsure(self) -> None:
        """A record whose write was reported failed may have landed all the same (a
        timeout after the write): if the bucket holds exactly it, it counts, and this
        cycle's record takes the next sequence."""
        unsure, self._unsure = self._unsure, None
        if unsure is None:
            return
        try:
            there = await asyncio.to_thread(vmc.load_record, self.store, self.layout,
                                            unsure.sequence)
        except CheckpointNotFoundError:
            return
        if there != unsure:
            raise CheckpointConflictError(f"VM checkpoint {unsure.sequence} was written by "
                                          "another writer")
        self._log.info("mirror %s: checkpoint %d had landed after all", self.status.url,
                       there.sequence)
        self._completed(there)

    def _completed(self, record: vmc.VMCheckpoint) -> None:
        self.status.sequence = record.sequence
        self.status.checkpoints += 1
        self.status.last_checkpoint_unix_s = record.created_unix_ns / 1e9

    def _all_objects(self, name: str) -> set[int]:
        return set(range(-(-self.sources[name].size_bytes // self.config.object_size_bytes)))

    async def _ensure_devices(self) -> None:
        """Make the S3 devices and upload the boot files (again after a failure)."""
        for name in sorted(self._unsure_devices):
            dev = self._devices.get(name)
            if dev is not None:
                newest = await asyncio.to_thread(list_checkpoints, self.store, name,
                                                 self.layout, newest=1)
                if newest and newest[0] != dev.manifest.sequence:
                    # Its manifest landed though reported failed: continue from it (below),
                    # copying every object again (unchanged ones are not uploaded again).
                    await self._devices.pop(name).close(checkpoint=False)
                    self._pending[name] = self._all_objects(name)
            self._unsure_devices.discard(name)
        if not self._files:
            for what in ("kernel", "initramfs"):
                data = getattr(self.identity, what)
                self._files[what] = await asyncio.to_thread(vmc.put_blob, self.store,
                                                            self.layout, data)
        for name, src in self.sources.items():
            if name in self._devices:
                continue
            kwargs: dict[str, Any] = dict(
                layout=self.layout, staging_dir=self.config.staging_dir, cache=self._cache,
                concurrency=self.config.concurrency)
            try:
                dev = await S3Device.create(
                    self.store, name, src.size_bytes,
                    block_size_bytes=src.geometry.block_size_bytes,
                    object_size_bytes=self.config.object_size_bytes, **kwargs)
            except CheckpointConflictError:
                # Made by this mirror's earlier, failed attempt (the prefix was checked
                # empty before it started): continue from it.
                dev = await S3Device.open(self.store, name, **kwargs)
            self._devices[name] = dev

    async def _copy(self) -> None:
        """Copy the objects holding dirty blocks (and pending ones) into staging."""
        size = self.config.object_size_bytes
        for name, src in self.sources.items():
            per = size // src.geometry.block_size_bytes
            todo = self._pending[name]
            todo.update(b // per for b in src.take_dirty())
            dev = self._devices[name]
            for index in sorted(todo):
                start = index * size
                data = await src.read_at(start, min(size, src.size_bytes - start))
                await dev.write_at(start, data)
                todo.discard(index)
                await asyncio.sleep(0)  # FUSE shares this loop: let guest faults through


async def check_prefix_free(store: ObjectStore, layout: Layout) -> None:
    """Refuse to mirror into a prefix that already holds a VM checkpoint."""
    found = await asyncio.to_thread(vmc.list_records, store, layout, newest=1)
    if found:
        raise MirrorError(f"s3://{store.bucket}/{layout.root} already holds a mirrored VM "
                          f"(checkpoint {found[0]}): restore it, or mirror to another prefix")


@contextlib.asynccontextmanager
async def running(mirror: Mirror) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``mirror`` in the background while the block runs."""
    task = asyncio.create_task(mirror.run(), name=f"mirror {mirror.identity.vm_id}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except FerryError as exc:
                log.error("mirror %s stopped: %s", mirror.status.url, exc)
