"""Mounting a :class:`DeviceFS` inside the caller's asyncio loop.

``async with FuseMount(mountpoint, devices) as m:`` mounts the devices as
files, serves FUSE requests from a task of the running loop (next to the
migrator and the NBD server), and unmounts on the way out, also when the body
raises or is cancelled.

Theory of operation::

    QEMU (MAP_SHARED)        kernel page cache           this loop
    guest store  ──────────▶  dirty page  ──writeback──▶  DeviceFS.write ─▶ device
    guest fault  ◀──────────  cached page ◀──read──────── DeviceFS.read  ◀─ device

The page cache is the guest's RAM; the device only learns about a store when
the kernel writes the page back: when the mount's dirty limit is crossed
(see :mod:`ferry.expose.fuse.bdi`), after ``dirty_expire_centisecs``, or on
``fsync``. :meth:`FuseMount.flush` is the msync of this design: it fsyncs the
file from a worker thread, which makes the kernel push *every* dirty page of
the file through the daemon (whoever dirtied it) and then ``device.flush()``.
When it returns, the device holds everything the guest wrote before the call.

Deadlock freedom: the fsync blocks its thread until the daemon, running in
*this* loop, has answered the writes. The loop only awaits the thread's
future, so it keeps serving requests. Never touch the mount with blocking
calls from the loop's own thread; use a thread or another process.

Limits: pyfuse3 keeps its session in module globals, so one process serves
at most one FuseMount at a time (a second one raises SessionBusyError). Put
all of a VM's devices into one mount, or run more mounts in more processes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pyfuse3
import pyfuse3.asyncio

from ferry.buffers import Buffer
from ferry.expose.fuse.bdi import NO_TUNING, BdiTuner, BdiTuning, bdi_dir
from ferry.expose.fuse.errors import (
    DaemonError,
    FlushError,
    FuseError,
    MountError,
    SessionBusyError,
)
from ferry.expose.fuse.filesystem import DeviceFS, IoCounters
from ferry.storage.device import Device

log = logging.getLogger(__name__)

FSNAME = "ferry"
"""The mount's source in /proc/mounts; how a stale ferry mount is recognised."""

DEFAULT_MAX_TASKS = 64
"""Upper bound on pyfuse3 worker tasks, i.e. on FUSE requests handled at once.
A request waiting for remote data holds one worker; the kernel itself keeps
at most ``max_background`` (12) writeback/readahead requests in flight plus
one synchronous request per blocked thread, so 64 leaves ample headroom."""

DEFAULT_BDI_TUNING = BdiTuning()

