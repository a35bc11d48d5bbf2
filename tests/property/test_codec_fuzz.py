"""Fuzzing the migration-protocol decoder with random and mutated bytes.

Whatever arrives, the codec may only return events, ask for more data, report
a clean close, or raise a RemoteProtocolError subclass: never IndexError,
struct.error, UnicodeDecodeError, ValueError, MemoryError... And it must not
allocate in proportion to a count or length field it was sent; only in
proportion to the bytes it actually received (checked with tracemalloc
against small caps, so a 2**32 count claimed by a 20-byte frame would show).
"""

from __future__ import annotations

import struct
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.errors import RemoteProtocolError
from ferry.protocol.codec import Connection, ConnectionClosed, encode
from ferry.protocol.messages import (
    BlockHashes,
    Completed,
    CompletedAck,
    Custom,
    CustomAck,
    DeviceInfo,
    DirtyAck,
    DirtyList,
    DontNeedAt,
    Encoding,
    Error,
    ErrorCode,
    Event,
    EventKind,
    Hello,
    HelloAck,
    NeedAt,
    ReadAt,
    ReadAtResponse,
    WriteBlocks,
    YouHave,
)

MAX_FRAME_BYTES = 4096
LIMITS = {
    "max_frame_bytes": MAX_FRAME_BYTES,
    "max_devices": 64,
    "max_blocks_per_frame": 64,
    "max_blocks_per_list": 4096,
}
# Decoding up to a few KiB of input under these caps needs well under this;
# any allocation driven by a forged count or length would blow far past it.
ALLOCATION_BOUND_BYTES = 2 * 1024 * 1024

SEEDS: tuple[Event, ...] = (
    Hello(1, (DeviceInfo("disk0", 1 << 30, 65536), DeviceInfo("mem", 1 << 28, 4096, b"\x07" * 32))),
    HelloAck(1, (True, False)),
    WriteBlocks(0, 7, Encoding.PLAIN, (b"\x01" * 16, b"\x02" * 16), b"block data" * 3),
    WriteBlocks(1, 0, Encoding.ZEROES, (b"\x03" * 16,), b""),
    WriteBlocks(0, 2, Encoding.ZSTD, (b"\x04" * 16,), b"\x28\xb5\x2f\xfd"),
    YouHave(0, (1, 2, 3, 9, 10, 2**32 - 1)),
    NeedAt(0, 4096, 65536),
    DontNeedAt(1, 0, 1 << 20),
    DirtyList(0, 4, (100, 101, 5)),
    DirtyList(0, 5, ()),
    DirtyAck(0, 4),
    ReadAt(9, 1, 123, 456),
    ReadAtResponse(9, b"read bytes"),
    ReadAtResponse(10, b"", error="no such device é"),
    Custom(1, EventKind.HANDOFF, b"payload"),
    CustomAck(1),
    BlockHashes(0, 0, (b"\x04" * 16, b"\x05" * 16)),
    Completed(0),
    CompletedAck(0),
    Error(ErrorCode.INTEGRITY, "block 7 hash mismatch ✗"),
)
SEED_FRAMES = [encode(e) for e in SEEDS]


def feed(data: bytes, chunk_sizes: list[int]) -> None:
    """Feed ``data`` in chunks, draining events; only protocol errors may escape."""
    conn = Connection(**LIMITS)
    pos = 0
    sizes = iter(chunk_sizes)
    try:
        while pos < len(data):
            step = max(1, next(sizes, len(data)))
            conn.receive_data(data[pos : pos + step])
            pos += step
            while (event := conn.next_event()) is not None:
                assert not isinstance(event, ConnectionClosed)
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), ConnectionClosed):
            pass
    except RemoteProtocolError:
        pass  # the only acceptable failure; anything else fails the test


def feed_measured(data: bytes, chunk_sizes: list[int]) -> None:
    tracemalloc.start()
    try:
        feed(data, chunk_sizes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_BOUND_BYTES, f"decoder allocated {peak} bytes"


chunkings = st.lists(st.integers(1, 64), max_size=8)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512), chunks=chunkings)
def test_random_bytes(data: bytes, chunks: list[int]) -> None:
    feed(data, chunks)


@settings(max_examples=300, deadline=None)
@given(
    header=st.tuples(
        st.integers(0, 20), st.just(0), st.just(0), st.integers(0, MAX_FRAME_BYTES + 16)
    ),
    body=st.binary(max_size=600),
)
def test_random_payloads_behind_plausible_headers(
    header: tuple[int, int, int, int], body: bytes
) -> None:
    # Random bytes rarely pass the header check; this reaches every payload decoder.
    feed(struct.pack(">BBHI", *header) + body, [])
    length_fixed = struct.pack(">BBHI", header[0], 0, 0, len(body)) + body
    feed(length_fixed, [])


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A few valid frames, then bit flips, byte overwrites, truncation, length edits."""
    frames = draw(st.lists(st.sampled_from(SEED_FRAMES), min_size=1, max_size=4))
    stream = bytearray(b"".join(frames))
    starts = [0]
    for f in frames[:-1]:
        starts.append(starts[-1] + len(f))
    for _ in range(draw(st.integers(1, 4))):
        mutation = draw(st.sampled_from(["flip", "byte", "u32", "length", "truncate", "insert"]))
        if not stream:
            break
        at = draw(st.integers(0, len(stream) - 1))
        if mutation == "flip":
            stream[at] ^= 1 << draw(st.integers(0, 7))
        elif mutation == "byte":
            stream[at] = draw(st.integers(0, 255))
        elif mutation == "u32":  # counts and lengths are mostly u32: forge one
            edges = st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1])
            value = draw(edges | st.integers(0, 2**32 - 1))
            stream[at : at + 4] = struct.pack(">I", value)
        elif mutation == "length":  # the header's payload_length of one frame
            start = draw(st.sampled_from(starts))
            if start + 8 <= len(stream):
                new_length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 64))
                stream[start + 4 : start + 8] = struct.pack(">I", new_length)
        elif mutation == "truncate":
            del stream[at:]
        else:
            stream[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(stream)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=mutated_streams(), chunks=chunkings)
def test_mutated_valid_frames(stream: bytes, chunks: list[int]) -> None:
    feed(stream, chunks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=mutated_streams())
def test_mutated_frames_allocate_only_in_proportion_to_input(stream: bytes) -> None:
    feed_measured(stream, [])


def test_forged_counts_do_not_allocate() -> None:
    # Each frame is tiny but claims a huge count; decoding must refuse it cheaply.
    forged = [
        struct.pack(">BBHI", 4, 0, 0, 14) + struct.pack(">HIII", 0, 1, 0, 2**32 - 1),
        struct.pack(">BBHI", 7, 0, 0, 10) + struct.pack(">HII", 0, 1, 2**32 - 1),
        struct.pack(">BBHI", 3, 0, 0, 11) + struct.pack(">HIBI", 0, 0, 0, 2**32 - 1),
        struct.pack(">BBHI", 13, 0, 0, 10) + struct.pack(">HII", 0, 0, 2**31),
        struct.pack(">BBHI", 1, 0, 0, 4) + struct.pack(">HH", 1, 2**16 - 1),
        struct.pack(">BBHI", 2, 0, 0, 4) + struct.pack(">HH", 1, 2**16 - 1),
        struct.pack(">BBHI", 3, 0, 0, 2**32 - 1),
    ]
    for frame in forged:
        feed_measured(frame, [])
        conn = Connection(**LIMITS)
        conn.receive_data(frame)
        try:
            conn.next_event()
        except RemoteProtocolError:
            continue
        raise AssertionError(f"forged frame accepted: {frame.hex()}")
