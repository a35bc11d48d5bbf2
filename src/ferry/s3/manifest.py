"""The manifest of one checkpoint of an S3-backed device: a pure codec, no I/O.

A device of ``size_bytes`` is cut into objects of ``object_size_bytes`` (the
last may be short). Each object is either a *hole* (all zeros: nothing stored)
or stored under the SHA-256 of its bytes. A manifest lists them all::

    offset      size    field
    0           8       magic b"FERRYS3M"
    8           4       version (u32, little-endian) = 1
    12          4       flags (u32) = 0, reserved
    16          8       sequence (u64): 1 for the first checkpoint, +1 for each later one
    24          8       created_unix_ns (u64): when the checkpoint was taken
    32          8       size_bytes of the device (u64)
    40          4       block_size_bytes (u32): the device's block size (dirty tracking,
                        migration); object_size_bytes is a multiple of it
    44          4       object_size_bytes (u32)
    48          4       n = object count (u32) = ceil(size_bytes / object_size_bytes)
    52          4       m = stored objects (u32), the others are holes
    56          b       bitmap, b = ceil(n / 8): bit (i % 8) of byte (i // 8) is set when
                        object i is stored; padding bits are zero
    56+b        32*m    SHA-256 of each stored object, in object order
    56+b+32m    32      SHA-256 of every byte before it

The trailing digest makes a truncated or bit-flipped manifest an error rather
than a different device. Every field is checked against the others and against
:data:`MAX_OBJECTS`, so a decoder trusts no length before checking it and a
manifest costs at most :data:`MAX_MANIFEST_BYTES` to read.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.errors import ConfigError
from ferry.s3.errors import ManifestFormatError

MAGIC = b"FERRYS3M"
VERSION = 1
DIGEST_BYTES = 32
"""SHA-256, not the engine's XXH3 (:mod:`ferry.storage.hashing`): an object's name is
its hash, in a bucket others may write, so the name must be collision resistant."""

DEFAULT_OBJECT_SIZE_BYTES = 4 << 20
"""4 MiB: large enough that S3's per-request cost (a round trip, a few ms) is small
against the transfer, small enough that a lazy read of one block does not fetch
much more than it needs. (Also the size of a SeaweedFS filer chunk.)"""

MIN_OBJECT_SIZE_BYTES = 4096
MAX_OBJECT_SIZE_BYTES = 64 << 20
"""Every object is read whole into memory, so its size bounds a read from S3."""

MAX_OBJECTS = 1 << 21
"""2 Mi objects: 8 TiB at 4 MiB objects, and a manifest of at most 64.3 MiB."""

_HEADER = struct.Struct("<8sIIQQQIIII")
MAX_MANIFEST_BYTES = _HEADER.size + MAX_OBJECTS // 8 + (MAX_OBJECTS + 1) * DIGEST_BYTES
"""The largest manifest a reader accepts (the bound on a manifest read from S3)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """One checkpoint: the device's geometry and, per object, its SHA-256 or None (hole)."""

    sequence: int
    created_unix_ns: int
    size_bytes: int
    block_size_bytes: int
    object_size_bytes: int
    objects: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        check_geometry(self.size_bytes, self.block_size_bytes, self.object_size_bytes)
        if not 1 <= self.sequence < 1 << 64:
            raise ConfigError("manifest sequence must be 1 .. 2**64-1")
        if not 0 <= self.created_unix_ns < 1 << 64:
            raise ConfigError("manifest created_unix_ns out of range")
        if len(self.objects) != object_count(self.size_bytes, self.object_size_bytes):
            raise ConfigError(f"manifest lists {len(self.objects)} objects, the geometry has "
                              f"{object_count(self.size_bytes, self.object_size_bytes)}")
        if any(d is not None and len(d) != DIGEST_BYTES for d in self.objects):
            raise ConfigError(f"every object digest must be {DIGEST_BYTES} bytes")

    def object_length(self, index: int) -> int:
        """Bytes in object ``index`` (the last may be short)."""
        start = index * self.object_size_bytes
        return min(self.object_size_bytes, self.size_bytes - start)

    def stored(self) -> set[bytes]:
        """The distinct digests this checkpoint needs from the bucket."""
        return {d for d in self.objects if d is not None}


