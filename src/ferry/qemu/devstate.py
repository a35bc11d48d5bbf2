"""Moving QEMU's device state (the migration stream without RAM) through ferry.

QEMU writes the stream to a ``unix:`` socket ferry listens on
(:func:`receive_stream`) and reads it from a socket QEMU listens on
(:func:`send_stream`). A ``unix:`` socket rather than ``exec:`` because a
forked helper closing its copy of the RAM file's descriptor would trigger a
full FUSE flush (docs/fuse.md).

Stored in a ferry device, the stream is framed so its length is known::

    offset 0   8 bytes  magic b"FERRYDS1"
    offset 8   8 bytes  payload length, unsigned big-endian
    offset 16  payload  QEMU's migration stream (starts with b"QEVM")

In a plain file it is stored as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ferry.aio import cancel_and_wait
from ferry.errors import BrokenResourceError
from ferry.qemu.errors import DeviceStateError
from ferry.storage.device import Device
from ferry.transport.streams import ConnectTimeoutError
from ferry.transport.unix import socket_when_listening

MAGIC = b"FERRYDS1"
_HEADER = struct.Struct(">8sQ")
HEADER_BYTES = _HEADER.size

MAX_STATE_BYTES = 64 * 1024 * 1024
"""Cap on a device-state stream. Without RAM it is ~50 KB for a microvm;
devices with big buffers (a VGA framebuffer, not used here) add megabytes.
Anything near the cap means RAM leaked into the stream (x-ignore-shared
not set or RAM not shared): refuse it instead of filling memory."""

_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class DeviceStateStats:
    """What one save or load moved and how long it took."""

    state_bytes: int
    migrate_s: float
    """QMP ``migrate``/``migrate-incoming`` until QEMU reports completed."""
    flush_bytes: int = 0
    """Guest RAM bytes the pre-save flush pushed into the memory device."""
    flush_s: float = 0.0
    total_s: float = 0.0


class StreamReceiver:
    """Accepts one connection on a UNIX socket and collects it until EOF."""

    def __init__(self, sock: socket.socket, vm: str) -> None:
        self._sock = sock
        self._vm = vm
        self._task = asyncio.create_task(self._collect(), name=f"devstate-receive {vm}")

    async def _collect(self) -> bytes:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        data = bytearray()
        with conn:
            conn.setblocking(False)
            while True:
                chunk = await loop.sock_recv(conn, _CHUNK_BYTES)
                if not chunk:
                    return bytes(data)
                data += chunk
                if len(data) > MAX_STATE_BYTES:
                    raise DeviceStateError(f"device state exceeds {MAX_STATE_BYTES} bytes "
                                           "(is RAM in the stream?)", vm=self._vm)

    async def result(self, timeout_s: float) -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(self._task)
        except TimeoutError as exc:
            raise DeviceStateError(f"device state stream did not end within {timeout_s} s",
                                   vm=self._vm) from exc

    async def aclose(self) -> None:
        await cancel_and_wait(self._task, swallow_errors=True)


@contextlib.asynccontextmanager
async def receive_stream(path: Path, *, vm: str) -> AsyncIterator[StreamReceiver]:
    """Listen on ``path`` for QEMU's outgoing migration; yields the receiver."""
    unlink_quietly(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(1)
        sock.setblocking(False)
        receiver = StreamReceiver(sock, vm)
        try:
            yield receiver
        finally:
            await receiver.aclose()
    finally:
        sock.close()
        unlink_quietly(path)


async def send_stream(path: Path, data: bytes, *, vm: str, timeout_s: float) -> None:
    """Connect to QEMU's incoming socket at ``path`` (retrying until it listens),
    send ``data`` and close."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            try:
                sock = await socket_when_listening(path, timeout_s=timeout_s)
            except ConnectTimeoutError as exc:
                raise TimeoutError from exc
            except BrokenResourceError as exc:
                raise DeviceStateError(f"feeding the device state failed: {exc}", vm=vm) from exc
            with sock:
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
    except TimeoutError as exc:
        raise DeviceStateError(f"could not feed the device state to {path} within "
                               f"{timeout_s} s", vm=vm) from exc
    except OSError as exc:
        raise DeviceStateError(f"feeding the device state failed: {exc}", vm=vm) from exc


async def store(dest: Path | Device, data: bytes, *, vm: str) -> None:
    """Write a captured stream to a file (as is) or a device (framed)."""
    if isinstance(dest, Path):
        await asyncio.to_thread(dest.write_bytes, data)
    else:
        await _store_in_device(dest, data, vm=vm)


async def _store_in_device(dest: Device, data: bytes, *, vm: str) -> None:
    if HEADER_BYTES + len(data) > dest.size_bytes:
        raise DeviceStateError(f"device of {dest.size_bytes} bytes cannot hold "
                               f"{len(data)} bytes of device state", vm=vm)
    await dest.write_at(0, _HEADER.pack(MAGIC, len(data)) + data)
    await dest.flush()


async def load(src: Path | Device | bytes, *, vm: str) -> bytes:
    """Read a stream stored by :func:`store` (or take ``bytes`` as is)."""
    if isinstance(src, bytes):
        return src
    if isinstance(src, Path):
        try:
            return await asyncio.to_thread(src.read_bytes)
        except OSError as exc:
            raise DeviceStateError(f"cannot read device state: {exc}", vm=vm) from exc
    return await _load_from_device(src, vm=vm)


async def _load_from_device(src: Device, *, vm: str) -> bytes:
    if src.size_bytes < HEADER_BYTES:
        raise DeviceStateError("device too small for a device-state header", vm=vm)
    magic, length = _HEADER.unpack(await src.read_at(0, HEADER_BYTES))
    if magic != MAGIC:
        raise DeviceStateError(f"no device state in device (magic {magic!r})", vm=vm)
    if length > MAX_STATE_BYTES or HEADER_BYTES + length > src.size_bytes:
        raise DeviceStateError(f"device-state length {length} is invalid", vm=vm)
    return await src.read_at(HEADER_BYTES, length)


def unlink_quietly(path: Path) -> None:
    """Remove a stale socket file; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
