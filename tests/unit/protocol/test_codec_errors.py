"""Malformed input raises typed errors, whoever's fault it is.

Bytes from the peer that break the wire format raise RemoteProtocolError
(FrameTooLargeError for an oversized frame); events we cannot represent raise
LocalProtocolError from send(). Frames here are built by hand from the layout
in docs/wire-protocol.md, not by the encoder under test.
"""

from __future__ import annotations

import struct

import pytest

from ferry.errors import (
    ConfigError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from ferry.protocol.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    Connection,
    ConnectionClosed,
    MessageType,
    encode,
)
from ferry.protocol.messages import (
    BlockHashes,
    Completed,
    Custom,
    DeviceInfo,
    DirtyList,
    DontNeedAt,
    Encoding,
    Error,
    ErrorCode,
    Event,
    Hello,
    HelloAck,
    NeedAt,
    ReadAt,
    ReadAtResponse,
    WriteBlocks,
    YouHave,
)

H = b"\x5a" * 16


def frame(message_type: int, payload: bytes, *, flags: int = 0, reserved: int = 0) -> bytes:
    return struct.pack(">BBHI", message_type, flags, reserved, len(payload)) + payload


def receive(data: bytes, conn: Connection | None = None) -> Event | ConnectionClosed | None:
    conn = conn or Connection()
    conn.receive_data(data)
    conn.receive_data(b"")
    return conn.next_event()


def remote_error(data: bytes, conn: Connection | None = None) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        receive(data, conn)
    assert type(info.value) is RemoteProtocolError
    return str(info.value)


# ---------------------------------------------------------------- frame header


def test_oversized_payload_length_fails_from_the_header_alone() -> None:
    conn = Connection()
    conn.receive_data(struct.pack(">BBHI", MessageType.WRITE_BLOCKS, 0, 0, 0xFFFF_FFFF))
    with pytest.raises(FrameTooLargeError):
        conn.next_event()


def test_frame_cap_is_inclusive_and_configurable() -> None:
    payload = struct.pack(">II", 1, 1) + b"x" * 56  # a Custom payload of 64 bytes
    assert receive(frame(MessageType.CUSTOM, payload), Connection(max_frame_bytes=64)) == Custom(
        1, 1, b"x" * 56
    )
    with pytest.raises(FrameTooLargeError):
        receive(frame(MessageType.CUSTOM, payload + b"x"), Connection(max_frame_bytes=64))
    assert DEFAULT_MAX_FRAME_BYTES > 16 * 1024 * 1024


@pytest.mark.parametrize("message_type", [0, 17, 0x7F, 0xFF])
def test_unknown_message_type(message_type: int) -> None:
    assert "unknown message type" in remote_error(frame(message_type, b"\x00\x01"))


@pytest.mark.parametrize(("flags", "reserved"), [(1, 0), (0x80, 0), (0, 1), (0, 0x8000)])
def test_nonzero_flags_or_reserved_bits(flags: int, reserved: int) -> None:
    data = frame(MessageType.COMPLETED, b"\x00\x01", flags=flags, reserved=reserved)
    assert "must be zero" in remote_error(data)


@pytest.mark.parametrize("keep", [1, 7, 8, 9, 12])
def test_truncated_frame_at_eof(keep: int) -> None:
    whole = frame(MessageType.DIRTY_ACK, struct.pack(">HI", 1, 2))
    assert "truncated frame" in remote_error(whole[:keep])


def test_errors_are_sticky() -> None:
    conn = Connection()
    conn.receive_data(frame(99, b"") + encode(Completed(0)))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):  # the stream cannot be resynchronised
        conn.next_event()
    conn.receive_data(b"more")  # the receive buffer is not pinned by the stored error


def test_receive_data_after_eof_is_our_bug() -> None:
    conn = Connection()
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeated EOF is harmless
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x00")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_frame_bytes": 0},
        {"max_frame_bytes": 2**32},
        {"max_devices": 0},
        {"max_devices": 2**16},
        {"max_blocks_per_frame": 0},
        {"max_blocks_per_list": 0},
    ],
)
def test_invalid_limits_are_a_config_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        Connection(**kwargs)


# ---------------------------------------------------------------- payloads

