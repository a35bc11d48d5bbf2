"""The codec's buffered receive API: ``get_buffer`` / ``buffer_updated``.

A transport that reads with ``recv_into`` writes straight into the
Connection's buffer. The same events must come out as through
``receive_data``, whatever the read sizes (one byte at a time, random
chunks, mixed with ``receive_data``), and the buffer must be reused rather
than grown or shifted for a steady stream of large frames.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import FrameTooLargeError, LocalProtocolError, RemoteProtocolError
from ferry.protocol.codec import (
    HEADER,
    RECEIVE_CHUNK_BYTES,
    Connection,
    ConnectionClosed,
    MessageType,
    encode,
    iter_events,
)
from ferry.protocol.messages import Encoding, Event, WriteBlocks

from .test_codec_roundtrip import SAMPLE_EVENTS, SAMPLE_STREAM, events

MiB = 1024 * 1024


def feed(conn: Connection, data: bytes | memoryview, *, max_read: int | None = None) -> int:
    """Copy ``data`` in through get_buffer/buffer_updated, as recv_into would;
    return how many reads it took."""
    pos = reads = 0
    while pos < len(data):
        view = conn.get_buffer()
        n = min(len(view), len(data) - pos, max_read or len(view))
        view[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        reads += 1
    return reads


def eof(conn: Connection) -> None:
    conn.get_buffer()
    conn.buffer_updated(0)


def big_write(i: int, size: int = MiB) -> WriteBlocks:
    data = random.Random(i).randbytes(size)
    hashes = tuple(bytes([i % 256]) * 16 for _ in range(16))
    return WriteBlocks(0, 16 * i, Encoding.PLAIN, hashes, data)


def test_byte_at_a_time_yields_each_event_exactly_when_its_last_byte_arrives() -> None:
    frame_ends = set(itertools.accumulate(len(encode(e)) for e in SAMPLE_EVENTS))
    conn = Connection()
    received: list[Event | ConnectionClosed] = []
    for i in range(len(SAMPLE_STREAM)):
        feed(conn, SAMPLE_STREAM[i : i + 1])
        got = list(iter_events(conn))
        assert len(got) == (1 if i + 1 in frame_ends else 0), f"after byte {i + 1}"
        received += got
    eof(conn)
    received += list(iter_events(conn))
    assert received == [*SAMPLE_EVENTS, ConnectionClosed()]
    assert conn.buffered_bytes == 0


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(events, min_size=1, max_size=8), data=st.data())
def test_random_reads_mixed_with_receive_data(batch: list[Event], data: st.DataObject) -> None:
    stream = b"".join(encode(e) for e in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    conn = Connection()
    received: list[Event | ConnectionClosed] = []
    for lo, hi in itertools.pairwise([0, *cuts, len(stream)]):
        if hi > lo:
            chunk = memoryview(stream)[lo:hi]
            if data.draw(st.booleans()):
                conn.receive_data(chunk)
            else:
                feed(conn, chunk, max_read=data.draw(st.integers(1, 64)))
            received += list(iter_events(conn))
    eof(conn)
    received += list(iter_events(conn))
    assert received == [*batch, ConnectionClosed()]


def test_large_frames_in_random_reads_without_draining_in_between() -> None:
    rnd = random.Random(7)
    batch: list[Event] = []
    for i in range(12):
        batch.append(big_write(i, rnd.choice([4096, 200_000, MiB, 3 * MiB])))
        batch.extend(rnd.sample(SAMPLE_EVENTS, 3))
    stream = b"".join(encode(e) for e in batch)
    conn = Connection()
    received: list[Event | ConnectionClosed] = []
    pos = 0
    while pos < len(stream):
        n = min(rnd.randint(1, 400_000), len(stream) - pos)
        feed(conn, memoryview(stream)[pos : pos + n])
        pos += n
        if rnd.random() < 0.5:  # sometimes leave complete frames buffered
            received += list(iter_events(conn))
    eof(conn)
    received += list(iter_events(conn))
    assert received == [*batch, ConnectionClosed()]


def test_view_covers_the_rest_of_a_large_frame_and_ends_with_it() -> None:
    frame = encode(big_write(1))
    conn = Connection()
    feed(conn, frame[:1000])
    view = conn.get_buffer()
    assert len(view) == len(frame) - 1000  # exactly the rest: one read can finish it
    view[:] = frame[1000:]
    conn.buffer_updated(len(view))
    assert conn.next_event() == big_write(1)
    assert conn.buffered_bytes == 0


def test_a_stream_of_large_frames_reuses_one_buffer_in_place() -> None:
    """Once grown to fit the first large frame, the same buffer takes every
    later one, each from its start: no reallocation, no bytes moved."""
    conn = Connection()
    owners: list[object] = []
    for i in range(6):
        frame = encode(big_write(i))
        pos = 0
        while pos < len(frame):
            view = conn.get_buffer()
            if pos == 0 and i > 0:
                assert len(view) == len(view.obj)  # type: ignore[arg-type]
            owners.append(view.obj)
            n = min(len(view), len(frame) - pos, 300_000)
            view[:n] = frame[pos : pos + n]
            conn.buffer_updated(n)
            pos += n
        assert conn.next_event() == big_write(i)
        assert conn.buffered_bytes == 0
    later = owners[-20:]
    assert all(owner is later[0] for owner in later)


def test_small_frames_arrive_many_per_read() -> None:
    stream = SAMPLE_STREAM * 20
    conn = Connection()
    assert len(stream) <= RECEIVE_CHUNK_BYTES
    assert feed(conn, stream) == 1
    assert list(iter_events(conn)) == list(SAMPLE_EVENTS) * 20


def test_eof_in_the_middle_of_a_frame_is_a_remote_error() -> None:
    conn = Connection()
    feed(conn, encode(SAMPLE_EVENTS[0])[:-1])
    eof(conn)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        conn.next_event()


def test_oversized_header_fails_without_making_room_for_it() -> None:
    conn = Connection(max_frame_bytes=1024)
    feed(conn, HEADER.pack(MessageType.WRITE_BLOCKS, 0, 0, 1 << 31))
    assert len(conn.get_buffer()) < MiB
    with pytest.raises(FrameTooLargeError):
        conn.next_event()


def test_misuse_is_reported() -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError, match="without a preceding get_buffer"):
        conn.buffer_updated(1)
    with pytest.raises(ValueError, match="min_bytes"):
        conn.get_buffer(0)
    view = conn.get_buffer()
    with pytest.raises(ValueError, match="for a view of"):
        conn.buffer_updated(len(view) + 1)
    # receive_data may move the buffered bytes: a view taken before is void.
    conn.get_buffer()
    conn.receive_data(b"\x0e")
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(1)
    # min_bytes is honoured even beyond the usual chunk.
    assert len(conn.get_buffer(3 * RECEIVE_CHUNK_BYTES)) >= 3 * RECEIVE_CHUNK_BYTES
    eof(conn)
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.get_buffer()