_session_owner: FuseMount | None = None
"""The FuseMount holding pyfuse3's process-wide session, if any."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the fields ferry needs."""

    mountpoint: str
    dev: int
    fstype: str
    source: str

    @property
    def is_ferry(self) -> bool:
        return self.fstype.startswith("fuse") and (
            self.source == FSNAME or self.fstype == f"fuse.{FSNAME}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount at exactly ``mountpoint`` (an absolute path), if any."""
    target = os.path.abspath(mountpoint)
    found: MountEntry | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or _unescape(fields[4]) != target:
                continue
            major, _, minor = fields[2].partition(":")
            fstype, source = [*right.split(), "", ""][:2]
            found = MountEntry(target, os.makedev(int(major), int(minor)),
                               fstype, _unescape(source))
    return found


async def lazy_unmount(mountpoint: str) -> None:
    """Detach ``mountpoint`` now; the kernel frees it when its last user leaves."""
    proc = await asyncio.create_subprocess_exec(
        "fusermount3", "-u", "-z", mountpoint,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0 and find_mount(mountpoint) is not None:
        raise MountError(f"fusermount3 -u -z failed: {err.decode().strip()}",
                         mountpoint=mountpoint)


async def clean_stale_mount(mountpoint: str, *, probe_timeout_s: float = 5.0,
                            owner_dead: bool = False) -> bool:
    """Lazily unmount a dead ferry mount left at ``mountpoint`` by a crashed run.

    Returns True if one was removed. A *live* mount (its daemon answers) or a
    mount that is not ferry's is left alone and reported as MountError: it is
    someone else's. With ``owner_dead`` (the caller knows the process that served
    it has died) a mount that does not answer is a wedged one (see
    :func:`abort_connection`): its connection is aborted and it is removed.
    """
    entry = find_mount(mountpoint)
    if entry is None:
        return False
    if not entry.is_ferry:
        raise MountError(f"already mounted ({entry.fstype} from {entry.source})",
                         mountpoint=mountpoint)
    try:
        # statfs always reaches the daemon; stat may be answered from cached attributes.
        await asyncio.wait_for(asyncio.to_thread(os.statvfs, mountpoint), probe_timeout_s)
    except TimeoutError as exc:  # (before OSError: TimeoutError is one)
        if not owner_dead:
            raise MountError("an existing ferry mount does not answer",
                             mountpoint=mountpoint) from exc
        log.warning("%s: a dead daemon's mount does not answer: aborting it", mountpoint)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECONNREFUSED):
            raise MountError(f"cannot probe existing mount: {exc}",
                             mountpoint=mountpoint) from exc
    else:
        raise MountError("a live ferry mount is already here", mountpoint=mountpoint)
    log.warning("%s: removing stale ferry mount (daemon gone)", mountpoint)
    await asyncio.to_thread(abort_connection, entry.dev)
    await lazy_unmount(mountpoint)
    return True


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(dev: int) -> bool:
    """Abort the FUSE connection of the mount with device number ``dev`` (fusectl's
    ``abort``; fusectl is mounted if it is not). Returns whether it was aborted.

    Why: a daemon's death normally aborts its connection, but not while one of its
    threads is stuck in the kernel on its own mount. A holder SIGKILLed during an
    ``fsync`` of guest RAM (a flush: mirror checkpoints do one a second) stays a zombie
    with that thread waiting for writeback only the daemon could answer; QEMU then
    hangs in ``fuse_page_mkwrite`` (state D) and neither ever exits. Aborting ends every
    request with an error, and both go.
    """
    control = FUSECTL / str(os.minor(dev)) / "abort"
    if not control.parent.exists():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=False,
                       capture_output=True, timeout=10)
    try:
        control.write_text("1")
    except OSError as exc:
        log.debug("cannot abort FUSE connection %d: %s", os.minor(dev), exc)
        return False
    return True


@dataclass(frozen=True, slots=True)
class FlushStats:
    """What one :meth:`FuseMount.flush` pushed through the daemon."""

    name: str
    bytes_written: int
    duration_s: float


PRELOAD_CHUNK_BYTES = 1 << 20
"""A good size for :meth:`FuseMount.preload` chunks (that of QEMU's own huge-page
readahead requests): per-call overhead vanishes, a chunk stays cheap to check for zeros."""


