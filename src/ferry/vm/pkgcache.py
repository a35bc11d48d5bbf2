"""Verified packages, extracted once into a cache keyed by their signed header's hash.

``open_package(file, trust, cache_dir=...)`` verifies and extracts a package
the first time and returns the extracted directory; later calls for the same
file (same device, inode, size and mtime) return it without reading the
package again. Entries live in ``<cache_dir>/<header sha256[:32]>/`` (the
host's ``HostConfig.package_cache``: ``$FERRY_PACKAGE_CACHE_DIR``, else
``packages/`` in the image cache) and are never modified: every VM runs on
copy-on-write overlays over them (:mod:`ferry.vm.runner`). The signed header
lists every file's SHA-256, so its hash names the content: two files with the
same header hold the same verified bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.package import ProgressCallback, TrustStore, extract_package
from ferry.storage.device import Geometry
from ferry.storage.hashing import BLOCK_HASH_BYTES, block_hash
from ferry.vm.manifest import DeviceEntry, VMManifest

log = logging.getLogger(__name__)

_ID_FILE = ".ferry-package-id"
LEFTOVER_AGE_S = 3600.0
"""A staging directory this old is a leftover of an interrupted extraction."""


@dataclass(frozen=True, slots=True)
class OpenedPackage:
    """An extracted, verified package directory and its identity."""

    directory: Path
    package_id: str
    """SHA-256 (hex) of the package's signed header."""
    manifest: VMManifest
    cache_hit: bool


def nonzero_blocks(package: OpenedPackage, entry: DeviceEntry) -> list[int] | None:
    """Blocks of ``entry``'s file that are not all zeros, from the package's block hashes.

    Answered from the hash file (16 bytes per block) instead of the data: a
    256 MiB memory file in 64 KiB blocks has a 64 KiB hash file. None if the
    hash file is missing or does not match the entry.
    """
    geometry = Geometry(entry.size_bytes, entry.block_size_bytes)
    try:
        raw = (package.directory / entry.hashes_path).read_bytes()
    except OSError as exc:
        log.warning("package %s: no block hashes for %s: %s", package.directory, entry.name, exc)
        return None
    if len(raw) != geometry.block_count * BLOCK_HASH_BYTES:
        log.warning("package %s: %s has %d bytes of hashes for %d blocks", package.directory,
                    entry.hashes_path, len(raw), geometry.block_count)
        return None
    zero_full = block_hash(bytes(geometry.block_size_bytes))
    last = geometry.block_count - 1
    zero_last = block_hash(bytes(geometry.block_length(last)))
    found = []
    for block in range(geometry.block_count):
        digest = raw[block * BLOCK_HASH_BYTES:(block + 1) * BLOCK_HASH_BYTES]
        if digest != (zero_last if block == last else zero_full):
            found.append(block)
    return found


def _stat_key(file: Path) -> str:
    st = file.stat()
    raw = f"{file.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def open_extracted(directory: Path) -> OpenedPackage:
    """An entry of the cache (or any directory :func:`open_package` returned)."""
    package_id = (directory / _ID_FILE).read_text().strip()
    return OpenedPackage(directory, package_id, VMManifest.load(directory), cache_hit=True)


def adopt(directory: Path, package_id: str) -> None:
    """Make a package directory made on this host (not extracted from a signed file, so
    with nothing to verify) openable by :func:`open_extracted` under ``package_id``."""
    (directory / _ID_FILE).write_text(package_id + "\n")


