"""An in-memory file tree that becomes either a cpio archive or a directory.

The initramfs and the root filesystem hold mostly the same things (busybox,
its applet links, ferry's guest scripts), so both are described once as a
:class:`Tree` and then written out: :func:`write_newc` for the initramfs,
:meth:`Tree.materialize` for the directory ``mkfs.ext4 -d`` turns into a disk.

Paths are absolute POSIX paths inside the guest. Parent directories are
created implicitly (mode 0755). Entries carry no timestamps or owners: every
file is ``root:root`` with mtime 0, so equal inputs give byte-equal archives.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from ferry.guest.image.errors import ImageError


class Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    CHARDEV = "chardev"


@dataclass(frozen=True, slots=True)
class Entry:
    """One path in a :class:`Tree`. Exactly the fields its ``kind`` needs are set."""

    kind: Kind
    mode: int
    data: bytes | None = None  # FILE with inline contents
    source: Path | None = None  # FILE copied from the host
    target: str | None = None  # SYMLINK
    rdev: tuple[int, int] | None = None  # CHARDEV (major, minor)

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.source is not None:
            return self.source.stat().st_size
        if self.target is not None:
            return len(self.target.encode())
        return 0


def _norm(path: str) -> str:
    p = PurePosixPath("/", path)
    if ".." in p.parts:
        raise ImageError(f"path {path!r} escapes the tree")
    return str(p)


class Tree:
    """Guest paths mapped to :class:`Entry`; later additions replace earlier ones."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {"/": Entry(Kind.DIR, 0o755)}

    def _parents(self, path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            key = str(parent)
            if key not in self._entries:
                self._entries[key] = Entry(Kind.DIR, 0o755)
            elif self._entries[key].kind is not Kind.DIR:
                raise ImageError(f"{key} is not a directory, cannot add {path}")

    def add(self, path: str, entry: Entry) -> None:
        key = _norm(path)
        self._parents(key)
        self._entries[key] = entry

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self.add(path, Entry(Kind.DIR, mode))

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.add(path, Entry(Kind.FILE, mode, data=data))

    def copy(self, path: str, source: Path, mode: int | None = None) -> None:
        """Add a host file (following symlinks), keeping its permission bits by default."""
        st = source.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{source} is not a regular file")
        self.add(path, Entry(Kind.FILE, stat.S_IMODE(st.st_mode) if mode is None else mode,
                             source=source))

    def symlink(self, path: str, target: str) -> None:
        self.add(path, Entry(Kind.SYMLINK, 0o777, target=target))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(path, Entry(Kind.CHARDEV, mode, rdev=(major, minor)))

    def copy_tree(self, dest: str, source: Path) -> None:
        """Add every file, directory and symlink under host directory ``source``."""
        for dirpath, dirnames, filenames in os.walk(source):
            rel = Path(dirpath).relative_to(source)
            base = PurePosixPath(_norm(dest)) / rel.as_posix()
            for name in sorted(dirnames + filenames):
                host = Path(dirpath) / name
                guest = str(base / name)
                if host.is_symlink():
                    self.symlink(guest, os.readlink(host))
                elif host.is_dir():
                    self.mkdir(guest, stat.S_IMODE(host.stat().st_mode))
                else:
                    self.copy(guest, host)

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._entries

    def get(self, path: str) -> Entry | None:
        return self._entries.get(_norm(path))

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Entries sorted by path, so parents come before their children."""
        yield from sorted(self._entries.items())

    def size_bytes(self) -> int:
        return sum(e.size() for _, e in self.items())

    def materialize(self, root: Path) -> None:
        """Write the tree into the (empty or missing) host directory ``root``."""
        root.mkdir(parents=True, exist_ok=True)
        for path, entry in self.items():
            host = root / path.lstrip("/")
            if entry.kind is Kind.DIR:
                host.mkdir(exist_ok=True)
            elif entry.kind is Kind.SYMLINK:
                assert entry.target is not None
                os.symlink(entry.target, host)
                continue
            elif entry.kind is Kind.CHARDEV:
                assert entry.rdev is not None
                os.mknod(host, stat.S_IFCHR | entry.mode, os.makedev(*entry.rdev))
            elif entry.source is not None:
                shutil.copyfile(entry.source, host)
            else:
                assert entry.data is not None
                host.write_bytes(entry.data)
            os.chmod(host, entry.mode)


class Writable(Protocol):
    """Anything bytes can be written to (a file, a GzipFile)."""

    def write(self, data: bytes, /) -> int: ...


_NEWC_MAGIC = b"070701"
_TYPE_BITS = {
    Kind.DIR: stat.S_IFDIR,
    Kind.FILE: stat.S_IFREG,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHARDEV: stat.S_IFCHR,
}


def _pad4(out: Writable, length: int) -> None:
    out.write(b"\0" * (-length % 4))


def _newc_record(out: Writable, ino: int, name: str, entry: Entry | None) -> None:
    name_b = name.encode() + b"\0"
    if entry is None:  # the trailer
        mode, size, nlink, rdev = 0, 0, 1, (0, 0)
    else:
        mode = _TYPE_BITS[entry.kind] | entry.mode
        size = 0 if entry.kind in (Kind.DIR, Kind.CHARDEV) else entry.size()
        nlink = 2 if entry.kind is Kind.DIR else 1
        rdev = entry.rdev or (0, 0)
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name_b), 0)
    header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out.write(header + name_b)
    _pad4(out, len(header) + len(name_b))
    if entry is None or size == 0:
        return
    if entry.kind is Kind.SYMLINK:
        assert entry.target is not None
        out.write(entry.target.encode())
    elif entry.source is not None:
        with entry.source.open("rb") as f:
            shutil.copyfileobj(f, out)
    else:
        assert entry.data is not None
        out.write(entry.data)
    _pad4(out, size)


def write_newc(tree: Tree, out: Writable) -> None:
    """Write ``tree`` as a cpio archive in the ``newc`` format the kernel unpacks."""
    ino = 0
    for path, entry in tree.items():
        if path == "/":
            continue
        ino += 1
        _newc_record(out, ino, path.lstrip("/"), entry)
    _newc_record(out, 0, "TRAILER!!!", None)
