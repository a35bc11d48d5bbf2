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
    ... migration protocol (Hello ... the last CompletedAck) ...
    ... report exchange in these frames (:mod:`ferry.live.report_exchange`) ...

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
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import (
    BrokenResourceError,
    ConfigError,
    DeadlineError,
    FerryError,
    FrameTooLargeError,
    RemoteProtocolError,
)
from ferry.live import checks
from ferry.live.bootcache import BootCache, BootCacheFullError, check_sha256
from ferry.live.errors import RefusedError
from ferry.live.rampath import RamPath
from ferry.net import PortForward, Proto
from ferry.net.service import check_service_address
from ferry.transport.base import Stream
from ferry.vm.labels import check_labels
from ferry.vm.manifest import VMManifest
from ferry.vm.registry import check_vm_id
from ferry.vm.safepath import safe_join

MAGIC = b"FLX1"
_HEAD = struct.Struct(">4sI")
MAX_FRAME_BYTES = 1024 * 1024
"""A manifest is ~2 KB; the cap keeps a hostile peer from filling memory."""
MAX_BOOT_FILE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 30.0
"""A peer silent this long inside the launch exchange is dropped (a live source answers
in milliseconds; a boot file arrives in 1 MiB chunks)."""
BOOT_FILES = ("kernel", "initramfs")


@dataclass(frozen=True, slots=True)
class BootFile:
    name: str
    sha256: str
    size_bytes: int


MAX_FORWARDS = 64
MAX_DISKS = 16
MAX_DEVICE_BYTES = 16 * 1024**4
MAX_TEXT_BYTES = checks.MAX_TEXT_BYTES
MAX_HOOKS = 32
ORIGINS = ("migration", "registry")


@dataclass(frozen=True, slots=True)
class Offer:
    """What the source says about the VM before the devices move."""

    vm_id: str
    manifest: VMManifest
    forwards: tuple[PortForward, ...]
    boot: tuple[BootFile, ...]
    origin: str = "migration"
    """``migration`` (a running VM) or ``registry`` (a package, pure post-copy)."""
    ram: RamPath = RamPath.ENGINE
    """How guest RAM travels: in QEMU's stream (the link is then a
    :class:`~ferry.transport.mux.Mux` of the channel and that stream) or as a device."""
    package: str | None = None
    """The id of the package the VM's devices overlay (the SHA-256 of its signed header).
    A destination whose package cache holds it builds the devices over its own copy
    and receives only the blocks the VM changed (:mod:`ferry.vm.overlays`)."""
    labels: dict[str, str] = field(default_factory=dict)
    """The VM's labels (:mod:`ferry.vm.labels`), kept by the destination."""
    service_address: str | None = None
    """The VM's service address (docs/networking.md), which follows it to the destination."""

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id, "manifest": self.manifest.to_json(),
                "origin": self.origin, "ram": self.ram.value, "package": self.package,
                "labels": dict(self.labels),
                "service_address": self.service_address,
                "forwards": [[f.host, f.host_port, f.guest_port, f.proto.value]
                             for f in self.forwards],
                "boot": [[b.name, b.sha256, b.size_bytes] for b in self.boot]}

    @classmethod
    def from_json(cls, data: object) -> Offer:
        """Validate every field of a peer's offer; RemoteProtocolError names the first bad one.

        Nothing is allocated from the offer's numbers here; the bounds above
        keep what the destination later makes from it (QEMU's RAM, device
        stacks, boot cache files, forwards) within what a host can hold.
        """
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            boot = tuple(_boot_file(item) for item in _list(data, "boot", len(BOOT_FILES)))
            if sorted(b.name for b in boot) != sorted(BOOT_FILES):
                raise ValueError(f"boot files {[b.name for b in boot]}")
            forwards = tuple(_forward(item) for item in _list(data, "forwards", MAX_FORWARDS))
            origin = checks.text(data.get("origin", "migration"), "origin")
            if origin not in ORIGINS:
                raise ValueError(f"origin {origin!r}")
            ram_text = checks.text(data.get("ram", RamPath.ENGINE.value), "ram")
            try:
                ram = RamPath(ram_text)
            except ValueError:
                raise ValueError(f"ram {ram_text!r:.40}") from None
            if ram is RamPath.AUTO:
                raise ValueError("ram 'auto' (the source chooses before it offers)")
            if ram is RamPath.QEMU and origin != "migration":
                raise ValueError("RAM in QEMU's stream needs a running VM at the source")
            package = data.get("package")
            if package is not None:
                try:
                    package = check_sha256(package, "package id")
                except RemoteProtocolError as exc:
                    raise ValueError(str(exc)) from None
            try:
                labels = check_labels(data.get("labels", {}))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            service_address = data.get("service_address")
            if service_address is not None:
                service_address = check_service_address(
                    checks.text(service_address, "service_address"))
            manifest = VMManifest.from_json(data.get("manifest"))
            _check_bounds(manifest)
            vm_id = check_vm_id(checks.text(data.get("vm_id"), "vm_id"))
            return cls(vm_id=vm_id, manifest=manifest, origin=origin, forwards=forwards,
                       boot=boot, ram=ram, package=package, labels=labels,
                       service_address=service_address)
        except RemoteProtocolError:
            raise
        except (KeyError, TypeError, ValueError, FerryError) as exc:
            raise RemoteProtocolError(f"malformed launch offer: {exc}") from exc

    def boot_file(self, name: str) -> BootFile:
        return next(b for b in self.boot if b.name == name)