WB = struct.Struct(">HIBI")  # device, first_block, encoding, count


def device_record(name: bytes, *, size: int = 4096, block: int = 4096, base: int = 0) -> bytes:
    return struct.pack(">H", len(name)) + name + struct.pack(">QIB", size, block, base)


HELLO1 = struct.pack(">HH", 1, 1)  # version 1, one device
RUN = struct.Struct(">II")  # first, count

# name: (frame, a fragment of the error message that says *why* it was refused)
MALFORMED: dict[str, tuple[bytes, str]] = {
    # counts inconsistent with the payload length
    "write_blocks_count_exceeds_hashes": (
        frame(3, WB.pack(0, 0, 0, 3) + H * 2),
        "3 hashes do not fit",
    ),
    "write_blocks_payload_ends_in_fixed_fields": (frame(3, WB.pack(0, 0, 0, 1)[:7]), "truncated"),
    "block_hashes_count_exceeds_hashes": (
        frame(13, struct.pack(">HII", 0, 0, 2) + H),
        "2 hashes do not fit",
    ),
    "hello_device_count_exceeds_payload": (
        frame(1, struct.pack(">HH", 1, 500) + b"\x00" * 40),
        "500 devices do not fit",
    ),
    "hello_ack_count_mismatch": (
        frame(2, struct.pack(">HH", 1, 3) + b"\x01\x00"),
        "3 have_base flags do not match",
    ),
    "runs_count_exceeds_payload": (
        frame(4, struct.pack(">HI", 0, 2) + RUN.pack(1, 1)),
        "2 runs do not match",
    ),
    "runs_count_short_of_payload": (
        frame(4, struct.pack(">HI", 0, 0) + RUN.pack(1, 1)),
        "0 runs do not match",
    ),
    "string_length_exceeds_payload": (frame(16, struct.pack(">HH", 1, 10) + b"abc"), "truncated"),
    "name_length_exceeds_payload": (
        frame(1, HELLO1 + struct.pack(">H", 200) + b"x" * 20),
        "truncated",
    ),
    # trailing garbage after a complete payload
    "trailing_completed": (frame(14, b"\x00\x01\x00"), "1 trailing bytes"),
    "trailing_completed_ack": (frame(15, b"\x00\x01\x00\x00"), "2 trailing bytes"),
    "trailing_dirty_ack": (frame(8, struct.pack(">HI", 0, 1) + b"\x00"), "trailing"),
    "trailing_need_at": (frame(5, struct.pack(">HQQ", 0, 0, 1) + b"\x00"), "trailing"),
    "trailing_dont_need_at": (frame(6, struct.pack(">HQQ", 0, 0, 1) + b"\x00"), "trailing"),
    "trailing_read_at": (frame(9, struct.pack(">IHQI", 1, 0, 0, 1) + b"\x00"), "trailing"),
    "trailing_custom_ack": (frame(12, struct.pack(">I", 1) + b"\x00"), "trailing"),
    "trailing_block_hashes": (
        frame(13, struct.pack(">HII", 0, 0, 1) + H + b"\x00"),
        "trailing",
    ),
    "trailing_error": (frame(16, struct.pack(">HH", 1, 1) + b"xy"), "trailing"),
    "trailing_read_error": (frame(10, struct.pack(">IBH", 1, 1, 1) + b"xy"), "trailing"),
    "trailing_hello": (frame(1, HELLO1 + device_record(b"d") + b"\x00"), "trailing"),
    "trailing_dirty_list_runs": (
        frame(7, struct.pack(">HII", 0, 1, 1) + RUN.pack(1, 1) + b"\x00"),
        "1 runs do not match",
    ),
    # invalid UTF-8
    "error_reason_not_utf8": (frame(16, struct.pack(">HH", 1, 2) + b"\xc3\x28"), "UTF-8"),
    "device_name_not_utf8": (frame(1, HELLO1 + device_record(b"\xff")), "UTF-8"),
    "read_error_not_utf8": (frame(10, struct.pack(">IBH", 1, 1, 1) + b"\x80"), "UTF-8"),
    # enum and flag values out of range
    "unknown_encoding": (frame(3, WB.pack(0, 0, 9, 1) + H + b"d"), "unknown encoding 9"),
    "unknown_error_code": (frame(16, struct.pack(">HH", 99, 0)), "unknown error code 99"),
    "error_code_zero": (frame(16, struct.pack(">HH", 0, 0)), "unknown error code 0"),
    "unknown_read_status": (frame(10, struct.pack(">IB", 1, 2)), "unknown status 2"),
    "has_base_flag_2": (
        frame(1, HELLO1 + device_record(b"d", base=2) + b"\x00" * 32),
        "has_base flag 2",
    ),
    "have_base_flag_2": (frame(2, struct.pack(">HH", 1, 1) + b"\x02"), "not 0 or 1"),
    # values the event types cannot mean
    "write_blocks_zero_count": (frame(3, WB.pack(0, 0, 0, 0) + b"d"), "count is zero"),
    "plain_without_data": (frame(3, WB.pack(0, 0, Encoding.PLAIN, 1) + H), "PLAIN data of 0"),
    "zstd_without_data": (frame(3, WB.pack(0, 0, Encoding.ZSTD, 1) + H), "ZSTD data of 0"),
    "zeroes_with_data": (frame(3, WB.pack(0, 0, Encoding.ZEROES, 1) + H + b"d"), "ZEROES data"),
    "blocks_past_u32_space": (
        frame(3, WB.pack(0, 0xFFFF_FFFF, 0, 2) + H * 2 + b"d"),
        "past the u32 block index space",
    ),
    "hashes_past_u32_space": (
        frame(13, struct.pack(">HII", 0, 0xFFFF_FFFF, 2) + H * 2),
        "past the u32 block index space",
    ),
    "block_hashes_zero_count": (frame(13, struct.pack(">HII", 0, 0, 0)), "count is zero"),
    "empty_run": (frame(7, struct.pack(">HII", 0, 1, 1) + RUN.pack(5, 0)), "empty run"),
    "run_past_u32_space": (
        frame(4, struct.pack(">HI", 0, 1) + RUN.pack(2**32 - 1, 2)),
        "past the u32 block index space",
    ),
    "need_at_zero_length": (frame(5, struct.pack(">HQQ", 0, 0, 0)), "zero length"),
    "dont_need_at_past_2_64": (frame(6, struct.pack(">HQQ", 0, 2**64 - 1, 2)), "past 2**64"),
    "read_at_zero_length": (frame(9, struct.pack(">IHQI", 1, 0, 0, 0)), "zero length"),
    "zero_block_size": (frame(1, HELLO1 + device_record(b"d", block=0)), "zero block size"),
    "empty_device_name": (frame(1, HELLO1 + device_record(b"") + b"\x00"), "empty device name"),
    "device_name_too_long": (frame(1, HELLO1 + device_record(b"n" * 256)), "exceeds 255"),
}


