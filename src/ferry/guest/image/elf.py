"""Just enough ELF64 parsing to build images without host tools.

Two questions are answered, both from section headers:

* which shared libraries a binary needs (``DT_NEEDED`` in ``.dynamic``) and
  which loader it asks for (``PT_INTERP``): used to copy only the libraries a
  Debian package's binaries use into a root filesystem, instead of a
  package's whole dependency closure (redis-tools would drag in perl);
* which modules a kernel module depends on (``depends=`` in ``.modinfo``):
  Debian's kernel .deb ships no ``modules.dep`` (``depmod`` runs at install
  time) and the host may have no kmod, so we read the field ourselves.

Only little-endian ELF64 is supported: guests are x86_64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ferry.guest.image.errors import ElfError

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_SHT_DYNAMIC = 6
_PT_INTERP = 3
_DT_NULL = 0
_DT_NEEDED = 1
# A cap on section counts so a corrupt file cannot make us loop for long.
_MAX_SECTIONS = 1 << 16


@dataclass(frozen=True, slots=True)
class _Section:
    name_offset: int
    type: int
    offset: int
    size: int
    link: int


@dataclass(frozen=True, slots=True)
class ElfInfo:
    """The dynamic-linking facts of one ELF file."""

    needed: tuple[str, ...]
    interpreter: str | None


def is_elf(path: Path) -> bool:
    """True if ``path`` is a regular file starting with the ELF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _sections(data: bytes, path: Path) -> list[_Section]:
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file", path=str(path))
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfError("only little-endian ELF64 is supported", path=str(path))
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    if shnum > _MAX_SECTIONS or (shnum and shentsize < 64):
        raise ElfError("implausible section header table", path=str(path))
    out = []
    for i in range(shnum):
        base = shoff + i * shentsize
        if base + 64 > len(data):
            raise ElfError("section header beyond end of file", path=str(path))
        name, typ, _flags, _addr, off, size, link = struct.unpack_from("<IIQQQQI", data, base)
        out.append(_Section(name, typ, off, size, link))
    return out


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset : end if end >= 0 else len(data)].decode("utf-8", "replace")


def _interpreter(data: bytes) -> str | None:
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            break
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", data, base)
        if ptype == _PT_INTERP:
            return data[off : off + filesz].rstrip(b"\0").decode()
    return None


def read_elf(path: Path) -> ElfInfo:
    """Return the ``DT_NEEDED`` entries and the loader of an ELF file."""
    data = path.read_bytes()
    sections = _sections(data, path)
    needed: list[str] = []
    for sec in sections:
        if sec.type != _SHT_DYNAMIC or sec.link >= len(sections):
            continue
        strtab = sections[sec.link]
        for off in range(sec.offset, sec.offset + sec.size - 15, 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(_cstr(data, strtab.offset + val))
    return ElfInfo(needed=tuple(needed), interpreter=_interpreter(data))


def module_depends(path: Path) -> tuple[str, ...]:
    """The ``depends=`` list of a kernel module's ``.modinfo`` section."""
    data = path.read_bytes()
    sections = _sections(data, path)
    shstrndx = struct.unpack_from("<H", data, 0x3E)[0]
    if shstrndx >= len(sections):
        raise ElfError("bad section name table index", path=str(path))
    names = sections[shstrndx]
    for sec in sections:
        if _cstr(data, names.offset + sec.name_offset) != ".modinfo":
            continue
        for field in data[sec.offset : sec.offset + sec.size].split(b"\0"):
            if field.startswith(b"depends="):
                value = field[len(b"depends=") :].decode()
                return tuple(d for d in value.split(",") if d)
        return ()
    raise ElfError("no .modinfo section: not a kernel module", path=str(path))