def _list(data: dict[str, Any], key: str, max_items: int) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list) or len(value) > max_items:
        raise ValueError(f"{key} must be a list of at most {max_items} items")
    return value


def _boot_file(item: object) -> BootFile:
    if not isinstance(item, list) or len(item) != 3:
        raise ValueError("a boot file is [name, sha256, size]")
    name, sha, size = item
    if name not in BOOT_FILES:
        raise ValueError(f"boot file name {name!r:.40}")
    return BootFile(name, check_sha256(sha), checks.integer(size, f"boot file {name} size", 1,
                                                  MAX_BOOT_FILE_BYTES))


def _forward(item: object) -> PortForward:
    if not isinstance(item, list) or len(item) != 4:
        raise ValueError("a forward is [host, host_port, guest_port, proto]")
    host, host_port, guest_port, proto = item
    return PortForward(checks.text(host, "forward host"),
                       checks.integer(host_port, "host port", 0, 65535),
                       checks.integer(guest_port, "guest port", 1, 65535),
                       Proto(checks.text(proto, "proto")))


def _check_bounds(m: VMManifest) -> None:
    """Limits a peer's manifest must respect before this host makes anything from it."""
    _ = m.machine.shape  # validates memory, vCPUs, CPU model (ferry.shape; ConfigError)
    if len(m.disks) > MAX_DISKS:
        raise ValueError(f"{len(m.disks)} disks (at most {MAX_DISKS})")
    if len({d.name for d in m.disks}) != len(m.disks):
        raise ValueError("disk names repeat")
    for d in (m.memory, *m.disks):
        checks.integer(d.size_bytes, f"device {d.name} size", 1, MAX_DEVICE_BYTES)
        checks.integer(d.block_size_bytes, f"device {d.name} block size", 512, 16 * 1024 * 1024)
    texts = [m.name, m.blueprint, m.image_key, m.created, m.machine.machine, m.machine.cpu_model,
             m.machine.accel, m.kernel_cmdline, m.kernel, m.initramfs, m.state,
             *(d.name for d in m.disks), *(d.path for d in (m.memory, *m.disks)),
             *m.agent.before_suspend, *m.agent.after_resume]
    for t in texts:
        checks.text(t, "a manifest string")
    if len(m.agent.before_suspend) + len(m.agent.after_resume) > MAX_HOOKS:
        raise ValueError(f"more than {MAX_HOOKS} agent hooks")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def boot_files(manifest: VMManifest, directory: Path) -> dict[str, Path]:
    """Where the kernel and initramfs of ``manifest`` are, in its package directory
    (checked to lie inside it: the manifest may come from a peer)."""
    return {"kernel": safe_join(directory, manifest.kernel),
            "initramfs": safe_join(directory, manifest.initramfs)}


def describe_boot(files: dict[str, Path]) -> tuple[BootFile, ...]:
    return tuple(BootFile(n, sha256_file(p), p.stat().st_size) for n, p in files.items())


# -- framing -------------------------------------------------------------------------------

def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise RemoteProtocolError(f"launch frame of {len(body)} bytes is too large")
    return _HEAD.pack(MAGIC, len(body)) + body