@dataclass(frozen=True, slots=True)
class PreloadStats:
    """What one :meth:`FuseMount.preload` put into the page cache."""

    name: str
    bytes_stored: int
    bytes_zero: int
    """All-zero chunks skipped (a fault on them still goes through the daemon)."""
    duration_s: float


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FuseMount:
    """A mounted :class:`DeviceFS` served from the current asyncio loop.

    ``allow_other`` lets other users (QEMU under another uid) open the files.
    ``bdi`` tunes the mount's writeback limits (restored before unmount).
    ``ready_timeout_s`` bounds the wait for the kernel's first request.
    ``unmount_flush_timeout_s`` bounds the final flush of dirty pages.
    """

    def __init__(
        self,
        mountpoint: str | os.PathLike[str],
        devices: Mapping[str, Device],
        *,
        allow_other: bool = False,
        bdi: BdiTuning = DEFAULT_BDI_TUNING,
        max_tasks: int = DEFAULT_MAX_TASKS,
        ready_timeout_s: float = 10.0,
        unmount_flush_timeout_s: float = 60.0,
    ) -> None:
        if max_tasks < 2:
            raise ValueError("max_tasks must be >= 2 so a waiting read cannot block the mount")
        self.mountpoint = os.path.abspath(mountpoint)
        self._fs = DeviceFS(devices)
        self._allow_other = allow_other
        self._bdi = bdi
        self._max_tasks = max_tasks
        self._ready_timeout_s = ready_timeout_s
        self._unmount_flush_timeout_s = unmount_flush_timeout_s
        self._tuner: BdiTuner | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._session = False

    # -- public API ------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self._fs.names

    def path(self, name: str) -> Path:
        """The file of device ``name`` on the mount (KeyError if unknown)."""
        self._fs.counters(name)
        return Path(self.mountpoint) / name

    def counters(self, name: str) -> IoCounters:
        """Bytes and requests that reached device ``name`` through the daemon."""
        return self._fs.counters(name)

    @property
    def bdi_dir(self) -> Path | None:
        """The mount's /sys/class/bdi directory while mounted."""
        return self._tuner.directory if self._tuner else None

    async def flush(self, name: str) -> FlushStats:
        """Push every dirty page of ``name`` through the daemon and flush the device.

        Returns the bytes that reached the device during the call (writes by a
        guest still running are included) and how long it took. Raises
        FlushError if the kernel reports a failed writeback (``EIO`` ...).
        """
        self._require_mounted()
        counters = self._fs.counters(name)
        before = counters.bytes_written
        start = time.monotonic()
        try:
            # Open, fsync and close all block on the daemon: keep them off the loop.
            await asyncio.to_thread(_fsync_file, str(self.path(name)))
        except OSError as exc:
            raise FlushError(f"fsync failed: {exc}", name=name) from exc
        stats = FlushStats(name, counters.bytes_written - before, time.monotonic() - start)
        log.debug("flushed %s: %d bytes in %.1f ms", name, stats.bytes_written,
                  stats.duration_s * 1e3)
        return stats

    async def preload(self, name: str, chunks: Iterable[tuple[int, Buffer]]) -> PreloadStats:
        """Put ``(offset, data)`` chunks of file ``name`` into the kernel's page cache.

        The daemon pushes the data with FUSE_NOTIFY_STORE: no request, no
        round trip, so a later page fault or read of those pages (QEMU's, on
        a resumed guest) is served from memory instead of through the daemon.
        The caller supplies the data (it knows where the device's bytes
        already are, e.g. a mapping of an immutable base file: the kernel then
        copies straight from it). ``chunks`` is consumed in a worker thread
        (the store itself runs without the GIL) so the loop keeps serving
        requests; all-zero chunks are skipped.

        Only call it while nothing has *written* those pages through the mount
        (before the guest runs): a store replaces a cached page even if it is
        dirty. Raises FuseError if the kernel refuses a store or a chunk lies
        beyond the file (a store there would grow it).
        """
        self._require_mounted()
        inode, device = self._fs.file_inode(name)
        # The kernel only takes stores for an inode it knows: look the file up
        # (a stat opens no descriptor, so a concurrent fork cannot flush it).
        await asyncio.to_thread(os.stat, self.path(name))
        stats = await asyncio.to_thread(self._store, name, inode, device.size_bytes, chunks)
        log.debug("preloaded %s: %d bytes (%d zero skipped) in %.1f ms", name,
                  stats.bytes_stored, stats.bytes_zero, stats.duration_s * 1e3)
        return stats

    def _store(self, name: str, inode: int, size_bytes: int,
               chunks: Iterable[tuple[int, Buffer]]) -> PreloadStats:
        start = time.monotonic()
        stored = zero = 0
        zeros = b""
        for offset, data in chunks:
            with memoryview(data) as view:
                n = view.nbytes
                if offset < 0 or offset + n > size_bytes:
                    raise FuseError(f"{self.mountpoint}/{name}: preload chunk {offset}+{n} "
                                    f"is outside the file ({size_bytes} bytes)")
                if len(zeros) != n:
                    zeros = bytes(n)
                if zeros.startswith(view):  # a memcmp; ``view == zeros`` goes byte by byte
                    zero += n
                    continue
                try:
                    # Typed as bytes, but pyfuse3 takes any contiguous buffer.
                    pyfuse3.notify_store(inode, offset, view)  # type: ignore[arg-type]
                except OSError as exc:
                    raise FuseError(f"{self.mountpoint}/{name}: the kernel refused a "
                                    f"page-cache store at {offset}: {exc}") from exc
                stored += n
        return PreloadStats(name, stored, zero, time.monotonic() - start)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        global _session_owner
        if _session_owner is not None:
            raise SessionBusyError(
                f"this process already serves {_session_owner.mountpoint}; pyfuse3 allows "
                "one mount per process", mountpoint=self.mountpoint)
        _session_owner = self
        try:
            await clean_stale_mount(self.mountpoint)
            if not await asyncio.to_thread(os.path.isdir, self.mountpoint):
                raise MountError("mountpoint is not a directory", mountpoint=self.mountpoint)
            await self._mount()
        except BaseException:
            await self._teardown(flush=False)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._teardown(flush=True, exc=exc)
        except BaseException as raised:
            if raised is exc:
                # The TaskGroup hands back the very exception it was given. Raising it
                # again from here, when this mount is an AsyncExitStack callback, makes
                # contextlib link it into its own __context__ chain and then loop
                # forever walking that chain (Ctrl-C hung at 100% CPU). Returning lets
                # the original exception propagate unchanged.
                return
            raise

    async def _mount(self) -> None:
        options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions"}
        if self._allow_other:
            options.add("allow_other")
        pyfuse3.asyncio.enable()
        try:
            pyfuse3.init(self._fs, self.mountpoint, options)
        except RuntimeError as exc:
            raise MountError(f"pyfuse3.init failed: {exc}", mountpoint=self.mountpoint) from exc
        self._session = True
        entry = find_mount(self.mountpoint)
        if entry is None:
            raise MountError("mount did not appear in /proc/self/mountinfo",
                             mountpoint=self.mountpoint)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._main = self._tg.create_task(self._serve(), name=f"fuse {self.mountpoint}")
        try:
            # The kernel sends INIT and then our STATFS; an answer means the
            # daemon is serving, not just that the mount syscall succeeded.
            await asyncio.wait_for(asyncio.to_thread(os.statvfs, self.mountpoint),
                                   self._ready_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise MountError(f"mount does not answer: {exc!r}",
                             mountpoint=self.mountpoint) from exc
        if self._bdi != NO_TUNING:
            self._tuner = BdiTuner(bdi_dir(entry.dev))
            self._tuner.apply(self._bdi)
        log.info("mounted %s with %s", self.mountpoint, ", ".join(self._fs.names))

    async def _serve(self) -> None:
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=self._max_tasks)
        except Exception as exc:
            log.exception("FUSE main loop for %s failed", self.mountpoint)
            raise DaemonError(f"FUSE main loop for {self.mountpoint} failed: {exc}") from exc

    def _require_mounted(self) -> None:
        if self._main is None or self._main.done():
            raise MountError("not mounted", mountpoint=self.mountpoint)

    async def _final_flush(self) -> None:
        for name in self._fs.names:
            try:
                await asyncio.wait_for(self.flush(name), self._unmount_flush_timeout_s)
            except (FlushError, TimeoutError) as exc:
                log.error("final flush of %s failed, unwritten guest data is lost: %r",
                          name, exc)

    async def _teardown(self, *, flush: bool, exc: BaseException | None = None) -> None:
        """Unmount and release everything; safe to call in any partial state."""
        global _session_owner
        cancelled: asyncio.CancelledError | None = None
        try:
            if flush and self._main is not None and not self._main.done():
                try:
                    await self._final_flush()
                except asyncio.CancelledError as c:
                    cancelled = c  # finish unmounting first, then re-raise
            if self._tuner is not None:
                self._tuner.restore()
                self._tuner = None
            if self._session:
                self._fs.abort_requests()
                pyfuse3.terminate()
            if self._main is not None:
                # pyfuse3.close() frees the session its workers use: they must
                # all have returned first, even if we are being cancelled.
                while not self._main.done():
                    try:
                        await asyncio.wait({self._main})
                    except asyncio.CancelledError as c:
                        cancelled = c
            if self._session:
                self._session = False
                try:
                    pyfuse3.close(unmount=True)
                except Exception:
                    log.exception("pyfuse3.close failed for %s", self.mountpoint)
                # Only ever detach a mount we made (never another daemon's).
                entry = find_mount(self.mountpoint)
                if entry is not None and entry.is_ferry:
                    log.warning("%s still mounted after close, detaching", self.mountpoint)
                    await lazy_unmount(self.mountpoint)
            if self._tg is not None:
                tg, self._tg = self._tg, None
                # Hand the TaskGroup only our own cancellation (a failed daemon
                # cancels the body), so it turns that into the daemon's error;
                # any other body exception propagates unchanged.
                if isinstance(exc, asyncio.CancelledError):
                    await tg.__aexit__(type(exc), exc, exc.__traceback__)
                else:
                    await tg.__aexit__(None, None, None)
        finally:
            was_mounted = self._main is not None
            self._main = None
            if _session_owner is self:
                _session_owner = None
            if was_mounted:
                log.info("unmounted %s", self.mountpoint)
        if cancelled is not None:
            raise cancelled
