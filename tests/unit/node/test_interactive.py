"""The interactive stream codec (exec -i/-t, attach): round trips at every split point,
caps checked from the header alone, malformed frames refused with a typed error."""

from __future__ import annotations

import struct

import pytest

from ferry.guest.agent.protocol import ExecOutcome, OutputStream
from ferry.node import interactive as ia
from ferry.node.interactive import HEADER, MAX_DATA_BYTES, FrameType, StreamProtocolError
from ferry.vm.errors import ControlError

EVENTS: list[ia.Event] = [
    ia.Input(b"ls -l\r"),
    ia.Input(b""),
    ia.Input(b"\xff" * MAX_DATA_BYTES),
    ia.Eof(),
    ia.Resize(24, 80),
    ia.Resize(0xFFFF, 0),
    ia.Signal(9),
    ia.Output(OutputStream.STDOUT, b"\x1b[1m/ #\x1b[0m "),
    ia.Output(OutputStream.STDERR, b"x" * MAX_DATA_BYTES),
    ia.Exit(7, ExecOutcome.EXITED),
    ia.Exit(-1, ExecOutcome.SIGNALED),
    ia.Error("the guest agent failed: ünïcode"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(event: ia.Event) -> None:
    frame = ia.encode(event)
    assert ia.decode_frame(frame) == event
    decoder = ia.Decoder()
    decoder.receive_data(frame)
    assert decoder.next_event() == event
    assert decoder.next_event() is None
    assert decoder.buffered_bytes == 0


def test_byte_at_a_time() -> None:
    stream = b"".join(ia.encode(e) for e in EVENTS)
    decoder = ia.Decoder()
    out = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i:i + 1])
        while (event := decoder.next_event()) is not None:
            out.append(event)
    assert out == EVENTS


def test_an_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = ia.Decoder()
    decoder.receive_data(HEADER.pack(FrameType.INPUT, 2**32 - 1))
    with pytest.raises(StreamProtocolError, match="exceeds") as info:
        decoder.next_event()
    assert isinstance(info.value, ControlError)


def test_an_unknown_type_is_refused_from_the_header_alone() -> None:
    decoder = ia.Decoder()
    decoder.receive_data(HEADER.pack(99, 10))
    with pytest.raises(StreamProtocolError, match="unknown frame type 99"):
        decoder.next_event()


@pytest.mark.parametrize(
    ("kind", "payload", "match"),
    [
        (FrameType.INPUT, b"x" * (MAX_DATA_BYTES + 1), "malformed INPUT"),
        (FrameType.EOF, b"x", "malformed EOF"),
        (FrameType.RESIZE, b"\0\x18\0", "malformed RESIZE"),
        (FrameType.SIGNAL, b"\0", "malformed SIGNAL"),
        (FrameType.SIGNAL, b"\x41", "malformed SIGNAL"),
        (FrameType.SIGNAL, b"\x09\x09", "malformed SIGNAL"),
        (FrameType.OUTPUT, b"", "malformed OUTPUT"),
        (FrameType.OUTPUT, b"\x03data", "unknown output stream 3"),
        (FrameType.EXIT, struct.pack(">iB", 0, 9), "unknown outcome 9"),
        (FrameType.EXIT, b"\0\0\0", "malformed EXIT"),
        (FrameType.ERROR, b"e" * 4097, "malformed ERROR"),
    ],
)
def test_malformed_payloads(kind: int, payload: bytes, match: str) -> None:
    with pytest.raises(StreamProtocolError, match=match):
        ia.decode_payload(kind, payload)
    decoder = ia.Decoder()
    decoder.receive_data(HEADER.pack(kind, len(payload)) + payload)
    with pytest.raises(StreamProtocolError):
        decoder.next_event()


def test_a_whole_frame_must_match_its_length() -> None:
    frame = ia.encode(ia.Input(b"abc"))
    with pytest.raises(StreamProtocolError, match="does not match"):
        ia.decode_frame(frame + b"x")
    with pytest.raises(StreamProtocolError, match="does not match"):
        ia.decode_frame(frame[:-1])
    with pytest.raises(StreamProtocolError, match="no header"):
        ia.decode_frame(b"\x01\0")


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (ia.Input(b"x" * (MAX_DATA_BYTES + 1)), "exceed"),
        (ia.Output(OutputStream.STDOUT, b"x" * (MAX_DATA_BYTES + 1)), "exceed"),
        (ia.Resize(-1, 80), "window size"),
        (ia.Resize(24, 70000), "window size"),
        (ia.Signal(0), "signal"),
        (ia.Exit(2**31, ExecOutcome.EXITED), "i32"),
    ],
)
def test_the_encoder_refuses_what_breaks_the_limits(event: ia.Event, match: str) -> None:
    with pytest.raises(StreamProtocolError, match=match):
        ia.encode(event)


def test_chunks_cut_data_into_frames() -> None:
    data = bytes(range(256)) * 600  # 153600 bytes
    pieces = ia.chunks(data)
    assert [len(p) for p in pieces] == [MAX_DATA_BYTES, MAX_DATA_BYTES, 153600 - 2 * MAX_DATA_BYTES]
    assert b"".join(pieces) == data
    assert ia.chunks(b"") == []


def test_a_long_error_message_is_cut_to_the_cap() -> None:
    event = ia.decode_frame(ia.encode(ia.Error("e" * 10_000)))
    assert isinstance(event, ia.Error)
    assert len(event.message) == ia.MAX_ERROR_BYTES
