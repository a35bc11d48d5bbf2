"""A block device stored in S3: lazy reads, local staging, checkpoints.

Theory of operation. The device is cut into objects of ``object_size_bytes``
(4 MiB by default; the last may be short). Under a *root* prefix of a bucket::

    <root>objects/<sha256 hex>                       one object's bytes, named by their hash
    <root>devices/<name>/<2**64-1-sequence:020d>.manifest
                                                     one checkpoint (:mod:`ferry.s3.manifest`);
                                                     names count down: newest listed first

*Reads* of an object come from the local staging file if this process wrote
it, else from the newest checkpoint: a hole reads as zeros without a request,
a stored object is fetched whole, checked against its SHA-256 and kept in a
bytes-bounded LRU (:class:`~ferry.s3.cache.ObjectCache`). *Writes* go to a
sparse staging file (an object written in part is first fetched into it) and
mark the object dirty; nothing is uploaded until :meth:`S3Device.checkpoint`.

A *checkpoint* uploads each dirty object under its hash, unless the bucket
already holds that hash (deduplication: across checkpoints, devices and VMs
under one root), then writes the manifest, last and create-only
(``If-None-Match: *``). So:

* a manifest is only ever written after every object it names, and S3 makes
  each PUT atomic: there is no torn checkpoint, whatever is interrupted when;
* an interrupted checkpoint leaves the previous manifest the newest one, and
  its objects untouched (an object is never overwritten by other content: its
  name is its content); the uploaded orphans are harmless;
* two writers that race for the same sequence cannot both win: the second
  gets :class:`~ferry.s3.errors.CheckpointConflictError`.

Writes during a checkpoint do not wait for it: the checkpoint is of the moment
it started. When a write reaches a dirty object the running checkpoint has not
read yet, the object's bytes of that moment are first copied aside (the
*frozen* file) and the checkpoint uploads those; the write makes the object
dirty again for the next checkpoint.

Local files (staging, frozen) are unlinked as soon as they are opened, so a
crash leaves nothing behind; writes after the last checkpoint are lost in a
crash, as a disk's volatile cache is: :meth:`S3Device.flush` checkpoints.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, Self, TypeVar

from ferry.buffers import Buffer
from ferry.errors import ConfigError, DeviceClosedError
from ferry.s3 import manifest as mf
from ferry.s3.cache import ObjectCache
from ferry.s3.errors import (
    CheckpointConflictError,
    CheckpointNotFoundError,
    ManifestFormatError,
    ObjectCorruptError,
    ObjectMissingError,
    S3ConflictError,
    S3DeviceError,
    S3Error,
    S3NotFoundError,
    S3ObjectTooLargeError,
)
from ferry.s3.store import ObjectStore
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, check_range
from ferry.storage.providers.file import FileDevice

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_CONCURRENCY = 8
"""S3 requests at once: objects uploaded by a checkpoint, objects fetched by one read.
S3 throughput comes from parallel requests (each is a round trip plus a transfer);
8 x 4 MiB keeps 32 MiB in flight, which bounds what a checkpoint holds in memory."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MANIFEST_NAME = re.compile(r"(\d{20})\.manifest")
MAX_SEQUENCE = 2**64 - 1
"""The manifest's u64 sequence field; names hold ``MAX_SEQUENCE - sequence`` in 20 digits."""
HINT_CHECKPOINTS = 3
"""A malformed newest manifest's error names this many older checkpoints to open instead."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a root's objects and manifests live in the bucket."""

    root: str = "ferry/"

    def __post_init__(self) -> None:
        if self.root and not self.root.endswith("/"):
            raise ConfigError(f"S3 root prefix {self.root!r} must be empty or end with '/'")

    def object_key(self, digest: bytes) -> str:
        return f"{self.root}objects/{digest.hex()}"

    def manifest_prefix(self, device: str) -> str:
        if not _NAME.fullmatch(device):
            raise ConfigError(f"device name {device!r}: use 1-128 of A-Z a-z 0-9 . _ - "
                              "(starting with a letter or digit)")
        return f"{self.root}devices/{device}/"

    def manifest_key(self, device: str, sequence: int) -> str:
        """Names count *down* (``MAX_SEQUENCE - sequence``): S3 lists keys in ascending
        order, so the newest checkpoint is the first key listed, whatever the history."""
        if not 1 <= sequence <= MAX_SEQUENCE:
            raise ConfigError(f"checkpoint sequence {sequence} outside 1..{MAX_SEQUENCE}")
        return f"{self.manifest_prefix(device)}{MAX_SEQUENCE - sequence:020d}.manifest"

    def sequence_of(self, device: str, key: str) -> int | None:
        """The sequence a manifest key names, or None if it is not a manifest's key."""
        prefix = self.manifest_prefix(device)
        match = _MANIFEST_NAME.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if match is None or int(match.group(1)) >= MAX_SEQUENCE:
            return None
        return MAX_SEQUENCE - int(match.group(1))


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """What one checkpoint did (deduplicated bytes were not uploaded: the bucket had them)."""

    device: str
    sequence: int
    created_unix_ns: int
    objects_dirty: int
    objects_uploaded: int
    bytes_uploaded: int
    objects_deduplicated: int
    bytes_deduplicated: int
    holes: int
    manifest_bytes: int
    duration_s: float


