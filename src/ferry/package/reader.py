"""Verify and extract packages, streaming, trusting nothing until the end.

Order of checks while the package streams through (see docs/package-format.md):

1. zstd frames and tar headers are parsed strictly (types, names, sizes, caps);
2. ``ferry-package.json`` must come first; its claimed signer must be in the
   trust list, so an untrusted package is refused before any content is read;
3. every member must be listed in the header, once, with the listed size, and
   its SHA-256 must match when its last byte has been read;
4. ``ferry-package.sig`` must come after every listed file and end the
   archive; its key must be the claimed signer and in the trust list, and the
   ed25519 signature over the header must verify with the *trusted* key;
5. the compressed stream must end exactly at a frame end.

Extraction writes into a private sibling staging directory while this runs
and renames it into place only after step 5; any failure removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import zstandard

from ferry.package._atomic import fsync_dir, io_error, remove_tree, temp_sibling
from ferry.package.errors import (
    PackageExistsError,
    PackageFormatError,
    PackageIOError,
    PackageTamperedError,
    PackageTruncatedError,
    SignatureError,
    UntrustedKeyError,
)
from ferry.package.format import (
    CHUNK_BYTES,
    HEADER_NAME,
    MAX_HEADER_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    SIGNING_CONTEXT,
    FileEntry,
    PackageHeader,
    PackageInfo,
    SignatureBlock,
    check_member_path,
)
from ferry.package.keys import key_id_of
from ferry.package.progress import Phase, Progress, ProgressCallback
from ferry.package.tarstream import TarReader
from ferry.package.trust import TrustStore
from ferry.package.zstdframes import ZstdFrameTracker

log = logging.getLogger(__name__)

SPARSE_BLOCK_BYTES = 64 * 1024
"""Extract leaves holes for all-zero runs of this size: guest memory is mostly zero pages."""
_ZERO_CHUNK = bytes(CHUNK_BYTES)
MAX_WINDOW_BYTES = 1 << 25
"""Decoder memory cap: level 3 uses a 2 MiB window, level 19 8 MiB; a hostile frame gets 32 MiB."""


class _Sink(Protocol):
    """Where verified-in-progress content goes (nowhere, or a staging directory)."""

    def open(self, entry: FileEntry) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class _NullSink:
    def open(self, entry: FileEntry) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class _StagingSink:
    """Writes files into a fresh private directory, leaving holes for zero runs."""

    def __init__(self, root: Path, report_as: Path) -> None:
        self._root = root
        self._report_as = report_as
        self._fd = -1
        self._offset = 0
        self._entry: FileEntry | None = None
        self.dirs: set[Path] = {root}

    def open(self, entry: FileEntry) -> None:
        target = self._root / entry.path
        try:
            # Names are validated and the staging tree holds only what we created,
            # so no component can be a symlink planted by someone else.
            for parent in reversed(target.relative_to(self._root).parents[:-1]):
                d = self._root / parent
                if d not in self.dirs:
                    d.mkdir(mode=0o700)
                    self.dirs.add(d)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(target, flags, 0o600)
        except OSError as exc:
            raise io_error(exc, self._report_as, f"creating {entry.path}") from exc
        self._offset = 0
        self._entry = entry

    def write(self, data: bytes) -> None:
        try:
            if data == _ZERO_CHUNK[: len(data)]:
                self._offset += len(data)
                return
            view = memoryview(data)
            start = 0
            for pos in range(0, len(data), SPARSE_BLOCK_BYTES):
                end = min(pos + SPARSE_BLOCK_BYTES, len(data))
                if data.count(0, pos, end) == end - pos:
                    if start < pos:
                        self._pwrite_all(view[start:pos], self._offset + start)
                    start = end
            if start < len(data):
                self._pwrite_all(view[start:], self._offset + start)
            self._offset += len(data)
        except OSError as exc:
            name = self._entry.path if self._entry else "?"
            raise io_error(exc, self._report_as, f"extracting {name}") from exc

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, self._offset)  # trailing holes still count towards the size
            os.fsync(fd)
        except OSError as exc:
            name = self._entry.path if self._entry else "?"
            raise io_error(exc, self._report_as, f"extracting {name}") from exc
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _TrackedSource:
    """The raw package file, fed to the zstd frame tracker as the decompressor reads it."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self._fh = fh
        self._path = path
        self.tracker = ZstdFrameTracker()
        self.compressed_bytes = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._fh.read(n)
        except OSError as exc:
            raise io_error(exc, self._path, "reading the package") from exc
        self.tracker.feed(data)
        self.compressed_bytes += len(data)
        return data


