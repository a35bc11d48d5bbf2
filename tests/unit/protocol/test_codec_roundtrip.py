"""Round trips through the migration-protocol codec: events -> bytes -> events.

Valid events of every type come from hypothesis strategies; streams are fed
whole, in random chunks, at every split point and one byte at a time, as h11's
tests do, because a framing bug usually hides at a buffer boundary.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.protocol.codec import (
    HEADER_BYTES,
    Connection,
    ConnectionClosed,
    MessageType,
    decode_frame,
    encode,
    encode_pieces,
    iter_events,
)
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

U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

u16 = st.integers(0, U16)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
hashes16 = st.binary(min_size=16, max_size=16)
text = st.text(max_size=40)
names = st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode()) <= 255)

device_infos = st.builds(
    DeviceInfo,
    name=names,
    size_bytes=u64,
    block_size_bytes=st.integers(1, U32),
    base_hash=st.none() | st.binary(min_size=32, max_size=32),
)


@st.composite
def block_runs(draw: st.DrawFn) -> tuple[int, ...]:
    """Block lists that are mostly runs (what RLE is for) with some scatter."""
    runs = draw(st.lists(st.tuples(st.integers(0, U32 - 64), st.integers(1, 64)), max_size=6))
    scatter = draw(st.lists(u32, max_size=6))
    blocks = [b for first, count in runs for b in range(first, first + count)] + scatter
    return tuple(draw(st.permutations(blocks)) if draw(st.booleans()) else blocks)


@st.composite
def write_blocks(draw: st.DrawFn) -> WriteBlocks:
    count = draw(st.integers(1, 8))
    encoding = draw(st.sampled_from(Encoding))
    data = b"" if encoding is Encoding.ZEROES else draw(st.binary(min_size=1, max_size=300))
    return WriteBlocks(
        device=draw(u16),
        first_block=draw(st.integers(0, 2**32 - count)),
        encoding=encoding,
        hashes=tuple(draw(st.lists(hashes16, min_size=count, max_size=count))),
        data=data,
    )


@st.composite
def block_hashes(draw: st.DrawFn) -> BlockHashes:
    count = draw(st.integers(1, 8))
    return BlockHashes(
        device=draw(u16),
        first_block=draw(st.integers(0, 2**32 - count)),
        hashes=tuple(draw(st.lists(hashes16, min_size=count, max_size=count))),
    )


@st.composite
def byte_ranges(draw: st.DrawFn) -> tuple[int, int, int]:
    offset = draw(u64)
    # The length is a u64 too, and the range must end within 2**64.
    return draw(u16), offset, draw(st.integers(1, min(2**64 - 1, 2**64 - offset)))


read_at_responses = st.builds(ReadAtResponse, request_id=u32, data=st.binary(max_size=100)) | (
    st.builds(ReadAtResponse, request_id=u32, data=st.just(b""), error=text)
)

events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Hello, version=u16, devices=st.lists(device_infos, max_size=4).map(tuple)),
    st.builds(HelloAck, version=u16, have_base=st.lists(st.booleans(), max_size=8).map(tuple)),
    write_blocks(),
    st.builds(YouHave, device=u16, blocks=block_runs()),
    byte_ranges().map(lambda r: NeedAt(*r)),
    byte_ranges().map(lambda r: DontNeedAt(*r)),
    st.builds(DirtyList, device=u16, sequence=u32, blocks=block_runs()),
    st.builds(DirtyAck, device=u16, sequence=u32),
    st.builds(ReadAt, request_id=u32, device=u16, offset=u64, length=st.integers(1, U32)),
    read_at_responses,
    st.builds(Custom, sequence=u32, kind=u32, payload=st.binary(max_size=100)),
    st.builds(CustomAck, sequence=u32),
    block_hashes(),
    st.builds(Completed, device=u16),
    st.builds(CompletedAck, device=u16),
    st.builds(Error, code=st.sampled_from(ErrorCode), reason=text),
)

# One valid event of every type, for the split-point tests.
SAMPLE_EVENTS: tuple[Event, ...] = (
    Hello(1, (DeviceInfo("disk0", 1 << 30, 65536), DeviceInfo("mem", 1 << 28, 4096, b"\x07" * 32))),
    HelloAck(1, (False, True)),
    WriteBlocks(0, 7, Encoding.PLAIN, (b"\x01" * 16, b"\x02" * 16), b"block data" * 3),
    WriteBlocks(1, 0, Encoding.ZEROES, (b"\x03" * 16,), b""),
    YouHave(0, (1, 2, 3, 9, 10)),
    NeedAt(0, 4096, 65536),
    DontNeedAt(1, 0, 1 << 20),
    DirtyList(0, 4, (100, 101, 5)),
    DirtyAck(0, 4),
    ReadAt(9, 1, 123, 456),
    ReadAtResponse(9, b"read bytes"),
    ReadAtResponse(10, b"", error="no such device"),
    Custom(1, EventKind.HANDOFF, b""),
    CustomAck(1),
    BlockHashes(0, 0, (b"\x04" * 16, b"\x05" * 16)),
    Completed(0),
    CompletedAck(0),
    Error(ErrorCode.INTEGRITY, "block 7 hash mismatch ✗"),
)
SAMPLE_STREAM = b"".join(encode(e) for e in SAMPLE_EVENTS)


def drain(conn: Connection) -> list[Event | ConnectionClosed]:
    return list(iter_events(conn))


@settings(max_examples=300, deadline=None)
@given(event=events)
def test_every_event_round_trips_through_a_connection(event: Event) -> None:
    sender, receiver = Connection(), Connection()
    for piece in sender.send(event):
        receiver.receive_data(piece)
    assert receiver.next_event() == event
    assert receiver.next_event() is None
    receiver.receive_data(b"")
    assert receiver.next_event() == ConnectionClosed()


@settings(max_examples=200, deadline=None)
@given(event=events)
def test_encode_and_decode_frame_are_inverse(event: Event) -> None:
    frame = encode(event)
    assert frame == b"".join(encode_pieces(event))
    assert decode_frame(frame) == event
    assert encode(decode_frame(frame)) == frame


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(events, min_size=1, max_size=8), data=st.data())
def test_random_chunking_of_a_multi_frame_stream(batch: list[Event], data: st.DataObject) -> None:
    stream = b"".join(encode(e) for e in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    conn = Connection()
    received: list[Event | ConnectionClosed] = []
    for lo, hi in itertools.pairwise([0, *cuts, len(stream)]):
        if hi > lo:  # an empty chunk would mean EOF
            conn.receive_data(memoryview(stream)[lo:hi])
            received += drain(conn)
    conn.receive_data(b"")
    received += drain(conn)
    assert received == [*batch, ConnectionClosed()]


def test_every_split_point_of_a_stream_of_every_message_type() -> None:
    expected = [*SAMPLE_EVENTS, ConnectionClosed()]
    for split in range(len(SAMPLE_STREAM) + 1):
        conn = Connection()
        received = []
        for chunk in (SAMPLE_STREAM[:split], bytearray(SAMPLE_STREAM[split:])):
            if chunk:  # an empty chunk would mean EOF
                conn.receive_data(chunk)
            received += drain(conn)
        conn.receive_data(b"")
        received += drain(conn)
        assert received == expected, f"split at byte {split}"


def test_byte_at_a_time_yields_each_event_exactly_when_its_last_byte_arrives() -> None:
    frame_ends = set(itertools.accumulate(len(encode(e)) for e in SAMPLE_EVENTS))
    conn = Connection()
    received: list[Event | ConnectionClosed] = []
    for i in range(len(SAMPLE_STREAM)):
        conn.receive_data(SAMPLE_STREAM[i : i + 1])
        got = drain(conn)
        assert len(got) == (1 if i + 1 in frame_ends else 0), f"after byte {i + 1}"
        received += got
    assert received == list(SAMPLE_EVENTS)
    assert conn.buffered_bytes == 0


def test_many_frames_in_one_receive_data_call() -> None:
    acks = [DirtyAck(device=i % 3, sequence=i) for i in range(5000)]
    conn = Connection()
    conn.receive_data(b"".join(encode(a) for a in acks) + SAMPLE_STREAM)
    conn.receive_data(b"")
    assert drain(conn) == [*acks, *SAMPLE_EVENTS, ConnectionClosed()]


def test_interleaving_receive_and_next_event_keeps_partial_frames() -> None:
    # Consumed bytes are compacted lazily; a partial frame behind them must survive.
    conn = Connection()
    frame = encode(SAMPLE_EVENTS[2])
    for _ in range(50):
        conn.receive_data(frame + frame[:5])
        assert conn.next_event() == SAMPLE_EVENTS[2]
        assert conn.next_event() is None
        conn.receive_data(frame[5:])
        assert conn.next_event() == SAMPLE_EVENTS[2]
        assert conn.buffered_bytes == 0


def test_send_references_block_data_without_copying_it() -> None:
    data = bytes(range(256)) * 4
    view = memoryview(bytearray(data))
    for payload in (data, view):
        event = WriteBlocks(0, 0, Encoding.PLAIN, (b"\x00" * 16,), payload)
        pieces = Connection().send(event)
        assert len(pieces) == 2
        assert pieces[1] is payload or pieces[1].obj is view.obj  # type: ignore[union-attr]
        assert decode_frame(b"".join(pieces)) == WriteBlocks(
            0, 0, Encoding.PLAIN, (b"\x00" * 16,), data
        )


def test_clean_eof_returns_connection_closed_every_time() -> None:
    conn = Connection()
    conn.receive_data(encode(Completed(1)))
    conn.receive_data(b"")
    assert conn.next_event() == Completed(1)
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()


def test_decoded_events_do_not_pin_the_receive_buffer() -> None:
    # If an event kept a view into the bytearray, growing it would raise BufferError.
    conn = Connection()
    conn.receive_data(SAMPLE_STREAM)
    kept = drain(conn)
    conn.receive_data(SAMPLE_STREAM * 3)
    assert len(kept) + len(drain(conn)) == 4 * len(SAMPLE_EVENTS)


# Golden frames, written by hand from docs/wire-protocol.md: the wire format is
# a contract with other versions of ferry, so these bytes must never change.
GOLDEN = [
    (Completed(3), "0e 00 0000 00000002 | 0003"),
    (CompletedAck(3), "0f 00 0000 00000002 | 0003"),
    (DirtyAck(1, 7), "08 00 0000 00000006 | 0001 00000007"),
    (CustomAck(2), "0c 00 0000 00000004 | 00000002"),
    (
        NeedAt(0, 4096, 65536),
        "05 00 0000 00000012 | 0000 0000000000001000 0000000000010000",
    ),
    (
        DontNeedAt(2, 0, 512),
        "06 00 0000 00000012 | 0002 0000000000000000 0000000000000200",
    ),
    (
        YouHave(2, (10, 11, 12, 40)),
        "04 00 0000 00000016 | 0002 00000002 0000000a 00000003 00000028 00000001",
    ),
    (
        DirtyList(1, 5, (8, 9)),
        "07 00 0000 00000012 | 0001 00000005 00000001 00000008 00000002",
    ),
    (DirtyList(1, 6, ()), "07 00 0000 0000000a | 0001 00000006 00000000"),
    (
        Hello(1, (DeviceInfo("d0", 65536, 4096),)),
        "01 00 0000 00000015 | 0001 0001 0002 6430 0000000000010000 00001000 00",
    ),
    (
        Hello(1, (DeviceInfo("m", 8192, 4096, b"\xee" * 32),)),
        "01 00 0000 00000034 | 0001 0001 0001 6d 0000000000002000 00001000 01" + " ee" * 32,
    ),
    (HelloAck(1, (True, False)), "02 00 0000 00000006 | 0001 0002 01 00"),
    (
        WriteBlocks(0, 1, Encoding.PLAIN, (b"\x11" * 16,), b"\xaa\xbb"),
        "03 00 0000 0000001d | 0000 00000001 00 00000001" + " 11" * 16 + " aabb",
    ),
    (
        WriteBlocks(4, 2, Encoding.ZEROES, (b"\x22" * 16,), b""),
        "03 00 0000 0000001b | 0004 00000002 01 00000001" + " 22" * 16,
    ),
    (ReadAt(5, 1, 512, 4096), "09 00 0000 00000012 | 00000005 0001 0000000000000200 00001000"),
    (ReadAtResponse(5, b"hi"), "0a 00 0000 00000007 | 00000005 00 6869"),
    (ReadAtResponse(6, b"", error="no"), "0a 00 0000 00000009 | 00000006 01 0002 6e6f"),
    (Custom(1, EventKind.HANDOFF, b""), "0b 00 0000 00000008 | 00000001 00000001"),
    (Custom(2, 1024, b"\x01"), "0b 00 0000 00000009 | 00000002 00000400 01"),
    (
        BlockHashes(0, 16, (b"\x33" * 16,)),
        "0d 00 0000 0000001a | 0000 00000010 00000001" + " 33" * 16,
    ),
    (Error(ErrorCode.VERSION, "no"), "10 00 0000 00000006 | 0002 0002 6e6f"),
]


@pytest.mark.parametrize(("event", "golden"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_frames(event: Event, golden: str) -> None:
    frame = bytes.fromhex(golden.replace("|", ""))
    assert encode(event) == frame
    assert decode_frame(frame) == event


def test_every_message_type_has_a_golden_frame() -> None:
    covered = {frame_type for _, golden in GOLDEN for frame_type in [int(golden[:2], 16)]}
    assert covered == {int(t) for t in MessageType}
    assert HEADER_BYTES == 8


def test_the_wire_hash_size_is_the_storage_hash_size() -> None:
    """The codec owns the wire's hash width; the engine's hash must produce exactly it."""
    from ferry.protocol.codec import BLOCK_HASH_BYTES as WIRE
    from ferry.storage.hashing import BLOCK_HASH_BYTES, block_hash

    assert WIRE == BLOCK_HASH_BYTES == len(block_hash(b"x" * 4096))