async def _receive_some(stream: Stream, max_bytes: int, idle_timeout_s: float) -> bytes:
    try:
        async with asyncio.timeout(idle_timeout_s):
            data = await stream.receive_some(max_bytes)
    except TimeoutError as exc:
        raise DeadlineError(f"{stream.peer}: the peer sent nothing for {idle_timeout_s} s "
                            "during the launch exchange") from exc
    if not data:
        raise BrokenResourceError("the peer closed the connection during the launch "
                                  "exchange", peer=stream.peer)
    return data


async def receive_exactly(stream: Stream, n: int, *,
                          idle_timeout_s: float = IDLE_TIMEOUT_S) -> bytes:
    """Exactly ``n`` bytes (never more: what follows belongs to the migration codec)."""
    out = bytearray()
    while len(out) < n:
        out += await _receive_some(stream, min(CHUNK_BYTES, n - len(out)), idle_timeout_s)
    return bytes(out)


async def receive_chunks(stream: Stream, n: int, *,
                         idle_timeout_s: float = IDLE_TIMEOUT_S) -> AsyncIterator[bytes]:
    """Exactly ``n`` bytes in chunks of at most :data:`CHUNK_BYTES` (memory stays bounded)."""
    left = n
    while left:
        data = await _receive_some(stream, min(CHUNK_BYTES, left), idle_timeout_s)
        left -= len(data)
        yield data


async def send_frame(stream: Stream, obj: dict[str, Any]) -> None:
    await stream.send_all(encode_frame(obj))


async def receive_frame(stream: Stream, *,
                        idle_timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, Any]:
    head = await receive_exactly(stream, _HEAD.size, idle_timeout_s=idle_timeout_s)
    length = decode_head(head)
    return decode_body(await receive_exactly(stream, length, idle_timeout_s=idle_timeout_s))


def decode_head(head: bytes) -> int:
    """The body length a frame header announces (checked against the cap)."""
    magic, length = _HEAD.unpack(head)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad launch frame magic {magic!r} (not a ferry peer?)")
    if length > MAX_FRAME_BYTES:
        raise FrameTooLargeError(f"launch frame of {length} bytes is too large")
    return int(length)


def decode_body(body: bytes) -> dict[str, Any]:
    """A frame body: one JSON object (RemoteProtocolError for anything else)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
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
        raise RemoteProtocolError(f"bad NEED {need!r:.200}")
    for name in dict.fromkeys(need):
        await _send_file(stream, files[name])
    ready = await receive_frame(stream)
    if not ready.get("ok"):
        raise RemoteProtocolError(f"the destination refused the VM: {ready.get('error')!s:.500}")


async def _send_file(stream: Stream, path: Path) -> None:
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
            await stream.send_all(chunk)
    finally:
        f.close()


async def send_refusal(stream: Stream, error: str) -> None:
    """Registry: answer a request it cannot serve, in place of the offer."""
    await send_frame(stream, {"refused": error[:MAX_TEXT_BYTES]})


async def receive_offer(stream: Stream, cache: BootCache, *,
                        idle_timeout_s: float = IDLE_TIMEOUT_S) -> tuple[Offer, Path]:
    """Destination: read the offer, fetch missing boot files into ``cache`` (by SHA-256).

    Returns the offer and the directory its kernel and initramfs are pinned in
    (:func:`boot_files` of the manifest and that directory gives their paths).
    The caller answers with :func:`send_ready` once it can take the VM.
    Raises :class:`RefusedError` when a registry refuses the request.
    """
    frame = await receive_frame(stream, idle_timeout_s=idle_timeout_s)
    if "refused" in frame and "vm_id" not in frame:
        raise RefusedError(str(frame["refused"])[:MAX_TEXT_BYTES])
    offer = Offer.from_json(frame)
    await asyncio.to_thread(cache.sweep_pins)
    rel = {"kernel": offer.manifest.kernel, "initramfs": offer.manifest.initramfs}
    need = [b.name for b in offer.boot
            if not await asyncio.to_thread(cache.pin, b.sha256, rel[b.name])]
    await send_frame(stream, {"need": need})
    for name in need:
        b = offer.boot_file(name)
        await cache.store(b.sha256, b.size_bytes, receive_chunks(stream, b.size_bytes,
                                                        idle_timeout_s=idle_timeout_s))
        if not await asyncio.to_thread(cache.pin, b.sha256, rel[name]):
            raise BootCacheFullError(f"boot file {name} was evicted as it arrived")
    return offer, cache.pin_dir


async def send_ready(stream: Stream, error: str | None = None) -> None:
    await send_frame(stream, {"ok": error is None,
                              "error": None if error is None else error[:MAX_TEXT_BYTES]})