def list_checkpoints(store: ObjectStore, device: str, layout: Layout = Layout(), *,
                     newest: int | None = None) -> list[int]:
    """Sequence numbers of ``device``'s checkpoints in the bucket, newest first; with
    ``newest``, only that many keys are listed (one request, however long the history)."""
    found = []
    for info in store.list(layout.manifest_prefix(device), limit=newest):
        sequence = layout.sequence_of(device, info.key)
        if sequence is None:
            log.warning("%s: ignoring %s: not a manifest name", device, info.key)
            continue
        found.append(sequence)
    return found


def load_manifest(store: ObjectStore, device: str, sequence: int,
                  layout: Layout = Layout()) -> mf.Manifest:
    """Read and decode one checkpoint's manifest (bounded by ``MAX_MANIFEST_BYTES``)."""
    key = layout.manifest_key(device, sequence)
    try:
        raw = store.get(key, max_bytes=mf.MAX_MANIFEST_BYTES)
    except S3NotFoundError as exc:
        raise CheckpointNotFoundError(f"no checkpoint {sequence}: {exc}",
                                      device=device) from exc
    except S3ObjectTooLargeError as exc:
        raise ManifestFormatError(str(exc), device=device, key=key) from exc
    try:
        manifest = mf.decode(raw, key=key)
    except ManifestFormatError as exc:
        raise ManifestFormatError(exc.detail, device=device, key=key) from exc
    if manifest.sequence != sequence:
        raise ManifestFormatError(f"holds sequence {manifest.sequence}, its name says "
                                  f"{sequence}", device=device, key=key)
    return manifest