def find_cached(cache_dir: Path, package_id: str) -> OpenedPackage | None:
    """The cache's entry for the package with this id, if this host extracted it before."""
    entry = cache_dir / package_id[:32]
    try:
        if (entry / _ID_FILE).read_text().strip() != package_id:
            return None
        return open_extracted(entry)
    except (OSError, FerryError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("package cache entry %s is unusable: %s", entry, exc)
        return None


def cached_packages(cache_dir: Path) -> list[OpenedPackage]:
    """Every complete entry of the cache, by package id."""
    found = []
    for entry in sorted(cache_dir.glob("*")) if cache_dir.is_dir() else []:
        if entry.name == "index" or entry.name.startswith("."):
            continue
        try:
            found.append(open_extracted(entry))
        except (OSError, FerryError) as exc:
            log.warning("package cache entry %s is unusable: %s", entry, exc)
    return found


def open_package(file: Path, trust: TrustStore, *, cache_dir: Path,
                 progress: ProgressCallback | None = None) -> OpenedPackage:
    """Verify and extract ``file`` into the package cache (once); see the module docstring.

    Raises the package layer's errors (tampered, truncated, untrusted ...)
    and :class:`~ferry.vm.errors.ManifestError` for a package that is not a VM.
    """
    root = cache_dir
    index = root / "index"
    index.mkdir(parents=True, exist_ok=True)
    memo = index / _stat_key(Path(file))
    if memo.is_file():
        entry = root / memo.read_text().strip()
        if (entry / _ID_FILE).is_file():
            return open_extracted(entry)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        dest = staging / "pkg"
        info = extract_package(file, dest, trust, progress=progress)
        package_id = info.header_sha256 or hashlib.sha256(
            json.dumps(info.manifest, sort_keys=True).encode()).hexdigest()
        manifest = VMManifest.load(dest)
        (dest / _ID_FILE).write_text(package_id + "\n")
        entry = root / package_id[:32]
        cache_hit = entry.exists()
        if not cache_hit:
            try:
                os.rename(dest, entry)
            except OSError:  # another process extracted the same package meanwhile
                cache_hit = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(entry.name + "\n")
    os.replace(tmp, memo)
    log.info("package %s: %s %s", file, "already extracted at" if cache_hit else "extracted to",
             entry)
    return OpenedPackage(entry, package_id, manifest, cache_hit=cache_hit)


class PackageInUseError(FerryError):
    """A cached package that a VM of this host runs on (or was suspended on)."""


def entry_bytes(package: OpenedPackage) -> int:
    """Disk space the cache entry takes (allocated blocks: the files are sparse)."""
    total = 0
    for path in package.directory.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.is_file():
            total += st.st_blocks * 512
    return total


def remove_cached(cache_dir: Path, package: OpenedPackage, in_use: set[Path]) -> None:
    """Remove one entry of the cache, unless a VM uses it (:class:`PackageInUseError`).

    The entry is renamed out of the cache first (atomically, so a concurrent
    :func:`find_cached` or :func:`open_package` sees it whole or not at all), then deleted;
    the index's memos that named it go too.
    """
    directory = package.directory
    if directory.resolve() in {p.resolve() for p in in_use}:
        raise PackageInUseError(f"package {package.package_id[:12]} ({package.manifest.name}) "
                                "is used by a VM on this host: stop or remove that VM first")
    trash = Path(tempfile.mkdtemp(prefix=".remove-", dir=cache_dir))
    os.rename(directory, trash / "pkg")
    index = cache_dir / "index"
    for memo in index.glob("*") if index.is_dir() else []:
        try:
            if memo.read_text().strip() == directory.name:
                memo.unlink()
        except OSError:
            continue
    shutil.rmtree(trash, ignore_errors=True)
    log.info("package cache: removed %s (%s)", package.package_id[:12], package.manifest.name)


def prune(cache_dir: Path, in_use: set[Path]) -> list[tuple[OpenedPackage, int]]:
    """Remove every entry no VM of this host uses; returns them with the bytes each freed.
    Leftovers of interrupted extractions (``.extract-*``, ``.remove-*``) older than
    :data:`LEFTOVER_AGE_S` go too."""
    removed = []
    for package in cached_packages(cache_dir):
        if package.directory.resolve() in {p.resolve() for p in in_use}:
            continue
        size = entry_bytes(package)
        remove_cached(cache_dir, package, in_use)
        removed.append((package, size))
    stale = time.time() - LEFTOVER_AGE_S
    for leftover in list(cache_dir.glob(".extract-*")) + list(cache_dir.glob(".remove-*")):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < stale:  # not an extraction still under way
                shutil.rmtree(leftover, ignore_errors=True)
    return removed
