"""The launch exchange: what a destination needs before the migration protocol starts.

The migration protocol moves devices; to start QEMU with ``-incoming`` the
destination also needs the VM's manifest (machine, CPU model, device set),
its kernel and initramfs, and the forwards the VM had. The source sends them
on the same connection, right before the migration's Hello::

    source                                        destination
    OFFER  {vm_id, manifest, forwards, boot}  ->
                                              <-  NEED  {"need": ["kernel", ...]}
    kernel / initramfs bytes (those asked for) ->
                                              <-  READY {"ok": true} | {"ok": false, "error"}
    ... migration protocol (Hello ...) ...
                                              <-  REPORT (a Custom event after the last
                                                  CompletedAck: the destination's report)

A registry start prefixes one frame, destination -> registry: ``{"package": NAME}``.

Frames: ``b"FLX1"``, u32 big-endian length, UTF-8 JSON object; at most
:data:`MAX_FRAME_BYTES`. Boot files are raw bytes of the sizes the offer
states (at most :data:`MAX_BOOT_FILE_BYTES` each), checked against their
SHA-256 and cached on the destination by it, so a host that already has them
(every hop after the first) asks for nothing. Reads never go beyond what the
exchange announced, so the migration codec gets the stream from Hello on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import BrokenResourceError, RemoteProtocolError
from ferry.net import PortForward, Proto
from ferry.protocol.messages import EventKind
from ferry.transport.base import Stream
from ferry.vm.manifest import VMManifest

MAGIC = b"FLX1"
_HEAD = struct.Struct(">4sI")
MAX_FRAME_BYTES = 1024 * 1024
"""A manifest is ~2 KB; the cap keeps a hostile peer from filling memory."""
MAX_BOOT_FILE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
BOOT_FILES = ("kernel", "initramfs")
REPORT_KIND = EventKind.APPLICATION + 1
"""Custom event kind of the destination's report, sent after the last CompletedAck."""
REPORT_SEQUENCE = 0xFFFF_FFF0


@dataclass(frozen=True, slots=True)
class BootFile:
    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Offer:
    """What the source says about the VM before the devices move."""

    vm_id: str
    manifest: VMManifest
    forwards: tuple[PortForward, ...]
    boot: tuple[BootFile, ...]
    origin: str = "migration"
    """``migration`` (a running VM) or ``registry`` (a package, pure post-copy)."""

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id, "manifest": self.manifest.to_json(),
                "origin": self.origin,
                "forwards": [[f.host, f.host_port, f.guest_port, f.proto.value]
                             for f in self.forwards],
                "boot": [[b.name, b.sha256, b.size_bytes] for b in self.boot]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Offer:
        try:
            boot = tuple(BootFile(str(n), str(h), int(s)) for n, h, s in data["boot"])
            if sorted(b.name for b in boot) != sorted(BOOT_FILES):
                raise ValueError(f"boot files {[b.name for b in boot]}")
            for b in boot:
                if not 0 < b.size_bytes <= MAX_BOOT_FILE_BYTES or len(b.sha256) != 64:
                    raise ValueError(f"boot file {b.name}: bad size or hash")
            return cls(vm_id=str(data["vm_id"]), manifest=VMManifest.from_json(data["manifest"]),
                       origin=str(data.get("origin", "migration")),
                       forwards=tuple(PortForward(str(h), int(hp), int(gp), Proto(p))
                                      for h, hp, gp, p in data["forwards"]),
                       boot=boot)
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed launch offer: {exc}") from exc

    def boot_file(self, name: str) -> BootFile:
        return next(b for b in self.boot if b.name == name)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def boot_files(manifest: VMManifest, directory: Path) -> dict[str, Path]:
    """Where the kernel and initramfs of ``manifest`` are, in its package directory."""
    return {"kernel": directory / manifest.kernel, "initramfs": directory / manifest.initramfs}


def describe_boot(files: dict[str, Path]) -> tuple[BootFile, ...]:
    return tuple(BootFile(n, sha256_file(p), p.stat().st_size) for n, p in files.items())


# -- framing -------------------------------------------------------------------------------

def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise RemoteProtocolError(f"launch frame of {len(body)} bytes is too large")
    return _HEAD.pack(MAGIC, len(body)) + body


async def receive_exactly(stream: Stream, n: int) -> bytes:
    """Exactly ``n`` bytes (never more: what follows belongs to the migration codec)."""
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(min(CHUNK_BYTES, n - len(out)))
        if not data:
            raise BrokenResourceError("the peer closed the connection during the launch "
                                      "exchange", peer=stream.peer)
        out += data
    return bytes(out)


async def send_frame(stream: Stream, obj: dict[str, Any]) -> None:
    await stream.send_all(encode_frame(obj))


async def receive_frame(stream: Stream) -> dict[str, Any]:
    magic, length = _HEAD.unpack(await receive_exactly(stream, _HEAD.size))
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad launch frame magic {magic!r} (not a ferry peer?)")
    if length > MAX_FRAME_BYTES:
        raise RemoteProtocolError(f"launch frame of {length} bytes is too large")
    try:
        obj = json.loads(await receive_exactly(stream, length))
    except ValueError as exc:
        raise RemoteProtocolError(f"launch frame is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError("launch frame is not a JSON object")
    return obj


# -- the two sides ------------------------------------------------------------------------

async def send_offer(stream: Stream, offer: Offer, files: dict[str, Path]) -> None:
    """Source: send the offer and the boot files the destination lacks; wait for READY.

    Raises :class:`RemoteProtocolError` if the destination refused the VM.
    """
    await send_frame(stream, offer.to_json())
    need = (await receive_frame(stream)).get("need", [])
    if not isinstance(need, list) or not set(need) <= set(BOOT_FILES):
        raise RemoteProtocolError(f"bad NEED {need!r}")
    for name in need:
        await stream.send_all(await asyncio.to_thread(files[name].read_bytes))
    ready = await receive_frame(stream)
    if not ready.get("ok"):
        raise RemoteProtocolError(f"the destination refused the VM: {ready.get('error')}")


async def receive_offer(stream: Stream, cache_dir: Path) -> tuple[Offer, dict[str, Path]]:
    """Destination: read the offer, fetch missing boot files into ``cache_dir`` (by SHA-256).

    Returns the offer and where its kernel and initramfs are on this host.
    The caller answers with :func:`send_ready` once it can take the VM.
    """
    offer = Offer.from_json(await receive_frame(stream))
    paths = {b.name: cache_dir / b.sha256 for b in offer.boot}
    need = await asyncio.to_thread(_missing, cache_dir, paths)
    await send_frame(stream, {"need": need})
    for name in need:
        b = offer.boot_file(name)
        data = await receive_exactly(stream, b.size_bytes)
        if hashlib.sha256(data).hexdigest() != b.sha256:
            raise RemoteProtocolError(f"boot file {name} does not match its SHA-256")
        await asyncio.to_thread(_store, paths[name], data)
    return offer, paths


def _missing(cache_dir: Path, paths: dict[str, Path]) -> list[str]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [name for name, path in paths.items() if not path.is_file()]


def _store(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


async def send_ready(stream: Stream, error: str | None = None) -> None:
    await send_frame(stream, {"ok": error is None, "error": error})
