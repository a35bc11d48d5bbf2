"""The ferry package format, version 1.

A package is ONE file: a POSIX (pax) tar stream compressed with zstd::

    zstd frame(s) ─┬─ tar member  ferry-package.json   header: version, time, signer,
                   │                                   VM manifest, [path, size, sha256]...
                   ├─ tar member  <content file>       regular files only, in header order
                   ├─ ...
                   ├─ tar member  ferry-package.sig    {algorithm, key_id, public_key, signature}
                   └─ two zero blocks (end of archive)

``ferry-package.json`` holds canonical JSON (sorted keys, no spaces, ASCII;
readers refuse anything else so one header has exactly one byte form). The
signature is ed25519 over ``SIGNING_CONTEXT + <header bytes>``; the header
lists every file's size and SHA-256, so signing it signs everything.

The header comes first so a reader knows what to expect (names, sizes, and
the claimed signer) before it reads a byte of content; the signature comes
last, like every streaming format, so the reader only trusts what it
extracted once it has seen the end. See docs/package-format.md.

Size caps (Firecracker's snapshot format has one "to prevent DOS attacks";
so do we): the header, the signature and pax records are read into memory
and bounded; content is streamed in 1 MiB chunks.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.package.errors import PackageFormatError, SignatureError

FORMAT_NAME = "ferry-package"
FORMAT_VERSION = 1
HEADER_NAME = "ferry-package.json"
SIGNATURE_NAME = "ferry-package.sig"
RESERVED_NAMES = frozenset({HEADER_NAME, SIGNATURE_NAME})
SIGNATURE_ALGORITHM = "ed25519"
SIGNING_CONTEXT = b"ferry-package-signature-v1\x00"
"""Domain separation: a package signature can never be replayed as some other ed25519 message."""
PACKAGE_SUFFIX = ".ferry"

CHUNK_BYTES = 1024 * 1024
"""Unit of streaming I/O, hashing and compression: large enough for throughput, small in RAM."""
MAX_HEADER_BYTES = 4 * 1024 * 1024
"""The VM manifest is a few KiB; 4 MiB leaves room and still bounds what a reader loads."""
MAX_SIGNATURE_BYTES = 4096
MAX_FILES = 10_000
MAX_PATH_BYTES = 1024
MAX_NAME_COMPONENT_BYTES = 255
MAX_FILE_BYTES = 1 << 44
"""16 TiB: larger than any disk we ship, small enough that sizes stay sane integers."""
ZSTD_LEVEL = 3

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CREATED_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON document that ferry signs and accepts."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _load_canonical(data: bytes, what: str) -> Any:
    try:
        obj = json.loads(data.decode("ascii"))
        again = canonical_json(obj)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackageFormatError(f"{what} is not valid JSON: {exc}") from exc
    if again != data:
        raise PackageFormatError(f"{what} is not canonical JSON (sorted keys, no spaces, ASCII)")
    return obj


def check_member_path(path: str) -> str:
    """Refuse names that could escape the destination or alias another file.

    Relative, '/'-separated, no empty, '.' or '..' components, no NUL or
    backslash, bounded length. No normalisation: a name is valid as written or
    not at all, so two spellings can never name one file.
    """
    raw = path.encode("utf-8", "surrogateescape")
    if not path or len(raw) > MAX_PATH_BYTES:
        raise PackageFormatError(f"invalid file name {path!r}: empty or too long")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise PackageFormatError(f"invalid file name {path!r}: absolute or contains \\ or NUL")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise PackageFormatError(f"invalid file name {path!r}: path traversal or empty part")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_COMPONENT_BYTES:
            raise PackageFormatError(f"invalid file name {path!r}: a component is too long")
    return path


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One content file: its path inside the package, size and SHA-256 (hex)."""

    path: str
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_member_path(self.path)
        if self.path in RESERVED_NAMES:
            raise PackageFormatError(f"{self.path} is a reserved name")
        if not 0 <= self.size_bytes <= MAX_FILE_BYTES:
            raise PackageFormatError(f"{self.path}: invalid size {self.size_bytes}")
        if not _SHA256_RE.fullmatch(self.sha256):
            raise PackageFormatError(f"{self.path}: invalid sha256 {self.sha256!r}")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size_bytes}