def _decompressed_reader(source: _TrackedSource) -> Callable[[int], bytes]:
    stream = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES).stream_reader(
        cast(BinaryIO, source), read_size=CHUNK_BYTES, read_across_frames=True
    )

    def read(n: int) -> bytes:
        try:
            return stream.read(n)
        except zstandard.ZstdError as exc:
            raise PackageFormatError(f"corrupt compressed data: {exc}") from exc

    return read


def _read_member(tar: TarReader, size: int, limit: int, name: str) -> bytes:
    if size > limit:
        raise PackageFormatError(f"{name} is {size} bytes, more than the {limit} allowed")
    parts = []
    while chunk := tar.read_data(CHUNK_BYTES):
        parts.append(chunk)
    return b"".join(parts)


def _check_signature(
    sig: SignatureBlock, header: PackageHeader, header_bytes: bytes, trust: TrustStore
) -> None:
    if key_id_of(sig.public_key) != sig.key_id:
        raise SignatureError(f"{SIGNATURE_NAME}: key id {sig.key_id} does not match its key")
    trusted = trust.get(sig.key_id)
    if trusted is None:
        raise UntrustedKeyError(
            "package is signed by a key this host does not trust", key_id=sig.key_id
        )
    if trusted.raw != sig.public_key:  # unreachable unless SHA-256 collides; cheap to check
        raise SignatureError(f"{SIGNATURE_NAME}: key differs from the trusted key {sig.key_id}")
    if sig.key_id != header.signer:
        raise SignatureError(
            f"signed by key {sig.key_id}, but {HEADER_NAME} names key {header.signer}"
        )
    if not trusted.verify(sig.signature, SIGNING_CONTEXT + header_bytes):
        raise SignatureError(
            f"signature by key {sig.key_id} does not verify: {HEADER_NAME} was modified"
            " or the signature is forged"
        )


