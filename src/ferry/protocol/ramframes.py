"""Frames of QEMU's RAM stream on ferry's link: plain or zstd-compressed chunks.

QEMU writes its migration stream to ferry, which carries it to the destination's QEMU
(:mod:`ferry.qemu.ramstream`). On the link the stream is cut into frames, so that each
chunk can go plain or compressed, whichever the link's speed and the chunk's
compressibility make faster (:mod:`ferry.migration.autocompress`)::

    offset  size  field
    0       1     kind: 0x50 'P' plain, 0x5A 'Z' one zstd frame
    1       3     zero
    4       4     payload length, big-endian, 1..MAX_PAYLOAD_BYTES

A 'Z' payload decompresses to at most :data:`MAX_CHUNK_BYTES` (the zstd frame must
state its size, and a stated size above the bound is refused before anything is
allocated). Sans-IO: :func:`encode_frame` returns bytes, :class:`FrameDecoder` takes
bytes as they arrive and returns the chunks they complete.
"""

from __future__ import annotations

import struct
from typing import Final

import zstandard

from ferry.buffers import Buffer
from ferry.errors import RemoteProtocolError

PLAIN: Final = 0x50
ZSTD: Final = 0x5A
HEADER = struct.Struct(">B3sI")
MAX_CHUNK_BYTES = 1024 * 1024
"""The largest chunk a frame carries, decoded."""
MAX_PAYLOAD_BYTES = MAX_CHUNK_BYTES + 1024
"""The largest payload: a chunk plus zstd's overhead on data that does not compress
(a sender sends such a chunk plain anyway)."""
_ZSTD_LEVEL = 1


class RamFrameError(RemoteProtocolError):
    """A frame of the RAM stream that breaks the format above."""


def compress(chunk: Buffer) -> bytes:
    """One zstd frame of ``chunk`` (stating its size), at the fastest level.
    Releases the GIL while it runs, so it can run in a worker thread."""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(chunk)


def encode_frame(kind: int, payload: Buffer) -> bytes:
    """The frame carrying ``payload`` (a chunk for PLAIN, :func:`compress` output for ZSTD)."""
    if kind not in (PLAIN, ZSTD):
        raise ValueError(f"unknown frame kind {kind:#x}")
    n = len(memoryview(payload))
    if not 0 < n <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {n} bytes outside 1..{MAX_PAYLOAD_BYTES}")
    return HEADER.pack(kind, b"\0\0\0", n) + bytes(payload)


def _unzstd(payload: bytes) -> bytes:
    try:
        stated = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise RamFrameError(f"RAM stream: bad zstd frame: {exc}") from exc
    if stated < 0:
        raise RamFrameError("RAM stream: zstd frame does not state its size")
    if stated > MAX_CHUNK_BYTES:
        raise RamFrameError(f"RAM stream: zstd frame states {stated} bytes, more than "
                            f"{MAX_CHUNK_BYTES}")
    try:
        data: bytes = zstandard.ZstdDecompressor().decompress(payload,
                                                              max_output_size=MAX_CHUNK_BYTES)
    except zstandard.ZstdError as exc:
        raise RamFrameError(f"RAM stream: bad zstd frame: {exc}") from exc
    if len(data) != stated:
        raise RamFrameError(f"RAM stream: zstd frame gave {len(data)} bytes, stated {stated}")
    return data


class FrameDecoder:
    """Reassembles frames from the bytes of the link and decodes their chunks.

    Holds at most one header and one payload (:data:`MAX_PAYLOAD_BYTES`) of input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames = 0
        self.wire_bytes = 0

    def feed(self, data: Buffer) -> list[bytes]:
        """The chunks completed by ``data``, in order. Raises :class:`RamFrameError`."""
        self._buf += data
        self.wire_bytes += len(memoryview(data))
        chunks: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            kind, zero, n = HEADER.unpack_from(self._buf)
            if kind not in (PLAIN, ZSTD) or zero != b"\0\0\0":
                raise RamFrameError(f"RAM stream: bad frame header {bytes(self._buf[:8]).hex()}")
            if not 0 < n <= MAX_PAYLOAD_BYTES:
                raise RamFrameError(f"RAM stream: frame of {n} bytes outside "
                                    f"1..{MAX_PAYLOAD_BYTES}")
            if len(self._buf) < HEADER.size + n:
                break
            payload = bytes(self._buf[HEADER.size:HEADER.size + n])
            del self._buf[:HEADER.size + n]
            if kind == PLAIN:
                if n > MAX_CHUNK_BYTES:
                    raise RamFrameError(f"RAM stream: plain frame of {n} bytes, more than "
                                        f"{MAX_CHUNK_BYTES}")
                chunks.append(payload)
            else:
                chunks.append(_unzstd(payload))
            self.frames += 1
        return chunks

    def finish(self) -> None:
        """At the end of the stream: raises if it ended inside a frame."""
        if self._buf:
            raise RamFrameError(f"RAM stream ended inside a frame ({len(self._buf)} bytes "
                                "of it)")