@dataclass(frozen=True, slots=True)
class PackageHeader:
    """The decoded ``ferry-package.json``: what the signature vouches for."""

    created: str
    signer: str
    manifest: Mapping[str, Any]
    files: tuple[FileEntry, ...]
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise PackageFormatError(f"unsupported package format version {self.version}")
        if not _CREATED_RE.fullmatch(self.created):
            raise PackageFormatError(f"invalid creation time {self.created!r}")
        if not _KEY_ID_RE.fullmatch(self.signer):
            raise PackageFormatError(f"invalid signer key id {self.signer!r}")
        if len(self.files) > MAX_FILES:
            raise PackageFormatError(f"too many files ({len(self.files)} > {MAX_FILES})")
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise PackageFormatError(f"file {entry.path} is listed twice")
            seen.add(entry.path)
        # "a" and "a/b" cannot both be files: one would have to be a directory.
        for entry in self.files:
            parts = entry.path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in seen:
                    raise PackageFormatError(
                        f"file {entry.path} lies under {'/'.join(parts[:i])}, which is a file"
                    )

    @property
    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.files)

    def encode(self) -> bytes:
        return canonical_json(
            {
                "created": self.created,
                "files": [e.to_json() for e in self.files],
                "format": FORMAT_NAME,
                "manifest": dict(self.manifest),
                "signer": self.signer,
                "version": self.version,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> PackageHeader:
        obj = _load_canonical(data, HEADER_NAME)
        if not isinstance(obj, dict):
            raise PackageFormatError(f"{HEADER_NAME} is not a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise PackageFormatError(f"{HEADER_NAME} does not describe a {FORMAT_NAME}")
        expected = {"created", "files", "format", "manifest", "signer", "version"}
        if set(obj) != expected:
            raise PackageFormatError(
                f"{HEADER_NAME} has fields {sorted(obj)}, expected {sorted(expected)}"
            )
        try:
            version, created, signer = obj["version"], obj["created"], obj["signer"]
            manifest, files = obj["manifest"], obj["files"]
            if not isinstance(version, int) or not isinstance(created, str):
                raise TypeError("version/created")
            if not isinstance(signer, str) or not isinstance(manifest, dict):
                raise TypeError("signer/manifest")
            if not isinstance(files, list):
                raise TypeError("files")
            entries = []
            for f in files:
                if not isinstance(f, dict) or set(f) != {"path", "sha256", "size"}:
                    raise TypeError("file entry")
                path, size, digest = f["path"], f["size"], f["sha256"]
                if not isinstance(path, str) or not isinstance(digest, str):
                    raise TypeError("file entry")
                if not isinstance(size, int) or isinstance(size, bool):
                    raise TypeError("file size")
                entries.append(FileEntry(path, size, digest))
        except TypeError as exc:
            msg = f"{HEADER_NAME} has a field of the wrong type ({exc})"
            raise PackageFormatError(msg) from exc
        return cls(created, signer, manifest, tuple(entries), version)


@dataclass(frozen=True, slots=True)
class SignatureBlock:
    """The decoded ``ferry-package.sig``."""

    key_id: str
    public_key: bytes
    signature: bytes
    algorithm: str = SIGNATURE_ALGORITHM

    def encode(self) -> bytes:
        return canonical_json(
            {
                "algorithm": self.algorithm,
                "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_key).decode("ascii"),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SignatureBlock:
        try:
            obj = _load_canonical(data, SIGNATURE_NAME)
        except PackageFormatError as exc:
            raise SignatureError(str(exc)) from exc
        if not isinstance(obj, dict) or set(obj) != {
            "algorithm",
            "key_id",
            "public_key",
            "signature",
        }:
            raise SignatureError(f"{SIGNATURE_NAME} does not have the expected fields")
        if obj["algorithm"] != SIGNATURE_ALGORITHM:
            raise SignatureError(f"unsupported signature algorithm {obj['algorithm']!r}")
        if not isinstance(obj["key_id"], str) or not _KEY_ID_RE.fullmatch(obj["key_id"]):
            raise SignatureError(f"invalid key id in {SIGNATURE_NAME}")
        try:
            public_key = base64.b64decode(obj["public_key"], validate=True)
            signature = base64.b64decode(obj["signature"], validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise SignatureError(f"{SIGNATURE_NAME} holds invalid base64") from exc
        if len(public_key) != 32 or len(signature) != 64:
            raise SignatureError(f"{SIGNATURE_NAME}: wrong ed25519 key or signature length")
        return cls(obj["key_id"], public_key, signature, obj["algorithm"])


@dataclass(frozen=True, slots=True)
class PackageInfo:
    """What a package holds and who signed it, returned by write, verify and extract."""

    path: Path
    header: PackageHeader
    key_id: str
    compressed_bytes: int
    header_sha256: str = field(default="")

    @property
    def manifest(self) -> Mapping[str, Any]:
        return self.header.manifest

    @property
    def files(self) -> tuple[FileEntry, ...]:
        return self.header.files

    @property
    def created(self) -> str:
        return self.header.created

    @property
    def total_bytes(self) -> int:
        return self.header.total_bytes
