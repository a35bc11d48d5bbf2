"""An OCI image's VM as a package: pull, boot until ready, snapshot (cached).

``ferry vm run oci://REF`` resumes what :func:`oci_package` returns, exactly as it
resumes a signed package: the first run pulls the image (:mod:`ferry.oci.pull`), boots
its guest (:mod:`ferry.oci.guest`) until the application is ready and snapshots it; later
runs of the same image with the same overrides resume that snapshot in milliseconds.

Entries live in ``<cache>/oci/packages/<name>-<key>/``, keyed by the guest's key (image
manifest digest, overrides, kernel, busybox, agent and ferry's guest files) and the
machine (memory, CPU model). They are made on this host, so they are not signed: the
directory is made under a temporary name and renamed into place once complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.hostconfig import HostConfig
from ferry.oci import PulledImage, PullOptions, pull
from ferry.oci.guest import RunOverrides, guest_blueprint, guest_image
from ferry.shape import DEFAULT_CPU_MODEL
from ferry.vm import pkgcache
from ferry.vm.manifest import BOOT_CONSOLE_PATH
from ferry.vm.snapshot import Progress, SnapshotReport, snapshot

log = logging.getLogger(__name__)

SCHEME = "oci://"


def is_oci(text: str) -> bool:
    """Whether a ``vm run``/``vm snapshot`` argument names an OCI image."""
    return text.startswith(SCHEME)


@dataclass(frozen=True, slots=True)
class OCIPackage:
    """A snapshot of an image's ready application, ready to resume."""

    directory: Path
    image: PulledImage
    cache_hit: bool
    snapshot: SnapshotReport | None  # None on a cache hit


async def snapshot_image(image: PulledImage, overrides: RunOverrides, out_dir: Path, *,
                         host: HostConfig, cpu_model: str = DEFAULT_CPU_MODEL,
                         prepare: Sequence[str] = (), progress: Progress,
                         console_copy: Path | None = None) -> SnapshotReport:
    """Boot ``image``'s guest until ready and snapshot it into ``out_dir`` (a package dir)."""
    bp = guest_blueprint(image, overrides)
    return await snapshot(
        bp, out_dir, host=host, cpu_model=cpu_model, progress=progress, prepare=prepare,
        console_copy=console_copy,
        image_for=lambda disks: guest_image(image, overrides, cache_dir=host.cache_root,
                                            disk_dir=disks))


async def oci_package(reference: str, overrides: RunOverrides, *, host: HostConfig,
                      options: PullOptions | None = None, cpu_model: str = DEFAULT_CPU_MODEL,
                      progress: Progress) -> OCIPackage:
    """The (cached) package of ``reference``'s ready application with ``overrides``."""
    progress(f"pulling {reference.removeprefix(SCHEME)}")
    image = await pull(reference, cache_dir=host.cache_root, options=options)
    guest = await asyncio.to_thread(guest_image, image, overrides, cache_dir=host.cache_root)
    key = hashlib.sha256(f"{guest.key}\0{overrides.memory_mib}\0{cpu_model}".encode())
    package_id = key.hexdigest()
    root = host.cache_root / "oci" / "packages"
    final = root / f"{guest.blueprint.name}-{package_id[:16]}"
    if (final / "manifest.json").is_file():
        return OCIPackage(final, image, cache_hit=True, snapshot=None)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        report = await snapshot_image(image, overrides, scratch / "pkg", host=host,
                                      cpu_model=cpu_model, progress=progress,
                                      console_copy=scratch / BOOT_CONSOLE_PATH)
        (scratch / BOOT_CONSOLE_PATH).rename(scratch / "pkg" / BOOT_CONSOLE_PATH)
        pkgcache.adopt(scratch / "pkg", package_id)
        try:
            (scratch / "pkg").rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            log.info("%s was made meanwhile by another run; using it", final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return OCIPackage(final, image, cache_hit=False, snapshot=report)
