"""The FUSE request handlers: a flat directory whose files are ferry devices.

``DeviceFS(devices)`` turns a mapping ``name -> Device`` into a read-write
filesystem with one regular file per device, sized like the device. It is
what QEMU maps ``MAP_SHARED`` as guest RAM (``memory-backend-file,share=on``):
the kernel page cache sits in front (writeback cache, ``keep_cache``), the
guest's stores dirty pages there, and the kernel writes them back through
:meth:`DeviceFS.write` whenever its dirty limits are crossed or someone calls
``fsync`` (see :mod:`ferry.expose.fuse.mount` for the flush contract).

The file set is fixed: no create, unlink, rename or resize. Timestamps may be
set (the kernel does so itself in writeback-cache mode) and an ``ftruncate``
to the current size is accepted because QEMU issues one on some paths.

Device errors are translated here, once, into errno values for the caller of
the system call; anything else that escapes a device (a bug) is logged and
answered with ``EIO`` rather than killing the FUSE main loop, which is what
pyfuse3 would do with a non-``FUSEError`` exception.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pyfuse3

from ferry.errors import DeviceClosedError, DeviceError, DeviceRangeError, ReadOnlyError
from ferry.storage.device import Device

log = logging.getLogger(__name__)

ATTR_TIMEOUT_S = 3600.0
"""How long the kernel may cache names and attributes. The file set and sizes
never change while mounted, so there is nothing to revalidate."""

BLOCK_SIZE_BYTES = 4096
"""``st_blksize``/``f_bsize`` reported to the kernel: the page size, the unit
the page cache writes back in."""

_FILE_MODE = stat.S_IFREG | 0o600
_DIR_MODE = stat.S_IFDIR | 0o755


@dataclass(slots=True)
class IoCounters:
    """Bytes and requests that reached one device through the filesystem."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    fsyncs: int = 0
    largest_write_bytes: int = 0


@dataclass(slots=True)
class _File:
    name: str
    inode: int
    device: Device
    counters: IoCounters
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def _errno_for(exc: BaseException) -> int:
    """The errno a device exception becomes for the process that issued the I/O."""
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    cause: BaseException | None = exc
    while cause is not None:  # a full disk surfaces as an OSError somewhere in the chain
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause.errno
        cause = cause.__cause__
    if isinstance(exc, DeviceRangeError):
        return errno.EINVAL
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


