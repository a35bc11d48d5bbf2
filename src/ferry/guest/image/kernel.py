"""The guest kernel: Debian's cloud kernel, unpacked from its .deb.

``linux-image-cloud-amd64`` is a metapackage; it Depends on the versioned
``linux-image-<abi>-cloud-amd64`` package that holds ``/boot/vmlinuz-*`` and
``/lib/modules/<release>``. The cloud flavour is small and boots well on
QEMU's microvm; the virtio drivers are modules, so the initramfs must carry
them (see :mod:`ferry.guest.image.initramfs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ferry.guest.image import debian
from ferry.guest.image.errors import PackageError

log = logging.getLogger(__name__)

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True, slots=True)
class Kernel:
    """An unpacked guest kernel."""

    package: str
    version: str
    release: str  # the `uname -r` string, e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>
    cache_hit: bool


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The versioned ``linux-image-*`` package a kernel metapackage points at."""
    for dep in debian.direct_depends(metapackage):
        if dep.startswith("linux-image-") and dep != metapackage:
            return dep
    raise PackageError("depends on no linux-image-* package", package=metapackage)


def fetch_kernel(cache_dir: Path, *, package: str | None = None) -> Kernel:
    """Download (first time) into ``cache_dir`` and unpack the guest kernel; later calls
    are cache hits.

    ``package`` selects a versioned kernel package directly; by default the
    current target of :data:`KERNEL_METAPACKAGE` is used.
    """
    name = package or resolve_kernel_package()
    unpacked = debian.fetch(name, cache_dir)
    vmlinuz = sorted((unpacked.root / "boot").glob("vmlinuz-*"))
    modules = sorted((unpacked.root / "lib" / "modules").glob("*"))
    if len(vmlinuz) != 1 or len(modules) != 1:
        raise PackageError(
            f"expected one vmlinuz and one modules tree, found {len(vmlinuz)} and {len(modules)}",
            package=name,
        )
    release = modules[0].name
    log.debug("kernel %s %s (cache hit: %s)", name, release, unpacked.cache_hit)
    return Kernel(
        package=name,
        version=unpacked.version,
        release=release,
        vmlinuz=vmlinuz[0],
        modules_dir=modules[0],
        cache_hit=unpacked.cache_hit,
    )
