"""The sans-IO NBD core: handshake, options, requests, replies, limits, fuzz."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.expose.nbd.errors import (
    NBDLocalProtocolError,
    NBDOptionTooLargeError,
    NBDRemoteProtocolError,
    NBDUnknownExportError,
)
from ferry.expose.nbd.protocol import (
    MAX_OPTION_BYTES,
    MAX_PAYLOAD_BYTES,
    CacheRequest,
    CommandFlag,
    DisconnectRequest,
    Errno,
    Event,
    ExportInfo,
    ExportSelected,
    FlushRequest,
    HandshakeAborted,
    OptionReceived,
    Phase,
    ReadRequest,
    RejectedRequest,
    ServerConnection,
    Signal,
    TransmissionFlag,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

from .nbd_helpers import go_payload, option, parse_option_replies, request

SIZE = 1 << 20
EXPORTS = {
    "disk": ExportInfo(SIZE, description="the disk", block_size_bytes=65536),
    "ro": ExportInfo(4096, read_only=True),
}


def feed_bytewise(conn: ServerConnection, data: bytes) -> list[Event]:
    """Feed one byte at a time, draining events after each, so every split is tried."""
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while (ev := conn.next_event()) not in (Signal.NEED_DATA, Signal.CLOSED):
            assert not isinstance(ev, Signal)
            events.append(ev)
    return events


def feed(conn: ServerConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    events: list[Event] = []
    while (ev := conn.next_event()) not in (Signal.NEED_DATA, Signal.CLOSED):
        assert not isinstance(ev, Signal)
        events.append(ev)
    return events


def connected(name: str = "disk", structured: bool = False) -> ServerConnection:
    conn = ServerConnection(EXPORTS)
    data = struct.pack(">I", 3)
    if structured:
        data += option(8)
    events = feed(conn, data + option(7, go_payload(name)))
    assert isinstance(events[-1], ExportSelected)
    conn.data_to_send()
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = ServerConnection(EXPORTS)
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
    assert conn.data_to_send() == b""


def test_go_handshake_byte_at_a_time() -> None:
    conn = ServerConnection(EXPORTS)
    conn.data_to_send()
    wire = struct.pack(">I", 3) + option(8) + option(7, go_payload("disk", (1, 2, 3)))
    events = feed_bytewise(conn, wire)
    assert events == [
        OptionReceived(8, 0),
        ExportSelected("disk", EXPORTS["disk"], structured_replies=True),
    ]
    assert conn.phase is Phase.TRANSMISSION
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0] == (8, 1, b"")
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for _, t, p in replies[1:-1] if t == 3}
    size, flags = struct.unpack(">QH", infos[0])
    assert size == SIZE
    flags = TransmissionFlag(flags)
    for expected in (
        TransmissionFlag.HAS_FLAGS,
        TransmissionFlag.SEND_FLUSH,
        TransmissionFlag.SEND_FUA,
        TransmissionFlag.SEND_TRIM,
        TransmissionFlag.SEND_WRITE_ZEROES,
        TransmissionFlag.CAN_MULTI_CONN,
        TransmissionFlag.SEND_DF,
    ):
        assert expected in flags
    assert TransmissionFlag.READ_ONLY not in flags
    assert infos[1] == b"disk"
    assert infos[2] == b"the disk"
    assert struct.unpack(">III", infos[3]) == (1, 65536, MAX_PAYLOAD_BYTES)
    assert replies[-1] == (7, 1, b"")


def test_read_only_export_flags() -> None:
    conn = ServerConnection(EXPORTS)
    conn.data_to_send()
    feed(conn, struct.pack(">I", 3) + option(6, go_payload("ro")))
    assert conn.phase is Phase.OPTIONS  # INFO does not end haggling
    replies = parse_option_replies(conn.data_to_send())
    _, flags = struct.unpack(">QH", replies[0][2][2:])
    assert TransmissionFlag.READ_ONLY in TransmissionFlag(flags)
    assert TransmissionFlag.SEND_TRIM not in TransmissionFlag(flags)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = ServerConnection(EXPORTS)
    conn.data_to_send()
    events = feed_bytewise(conn, struct.pack(">I", 3 if no_zeroes else 1) + option(1, b"disk"))
    assert events == [ExportSelected("disk", EXPORTS["disk"], False)]
    out = conn.data_to_send()
    assert len(out) == 10 + (0 if no_zeroes else 124)
    assert struct.unpack_from(">Q", out)[0] == SIZE
    assert out[10:] == bytes(len(out) - 10)


def test_export_name_unknown_ends_session() -> None:
    conn = ServerConnection(EXPORTS)
    with pytest.raises(NBDUnknownExportError) as info:
        feed(conn, struct.pack(">I", 3) + option(1, b"nope"))
    assert info.value.export == "nope"


def test_default_export_name_picks_only_export() -> None:
    conn = ServerConnection({"only": ExportInfo(512)})
    events = feed(conn, struct.pack(">I", 3) + option(7, go_payload("")))
    assert events[-1] == ExportSelected("only", ExportInfo(512), False)


def test_list_and_errors_keep_haggling() -> None:
    conn = ServerConnection(EXPORTS)
    conn.data_to_send()
    wire = (
        struct.pack(">I", 3)
        + option(3)  # LIST
        + option(3, b"x")  # LIST with data: invalid
        + option(99, b"abc")  # unknown option
        + option(5)  # STARTTLS: we do not do TLS
        + option(7, go_payload("missing"))
        + option(7, b"\x00\x00\x00\x09ab")  # name length beyond the data
        + option(8, b"x")  # STRUCTURED_REPLY with data: invalid
        + option(2)  # ABORT
    )
    events = feed_bytewise(conn, wire)
    assert isinstance(events[-1], HandshakeAborted)
    assert conn.phase is Phase.CLOSED
    replies = parse_option_replies(conn.data_to_send())
    kinds = [(opt, rtype) for opt, rtype, _ in replies]
    assert kinds == [
        (3, 2),
        (3, 2),
        (3, 1),
        (3, 2**31 + 3),
        (99, 2**31 + 1),
        (5, 2**31 + 1),
        (7, 2**31 + 6),
        (7, 2**31 + 3),
        (8, 2**31 + 3),
        (2, 1),
    ]
    servers = [p for _, t, p in replies if t == 2]
    assert servers[0] == struct.pack(">I", 4) + b"disk" + b"the disk"
    assert servers[1] == struct.pack(">I", 2) + b"ro"


def test_bad_option_magic() -> None:
    conn = ServerConnection(EXPORTS)
    with pytest.raises(NBDRemoteProtocolError, match="magic"):
        feed(conn, struct.pack(">I", 3) + b"IHAVEOPX" + struct.pack(">II", 7, 0))


def test_oversized_option_rejected_before_its_data_arrives() -> None:
    conn = ServerConnection(EXPORTS)
    with pytest.raises(NBDOptionTooLargeError):
        feed(conn, struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, MAX_OPTION_BYTES + 1))


def test_unknown_client_flags() -> None:
    conn = ServerConnection(EXPORTS)
    with pytest.raises(NBDRemoteProtocolError, match="client flags"):
        feed(conn, struct.pack(">I", 0x80))


def test_requests_byte_at_a_time() -> None:
    conn = connected()
    payload = bytes(range(256)) * 4
    wire = (
        request(0, 1, 4096, 512)
        + request(1, 2, 8192, len(payload), flags=1, data=payload)
        + request(3, 3)
        + request(4, 4, 0, 65536)
        + request(6, 5, 0, 4096, flags=2)
        + request(5, 6, 0, 4096)
        + request(2, 7)
    )
    events = feed_bytewise(conn, wire)
    assert events == [
        ReadRequest(1, 4096, 512, CommandFlag(0)),
        WriteRequest(2, 8192, bytearray(payload), CommandFlag.FUA),
        FlushRequest(3, CommandFlag(0)),
        TrimRequest(4, 0, 65536, CommandFlag(0)),
        WriteZeroesRequest(5, 0, 4096, CommandFlag.NO_HOLE),
        CacheRequest(6, 0, 4096, CommandFlag(0)),
        DisconnectRequest(),
    ]
    assert conn.next_event() is Signal.CLOSED


def test_large_write_payload_lands_in_handed_out_buffer() -> None:
    """The recv_into path: after the header, get_buffer is the payload itself."""
    conn = connected()
    data = b"\x5a" * (256 * 1024)
    conn.receive_data(request(1, 9, 0, len(data)))
    assert conn.next_event() is Signal.NEED_DATA
    target = conn.get_buffer()
    assert len(target) == len(data)
    target[:] = data
    conn.buffer_updated(len(data))
    ev = conn.next_event()
    assert isinstance(ev, WriteRequest)
    assert ev.data == data


@pytest.mark.parametrize(
    ("export", "wire", "error"),
    [
        ("disk", request(0, 1, SIZE - 511, 512), Errno.EINVAL),  # read past the end
        ("disk", request(0, 1, 2**64 - 1, 2), Errno.EINVAL),  # offset overflow
        ("disk", request(4, 1, SIZE, 1), Errno.ENOSPC),  # trim past the end
        ("disk", request(6, 1, SIZE - 1, 2), Errno.ENOSPC),  # zeroes past the end
        ("disk", request(0, 1, 0, MAX_PAYLOAD_BYTES + 1), Errno.EINVAL),  # too long
        ("disk", request(9, 1, 0, 0), Errno.EINVAL),  # unknown command
        ("disk", request(7, 1, 0, 512), Errno.EINVAL),  # block status not negotiated
        ("disk", request(0, 1, 0, 512, flags=CommandFlag.DF), Errno.EINVAL),  # DF w/o structured
        ("disk", request(3, 1, flags=0x40), Errno.EINVAL),  # unknown flag
        ("ro", request(4, 1, 0, 512), Errno.EPERM),  # trim on read-only
    ],
)
def test_rejected_requests(export: str, wire: bytes, error: Errno) -> None:
    conn = connected(export)
    events = feed(conn, wire + request(3, 2))
    assert len(events) == 2
    assert isinstance(events[0], RejectedRequest)
    assert events[0].error is error
    assert events[1] == FlushRequest(2, CommandFlag(0))  # the stream stays in sync


@pytest.mark.parametrize(
    ("export", "offset", "length", "error"),
    [
        ("disk", SIZE - 100, 200, Errno.ENOSPC),
        ("ro", 0, 100, Errno.EPERM),
        ("disk", 0, MAX_PAYLOAD_BYTES + 4096, Errno.EINVAL),
    ],
)
def test_rejected_write_payload_is_skipped(
    export: str, offset: int, length: int, error: Errno
) -> None:
    conn = connected(export)
    events = feed(conn, request(1, 1, offset, length))
    assert events == [RejectedRequest(1, 1, offset, length, error, events[0].message)]  # type: ignore[union-attr]
    # Stream the payload in pieces: it must be skipped, not stored.
    chunk = b"\xff" * (1 << 20)
    sent = 0
    while sent < length:
        n = min(len(chunk), length - sent)
        assert feed(conn, chunk[:n]) == []
        sent += n
    assert len(conn._scratch) <= 256 * 1024
    assert feed(conn, request(0, 2, 0, 16)) == [ReadRequest(2, 0, 16, CommandFlag(0))]


def test_bad_request_magic() -> None:
    conn = connected()
    with pytest.raises(NBDRemoteProtocolError, match="magic"):
        feed(conn, b"\x00" * 28)


def test_eof_mid_request_and_clean_eof() -> None:
    conn = connected()
    conn.receive_data(request(1, 1, 0, 100)[:20])
    conn.receive_data(b"")
    with pytest.raises(NBDRemoteProtocolError):
        conn.next_event()
    conn = connected()
    conn.receive_data(request(1, 1, 0, 100, data=b"x" * 50))
    assert conn.next_event() is Signal.NEED_DATA
    conn.receive_eof()
    with pytest.raises(NBDRemoteProtocolError, match="mid-write"):
        conn.next_event()
    conn = connected()
    conn.receive_eof()
    assert conn.next_event() is Signal.CLOSED


def test_simple_replies() -> None:
    conn = connected()
    read = ReadRequest(0xABC, 0, 4, CommandFlag(0))
    assert conn.reply_read(read, b"data") == struct.pack(">IIQ", 0x67446698, 0, 0xABC)
    flush = FlushRequest(7, CommandFlag(0))
    assert conn.reply_done(flush) == struct.pack(">IIQ", 0x67446698, 0, 7)
    assert conn.reply_error(read, Errno.EIO, "x") == struct.pack(">IIQ", 0x67446698, 5, 0xABC)
    with pytest.raises(NBDLocalProtocolError):
        conn.reply_read(read, b"too long")
    with pytest.raises(NBDLocalProtocolError):
        conn.reply_done(read)


def test_structured_replies() -> None:
    conn = connected(structured=True)
    read = ReadRequest(5, 4096, 3, CommandFlag.DF)
    assert conn.reply_read(read, b"abc") == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 5, 11, 4096)
    empty = ReadRequest(6, 0, 0, CommandFlag(0))
    assert conn.reply_read(empty, b"") == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 6, 0)
    assert (
        conn.reply_error(read, Errno.EINVAL, "bad")
        == struct.pack(">IHHQIIH", 0x668E33EF, 1, 2**15 + 1, 5, 9, 22, 3) + b"bad"
    )


# --- fuzzing ------------------------------------------------------------------

_request_strategy = st.one_of(
    st.builds(
        lambda h, o, n: (request(0, h, o, n), ReadRequest(h, o, n, CommandFlag(0))),
        st.integers(0, 2**64 - 1),
        st.integers(0, SIZE // 2),
        st.integers(0, 4096),
    ),
    st.builds(
        lambda h, o, d: (
            request(1, h, o, len(d), data=d),
            WriteRequest(h, o, bytearray(d), CommandFlag(0)),
        ),
        st.integers(0, 2**64 - 1),
        st.integers(0, SIZE // 2),
        st.binary(max_size=3000),
    ),
    st.builds(
        lambda h: (request(3, h), FlushRequest(h, CommandFlag(0))),
        st.integers(0, 2**64 - 1),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_request_strategy, max_size=8), st.lists(st.integers(1, 4000), max_size=20))
def test_fuzz_valid_stream_any_split(reqs: list[tuple[bytes, Event]], cuts: list[int]) -> None:
    """Valid requests split at arbitrary points parse to exactly the requests sent."""
    conn = connected()
    wire = b"".join(w for w, _ in reqs)
    events: list[Event] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        events += feed(conn, wire[pos : pos + cut])
        pos += cut
        if pos >= len(wire):
            break
    assert events == [e for _, e in reqs]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_fuzz_garbage_only_raises_protocol_errors(garbage: bytes, structured: bool) -> None:
    """Arbitrary bytes in transmission yield events or NBDRemoteProtocolError, nothing else."""
    conn = connected(structured=structured)
    try:
        events = feed(conn, garbage)
        conn.receive_eof()
        while conn.next_event() not in (Signal.NEED_DATA, Signal.CLOSED):
            pass
    except NBDRemoteProtocolError:
        return
    for ev in events:
        if isinstance(ev, ReadRequest | WriteRequest | TrimRequest | WriteZeroesRequest):
            assert ev.offset + ev.length <= SIZE  # nothing out of range reaches a device
        if isinstance(ev, ReadRequest | WriteRequest):
            assert ev.length <= MAX_PAYLOAD_BYTES


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_handshake_garbage(garbage: bytes) -> None:
    conn = ServerConnection(EXPORTS)
    with contextlib.suppress(NBDRemoteProtocolError, NBDUnknownExportError):
        feed(conn, struct.pack(">I", 3) + garbage)


def test_payload_end_and_next_request_in_one_chunk() -> None:
    """Regression (found by the fuzz test): a chunk that completes a write's
    payload and carries the next request must not stall the receive loop."""
    conn = connected()
    assert feed(conn, request(1, 1, 0, 4)) == []
    assert feed(conn, b"abcd" + request(3, 2)) == [
        WriteRequest(1, 0, bytearray(b"abcd"), CommandFlag(0)),
        FlushRequest(2, CommandFlag(0)),
    ]


def test_recycled_buffer_is_reused_for_same_size() -> None:
    conn = connected()
    first = feed(conn, request(1, 1, 0, 8, data=b"A" * 8))[0]
    assert isinstance(first, WriteRequest)
    conn.recycle(first.data)
    second = feed(conn, request(1, 2, 0, 8, data=b"B" * 8))[0]
    assert isinstance(second, WriteRequest)
    assert second.data is first.data
    assert second.data == b"B" * 8
