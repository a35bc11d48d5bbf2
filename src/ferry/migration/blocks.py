"""Encoding and decoding of block runs for WriteBlocks frames.

Kept apart from the migrator so the rules (zero-run elision, compression,
hash per decoded block) are in one place and tested on their own.
"""

from __future__ import annotations

import enum
from functools import lru_cache

import lz4.frame
import zstandard

from ferry.buffers import Buffer
from ferry.errors import IntegrityError, RemoteProtocolError
from ferry.protocol.messages import Encoding, WriteBlocks
from ferry.storage.device import Geometry
from ferry.storage.hashing import block_hash

MAX_DECODED_RUN_BYTES = 64 * 1024 * 1024
"""Upper bound on a decoded run, so a compressed frame cannot expand without limit."""


class Compression(enum.Enum):
    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"


@lru_cache(maxsize=8)
def _zeroes(length: int) -> bytes:
    return bytes(length)


@lru_cache(maxsize=8)
def _zero_hash(length: int) -> bytes:
    return block_hash(_zeroes(length))


_ZSTD_LEVEL = 1  # fastest level: the wire is rarely slower than level-1 zstd on one core


def compress_sample(data: Buffer) -> bytes:
    """``data`` compressed as a ZSTD run would be: a sample of compressibility."""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def encode_run(
    device: int,
    first_block: int,
    geometry: Geometry,
    data: Buffer,
    compression: Compression = Compression.NONE,
) -> list[WriteBlocks]:
    """Build the WriteBlocks events for ``data``, the contents of blocks
    ``first_block, first_block+1, ...`` of a device with ``geometry``.

    Runs of all-zero blocks become ZEROES events that carry no data; the rest
    is sent plain or compressed. Most runs come back as one event.
    """
    view = memoryview(data)
    hashes: list[bytes] = []
    zero: list[bool] = []
    pos = 0
    block = first_block
    while pos < len(view):
        n = geometry.block_length(block)
        chunk = view[pos : pos + n]
        h = block_hash(chunk)
        hashes.append(h)
        # Only a block whose hash is the hash of zeroes can be all zeroes, so the
        # hash we need anyway spares a second pass over ordinary data; the byte
        # comparison confirms (XXH3 is not collision resistant against a guest).
        zero.append(h == _zero_hash(n) and bytes(chunk) == _zeroes(n))
        pos += n
        block += 1
    events: list[WriteBlocks] = []
    i = 0
    pos = 0
    while i < len(hashes):
        j = i
        while j < len(hashes) and zero[j] == zero[i]:
            j += 1
        length = sum(geometry.block_length(first_block + k) for k in range(i, j))
        part = view[pos : pos + length]
        events.append(
            _event(device, first_block + i, tuple(hashes[i:j]), part, zero[i], compression)
        )
        pos += length
        i = j
    return events


def _event(
    device: int,
    first_block: int,
    hashes: tuple[bytes, ...],
    data: memoryview,
    zero: bool,
    compression: Compression,
) -> WriteBlocks:
    if zero:
        return WriteBlocks(device, first_block, Encoding.ZEROES, hashes, b"")
    if compression is Compression.ZSTD:
        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
        return WriteBlocks(device, first_block, Encoding.ZSTD, hashes, packed)
    if compression is Compression.LZ4:
        return WriteBlocks(device, first_block, Encoding.LZ4, hashes, lz4.frame.compress(data))
    return WriteBlocks(device, first_block, Encoding.PLAIN, hashes, data)


def _unzstd(packed: Buffer, expected: int, device_name: str) -> bytes:
    """Decompress one zstd frame of ``expected`` bytes without ever allocating more.

    ``max_output_size`` only applies to frames that do not state their size; a
    frame that does is decompressed into a buffer of the stated size, so a
    stated size above ``expected`` is refused before anything is allocated.
    """
    try:
        stated = zstandard.frame_content_size(packed)
        if stated > expected:
            raise RemoteProtocolError(
                f"{device_name}: zstd frame states {stated} bytes, expected {expected}"
            )
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"{device_name}: bad zstd data: {exc}") from exc


def _unlz4(packed: Buffer, expected: int, device_name: str) -> bytes:
    """Decompress one lz4 frame of ``expected`` bytes without ever allocating more.

    ``lz4.frame.decompress`` has no output limit and the frame decompressor
    allocates a stated content size up front, so the stated size is checked
    first and the output is capped at one byte past ``expected`` (a longer
    frame is then refused without being decoded further).
    """
    try:
        stated = int(lz4.frame.get_frame_info(packed)["content_size"])
        if stated > expected:
            raise RemoteProtocolError(
                f"{device_name}: lz4 frame states {stated} bytes, expected {expected}"
            )
        decompressor = lz4.frame.LZ4FrameDecompressor()
        data: bytes = decompressor.decompress(packed, max_length=expected + 1)
        if not decompressor.eof and len(data) == expected:
            raise RemoteProtocolError(f"{device_name}: lz4 frame longer than {expected} bytes")
    except RuntimeError as exc:
        raise RemoteProtocolError(f"{device_name}: bad lz4 data: {exc}") from exc
    return data


def decode_run(event: WriteBlocks, geometry: Geometry, device_name: str) -> bytes:
    """Return the decoded run of ``event`` after checking its shape and every
    block's hash against ``geometry``. Raises RemoteProtocolError for a run that
    does not fit the device, IntegrityError naming the first bad block."""
    count = len(event.hashes)
    last = event.first_block + count - 1
    if count == 0 or event.first_block < 0 or last >= geometry.block_count:
        raise RemoteProtocolError(
            f"{device_name}: blocks {event.first_block}..{last} outside device "
            f"of {geometry.block_count} blocks"
        )
    expected = geometry.block_offset(last) + geometry.block_length(last)
    expected -= geometry.block_offset(event.first_block)
    if expected > MAX_DECODED_RUN_BYTES:
        raise RemoteProtocolError(f"{device_name}: run of {expected} bytes too large")
    if event.encoding is Encoding.ZEROES:
        data: bytes = bytes(expected)
    elif event.encoding is Encoding.PLAIN:
        data = event.data if isinstance(event.data, bytes) else bytes(event.data)
    elif event.encoding is Encoding.ZSTD:
        data = _unzstd(event.data, expected, device_name)
    elif event.encoding is Encoding.LZ4:
        data = _unlz4(event.data, expected, device_name)
    else:  # pragma: no cover - the codec only produces known encodings
        raise RemoteProtocolError(f"{device_name}: unknown encoding {event.encoding}")
    if len(data) != expected:
        raise RemoteProtocolError(
            f"{device_name}: run at block {event.first_block} carries {len(data)} bytes, "
            f"expected {expected}"
        )
    view = memoryview(data)
    pos = 0
    for i, want in enumerate(event.hashes):
        block = event.first_block + i
        n = geometry.block_length(block)
        if block_hash(view[pos : pos + n]) != want:
            raise IntegrityError(
                "received block does not match its hash", device=device_name, block=block
            )
        pos += n
    return data
