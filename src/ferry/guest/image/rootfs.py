"""The root filesystem: a busybox tree plus Debian packages, as an ext4 image.

Packages are added without dpkg and without their whole dependency closure
(redis-tools' closure reaches perl). The listed packages are unpacked
entirely; from their dependencies we take only the shared libraries the
listed packages' ELF files need, transitively (``DT_NEEDED`` plus the
``PT_INTERP`` loader). Dependencies are fetched lazily, breadth first: only
when a library is still missing are the direct dependencies of the packages
used so far fetched, so the redis image pulls about ten small library
packages. Maintainer scripts never run: a package that needs its postinst
(users, alternatives, generated config) needs the blueprint to add those
files itself.

The image is made by ``mkfs.ext4 -d``, which copies a directory into a new
filesystem without mounting anything (no root or loop devices needed).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.guest.image import debian
from ferry.guest.image.elf import is_elf, read_elf
from ferry.guest.image.errors import ImageError, PackageError
from ferry.guest.image.tree import Tree

log = logging.getLogger(__name__)

# Where Debian's x86_64 loader looks for libraries without an ld.so.cache.
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64",
                "lib", "usr/lib")
_MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True, slots=True)
class PackageSet:
    """What :func:`add_packages` put into a tree, for the image manifest."""

    payload: tuple[debian.UnpackedPackage, ...]
    library_sources: tuple[debian.UnpackedPackage, ...]
    libraries: tuple[str, ...]  # guest paths


def resolve_in_root(root: Path, guest_path: str) -> Path | None:
    """Follow ``guest_path`` inside ``root`` as if ``root`` were ``/``.

    Absolute symlink targets are taken relative to ``root`` (a host-side
    ``resolve()`` would escape into the host's own /lib). Returns the host
    path of the final regular file, or None if it does not exist there.
    """
    parts = list(PurePosixPath("/", guest_path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = root / str(candidate).lstrip("/")
        if host.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return None
            target = PurePosixPath(os.readlink(host))
            base = PurePosixPath("/") if target.is_absolute() else current
            parts = list((base / target).parts[1:]) + parts
            current = PurePosixPath("/")
            continue
        if not host.exists():
            return None
        current = candidate
    host = root / str(current).lstrip("/")
    return host if host.is_file() else None


def _find_library(pkg: debian.UnpackedPackage, soname: str) -> tuple[str, Path] | None:
    for d in LIBRARY_DIRS:
        guest_path = f"/{d}/{soname}"
        host = resolve_in_root(pkg.root, guest_path)
        if host is not None:
            return guest_path, host
    return None


def _elf_needs(host: Path) -> tuple[set[str], str | None]:
    info = read_elf(host)
    return set(info.needed), info.interpreter


def add_packages(tree: Tree, names: Sequence[str], cache_dir: Path) -> PackageSet:
    """Unpack ``names`` into ``tree`` and add the shared libraries they need."""
    payload = tuple(debian.fetch_many(list(names), cache_dir)) if names else ()
    needed: set[str] = set()
    interpreters: set[str] = set()
    for pkg in payload:
        tree.copy_tree("/", pkg.root)
        for dirpath, _dirs, files in os.walk(pkg.root):
            for f in files:
                host = Path(dirpath) / f
                if not host.is_symlink() and is_elf(host):
                    libs, interp = _elf_needs(host)
                    needed |= libs
                    if interp:
                        interpreters.add(interp)

    pool: dict[str, debian.UnpackedPackage] = {p.name: p for p in payload}
    expanded: set[str] = set()  # packages whose direct deps are already in the pool
    contributing: set[str] = set(pool)
    resolved: dict[str, str] = {}  # soname -> guest path
    sources: dict[str, debian.UnpackedPackage] = {}
    while True:
        progress = True
        while progress:  # resolve what the current pool can provide
            progress = False
            for soname in sorted(needed - resolved.keys()):
                for pkg in pool.values():
                    found = _find_library(pkg, soname)
                    if found is None:
                        continue
                    guest_path, host = found
                    tree.copy(guest_path, host)
                    resolved[soname] = guest_path
                    contributing.add(pkg.name)
                    if pkg.name not in {p.name for p in payload}:
                        sources[pkg.name] = pkg
                    libs, interp = _elf_needs(host)
                    needed |= libs
                    if interp:
                        interpreters.add(interp)
                    progress = True
                    break
        missing_interp = [i for i in interpreters if i not in tree]
        if not (needed - resolved.keys()) and not missing_interp:
            break
        deps = debian.direct_depends_many(sorted(contributing - expanded))
        new = [d for ds in deps.values() for d in ds if d not in pool]
        expanded |= contributing
        if not new:
            # Interpreters may live in a package already in the pool.
            for interp in missing_interp:
                for pkg in pool.values():
                    host_interp = resolve_in_root(pkg.root, interp)
                    if host_interp is not None:
                        tree.copy(interp, host_interp, mode=0o755)
                        break
            still = sorted(needed - resolved.keys()) + [i for i in interpreters if i not in tree]
            if still:
                raise PackageError(f"shared libraries not found in its dependencies: {still}",
                                   package=",".join(names))
            break
        for pkg in debian.fetch_many(list(dict.fromkeys(new)), cache_dir):
            pool[pkg.name] = pkg
        log.debug("library pool grew by %s", new)
    return PackageSet(payload=payload, library_sources=tuple(sources.values()),
                      libraries=tuple(sorted(resolved.values())))


def write_ext4(tree: Tree, image: Path, *, size_mib: int, scratch: Path, label: str) -> None:
    """Create ``image`` (``size_mib``, sparse) as ext4 holding ``tree``."""
    needed = tree.size_bytes()
    if needed > size_mib * 1024 * 1024 * 0.9:
        raise ImageError(f"{needed / 2**20:.1f} MiB of files do not fit a {size_mib} MiB disk")
    staging = scratch / "rootfs-tree"
    tree.materialize(staging)
    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    argv = ["mkfs.ext4", "-q", "-F", "-L", label[:16], "-E", "root_owner=0:0",
            "-d", str(staging), str(image)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"mkfs.ext4 failed ({proc.returncode}): {proc.stderr.strip()}")

