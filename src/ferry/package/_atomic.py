"""Write-then-rename helpers: a final name holds a complete file or nothing.

Temporary siblings are named ``.<final name>.ferry-tmp-<random>`` in the same
directory, so the rename is atomic (same filesystem) and a crash leaves an
obviously disposable dot-file, never a half package under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from ferry.package.errors import PackageExistsError, PackageIOError, PackageNoSpaceError

TEMP_MARKER = ".ferry-tmp-"


def temp_sibling(final: Path) -> Path:
    """A fresh, unused name next to ``final`` for staging it."""
    return final.with_name(f".{final.name}{TEMP_MARKER}{secrets.token_hex(6)}")


def io_error(exc: OSError, path: Path | str, doing: str) -> PackageIOError:
    """Translate an OSError once, naming the file and making ENOSPC unmistakable."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PackageNoSpaceError(f"no space left on device while {doing}", path=str(path))
    return PackageIOError(f"{doing} failed: {exc.strerror or exc}", path=str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Move a complete, fsynced ``tmp`` to ``final``; without overwrite never clobber."""
    if overwrite:
        os.replace(tmp, final)
    else:
        # link() fails with EEXIST instead of replacing: a race-free no-clobber rename.
        try:
            os.link(tmp, final)
        except FileExistsError as exc:
            msg = "already exists (use --overwrite to replace it)"
            raise PackageExistsError(msg, path=str(final)) from exc
        os.unlink(tmp)
    fsync_dir(final.parent)


def write_file_atomic(final: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write a small file completely under a temporary name, fsync, then commit it."""
    if not overwrite and final.exists():
        raise PackageExistsError("already exists (use --overwrite to replace it)", path=str(final))
    tmp = temp_sibling(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what we promise
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        commit_file(tmp, final, overwrite=overwrite)
    except OSError as exc:
        raise io_error(exc, final, "writing") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_tree(path: Path) -> None:
    """Remove a staging directory or file, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
