"""A strict, streaming reader and a minimal writer for the tar members a package uses.

Why not :mod:`tarfile` for reading: it reads pax and GNU long-name records
of any announced size into memory, follows its own idea of member types,
and happily yields symlinks, devices and ``../`` names to be filtered later.
A package only ever holds regular files, so this reader accepts exactly
POSIX ustar headers of type '0' with optional pax ('x') records before them,
checks every header checksum, caps the pax record size, and refuses anything
else while parsing. Writing reuses :class:`tarfile.TarInfo` to produce
standard headers (any tar tool can list a package after ``zstd -d``).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from ferry.package.errors import PackageFormatError, PackageTruncatedError

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
MAX_PAX_BYTES = 64 * 1024
"""pax records carry a long path or a size above 8 GiB: a few hundred bytes, never 64 KiB."""
MAX_TRAILING_ZERO_BYTES = 1024 * 1024
"""Tools pad archives to a record size (10 KiB for GNU tar); allow that, refuse more."""

_REGULAR = (b"0", b"\x00")
_PAX = b"x"
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"g": "global pax header",
    b"L": "GNU long name",
    b"K": "GNU long link",
    b"S": "GNU sparse file",
}


def member_header(name: str, size_bytes: int, mtime: int) -> bytes:
    """Header block(s) for a regular file: mode 0600, owner 0:0, pax when needed."""
    info = tarfile.TarInfo(name)
    info.size = size_bytes
    info.mtime = mtime
    info.mode = 0o600
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size_bytes: int) -> bytes:
    """Zero bytes that round a member's data up to whole 512-byte blocks."""
    return bytes(-size_bytes % BLOCK)


@dataclass(frozen=True, slots=True)
class Member:
    """A regular-file member: its name and data size."""

    name: str
    size_bytes: int


def _octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\x00 ").lstrip(b" ")
    if field[:1] and field[0] & 0x80:
        raise PackageFormatError(f"tar {what} uses base-256, which a package never does")
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise PackageFormatError(f"tar header has an invalid {what} field") from exc


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:] == bytes(len(data) - pos):
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise PackageFormatError("malformed pax record")
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise PackageFormatError("malformed pax record length") from exc
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise PackageFormatError("malformed pax record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise PackageFormatError("malformed pax record (no '=')")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PackageFormatError("pax record is not UTF-8") from exc
        pos = end
    return records


class TarReader:
    """Pull members from a decompressed tar stream; ``read`` is any ``read(n) -> bytes``."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._remaining = 0  # data bytes of the current member not yet read
        self._pad = 0
        self.ended = False

    def _read_exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._read(n - got)
            if not chunk:
                raise PackageTruncatedError(f"package ends inside {what}")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _header_block(self) -> bytes:
        block = self._read_exact(BLOCK, "a tar header")
        if block == bytes(BLOCK):
            return block
        stored = _octal(block[148:156], "checksum")
        computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if stored != computed:
            raise PackageFormatError("tar header checksum mismatch (corrupt or not a tar)")
        if block[257:263] != b"ustar\x00":
            raise PackageFormatError("tar header is not POSIX ustar/pax")
        return block

    def next_member(self) -> Member | None:
        """The next regular-file member, or None at the end of the archive."""
        if self._remaining:
            raise PackageFormatError("previous member's data was not read")  # our bug if reached
        self._read_exact(self._pad, "tar padding")
        self._pad = 0
        pax: dict[str, str] | None = None
        while True:
            block = self._header_block()
            if block == bytes(BLOCK):
                if pax is not None:
                    raise PackageFormatError("pax header without a member")
                self._finish()
                return None
            typeflag = block[156:157]
            size = _octal(block[124:136], "size")
            if typeflag == _PAX:
                if pax is not None:
                    raise PackageFormatError("two pax headers in a row")
                if size > MAX_PAX_BYTES:
                    raise PackageFormatError(f"pax header of {size} bytes exceeds {MAX_PAX_BYTES}")
                data = self._read_exact(size + (-size % BLOCK), "a pax header")
                pax = _parse_pax(data[:size])
                continue
            if typeflag not in _REGULAR:
                kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
                raise PackageFormatError(f"package holds a {kind}; only regular files are allowed")
            name = self._name(block, pax or {})
            if pax and "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError as exc:
                    raise PackageFormatError("pax size is not a number") from exc
            if pax and any(k.startswith("GNU.sparse") for k in pax):
                raise PackageFormatError(f"{name}: sparse tar members are not allowed")
            if size < 0:
                raise PackageFormatError(f"{name}: negative size")
            self._remaining = size
            self._pad = -size % BLOCK
            return Member(name, size)

    @staticmethod
    def _name(block: bytes, pax: dict[str, str]) -> str:
        if "path" in pax:
            return pax["path"]
        name = block[0:100].split(b"\x00", 1)[0]
        prefix = block[345:500].split(b"\x00", 1)[0]
        full = prefix + b"/" + name if prefix else name
        try:
            return full.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PackageFormatError("tar member name is not UTF-8") from exc

    def read_data(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the current member's data; b"" once it is all read."""
        if not self._remaining:
            return b""
        chunk = self._read(min(max_bytes, self._remaining))
        if not chunk:
            raise PackageTruncatedError("package ends inside a file's data")
        self._remaining -= len(chunk)
        return chunk

    def _finish(self) -> None:
        if self._read_exact(BLOCK, "the end-of-archive marker") != bytes(BLOCK):
            raise PackageFormatError("tar end-of-archive marker is incomplete")
        trailing = 0
        while chunk := self._read(64 * 1024):
            if chunk.count(0) != len(chunk):
                raise PackageFormatError("data after the end of the tar archive")
            trailing += len(chunk)
            if trailing > MAX_TRAILING_ZERO_BYTES:
                raise PackageFormatError("too much padding after the end of the tar archive")
        self.ended = True
