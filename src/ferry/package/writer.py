"""Write a signed package from a package directory.

Two passes over the source: the first hashes every file (the signed header
that lists the hashes must come first in the stream), the second compresses
the files into the package and hashes them again, so a file that changed in
between is caught here rather than by every host that later refuses the
package. The package is written to a temporary sibling, fsynced, and then
renamed: the final name never holds half a package.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from ferry.package._atomic import commit_file, io_error, temp_sibling
from ferry.package.errors import PackageExistsError, PackageFormatError, PackageSourceError
from ferry.package.format import (
    CHUNK_BYTES,
    HEADER_NAME,
    MAX_FILES,
    MAX_HEADER_BYTES,
    RESERVED_NAMES,
    SIGNATURE_ALGORITHM,
    SIGNATURE_NAME,
    SIGNING_CONTEXT,
    ZSTD_LEVEL,
    FileEntry,
    PackageHeader,
    PackageInfo,
    SignatureBlock,
    check_member_path,
)
from ferry.package.keys import SigningKey
from ferry.package.progress import Phase, Progress, ProgressCallback
from ferry.package.tarstream import END_OF_ARCHIVE, member_header, padding

log = logging.getLogger(__name__)


def _source_files(root: Path) -> list[str]:
    """Relative paths of every regular file under ``root``, sorted; refuses anything else."""
    found: list[str] = []

    def walk(d: Path, rel: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise io_error(exc, d, "listing the package directory") from exc
        for e in entries:
            name = f"{rel}{e.name}"
            if e.is_symlink():
                raise PackageSourceError(f"{d / e.name}: symlinks cannot be packaged")
            if e.is_dir(follow_symlinks=False):
                walk(Path(e.path), name + "/")
            elif e.is_file(follow_symlinks=False):
                found.append(name)
            else:
                raise PackageSourceError(f"{d / e.name}: only regular files can be packaged")

    if not root.is_dir():
        raise PackageSourceError(f"{root}: not a directory")
    walk(root, "")
    for name in found:
        if name in RESERVED_NAMES:
            raise PackageSourceError(f"{root / name}: {name} is reserved for the package itself")
        try:
            check_member_path(name)
        except PackageFormatError as exc:
            raise PackageSourceError(f"{root / name}: {exc}") from exc
    if len(found) > MAX_FILES:
        raise PackageSourceError(f"{root}: more than {MAX_FILES} files")
    return found


def _chunks(fh: BinaryIO, size: int, path: Path) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``fh`` in 1 MiB chunks; a shorter file is an error."""
    left = size
    while left:
        try:
            chunk = fh.read(min(CHUNK_BYTES, left))
        except OSError as exc:
            raise io_error(exc, path, "reading") from exc
        if not chunk:
            raise PackageSourceError(f"{path}: shrank while being packaged")
        left -= len(chunk)
        yield chunk


def _hash_file(
    path: Path, done: int, total: int, progress: ProgressCallback | None, rel: str
) -> tuple[FileEntry, int]:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            for chunk in _chunks(fh, size, path):
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(Progress(Phase.HASHING, rel, done, total))
    except OSError as exc:
        raise io_error(exc, path, "reading") from exc
    return FileEntry(rel, size, digest.hexdigest()), done


def _utc_now() -> tuple[str, int]:
    now = int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), now


def write_package(
    src_dir: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    key: SigningKey,
    *,
    manifest: Mapping[str, Any],
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    level: int = ZSTD_LEVEL,
    threads: int = -1,
) -> PackageInfo:
    """Package every regular file under ``src_dir`` into ``out_file``, signed with ``key``.

    ``manifest`` (the VM layer's description, any JSON object) is embedded in
    the signed header as is. Subdirectories are kept, empty directories are
    not; symlinks, devices and the reserved names ``ferry-package.json`` /
    ``ferry-package.sig`` are refused. ``threads=-1`` lets zstd use every
    core. Refuses an existing ``out_file`` unless ``overwrite`` is set.
    """
    src = Path(src_dir)
    out = Path(out_file)
    if out.exists() and not overwrite:
        raise PackageExistsError("already exists (use --overwrite to replace it)", path=str(out))
    names = _source_files(src)
    try:
        total = sum((src / n).stat().st_size for n in names)
    except OSError as exc:
        raise io_error(exc, src, "reading") from exc

    entries, done = [], 0
    for name in names:
        entry, done = _hash_file(src / name, done, total, progress, name)
        entries.append(entry)
    created, mtime = _utc_now()
    header = PackageHeader(created, key.key_id, dict(manifest), tuple(entries))
    try:
        header_bytes = header.encode()
    except (TypeError, ValueError) as exc:
        raise PackageSourceError(f"the manifest is not a JSON object: {exc}") from exc
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise PackageSourceError(
            f"{HEADER_NAME} would be {len(header_bytes)} bytes, over the {MAX_HEADER_BYTES} cap"
        )
    sig_bytes = SignatureBlock(
        key.key_id, key.public.raw, key.sign(SIGNING_CONTEXT + header_bytes), SIGNATURE_ALGORITHM
    ).encode()

    tmp = temp_sibling(out)
    try:
        with tmp.open("xb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # a package holds guest memory
            cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
            with cctx.stream_writer(fh, closefd=False) as z:
                z.write(member_header(HEADER_NAME, len(header_bytes), mtime))
                z.write(header_bytes + padding(len(header_bytes)))
                done = 0
                for entry in entries:
                    done = _write_member(z, src, entry, mtime, done, total, progress)
                z.write(member_header(SIGNATURE_NAME, len(sig_bytes), mtime))
                z.write(sig_bytes + padding(len(sig_bytes)))
                z.write(END_OF_ARCHIVE)
            fh.flush()
            os.fsync(fh.fileno())
            compressed = os.fstat(fh.fileno()).st_size
        commit_file(tmp, out, overwrite=overwrite)
    except OSError as exc:
        raise io_error(exc, out, "writing the package") from exc
    except zstandard.ZstdError as exc:
        raise PackageSourceError(f"zstd failed while writing {out}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info(
        "wrote package %s: %d files, %d bytes -> %d bytes, signed by %s",
        out,
        len(entries),
        total,
        compressed,
        key.key_id,
    )
    return PackageInfo(
        out, header, key.key_id, compressed, hashlib.sha256(header_bytes).hexdigest()
    )


def _write_member(
    z: Any,
    src: Path,
    entry: FileEntry,
    mtime: int,
    done: int,
    total: int,
    progress: ProgressCallback | None,
) -> int:
    path = src / entry.path
    digest = hashlib.sha256()
    z.write(member_header(entry.path, entry.size_bytes, mtime))
    try:
        with path.open("rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise PackageSourceError(f"{path}: no longer a regular file")
            for chunk in _chunks(fh, entry.size_bytes, path):
                digest.update(chunk)
                z.write(chunk)
                done += len(chunk)
                if progress:
                    progress(Progress(Phase.WRITING, entry.path, done, total))
    except FileNotFoundError as exc:
        raise PackageSourceError(f"{path}: disappeared while being packaged") from exc
    if digest.hexdigest() != entry.sha256:
        raise PackageSourceError(f"{path}: changed while being packaged")
    z.write(padding(entry.size_bytes))
    return done
