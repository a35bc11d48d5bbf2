"""Read replies served straight from the file behind a device.

A device that can say where its bytes live in a file (the optional
``file_extent(offset, length) -> (fd, file_offset) | None`` capability of
``FileDevice``, forwarded by decorator modules that leave reads alone) lets
the server skip ``read_at``:

* small reads are ``os.pread`` on the event loop, with no task and no
  coroutine per request, and their replies go out together in one
  ``sendmsg`` (batched by the connection loop in ``server.py``);
* large reads go from the page cache to the socket with ``os.sendfile``,
  so the data never passes through Python: one kernel copy fewer than
  ``pread`` + ``sendmsg``, and on a UNIX socket none on our side at all.

A device without the capability, or a decorator that changes reads (a
waiting cache that must wait for absent blocks, a lock, read tracking)
answers ``None`` and its reads go through ``read_at`` as before.

Consistency: like ``pread``, a ``sendfile`` that has to wait for room in the
socket may send a range while a write to it lands, so a READ that overlaps a
concurrent WRITE can see a mix of old and new data. The NBD spec leaves the
result of overlapping requests in flight unspecified, and a disk behaves the
same way.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ferry.expose.nbd.errors import NBDReplyAbortedError

INLINE_READ_MAX_BYTES = 128 * 1024
"""Reads up to this size are answered inline with ``pread``: a page-cache hit
costs microseconds, less than a task, and the bytes are copied once more than
with ``sendfile`` but the reply joins a batch sent with one system call.
Larger ones use ``sendfile``, where saving a copy outweighs a system call."""

FileExtent = Callable[[int, int], "tuple[int, int] | None"]


@runtime_checkable
class FileBacked(Protocol):
    """A device that can point at the file holding its bytes (optional capability)."""

    def file_extent(self, offset: int, length: int) -> tuple[int, int] | None: ...


def file_extent_of(device: object) -> FileExtent | None:
    """``device.file_extent`` if the device offers it, else ``None``."""
    if isinstance(device, FileBacked):
        return device.file_extent
    return None


def pread_exact(fd: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes at ``offset`` of ``fd``, or ``None`` if the file is shorter.

    ``None`` sends the caller back to ``read_at``, which reports the problem
    as a device error.
    """
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            return None
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


async def wait_writable(loop: asyncio.AbstractEventLoop, sock_fd: int) -> None:
    """Return once ``sock_fd`` has room for more bytes."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock_fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock_fd)


async def sendfile_all(
    loop: asyncio.AbstractEventLoop, sock_fd: int, fd: int, offset: int, length: int
) -> None:
    """Send ``length`` bytes at ``offset`` of ``fd`` to the non-blocking ``sock_fd``.

    The caller holds the connection's send lock, so nothing else is written
    between the reply header and these bytes. Raises
    :class:`NBDReplyAbortedError` if the file ends early; ``OSError`` from
    the socket (the client left) passes through.
    """
    end = offset + length
    while offset < end:
        try:
            sent = os.sendfile(sock_fd, fd, offset, end - offset)
        except BlockingIOError:
            await wait_writable(loop, sock_fd)
            continue
        if sent == 0:
            raise NBDReplyAbortedError(
                f"file ended at {offset}, {end - offset} bytes short of a read reply"
            )
        offset += sent
