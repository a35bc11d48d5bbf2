"""Playing a hostile peer against ferry's VM endpoints: for tests and benchmarks.

:func:`sample_offer` is a valid launch offer (JSON form) whose boot files are
the given bytes; :data:`HOSTILE_OFFERS` are offers a receiver must refuse with
a typed error before it allocates or writes anything, each named for what it
tries (a path traversal in the boot hash, an absolute or ``..`` kernel path,
absurd sizes and counts, wrong types). :func:`frame` and :func:`connect_raw`
put bytes on the wire as a peer would.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from ferry.live import launch
from ferry.vm.manifest import (
    AgentSettings,
    DeviceEntry,
    GuestNetwork,
    MachineSpec,
    VMManifest,
)

KERNEL = b"\x7fELF fake kernel" * 64
INITRAMFS = b"070701 fake initramfs" * 64
TRAVERSAL_SHA = "../../../../../../../../../../../../../../../../../../etc/shadow"[:64]


def sample_manifest() -> VMManifest:
    return VMManifest(
        name="redis", blueprint="redis", image_key="k", created="2026-01-01T00:00:00Z",
        machine=MachineSpec("microvm", "Nehalem-v1", 1, 256, "tcg"),
        kernel_cmdline="console=ttyS0", kernel="boot/vmlinuz",
        initramfs="boot/initramfs.cpio", state="state.bin", state_bytes=70000,
        memory=DeviceEntry("memory", "memory", 256 << 20, 65536, "hashes/memory.xxh3"),
        disks=(DeviceEntry("root", "disks/root.img", 64 << 20, 65536, "hashes/root.xxh3"),),
        agent=AgentSettings(True, (), ()),
        network=GuestNetwork("10.0.2.15", 24, "10.0.2.2", "52:54:00:12:34:56"))


def sample_offer(kernel: bytes = KERNEL, initramfs: bytes = INITRAMFS,
                 vm_id: str = "r1") -> dict[str, Any]:
    """A valid offer (as sent on the wire) for boot files with these contents."""
    boot = (launch.BootFile("kernel", hashlib.sha256(kernel).hexdigest(), len(kernel)),
            launch.BootFile("initramfs", hashlib.sha256(initramfs).hexdigest(),
                            len(initramfs)))
    return launch.Offer(vm_id, sample_manifest(), (), boot).to_json()


def _changed(change: Callable[[dict[str, Any]], None]) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        offer = copy.deepcopy(sample_offer())
        change(offer)
        return offer
    return make


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def change(offer: dict[str, Any]) -> None:
        node: Any = offer
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


HOSTILE_OFFERS: dict[str, Callable[[], dict[str, Any]]] = {
    "sha256 is a path traversal": _changed(_set("boot", 1, 1, TRAVERSAL_SHA)),
    "sha256 is upper-case hex": _changed(lambda o: o["boot"][0].__setitem__(
        1, o["boot"][0][1].upper())),
    "sha256 is not a string": _changed(_set("boot", 0, 1, 12345)),
    "kernel path climbs out": _changed(_set("manifest", "kernel", "../../../../etc/passwd")),
    "kernel path is absolute": _changed(_set("manifest", "kernel", "/etc/passwd")),
    "boot file of 1 TiB": _changed(_set("boot", 0, 2, 1 << 40)),
    "boot file of negative size": _changed(_set("boot", 0, 2, -1)),
    "boot file size is a bool": _changed(_set("boot", 0, 2, True)),
    "three boot files": _changed(lambda o: o["boot"].append(list(o["boot"][0]))),
    "guest RAM of 1 PiB": _changed(lambda o: o["manifest"].update(
        machine=dict(o["manifest"]["machine"], memory_mib=1 << 30),
        memory=dict(o["manifest"]["memory"], size_bytes=1 << 50))),
    "memory_mib is a long string": _changed(_set("manifest", "machine", "memory_mib",
                                                 "9" * 100_000)),
    "4096 vCPUs": _changed(_set("manifest", "machine", "vcpus", 4096)),
    "1000 disks": _changed(lambda o: o["manifest"].__setitem__(
        "disks", [dict(o["manifest"]["disks"][0], name=f"d{i}") for i in range(1000)])),
    "10000 forwards": _changed(_set("forwards", [["127.0.0.1", 1, 1, "tcp"]] * 10_000)),
    "forward port out of range": _changed(_set("forwards", [["127.0.0.1", 1, 70000, "tcp"]])),
    "vm_id with a slash": _changed(_set("vm_id", "../x")),
    "a 100 kB kernel command line": _changed(_set("manifest", "kernel_cmdline", "x" * 100_000)),
    "unknown origin": _changed(_set("origin", "elsewhere")),
    "package id is a path into the cache": _changed(_set("package", "../" * 21 + "x")),
    "package id is a number": _changed(_set("package", 7)),
    "manifest is a list": _changed(_set("manifest", [])),
    "1000 labels": _changed(_set("labels", {f"k{i}": "v" for i in range(1000)})),
    "a label key with a newline": _changed(_set("labels", {"a\nb": "v"})),
    "a 100 kB label value": _changed(_set("labels", {"team": "x" * 100_000})),
    "labels are a list": _changed(_set("labels", ["team=a"])),
}


def frame(obj: Any) -> bytes:
    """A launch frame carrying ``obj`` (any JSON value), without the size check."""
    body = json.dumps(obj).encode()
    return struct.pack(">4sI", launch.MAGIC, len(body)) + body


async def connect_raw(host: str, port: int, data: bytes, *,
                      read_timeout_s: float = 5.0) -> bytes:
    """Connect over plain TCP, send ``data``, return what comes back until EOF, a reset or
    the timeout. (A server that closes a socket with unread bytes in it makes the kernel
    answer with a reset instead of a FIN: a hostile peer's garbage is never all read.)"""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        try:
            async with asyncio.timeout(read_timeout_s):
                while chunk := await reader.read(65536):
                    out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out
    finally:
        writer.close()