class S3Device:
    """A :class:`~ferry.storage.device.Device` whose checkpoints live in S3.

    Make one with :meth:`create` (a new device: checkpoint 1, all zeros) or
    :meth:`open` (the newest checkpoint, or ``sequence``). ``cache`` may be shared
    by devices of one event loop. Every S3 call runs in one of the device's
    ``concurrency`` threads.
    """

    def __init__(self, store: ObjectStore, name: str, manifest: mf.Manifest, *,
                 layout: Layout, staging_dir: Path | None, cache: ObjectCache | None,
                 concurrency: int, clock_ns: Callable[[], int]) -> None:
        if concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        layout.manifest_prefix(name)  # a valid name (it is also part of local file names)
        self.store = store
        self.name = name
        self.layout = layout
        self.cache = cache if cache is not None else ObjectCache()
        self.concurrency = concurrency
        self._clock_ns = clock_ns
        self._manifest = manifest
        self._log = log.getChild(name)
        self._dir = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())
        self._staging: FileDevice | None = self._scratch("staging")
        self._frozen: FileDevice | None = None
        self._staged: set[int] = set()
        self._dirty: set[int] = set()
        self._pending: set[int] = set()
        self._captured: set[int] = set()
        self._known: set[bytes] = set()
        """Digests this process saw in the bucket (uploaded, found, or read and verified)."""
        self._uploading: dict[bytes, asyncio.Event] = {}
        self._fetching: dict[bytes, asyncio.Event] = {}
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self._checkpoint_lock = asyncio.Lock()
        self._zeros = bytes(manifest.object_size_bytes)
        # Threads of its own for the blocking S3 calls: asyncio's default pool has
        # cpu_count + 4 threads for the whole process (6 on 2 cores), fewer than the
        # requests a checkpoint keeps in flight, and shared with every other to_thread.
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix=f"ferry-s3-{name}")
        self.fetched_objects = 0
        self.fetched_bytes = 0

    # -- making one ---------------------------------------------------------

    @classmethod
    async def create(cls, store: ObjectStore, name: str, size_bytes: int, *,
                     layout: Layout = Layout(),
                     block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
                     object_size_bytes: int = mf.DEFAULT_OBJECT_SIZE_BYTES,
                     staging_dir: Path | None = None, cache: ObjectCache | None = None,
                     concurrency: int = DEFAULT_CONCURRENCY,
                     clock_ns: Callable[[], int] = time.time_ns) -> S3Device:
        """A new all-zero device: writes its checkpoint 1 (every object a hole).

        A device of that name under ``layout`` must not exist yet
        (:class:`CheckpointConflictError` otherwise; nothing is changed).
        """
        mf.check_geometry(size_bytes, block_size_bytes, object_size_bytes)
        existing = await asyncio.to_thread(list_checkpoints, store, name, layout, newest=1)
        if existing:
            raise CheckpointConflictError(f"already exists in s3://{store.bucket}/"
                                          f"{layout.manifest_prefix(name)} (newest "
                                          f"checkpoint {existing[0]})", device=name)
        first = mf.Manifest(1, clock_ns(), size_bytes, block_size_bytes, object_size_bytes,
                            (None,) * mf.object_count(size_bytes, object_size_bytes))
        await cls._put_manifest(store, name, layout, first)
        return cls(store, name, first, layout=layout, staging_dir=staging_dir, cache=cache,
                   concurrency=concurrency, clock_ns=clock_ns)

    @classmethod
    async def open(cls, store: ObjectStore, name: str, *, layout: Layout = Layout(),
                   sequence: int | None = None, staging_dir: Path | None = None,
                   cache: ObjectCache | None = None,
                   concurrency: int = DEFAULT_CONCURRENCY,
                   clock_ns: Callable[[], int] = time.time_ns) -> S3Device:
        """The device as of its newest checkpoint (or checkpoint ``sequence``).

        A malformed newest manifest is an error, not a silent step back to an
        older one: the message names the older checkpoints that ``sequence``
        can open instead.
        """
        if sequence is None:
            found = await asyncio.to_thread(list_checkpoints, store, name, layout,
                                            newest=1 + HINT_CHECKPOINTS)
            if not found:
                raise CheckpointNotFoundError(
                    f"no checkpoint in s3://{store.bucket}/{layout.manifest_prefix(name)}",
                    device=name)
            want, older = found[0], found[1:]
        else:
            want, older = sequence, []
        try:
            manifest = await asyncio.to_thread(load_manifest, store, name, want, layout)
        except ManifestFormatError as exc:
            if not older:
                raise
            raise ManifestFormatError(f"{exc.detail}; older checkpoints: {older} (open one "
                                      "with sequence=)", device=name, key=exc.key) from exc
        return cls(store, name, manifest, layout=layout, staging_dir=staging_dir, cache=cache,
                   concurrency=concurrency, clock_ns=clock_ns)

    def _scratch(self, what: str) -> FileDevice:
        fd, path = tempfile.mkstemp(prefix=f".ferry-s3-{self.name}.", suffix=f".{what}",
                                    dir=self._dir)
        os.close(fd)
        try:
            dev = FileDevice(path, size_bytes=self._manifest.size_bytes, create=True,
                             name=f"{self.name}:{what}")
        finally:
            os.unlink(path)  # held open only: nothing is left behind by a crash
        return dev

    # -- the Device interface -------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._manifest.size_bytes

    @property
    def manifest(self) -> mf.Manifest:
        """The newest checkpoint this device has read or written."""
        return self._manifest

    @property
    def dirty_objects(self) -> int:
        """Objects written since the last checkpoint."""
        return len(self._dirty)

    def _staging_file(self) -> FileDevice:
        if self._staging is None:
            raise DeviceClosedError("device is closed", device=self.name)
        return self._staging

    def _span(self, index: int, offset: int, end: int) -> tuple[int, int, int]:
        """(object start, start, end) of the part of [offset, end) inside object ``index``."""
        start = index * self._manifest.object_size_bytes
        return start, max(offset, start), min(end, start + self._manifest.object_length(index))

    def _objects(self, offset: int, length: int) -> range:
        osz = self._manifest.object_size_bytes
        return range(offset // osz, -(-(offset + length) // osz)) if length else range(0)

    async def read_at(self, offset: int, length: int) -> bytes:
        self._staging_file()
        check_range(self.size_bytes, offset, length, self.name)
        objects = self._objects(offset, length)
        wanted = {d: self._manifest.object_length(i) for i in objects
                  if i not in self._staged and (d := self._manifest.objects[i]) is not None}
        fetched = await self._fetch_many(wanted)
        staging = self._staging_file()  # closed meanwhile?
        out = bytearray(length)
        end = offset + length
        for i in objects:
            ostart, s, e = self._span(i, offset, end)
            if i in self._staged:  # (perhaps since the fetch: then it is newer)
                out[s - offset:e - offset] = staging.read_sync(s, e - s)
            elif (digest := self._manifest.objects[i]) is not None:
                out[s - offset:e - offset] = memoryview(fetched[digest])[s - ostart:e - ostart]
            # else a hole: already zeros
        return bytes(out)

    async def write_at(self, offset: int, data: Buffer) -> None:
        self._staging_file()
        view = memoryview(data).cast("B")
        check_range(self.size_bytes, offset, len(view), self.name)
        end = offset + len(view)
        for i in self._objects(offset, len(view)):
            ostart, s, e = self._span(i, offset, end)
            whole = s == ostart and e - s == self._manifest.object_length(i)
            if i not in self._staged and not whole:
                await self._stage_in(i)
            # From here to the end of the iteration nothing awaits: the object is
            # captured (if a checkpoint needs its old bytes), written, marked, as one step.
            staging = self._staging_file()
            self._capture(i)
            staging.write_sync(s, view[s - offset:e - offset])
            self._staged.add(i)
            self._dirty.add(i)

    async def flush(self) -> None:
        """Checkpoint, if anything was written since the last one: S3 is where this
        device's writes become durable."""
        self._staging_file()
        await self._settle()

    async def _call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in this device's S3 threads."""
        self._staging_file()  # closed: its threads are gone
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def _settle(self) -> None:
        """Return once every write made before the call is in a checkpoint."""
        while self._dirty or self._checkpoint_lock.locked():
            if self._dirty:
                await self.checkpoint()
            else:  # a running checkpoint holds the last writes: wait for it to end
                async with self._checkpoint_lock:
                    pass

    async def close(self, *, checkpoint: bool = True) -> None:
        """Checkpoint what was written (unless ``checkpoint=False``), then drop the local
        files. The local files go even if the checkpoint fails (the error is raised)."""
        if self._staging is None:
            return
        try:
            if checkpoint:
                await self._settle()
        finally:
            staging, frozen, self._staging, self._frozen = self._staging, self._frozen, None, None
            for scratch in (staging, frozen):
                if scratch is not None:  # (None: a concurrent close got there first)
                    scratch.close_sync()
            # Requests still running (a cancelled checkpoint's) finish in their threads;
            # nothing waits for them, and nothing more is queued.
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # After an error, do not try to upload on the way out: just drop local state.
        await self.close(checkpoint=exc is None)

    # -- reading objects ------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, index: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(index, (asyncio.Lock(), 0))
        self._locks[index] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[index]
            if users == 1:
                del self._locks[index]
            else:
                self._locks[index] = (lock, users - 1)

    async def _stage_in(self, index: int) -> None:
        """Put object ``index``'s checkpointed bytes into the staging file."""
        async with self._locked(index):
            if index in self._staged:
                return
            digest = self._manifest.objects[index]
            if digest is None:  # a hole: the sparse staging file already reads zeros
                self._staged.add(index)
                return
            data = await self._fetch(digest, self._manifest.object_length(index))
            if index in self._staged:  # a whole-object write landed while we fetched
                return
            self._staging_file().write_sync(index * self._manifest.object_size_bytes, data)
            self._staged.add(index)

    async def _fetch_many(self, wanted: dict[bytes, int]) -> dict[bytes, bytes]:
        """Objects ``{digest: length}``, fetched ``concurrency`` at a time."""
        if len(wanted) <= 1:
            return {d: await self._fetch(d, n) for d, n in wanted.items()}
        got: dict[bytes, bytes] = {}
        work = iter(wanted.items())

        async def fetcher() -> None:
            for digest, length in work:
                got[digest] = await self._fetch(digest, length)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.concurrency, len(wanted))):
                    tg.create_task(fetcher())
        except BaseExceptionGroup as group:
            first = _first_error(group)
            if isinstance(first, Exception):
                raise first from first.__cause__
            raise
        return got

    async def _fetch(self, digest: bytes, length: int) -> bytes:
        """Object ``digest`` of ``length`` bytes, verified, through the cache; one
        request at a time per object (a second reader waits for the first)."""
        while (claim := self._fetching.get(digest)) is not None:
            await claim.wait()
        data = self.cache.get(digest)
        if data is not None:
            return data
        self._fetching[digest] = claim = asyncio.Event()
        try:
            data = await self._get_verified(digest, length)
        finally:
            del self._fetching[digest]
            claim.set()
        return data

    async def _get_verified(self, digest: bytes, length: int) -> bytes:
        key = self.layout.object_key(digest)
        try:
            data = await self._call(self.store.get, key, max_bytes=length)
        except S3NotFoundError as exc:
            raise ObjectMissingError(f"named by checkpoint {self._manifest.sequence} but not "
                                     f"in the bucket ({exc})", device=self.name,
                                     key=key) from exc
        except S3ObjectTooLargeError as exc:
            raise ObjectCorruptError(f"larger than the {length} bytes its checkpoint says "
                                     f"({exc})", device=self.name, key=key) from exc
        except S3Error as exc:
            raise S3DeviceError(f"reading object {key}: {exc}", device=self.name) from exc
        if len(data) != length:
            raise ObjectCorruptError(f"{len(data)} bytes, its checkpoint says {length}: "
                                     "truncated", device=self.name, key=key)
        if hashlib.sha256(data).digest() != digest:
            raise ObjectCorruptError("content does not match its SHA-256: corrupted or "
                                     "tampered; not used", device=self.name, key=key)
        self.fetched_objects += 1
        self.fetched_bytes += length
        self._known.add(digest)
        self.cache.put(digest, data)
        return data

    # -- checkpoints -----------------------------------------------------------

    def _capture(self, index: int) -> None:
        """Before object ``index`` changes: keep its bytes for the running checkpoint."""
        if index not in self._pending or index in self._captured:
            return
        if self._frozen is None:
            self._frozen = self._scratch("frozen")
        start = index * self._manifest.object_size_bytes
        length = self._manifest.object_length(index)
        self._frozen.write_sync(start, self._staging_file().read_sync(start, length))
        self._captured.add(index)

    def _take(self, index: int) -> bytes:
        """Object ``index`` as of the running checkpoint's start (and the checkpoint
        no longer needs it protected)."""
        start = index * self._manifest.object_size_bytes
        length = self._manifest.object_length(index)
        if index in self._captured:
            if self._frozen is None:
                raise DeviceClosedError("device closed during a checkpoint", device=self.name)
            data = self._frozen.read_sync(start, length)
        else:
            data = self._staging_file().read_sync(start, length)
        self._pending.discard(index)
        return data

    def _digest_or_hole(self, data: bytes) -> bytes | None:
        if data == self._zeros[:len(data)]:
            return None
        return hashlib.sha256(data).digest()

    async def checkpoint(self) -> CheckpointReport:
        """Upload what changed since the last checkpoint, then its manifest (last).

        On failure or cancellation nothing is taken as a checkpoint: the previous
        one stays the newest in the bucket and the writes stay dirty here, for the
        next attempt. Raises :class:`CheckpointConflictError` if another writer
        made this sequence first, :class:`S3DeviceError` (from the S3 error) if S3
        failed.
        """
        async with self._checkpoint_lock:
            self._staging_file()
            started = time.monotonic()
            dirty = sorted(self._dirty)
            self._dirty = set()
            self._pending = set(dirty)
            self._captured = set()
            objects = list(self._manifest.objects)
            counts = {"uploaded": 0, "up_bytes": 0, "dedup": 0, "dedup_bytes": 0, "holes": 0}
            work: Iterator[int] = iter(dirty)

            async def uploader() -> None:
                for index in work:  # shared iterator: each object goes to one uploader
                    data = self._take(index)
                    digest = await self._call(self._digest_or_hole, data)
                    objects[index] = digest
                    if digest is None:
                        counts["holes"] += 1
                    elif await self._upload(digest, data):
                        counts["uploaded"] += 1
                        counts["up_bytes"] += len(data)
                    else:
                        counts["dedup"] += 1
                        counts["dedup_bytes"] += len(data)

            new = None
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.concurrency, len(dirty))):
                        tg.create_task(uploader())
                old = self._manifest
                new = mf.Manifest(old.sequence + 1, self._clock_ns(), old.size_bytes,
                                  old.block_size_bytes, old.object_size_bytes, tuple(objects))
                manifest_bytes = await self._put_manifest(self.store, self.name, self.layout,
                                                          new)
            except BaseException as exc:
                self._dirty |= set(dirty)  # still to be uploaded
                first = _first_error(exc)
                self._log.warning("checkpoint %d failed; checkpoint %d stays the newest: %s",
                                  self._manifest.sequence + 1, self._manifest.sequence, first)
                if first is not exc and isinstance(first, Exception):
                    raise first from first.__cause__  # one uploader's error, not a group
                raise
            finally:
                self._pending = set()
                self._captured = set()
                if self._frozen is not None:
                    self._frozen.close_sync()
                    self._frozen = None
            self._manifest = new
        report = CheckpointReport(
            self.name, new.sequence, new.created_unix_ns, len(dirty), counts["uploaded"],
            counts["up_bytes"], counts["dedup"], counts["dedup_bytes"], counts["holes"],
            manifest_bytes, time.monotonic() - started)
        self._log.info("checkpoint %d: %d objects changed, %d uploaded (%d bytes), %d "
                       "already stored (%d bytes), %d holes", new.sequence, len(dirty),
                       report.objects_uploaded, report.bytes_uploaded,
                       report.objects_deduplicated, report.bytes_deduplicated, report.holes)
        return report

    async def _upload(self, digest: bytes, data: bytes) -> bool:
        """Make sure the bucket holds ``data`` under ``digest``; True if it was uploaded,
        False if it was there already (deduplicated)."""
        while (claim := self._uploading.get(digest)) is not None:
            await claim.wait()  # another uploader has the same content in flight
        if digest in self._known:
            return False
        key = self.layout.object_key(digest)
        self._uploading[digest] = claim = asyncio.Event()
        try:
            size = await self._call(self.store.size_of, key)
            uploaded = size != len(data)
            if uploaded:  # absent, or a wrong-sized leftover: same name, right content
                await self._call(self.store.put, key, data)
            self._known.add(digest)
        except S3Error as exc:
            raise S3DeviceError(f"uploading {key}: {exc}", device=self.name) from exc
        finally:
            del self._uploading[digest]
            claim.set()
        return uploaded

    @staticmethod
    async def _put_manifest(store: ObjectStore, name: str, layout: Layout,
                            manifest: mf.Manifest) -> int:
        key = layout.manifest_key(name, manifest.sequence)
        raw = mf.encode(manifest)
        try:
            await asyncio.to_thread(store.put, key, raw, create_only=True)
        except S3ConflictError as exc:
            raise CheckpointConflictError(
                f"checkpoint {manifest.sequence} was written by another writer first; "
                "reopen the device to continue from it", device=name) from exc
        except S3Error as exc:
            raise S3DeviceError(f"writing manifest {key}: {exc}", device=name) from exc
        return len(raw)

    async def verify(self) -> int:
        """Check that the bucket holds every object of the current checkpoint, at the
        right size (HEAD requests; content is checked on every read). Returns the
        number of distinct objects checked; raises :class:`ObjectMissingError` or
        :class:`ObjectCorruptError` for the first bad one."""
        sizes: dict[bytes, int] = {}
        for i, digest in enumerate(self._manifest.objects):
            if digest is not None:
                sizes[digest] = self._manifest.object_length(i)
        for digest, length in sizes.items():
            key = self.layout.object_key(digest)
            try:
                size = await self._call(self.store.size_of, key)
            except S3Error as exc:
                raise S3DeviceError(f"checking {key}: {exc}", device=self.name) from exc
            if size is None:
                raise ObjectMissingError(f"named by checkpoint {self._manifest.sequence} but "
                                         "not in the bucket", device=self.name, key=key)
            if size != length:
                raise ObjectCorruptError(f"{size} bytes, its checkpoint says {length}",
                                         device=self.name, key=key)
        return len(sizes)


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
