"""The RAM stream's frames: round trips however the bytes are cut, and hostile frames."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ferry.protocol import ramframes
from ferry.protocol.ramframes import (
    MAX_CHUNK_BYTES,
    MAX_PAYLOAD_BYTES,
    PLAIN,
    ZSTD,
    FrameDecoder,
    RamFrameError,
    encode_frame,
)


def _stream(chunks: list[bytes], compress: list[bool]) -> bytes:
    out = b""
    for chunk, z in zip(chunks, compress, strict=True):
        out += (encode_frame(ZSTD, ramframes.compress(chunk)) if z
                else encode_frame(PLAIN, chunk))
    return out


@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8),
       st.data())
def test_round_trip_cut_anywhere(chunks: list[bytes], data: st.DataObject) -> None:
    compress = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    wire = _stream(chunks, compress)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder()
    got: list[bytes] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[last:cut])
        last = cut
    decoder.finish()
    assert got == chunks
    assert decoder.frames == len(chunks)
    assert decoder.wire_bytes == len(wire)


def test_compressible_chunk_shrinks() -> None:
    chunk = b"redis-key-0001:value;" * 10_000
    frame = encode_frame(ZSTD, ramframes.compress(chunk))
    assert len(frame) < len(chunk) // 10
    assert FrameDecoder().feed(frame) == [chunk]


@pytest.mark.parametrize("header", [
    struct.pack(">B3sI", 0x41, b"\0\0\0", 10),        # unknown kind
    struct.pack(">B3sI", PLAIN, b"\0\1\0", 10),       # reserved bytes not zero
    struct.pack(">B3sI", PLAIN, b"\0\0\0", 0),        # empty payload
    struct.pack(">B3sI", ZSTD, b"\0\0\0", MAX_PAYLOAD_BYTES + 1),  # over the bound
], ids=["kind", "reserved", "empty", "oversize"])
def test_bad_header_refused_before_payload(header: bytes) -> None:
    with pytest.raises(RamFrameError):
        FrameDecoder().feed(header)


def test_plain_frame_over_chunk_bound_refused() -> None:
    payload = b"x" * (MAX_CHUNK_BYTES + 1)
    with pytest.raises(RamFrameError, match="plain frame"):
        FrameDecoder().feed(encode_frame(PLAIN, payload))


def test_zstd_bomb_refused_by_stated_size() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 * MAX_CHUNK_BYTES))
    assert len(bomb) < MAX_PAYLOAD_BYTES
    with pytest.raises(RamFrameError, match="states"):
        FrameDecoder().feed(encode_frame(ZSTD, bomb))


def test_zstd_without_stated_size_refused() -> None:
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 1000)
    with pytest.raises(RamFrameError, match="does not state"):
        FrameDecoder().feed(encode_frame(ZSTD, unsized))


def test_garbage_zstd_refused() -> None:
    with pytest.raises(RamFrameError, match="bad zstd"):
        FrameDecoder().feed(encode_frame(ZSTD, os.urandom(100)))


def test_stream_ending_inside_a_frame_is_an_error() -> None:
    wire = encode_frame(PLAIN, b"abcdef")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-2]) == []
    with pytest.raises(RamFrameError, match="ended inside a frame"):
        decoder.finish()


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_frame(PLAIN, b"")
    with pytest.raises(ValueError, match="unknown frame kind"):
        encode_frame(0x41, b"x")