def _read_package(
    path: Path, trust: TrustStore, sink: _Sink, phase: Phase, progress: ProgressCallback | None
) -> PackageInfo:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise io_error(exc, path, "opening the package") from exc
    with fh:
        source = _TrackedSource(fh, path)
        tar = TarReader(_decompressed_reader(source))

        first = tar.next_member()
        if first is None or first.name != HEADER_NAME:
            raise PackageFormatError(f"not a ferry package: {HEADER_NAME} is not the first member")
        header_bytes = _read_member(tar, first.size_bytes, MAX_HEADER_BYTES, HEADER_NAME)
        header = PackageHeader.decode(header_bytes)
        if not trust.is_trusted(header.signer):
            raise UntrustedKeyError(
                "package names a signer this host does not trust", key_id=header.signer
            )

        expected = {e.path: e for e in header.files}
        seen: set[str] = set()
        total, done = header.total_bytes, 0
        while True:
            member = tar.next_member()
            if member is None:
                raise PackageFormatError(f"package has no signature ({SIGNATURE_NAME} missing)")
            if member.name == SIGNATURE_NAME:
                sig_bytes = _read_member(
                    tar, member.size_bytes, MAX_SIGNATURE_BYTES, SIGNATURE_NAME
                )
                break
            check_member_path(member.name)
            entry = expected.get(member.name)
            if entry is None:
                raise PackageFormatError(f"file {member.name} is not listed in {HEADER_NAME}")
            if member.name in seen:
                raise PackageFormatError(f"file {member.name} appears twice")
            seen.add(member.name)
            if member.size_bytes != entry.size_bytes:
                raise PackageTamperedError(
                    f"size {member.size_bytes} differs from the signed size {entry.size_bytes}",
                    path=entry.path,
                )
            digest = hashlib.sha256()
            sink.open(entry)
            while chunk := tar.read_data(CHUNK_BYTES):
                digest.update(chunk)
                sink.write(chunk)
                done += len(chunk)
                if progress:
                    progress(Progress(phase, entry.path, done, total))
            sink.close()
            if digest.hexdigest() != entry.sha256:
                raise PackageTamperedError("SHA-256 differs from the signed hash", path=entry.path)

        missing = sorted(set(expected) - seen)
        if missing:
            raise PackageFormatError(f"files listed in {HEADER_NAME} are missing: {missing}")
        if tar.next_member() is not None:
            raise PackageFormatError(f"a member follows {SIGNATURE_NAME}, which must be last")
        if source.read(CHUNK_BYTES):  # the decompressor may stop at the last frame's end
            raise PackageFormatError("data after the end of the compressed package")
        if not source.tracker.at_frame_end:
            raise PackageTruncatedError("package ends inside a zstd frame (file cut off)")
        _check_signature(SignatureBlock.decode(sig_bytes), header, header_bytes, trust)

    log.info(
        "verified package %s: %d files, %d bytes, signed by %s",
        path,
        len(header.files),
        total,
        header.signer,
    )
    return PackageInfo(
        path,
        header,
        header.signer,
        source.compressed_bytes,
        hashlib.sha256(header_bytes).hexdigest(),
    )


def verify_package(
    file: str | os.PathLike[str], trust: TrustStore, *, progress: ProgressCallback | None = None
) -> PackageInfo:
    """Check a package completely (structure, every file's size and SHA-256, signature, trust).

    Writes nothing. Raises a :class:`~ferry.package.errors.PackageError` subclass
    saying what is wrong; returns the package's description when all is well.
    """
    return _read_package(Path(file), trust, _NullSink(), Phase.VERIFYING, progress)


def extract_package(
    file: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    trust: TrustStore,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PackageInfo:
    """Verify and unpack a package into ``dest_dir``, which appears only if all checks pass.

    Content goes into a private (0700) sibling staging directory; after the
    signature and every hash verified, files and directories are fsynced and
    the staging directory is renamed to ``dest_dir``. An existing ``dest_dir``
    is refused unless ``overwrite`` is set, in which case it is replaced only
    after verification succeeded. Files are created 0600: guest memory holds
    the guest's secrets.
    """
    src = Path(file)
    dest = Path(dest_dir)
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise PackageExistsError("destination already exists (use --overwrite to replace it)",
                                 path=str(dest))
    if not dest.parent.is_dir():
        raise PackageIOError("parent directory does not exist", path=str(dest.parent))
    staging = temp_sibling(dest)
    try:
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise io_error(exc, dest, "creating the staging directory") from exc
    sink = _StagingSink(staging, dest)
    try:
        info = _read_package(src, trust, sink, Phase.EXTRACTING, progress)
        try:
            for d in sorted(sink.dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
            _commit_dir(staging, dest, overwrite=overwrite)
        except OSError as exc:
            raise io_error(exc, dest, "moving the extracted package into place") from exc
    except BaseException:
        sink.abort()
        remove_tree(staging)
        raise
    log.info("extracted package %s into %s", src, dest)
    return info


def _commit_dir(staging: Path, dest: Path, *, overwrite: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise PackageExistsError("destination appeared while extracting", path=str(dest))
        trash = temp_sibling(dest)
        os.rename(dest, trash)
        try:
            os.rename(staging, dest)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(trash, dest)
            raise
        remove_tree(trash)
    else:
        os.rename(staging, dest)
    fsync_dir(dest.parent)