@pytest.mark.parametrize(("data", "why"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload(data: bytes, why: str) -> None:
    message = remote_error(data)
    assert message.startswith(MessageType(data[0]).name + ":")
    assert why in message


def test_the_limits_bound_counts_before_allocation() -> None:
    hello = Hello(1, tuple(DeviceInfo(f"d{i}", 0, 512) for i in range(3)))
    assert receive(encode(hello), Connection(max_devices=3)) == hello
    assert "exceed the limit" in remote_error(encode(hello), Connection(max_devices=2))
    ack = HelloAck(1, (True, True, False))
    assert "exceed the limit" in remote_error(encode(ack), Connection(max_devices=2))

    write = WriteBlocks(0, 0, Encoding.ZEROES, (H, H, H), b"")
    assert receive(encode(write), Connection(max_blocks_per_frame=3)) == write
    assert "exceed the limit" in remote_error(encode(write), Connection(max_blocks_per_frame=2))
    hashes = BlockHashes(0, 0, (H, H, H))
    assert "exceed the limit" in remote_error(encode(hashes), Connection(max_blocks_per_frame=2))

    # A 20-byte frame claiming a run of 2**32 - 1 blocks: refused, not expanded.
    huge_run = frame(4, struct.pack(">HI", 0, 1) + struct.pack(">II", 0, 2**32 - 1))
    assert "exceeds the limit" in remote_error(huge_run)
    listed = DirtyList(0, 1, tuple(range(10)))
    assert receive(encode(listed), Connection(max_blocks_per_list=10)) == listed
    assert "exceeds the limit" in remote_error(encode(listed), Connection(max_blocks_per_list=9))


# ---------------------------------------------------------------- sending invalid events

INVALID_EVENTS: dict[str, object] = {
    "hash_too_short": WriteBlocks(0, 0, Encoding.PLAIN, (b"short",), b"d"),
    "hash_not_bytes": BlockHashes(0, 0, ("x" * 16,)),  # type: ignore[arg-type]
    "no_hashes": WriteBlocks(0, 0, Encoding.PLAIN, (), b"d"),
    "too_many_blocks": BlockHashes(0, 0, (H,) * 4097),
    "blocks_past_u32_space": WriteBlocks(0, 2**32 - 1, Encoding.ZEROES, (H, H), b""),
    "zeroes_with_data": WriteBlocks(0, 0, Encoding.ZEROES, (H,), b"d"),
    "plain_without_data": WriteBlocks(0, 0, Encoding.PLAIN, (H,), b""),
    "lz4_without_data": WriteBlocks(0, 0, Encoding.LZ4, (H,), memoryview(b"")),
    "unknown_encoding": WriteBlocks(0, 0, 7, (H,), b"d"),  # type: ignore[arg-type]
    "device_out_of_range": WriteBlocks(2**16, 0, Encoding.PLAIN, (H,), b"d"),
    "negative_offset": NeedAt(0, -1, 1),
    "zero_length": DontNeedAt(0, 0, 0),
    "range_past_2_64": NeedAt(0, 2**64 - 1, 2),
    "read_length_too_big": ReadAt(0, 0, 0, 2**32),
    "float_offset": ReadAt(0, 0, 1.5, 1),  # type: ignore[arg-type]
    "block_index_too_big": YouHave(0, (2**32,)),
    "negative_block_index": DirtyList(0, 1, (-1,)),
    "sequence_too_big": DirtyList(0, 2**32, ()),
    "name_too_long": Hello(1, (DeviceInfo("n" * 256, 0, 512),)),
    "name_multibyte_too_long": Hello(1, (DeviceInfo("é" * 128, 0, 512),)),
    "empty_name": Hello(1, (DeviceInfo("", 0, 512),)),
    "name_with_surrogate": Hello(1, (DeviceInfo("\udc80", 0, 512),)),
    "zero_block_size": Hello(1, (DeviceInfo("d", 0, 0),)),
    "size_too_big": Hello(1, (DeviceInfo("d", 2**64, 512),)),
    "base_hash_wrong_length": Hello(1, (DeviceInfo("d", 0, 512, b"\x00" * 31),)),
    "too_many_devices": Hello(1, tuple(DeviceInfo(f"d{i}", 0, 512) for i in range(1025))),
    "version_too_big": HelloAck(2**16, ()),
    "have_base_not_bool": HelloAck(1, (1,)),  # type: ignore[arg-type]
    "read_error_with_data": ReadAtResponse(1, b"data", error="boom"),
    "reason_too_long": Error(ErrorCode.IO, "x" * 65536),
    "unknown_error_code": Error(42, "?"),  # type: ignore[arg-type]
    "kind_too_big": Custom(1, 2**32, b""),
    "payload_not_bytes": Custom(1, 1, "text"),  # type: ignore[arg-type]
    "frame_too_large": Custom(1, 1, b"\x00" * DEFAULT_MAX_FRAME_BYTES),
    "not_an_event": object(),
}


@pytest.mark.parametrize("event", INVALID_EVENTS.values(), ids=INVALID_EVENTS.keys())
def test_sending_an_invalid_event_is_a_local_error(event: Event) -> None:
    with pytest.raises(LocalProtocolError):
        Connection().send(event)


def test_send_respects_the_connection_limits() -> None:
    event = DirtyList(0, 1, tuple(range(0, 20, 2)))  # ten runs of one block
    assert Connection().send(event)
    with pytest.raises(LocalProtocolError):
        Connection(max_blocks_per_list=9).send(event)
    with pytest.raises(LocalProtocolError):  # payload: 10 fixed bytes + 80 of runs
        Connection(max_frame_bytes=89).send(event)
    assert Connection(max_frame_bytes=90).send(event)