def object_count(size_bytes: int, object_size_bytes: int) -> int:
    return -(-size_bytes // object_size_bytes)


def check_geometry(size_bytes: int, block_size_bytes: int, object_size_bytes: int) -> None:
    """Raise ConfigError unless the three sizes make a device ferry can store."""
    if size_bytes < 0:
        raise ConfigError("size_bytes must be >= 0")
    if block_size_bytes <= 0 or block_size_bytes % 512:
        raise ConfigError("block_size_bytes must be a positive multiple of 512")
    if not MIN_OBJECT_SIZE_BYTES <= object_size_bytes <= MAX_OBJECT_SIZE_BYTES:
        raise ConfigError(f"object_size_bytes must be {MIN_OBJECT_SIZE_BYTES} .. "
                          f"{MAX_OBJECT_SIZE_BYTES}")
    if object_size_bytes % block_size_bytes:
        raise ConfigError(f"object_size_bytes ({object_size_bytes}) must be a multiple of "
                          f"block_size_bytes ({block_size_bytes})")
    if object_count(size_bytes, object_size_bytes) > MAX_OBJECTS:
        raise ConfigError(f"a device of {size_bytes} bytes needs more than {MAX_OBJECTS} "
                          f"objects of {object_size_bytes} bytes: use larger objects")


def encode(manifest: Manifest) -> bytes:
    objects: Sequence[bytes | None] = manifest.objects
    n = len(objects)
    bitmap = bytearray(-(-n // 8))
    digests = []
    for i, d in enumerate(objects):
        if d is not None:
            bitmap[i // 8] |= 1 << (i % 8)
            digests.append(d)
    body = b"".join([
        _HEADER.pack(MAGIC, VERSION, 0, manifest.sequence, manifest.created_unix_ns,
                     manifest.size_bytes, manifest.block_size_bytes,
                     manifest.object_size_bytes, n, len(digests)),
        bytes(bitmap), *digests])
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, *, key: str | None = None) -> Manifest:
    """The manifest in ``data``; anything malformed is a :class:`ManifestFormatError`."""

    def bad(message: str) -> ManifestFormatError:
        return ManifestFormatError(message, key=key)

    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"{len(data)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    if len(data) < _HEADER.size + DIGEST_BYTES:
        raise bad(f"only {len(data)} bytes: truncated, or not a ferry manifest")
    (magic, version, flags, sequence, created, size, block_size, object_size, n,
     m) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise bad("not a ferry manifest (bad magic)")
    if version != VERSION:
        raise bad(f"version {version}; this ferry reads version {VERSION}")
    if flags:
        raise bad(f"unknown flags {flags:#x}")
    try:
        check_geometry(size, block_size, object_size)
    except ConfigError as exc:
        raise bad(f"bad geometry: {exc}") from None
    if n != object_count(size, object_size):
        raise bad(f"says {n} objects, its geometry has {object_count(size, object_size)}")
    if m > n:
        raise bad(f"says {m} stored objects out of {n}")
    bitmap_bytes = -(-n // 8)
    expected = _HEADER.size + bitmap_bytes + m * DIGEST_BYTES + DIGEST_BYTES
    if len(data) != expected:
        raise bad(f"{len(data)} bytes, its header implies {expected}: truncated or padded")
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise bad("checksum mismatch: corrupted")
    bitmap = data[_HEADER.size:_HEADER.size + bitmap_bytes]
    if n % 8 and bitmap[-1] >> (n % 8):
        raise bad("padding bits of the object bitmap are set")
    stored = [i for i in range(n) if bitmap[i // 8] >> (i % 8) & 1]
    if len(stored) != m:
        raise bad(f"bitmap marks {len(stored)} stored objects, the header says {m}")
    if sequence == 0:
        raise bad("sequence 0 (sequences start at 1)")
    objects: list[bytes | None] = [None] * n
    pos = _HEADER.size + bitmap_bytes
    for i in stored:
        objects[i] = data[pos:pos + DIGEST_BYTES]
        pos += DIGEST_BYTES
    return Manifest(sequence, created, size, block_size, object_size, tuple(objects))
