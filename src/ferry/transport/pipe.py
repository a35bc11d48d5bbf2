"""Streams over pairs of file descriptors: os.pipe pairs, our own stdio, and
a child process's stdin/stdout.

This is how ferry runs over ssh without opening a port:
``subprocess_stream(["ssh", host, "ferry", "receive", "--stdio"])`` on one
side, :func:`stdio_stream` inside ``ferry receive --stdio`` on the other.
EOF is per direction: ``send_eof`` closes the write descriptor, and the peer
reads ``b""`` once it has read everything before it. A reader that goes away
makes our ``send_all`` raise BrokenResourceError (EPIPE; Python ignores
SIGPIPE), a writer that goes away shows as ``b""``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence

from ferry.errors import TransportError
from ferry.transport.streams import READER_LIMIT_BYTES, AsyncioStream, describe


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def fd_stream(read_fd: int, write_fd: int, peer: str) -> AsyncioStream:
    """A Stream reading ``read_fd`` and writing ``write_fd``; it owns (and will
    close) both. They must be pipes, sockets or character devices, not the
    same descriptor; they are switched to non-blocking mode."""
    if read_fd == write_fd:
        raise TransportError("fd_stream needs two distinct descriptors", peer=peer)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READER_LIMIT_BYTES, loop=loop)
    read_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    # The writer needs a protocol that also tracks close (for wait_closed); its
    # reader half is unused.
    write_protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop)
    try:
        read_file = os.fdopen(read_fd, "rb", buffering=0)
    except OSError as exc:
        _close_fds(read_fd, write_fd)
        raise TransportError(f"bad read descriptor {read_fd}: {describe(exc)}", peer=peer) from exc
    try:
        write_file = os.fdopen(write_fd, "wb", buffering=0)
    except OSError as exc:
        read_file.close()
        _close_fds(write_fd)
        raise TransportError(f"bad write descriptor {write_fd}: {describe(exc)}",
                             peer=peer) from exc
    try:
        read_transport, _ = await loop.connect_read_pipe(lambda: read_protocol, read_file)
    except (OSError, ValueError) as exc:
        read_file.close()
        write_file.close()
        raise TransportError(f"cannot read from descriptor: {exc}", peer=peer) from exc
    try:
        write_transport, _ = await loop.connect_write_pipe(lambda: write_protocol, write_file)
    except (OSError, ValueError) as exc:
        read_transport.close()
        write_file.close()
        raise TransportError(f"cannot write to descriptor: {exc}", peer=peer) from exc
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    return AsyncioStream(reader, writer, peer, also_close=[read_transport])


async def stdio_stream(*, protect_stdio: bool = True) -> AsyncioStream:
    """A Stream over this process's stdin (read) and stdout (write).

    With ``protect_stdio`` (the default) fd 1 is pointed at stderr and fd 0 at
    /dev/null once the stream has its own copies, so a stray ``print`` or a
    library reading stdin cannot corrupt the protocol stream.
    """
    read_fd = os.dup(0)
    write_fd = os.dup(1)
    if protect_stdio:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
        os.dup2(2, 1)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null_fd, 0)
        finally:
            os.close(null_fd)
    return await fd_stream(read_fd, write_fd, peer="stdio")


async def subprocess_stream(
    argv: Sequence[str], *, peer: str | None = None
) -> tuple[AsyncioStream, asyncio.subprocess.Process]:
    """Start ``argv`` and return a Stream over its stdin/stdout, plus the process.

    The child's stderr is inherited (ssh prints its errors there). The caller
    owns the process: ``aclose`` the stream, then ``await process.wait()``
    (or kill it). Raises TransportError if the command cannot be started.
    """
    if not argv:
        raise TransportError("subprocess_stream needs a command")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=to_child_r, stdout=from_child_w
        )
    except OSError as exc:
        _close_fds(to_child_w, from_child_r)
        raise TransportError(f"cannot start {argv[0]}: {describe(exc)}") from exc
    finally:
        _close_fds(to_child_r, from_child_w)  # the child has its own copies
    name = peer or f"subprocess:{os.path.basename(argv[0])}[{process.pid}]"
    try:
        stream = await fd_stream(from_child_r, to_child_w, peer=name)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return stream, process
