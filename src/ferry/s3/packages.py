"""Signed packages in a bucket: ``ferry package push FILE s3://B/K`` and ``pull``.

A package is stored as it is on disk, one object (s3transfer uploads it in
parallel multipart parts). Trust does not come from the bucket: ``pull``
downloads into a hidden temporary file beside the destination, runs the very
check ``ferry package verify`` runs (:func:`ferry.package.verify_package`:
structure, every file's SHA-256, the signature, the trust list) and only then
renames it to the destination. A truncated or tampered object fails with the
package layer's own error (:class:`~ferry.package.PackageTruncatedError`,
:class:`~ferry.package.PackageTamperedError`, :class:`~ferry.package.SignatureError`
...) and leaves nothing under the destination name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from ferry.errors import ConfigError
from ferry.package import (
    PackageExistsError,
    PackageInfo,
    PackageIOError,
    ProgressCallback,
    TrustStore,
    verify_package,
)
from ferry.s3.config import S3Config
from ferry.s3.errors import S3ConflictError
from ferry.s3.store import ObjectStore
from ferry.s3.url import S3URL

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKAGE_BYTES = 64 << 30
"""``pull`` refuses a larger object before fetching a byte: a package holds a VM's
memory and disks, tens of GiB at most; a bucket must not fill this host's disk."""

TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20,
                          max_concurrency=8)
"""Parts of 16 MiB, 8 at once, from 64 MiB up: fewer, larger requests than boto3's
8 MiB default (a package is hundreds of MiB) at the same memory bound (128 MiB)."""


@dataclass(frozen=True, slots=True)
class TransferReport:
    url: str
    file: str
    size_bytes: int
    duration_s: float


def push_package(file: Path, url: S3URL, config: S3Config, *,
                 overwrite: bool = False) -> TransferReport:
    """Upload the package ``file`` to ``url``; an existing object is kept unless
    ``overwrite`` (checked before the upload: two pushes racing to one key leave
    one complete package, the later one)."""
    if not url.key or url.key.endswith("/"):
        raise ConfigError(f"{url}: give the object key the package goes to")
    if not file.is_file():
        raise ConfigError(f"no package file {file}")
    store = ObjectStore.connect(config, url.bucket)
    if not overwrite and store.size_of(url.key) is not None:
        raise S3ConflictError("already exists (use --overwrite to replace it)",
                              endpoint=store.endpoint, bucket=url.bucket, key=url.key)
    started = time.monotonic()
    size = file.stat().st_size
    store.upload_file(file, url.key, transfer=TRANSFER)
    log.info("pushed %s (%d bytes) to %s", file, size, url)
    return TransferReport(str(url), str(file), size, time.monotonic() - started)


def default_destination(url: S3URL) -> Path:
    """Where ``pull`` puts a package when no destination is given: its key's last part."""
    name = url.key.rstrip("/").rpartition("/")[2]
    if not name or name in (".", ".."):
        raise ConfigError(f"{url}: no file name in the key; give a destination")
    return Path(name)


def pull_package(url: S3URL, dest: Path, trust: TrustStore, config: S3Config, *,
                 overwrite: bool = False, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
                 progress: ProgressCallback | None = None) -> tuple[PackageInfo, TransferReport]:
    """Download ``url``, verify it as ``ferry package verify`` does, then move it to
    ``dest``. Nothing lands at ``dest`` unless every check passed."""
    if dest.is_dir():
        dest = dest / default_destination(url)
    if not overwrite and dest.exists():
        raise PackageExistsError("already exists (use --overwrite to replace it)",
                                 path=str(dest))
    store = ObjectStore.connect(config, url.bucket)
    tmp = dest.with_name(f".{dest.name}.ferry-pull-{secrets.token_hex(6)}")
    started = time.monotonic()
    try:
        size = store.download_file(url.key, tmp, max_bytes=max_bytes, transfer=TRANSFER)
        info = verify_package(tmp, trust, progress=progress)
        try:
            _commit(tmp, dest, overwrite=overwrite)
        except OSError as exc:
            raise PackageIOError(f"moving the verified package into place: {exc}",
                                 path=str(dest)) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("pulled %s (%d bytes, signed by %s) to %s", url, size, info.key_id, dest)
    return info, TransferReport(str(url), str(dest), size, time.monotonic() - started)


def _commit(tmp: Path, dest: Path, *, overwrite: bool) -> None:
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        os.replace(tmp, dest)
    else:
        try:
            os.link(tmp, dest)  # fails instead of replacing: no clobbering race
        except FileExistsError as exc:
            raise PackageExistsError("already exists (use --overwrite to replace it)",
                                     path=str(dest)) from exc
    dirfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
