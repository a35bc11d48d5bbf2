"""Copy-on-write overlays over a package's device files, and the bases they share.

Every VM run from a package keeps its changes in an overlay over the
package's read-only files (:func:`package_overlay`). The overlay's base is
named by the package's id (the SHA-256 of its signed header, which names
every file's content) and the device's name, so the same name on two hosts
means the same verified bytes.

That name is what a live migration offers as a device's *base*
(:func:`base_hash`): a destination whose package cache holds the same
package (:class:`PackageBases`) builds the arriving device as an overlay
over its own copy, and the source sends only the blocks the VM changed
(``YouHave`` for the rest, :mod:`ferry.migration.source`). The destination
reads those base blocks back and checks them against the source's final
hashes before the migration completes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ferry.protocol.messages import DeviceInfo
from ferry.storage import FileDevice, OverlayDevice
from ferry.vm.errors import ManifestError
from ferry.vm.manifest import DeviceEntry
from ferry.vm.pkgcache import OpenedPackage

log = logging.getLogger(__name__)


def base_id(package_id: str, device: str) -> bytes:
    """The name of a package device's content (recorded in its overlays' maps)."""
    return f"{package_id[:64]}:{device}".encode()


def base_hash(overlay_base_id: bytes) -> bytes:
    """What the migration protocol carries as a device's base (32 bytes)."""
    return hashlib.sha256(overlay_base_id).digest()


def package_overlay(package: OpenedPackage, entry: DeviceEntry, directory: Path,
                    *, name: str | None = None) -> OverlayDevice:
    """A new (or reopened) overlay ``directory/<entry.name>.ovl`` over ``entry``'s file."""
    base = FileDevice(package.directory / entry.path, read_only=True,
                      name=f"{entry.name}-base")
    if base.size_bytes != entry.size_bytes:
        base.close_sync()
        raise ManifestError(f"{entry.path} has {base.size_bytes} bytes, the manifest says "
                            f"{entry.size_bytes}")
    try:
        return OverlayDevice(base, directory / f"{entry.name}.ovl",
                             block_size_bytes=entry.block_size_bytes,
                             base_id=base_id(package.package_id, entry.name),
                             name=name or entry.name)
    except BaseException:
        base.close_sync()
        raise


class PackageBases:
    """The device bases one package of this host's cache offers an arriving VM.

    Calling it with the source's :class:`DeviceInfo` gives a fresh overlay in
    ``directory`` over the matching device file, or None when the device
    names no base, another base, or a shape that differs from the package's.
    """

    def __init__(self, package: OpenedPackage, directory: Path) -> None:
        self._package = package
        self._directory = directory
        m = package.manifest
        self._entries = {base_hash(base_id(package.package_id, e.name)): e
                         for e in (m.memory, *m.disks)}

    def __call__(self, info: DeviceInfo) -> OverlayDevice | None:
        entry = self._entries.get(info.base_hash) if info.base_hash is not None else None
        if entry is None:
            return None
        if (entry.size_bytes, entry.block_size_bytes) != (info.size_bytes,
                                                          info.block_size_bytes):
            log.warning("%s: the source's base has another shape than package %s's %s",
                        info.name, self._package.package_id[:12], entry.name)
            return None
        return package_overlay(self._package, entry, self._directory,
                               name=info.name.replace("/", "-"))