class DeviceFS(pyfuse3.Operations):
    """pyfuse3 operations exposing ``devices`` as files of a flat directory.

    Inode numbers are assigned in sorted name order starting at 2 (1 is the
    root). Handlers run concurrently in pyfuse3's worker tasks, so a read
    that waits for remote data does not hold up other requests.
    """

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, devices: Mapping[str, Device]) -> None:
        super().__init__()
        now = time.time_ns()
        self._files: dict[int, _File] = {}
        self._by_name: dict[bytes, _File] = {}
        for index, name in enumerate(sorted(devices)):
            if not name or "/" in name or "\0" in name or name in (".", ".."):
                raise ValueError(f"invalid device file name {name!r}")
            f = _File(name, pyfuse3.ROOT_INODE + 1 + index, devices[name], IoCounters(),
                      now, now, now)
            self._files[f.inode] = f
            self._by_name[os.fsencode(name)] = f
        self._mount_ns = now
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._active: set[asyncio.Task[object]] = set()
        self._aborting = False

    # -- API for FuseMount -------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Device file names, in inode order."""
        return [f.name for f in self._files.values()]

    def counters(self, name: str) -> IoCounters:
        """Live I/O counters of the file ``name`` (KeyError if unknown)."""
        return self._by_name[os.fsencode(name)].counters

    def file_inode(self, name: str) -> tuple[int, Device]:
        """The inode number and device of the file ``name`` (KeyError if unknown)."""
        f = self._by_name[os.fsencode(name)]
        return f.inode, f.device

    def abort_requests(self) -> None:
        """Fail every in-flight and future request with ``EIO``.

        Used at unmount so a read stuck waiting for data that will never
        arrive cannot keep pyfuse3's main loop (and so the unmount) alive.
        """
        self._aborting = True
        for task in list(self._active):
            task.cancel()

    @contextmanager
    def _request(self, what: str, f: _File | None = None) -> Iterator[None]:
        """Track the handler's task and translate failures into FUSEError."""
        if self._aborting:
            raise pyfuse3.FUSEError(errno.EIO)
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except asyncio.CancelledError:
            if not self._aborting or task is None:
                raise
            # Our own abort_requests(): answer the kernel instead of dying so
            # pyfuse3's worker exits cleanly; the cancel request is consumed.
            task.uncancel()
            log.warning("%s on %s aborted by unmount", what, f.name if f else "/")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (DeviceError, OSError) as exc:
            code = _errno_for(exc)
            level = logging.DEBUG if isinstance(exc, DeviceClosedError) else logging.ERROR
            log.log(level, "%s on %s failed (%s): %s", what, f.name if f else "/",
                    errno.errorcode.get(code, code), exc)
            raise pyfuse3.FUSEError(code) from exc
        except Exception as exc:
            log.exception("%s on %s: unexpected error", what, f.name if f else "/")
            raise pyfuse3.FUSEError(errno.EIO) from exc
        finally:
            if task is not None:
                self._active.discard(task)

    # -- helpers -------------------------------------------------------------

    def _file(self, inode: int) -> _File:
        try:
            return self._files[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = ATTR_TIMEOUT_S
        attr.attr_timeout = ATTR_TIMEOUT_S
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = BLOCK_SIZE_BYTES
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = _DIR_MODE
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mount_ns
        else:
            f = self._file(inode)
            attr.st_mode = _FILE_MODE
            attr.st_nlink = 1
            attr.st_size = f.device.size_bytes
            attr.st_blocks = -(-f.device.size_bytes // 512)
            attr.st_atime_ns = f.atime_ns
            attr.st_mtime_ns = f.mtime_ns
            attr.st_ctime_ns = f.ctime_ns
        return attr

    # -- metadata ------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        f = self._by_name.get(name)
        if f is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(f.inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        f = self._file(inode)
        if fields.update_size and attr.st_size != f.device.size_bytes:
            # Devices have a fixed size; only a no-op truncate (QEMU) is allowed.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_atime:
            f.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            f.mtime_ns = attr.st_mtime_ns
        f.ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        return self._attrs(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The offset handed back to us is the inode of the last entry returned.
        for inode, f in self._files.items():
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(f.name), self._attrs(inode), inode):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        total = sum(f.device.size_bytes for f in self._files.values())
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLOCK_SIZE_BYTES
        st.f_frsize = BLOCK_SIZE_BYTES
        st.f_blocks = -(-total // BLOCK_SIZE_BYTES)
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self._files) + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # Creating, removing and renaming files are not part of the model.
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- data ------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        f = self._file(inode)
        if flags & os.O_TRUNC and f.device.size_bytes:
            raise pyfuse3.FUSEError(errno.EPERM)
        # keep_cache: opening the file again (a flush, a second QEMU) must not
        # drop the pages the guest is using; only we write the device.
        return pyfuse3.FileInfo(fh=inode, direct_io=False, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._file(fh)
        length = max(0, min(size, f.device.size_bytes - off))
        if length == 0:
            return b""
        with self._request("read", f):
            data = await f.device.read_at(off, length)
        f.counters.reads += 1
        f.counters.bytes_read += length
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._file(fh)
        if off + len(buf) > f.device.size_bytes:
            # The kernel owns i_size in writeback-cache mode and may let a
            # write past the end into the page cache; the device cannot grow.
            log.error("write of %d bytes at %d beyond %s (%d bytes)",
                      len(buf), off, f.name, f.device.size_bytes)
            raise pyfuse3.FUSEError(errno.EFBIG)
        with self._request("write", f):
            await f.device.write_at(off, buf)
        f.counters.writes += 1
        f.counters.bytes_written += len(buf)
        f.counters.largest_write_bytes = max(f.counters.largest_write_bytes, len(buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        # close(): the kernel has already written the dirty pages back before
        # sending FLUSH; durability is fsync's job, so close stays cheap.
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._file(fh)
        with self._request("fsync", f):
            await f.device.flush()
        f.counters.fsyncs += 1

    async def release(self, fh: int) -> None:
        return None
