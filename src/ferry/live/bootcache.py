"""The destination's cache of boot files (kernel, initramfs), named by SHA-256 and bounded.

A migration or registry peer offers boot files by hash and size; the cache
keeps each one once under ``ROOT/<sha256>`` so later hops send nothing. Every
name is checked to be 64 lowercase hex digits and joined with
:func:`~ferry.vm.safepath.safe_join`; files arrive in chunks into a 0600
temporary file while being hashed (never whole in memory) and are renamed
into place only if they match. The cache holds at most ``max_files`` files
and ``max_bytes`` bytes: storing evicts the least recently used files that no
VM holds, and refuses (:class:`BootCacheFullError`) if that is not enough.

A VM that runs from cached files *pins* them: hard links under
``ROOT/pins/<holder>/``, laid out like the package (``boot/vmlinuz``), keep the
files while the VM lives (QEMU and later hops read them there), and eviction
skips any file with more than one link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError, RemoteProtocolError
from ferry.vm.safepath import safe_join

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_FILES = 32
"""Sixteen VMs' worth of distinct kernels and initramfs images."""
DEFAULT_MAX_BYTES = 2 * 1024**3
"""A Debian cloud kernel is ~8 MiB and ferry's initramfs a few MiB; 2 GiB is generous."""
PINS = "pins"


class BootCacheFullError(FerryError):
    """The boot cache cannot take a file without evicting files that VMs still use."""


def check_sha256(text: object, what: str = "boot file hash") -> str:
    """``text`` if it is 64 lowercase hex digits (a SHA-256); else RemoteProtocolError."""
    if not isinstance(text, str) or not SHA256_RE.match(text):
        raise RemoteProtocolError(f"{what} {text!r:.80} is not 64 lowercase hex digits")
    return text


@dataclass(frozen=True, slots=True)
class _Entry:
    path: Path
    size_bytes: int
    mtime_ns: int
    links: int


class BootCache:
    """Files by SHA-256 under ``root``; see the module docstring.

    ``holder`` names this process's pins (default: its pid).
    """

    def __init__(self, root: Path, *, max_files: int = DEFAULT_MAX_FILES,
                 max_bytes: int = DEFAULT_MAX_BYTES, holder: str | None = None) -> None:
        if max_files < 2 or max_bytes <= 0:
            raise ValueError("a boot cache needs room for at least a kernel and an initramfs")
        self.root = root
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.holder = holder or str(os.getpid())

    def path(self, sha256: str) -> Path:
        """Where the file with this hash lives (checked: hex name, inside the root)."""
        return safe_join(self.root, check_sha256(sha256))

    def entries(self) -> list[_Entry]:
        out: list[_Entry] = []
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            if SHA256_RE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    st = p.lstat()
                    out.append(_Entry(p, st.st_size, st.st_mtime_ns, st.st_nlink))
        return out

    def make_room(self, size_bytes: int) -> None:
        """Evict unpinned files, least recently used first, until ``size_bytes`` more fit."""
        if size_bytes > self.max_bytes:
            raise BootCacheFullError(f"a boot file of {size_bytes} bytes exceeds the boot "
                                     f"cache's {self.max_bytes} bytes")
        entries = sorted(self.entries(), key=lambda e: e.mtime_ns)
        count = len(entries)
        total = sum(e.size_bytes for e in entries)
        for e in entries:
            if count + 1 <= self.max_files and total + size_bytes <= self.max_bytes:
                break
            if e.links > 1:
                continue  # a running VM holds it
            with contextlib.suppress(FileNotFoundError):
                e.path.unlink()
                log.info("boot cache: evicted %s (%d bytes)", e.path.name, e.size_bytes)
            count -= 1
            total -= e.size_bytes
        if count + 1 > self.max_files or total + size_bytes > self.max_bytes:
            raise BootCacheFullError(
                f"the boot cache is full ({count} files, {total} bytes, all in use by VMs)")

    async def store(self, sha256: str, size_bytes: int,
                    chunks: AsyncIterator[bytes]) -> Path:
        """Write ``chunks`` (exactly ``size_bytes``) as the file ``sha256``, verified."""
        final = self.path(sha256)
        await asyncio.to_thread(self.make_room, size_bytes)
        tmp = final.with_name(f".{sha256[:16]}.{os.getpid()}.tmp")
        fd = await asyncio.to_thread(
            os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600)
        try:
            h = hashlib.sha256()
            written = 0
            try:
                async for chunk in chunks:
                    h.update(chunk)
                    written += len(chunk)
                    await asyncio.to_thread(os.write, fd, chunk)
            finally:
                os.close(fd)
            if written != size_bytes or h.hexdigest() != sha256:
                raise RemoteProtocolError(f"boot file {sha256[:16]}... does not match its "
                                          "SHA-256")
            await asyncio.to_thread(os.replace, tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return final

    @property
    def pin_dir(self) -> Path:
        """This holder's pins, laid out like a package directory (``boot/vmlinuz`` ...)."""
        return safe_join(self.root, f"{PINS}/{self.holder}")

    def pin(self, sha256: str, rel_path: str) -> bool:
        """Hard-link the cached file to ``pin_dir/rel_path``, which keeps it from eviction
        until :meth:`release`; mark it recently used. False if it is not cached."""
        source = self.path(sha256)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        pins = self.pin_dir
        target = safe_join(pins, rel_path)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not source.is_file() or source.is_symlink():
            return False
        try:
            os.link(source, target, follow_symlinks=False)
        except FileNotFoundError:
            return False  # evicted by another process just now
        except FileExistsError as exc:
            if not os.path.samefile(source, target):
                raise RemoteProtocolError(f"two boot files claim the path {rel_path!r}") from exc
        with contextlib.suppress(OSError):
            os.utime(source)
        return True

    def release(self) -> None:
        """Drop this holder's pins."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def sweep_pins(self) -> None:
        """Drop the pins of holders (pids) that no longer run."""
        pins = self.root / PINS
        if not pins.is_dir():
            return
        for d in pins.iterdir():
            if d.name.isdigit() and not Path(f"/proc/{d.name}").exists():
                shutil.rmtree(d, ignore_errors=True)
