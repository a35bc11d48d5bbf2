"""Helpers for package tests: a small VM directory and hand-crafted (hostile) packages."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ferry.package.format import (
    HEADER_NAME,
    SIGNATURE_NAME,
    SIGNING_CONTEXT,
    canonical_json,
)
from ferry.package.keys import SigningKey

MANIFEST = {"name": "tiny-vm", "memory_bytes": 2 * 1024 * 1024, "devices": ["disk"], "vcpus": 1}


def make_vm_dir(root: Path, *, seed: int = 7) -> Path:
    """A package directory shaped like the VM layer's: mostly-zero memory, state, disk, nested."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    memory = bytearray(2 * 1024 * 1024)
    for page in rng.sample(range(len(memory) // 4096), 40):  # ~8% of pages hold data
        memory[page * 4096 : (page + 1) * 4096] = rng.randbytes(4096)
    (root / "memory.bin").write_bytes(memory)
    (root / "state.bin").write_bytes(rng.randbytes(53_000))
    (root / "manifest.json").write_text(json.dumps(MANIFEST))
    (root / "disks").mkdir()
    (root / "disks" / "disk.img").write_bytes(rng.randbytes(300_000) + bytes(700_000))
    (root / "empty.txt").write_bytes(b"")
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root by relative path, with contents."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary dot-files or staging dirs a failed operation would have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".ferry-tmp-" in p.name)


def decompress(package: Path) -> bytes:
    """The raw tar bytes of a package."""
    with package.open("rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh).readall()


def members_of(package: Path) -> list[tuple[str, bytes]]:
    """(name, data) of every member, read with tarfile: for rebuilding modified packages."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(decompress(package)), mode="r:") as tf:
        for info in tf:
            f = tf.extractfile(info)
            assert f is not None
            out.append((info.name, f.read()))
    return out


@dataclass(frozen=True)
class Entry:
    """One member to craft: a regular file unless ``kind`` says otherwise."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""
    pax: dict[str, str] | None = None


def craft(path: Path, entries: list[Entry], *, tail: bytes = b"") -> Path:
    """Write a zstd-compressed pax tar of exactly these entries (no validation at all)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.kind
            info.linkname = e.linkname
            info.size = len(e.data) if e.kind == tarfile.REGTYPE else 0
            if e.pax:
                info.pax_headers = e.pax
            tf.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue() + tail))
    return path


def header_for(files: dict[str, bytes], key: SigningKey, manifest: object = None) -> bytes:
    """Canonical header bytes listing ``files`` and naming ``key`` as signer."""
    return canonical_json(
        {
            "created": "2026-11-22T00:00:00Z",
            "files": [
                {"path": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                for n, d in sorted(files.items())
            ],
            "format": "ferry-package",
            "manifest": MANIFEST if manifest is None else manifest,
            "signer": key.key_id,
            "version": 1,
        }
    )


def signature_for(header: bytes, key: SigningKey) -> bytes:
    """A valid signature member by ``key`` over ``header``."""
    import base64

    return canonical_json(
        {
            "algorithm": "ed25519",
            "key_id": key.key_id,
            "public_key": base64.b64encode(key.public.raw).decode(),
            "signature": base64.b64encode(key.sign(SIGNING_CONTEXT + header)).decode(),
        }
    )


def signed_entries(
    files: dict[str, bytes], key: SigningKey, body: list[Entry] | None = None
) -> list[Entry]:
    """Header, body (default: the files in order), signature: a valid package unless body lies."""
    header = header_for(files, key)
    if body is None:
        body = [Entry(n, d) for n, d in sorted(files.items())]
    return [Entry(HEADER_NAME, header), *body, Entry(SIGNATURE_NAME, signature_for(header, key))]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def dir_is_empty_of_outputs(parent: Path, *names: str) -> bool:
    return not any((parent / n).exists() for n in names) and not leftovers(parent)
