"""UNIX-domain socket connections and listeners, as Streams.

The listening socket file is created with mode 0600 (only our user may
connect: a migration stream carries a VM's memory and disk) and removed when
the listener closes. A socket file left behind by a crashed run is replaced;
one that a live server still answers on, or a path that is not a socket, is
refused rather than clobbered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat

from ferry.errors import BrokenResourceError, TransportError
from ferry.transport.base import Stream
from ferry.transport.listener import Handler, Listener
from ferry.transport.sockets import LISTEN_BACKLOG, SocketServer, SocketStream, connect_socket
from ferry.transport.streams import ConnectTimeoutError, describe

SOCKET_MODE = 0o600

SEND_BUFFER_BYTES = 4 * 1024 * 1024
"""Kernel send buffer asked for on every UNIX connection (the kernel caps it
at ``net.core.wmem_max``). A UNIX stream socket holds in flight only what the
sender's buffer allows, 208 KiB by default, so a 1 MiB migration frame took
several sleep/wake rounds on both sides; 4 MiB sped a 512 MiB migration up by
about 10-40 % here. Unlike TCP there is no autotuning this would disable."""


def _stream(sock: socket.socket, peer: str) -> SocketStream:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    return SocketStream(sock, peer)


def _peer_name(path: str | os.PathLike[str]) -> str:
    return f"unix:{os.fspath(path)}"


async def connect_unix(path: str | os.PathLike[str], *, timeout_s: float = 10.0) -> SocketStream:
    """Connect to the UNIX socket at ``path``."""
    peer = _peer_name(path)
    try:
        async with asyncio.timeout(timeout_s):
            sock = await connect_socket(socket.AF_UNIX, os.fspath(path))
    except TimeoutError as exc:
        raise ConnectTimeoutError(f"connect timed out after {timeout_s} s", peer=peer) from exc
    except OSError as exc:
        raise BrokenResourceError(f"connect failed: {describe(exc)}", peer=peer) from exc
    return _stream(sock, peer)


WAIT_INTERVAL_S = 0.002
"""How often :func:`socket_when_listening` retries: a QEMU that is starting creates its
sockets within milliseconds (the resume path waits on them), and each try is one cheap
syscall."""


async def socket_when_listening(path: str | os.PathLike[str], *, timeout_s: float) -> socket.socket:
    """A connected socket to ``path``, retrying while nothing listens there yet (the file
    is missing or refuses), as when QEMU is still creating its sockets. Raises
    :class:`ConnectTimeoutError` after ``timeout_s`` with the last refusal, and
    :class:`BrokenResourceError` at once for any other error."""
    peer = _peer_name(path)
    address = os.fspath(path)
    last: OSError | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    return await connect_socket(socket.AF_UNIX, address)
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    last = exc
                await asyncio.sleep(WAIT_INTERVAL_S)
    except TimeoutError as exc:
        why = describe(last) if last is not None else "no attempt finished"
        raise ConnectTimeoutError(f"nothing listened within {timeout_s} s ({why})",
                                  peer=peer) from exc
    except OSError as exc:
        raise BrokenResourceError(f"connect failed: {describe(exc)}", peer=peer) from exc


async def connect_unix_when_listening(path: str | os.PathLike[str], *,
                                      timeout_s: float) -> SocketStream:
    """:func:`connect_unix`, retrying while nothing listens at ``path`` yet."""
    return _stream(await socket_when_listening(path, timeout_s=timeout_s), _peer_name(path))


async def listen_unix(path: str | os.PathLike[str]) -> Listener[str]:
    """Bind and listen at ``path``; take connections with ``await listener.accept()``."""
    return await _listen(None, os.fspath(path))


async def serve_unix(handler: Handler, path: str | os.PathLike[str]) -> Listener[str]:
    """Bind and listen at ``path``, running ``handler(stream)`` for every connection."""
    return await _listen(handler, os.fspath(path))


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # a crashed run's leftover
        return
    except OSError as exc:
        raise TransportError(f"cannot listen on {path}: {describe(exc)}") from exc
    finally:
        probe.close()
    raise TransportError(f"cannot listen on {path}: another server is listening there")


def _bind(path: str) -> socket.socket:
    """A bound, mode-0600, not yet listening socket: nobody can connect before
    ``listen()``, so there is no window in which the file is more open."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise TransportError(f"cannot listen on {path}: {describe(exc)}") from exc
    return sock


async def _listen(handler: Handler | None, path: str) -> Listener[str]:
    async def make_stream(sock: socket.socket) -> Stream:
        return _stream(sock, _peer_name(path))

    listener: Listener[str] | None = None

    async def on_connection(sock: socket.socket) -> None:
        assert listener is not None
        await listener.on_connection(sock)

    sock = _bind(path)
    identity = os.stat(path).st_ino

    def remove_socket_file() -> None:
        # Only our own file: another server may have replaced it since.
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == identity:
                os.unlink(path)

    try:
        sock.listen(LISTEN_BACKLOG)
        server = SocketServer([sock], on_connection)
    except BaseException:
        sock.close()
        remove_socket_file()
        raise
    listener = Listener(
        server, path, make_stream, handler, on_close=remove_socket_file, label=_peer_name(path)
    )
    return listener
