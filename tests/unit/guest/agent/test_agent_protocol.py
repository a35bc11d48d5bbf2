"""The agent codec: round trips, every split point, size caps, malformed input, resync."""

from __future__ import annotations

import struct

import pytest

from ferry.errors import FrameTooLargeError, RemoteProtocolError
from ferry.guest.agent.errors import (
    AgentFrameTooLargeError,
    AgentProtocolError,
    AgentRequestError,
)
from ferry.guest.agent.protocol import (
    HEADER,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    MAX_STDIN_BYTES,
    SESSION_WINDOW,
    AfterResume,
    BeforeSuspend,
    Decoder,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecOutcome,
    ExecResult,
    Frame,
    Hello,
    HelloRequest,
    HookResult,
    HooksResult,
    Message,
    MessageType,
    OutputStream,
    Ping,
    Pong,
    SessionAck,
    SessionEof,
    SessionExit,
    SessionInput,
    SessionInputAck,
    SessionOpen,
    SessionOutput,
    SessionResize,
    SessionSignal,
    SessionStarted,
    encode,
)

MESSAGES: list[Message] = [
    HelloRequest(),
    Ping(),
    Exec(argv=(b"echo", b"hi there", b""), stdin=b"in\x00put", timeout_ms=1500,
         max_output_bytes=100),
    Exec(argv=(b"exit 3",), shell=True),
    BeforeSuspend(timeout_ms=30_000),
    AfterResume(timeout_ms=1, host_time_ns=-5),
    AfterResume(timeout_ms=2000, host_time_ns=1_800_000_000_123_456_789),
    Hello(protocol_version=1, agent_version="ferry-agent 1.0", boot_id="b0" * 16),
    Pong(guest_time_ns=1 << 62, uptime_ns=12345),
    ExecResult(outcome=ExecOutcome.EXITED, code=0, stdout=b"hi\n", stderr=b""),
    ExecResult(outcome=ExecOutcome.SIGNALED, code=9, stdout=b"x" * 1000, stderr=b"e",
               stdout_truncated=True, stderr_truncated=True),
    ExecResult(outcome=ExecOutcome.EXITED, code=-1),
    HooksResult(clock_offset_ns=-1_000_000_000_000, hooks=(
        HookResult(command="sync", outcome=ExecOutcome.EXITED, code=0, output=b""),
        HookResult(command="redis-cli save", outcome=ExecOutcome.TIMED_OUT, code=9,
                   output=b"partial"),
    )),
    HooksResult(clock_offset_ns=0),
    ErrorReply(code=ErrorCode.UNKNOWN_TYPE, message="unknown message type 77"),
    ErrorReply(code=ErrorCode.NO_SESSION, message="no open session 9"),
    SessionOpen(argv=(b"sh",), tty=True, rows=24, cols=80, term=b"xterm-256color"),
    SessionOpen(argv=(b"cat > /tmp/x",), shell=True),
    SessionInput(b"ls\r"),
    SessionInput(b"x" * MAX_CHUNK_BYTES),
    SessionEof(),
    SessionResize(rows=0xFFFF, cols=1),
    SessionSignal(9),
    SessionAck(SESSION_WINDOW),
    SessionStarted(pid=231),
    SessionOutput(OutputStream.STDERR, b"\x1b[0m$ "),
    SessionInputAck(0),
    SessionExit(ExecOutcome.SIGNALED, 2),
]


def _decode_all(data: bytes, *, step: int | None = None, resync: bool = False) -> list[Frame]:
    decoder = Decoder(resync=resync)
    frames: list[Frame] = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.buffered_bytes == 0
    return frames


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    assert _decode_all(encode(message, 7)) == [Frame(7, message)]


def test_byte_at_a_time_stream_of_every_message() -> None:
    stream = b"".join(encode(m, i) for i, m in enumerate(MESSAGES))
    expected = [Frame(i, m) for i, m in enumerate(MESSAGES)]
    assert _decode_all(stream, step=1) == expected
    assert _decode_all(stream, step=5) == expected


def test_header_layout_matches_the_spec() -> None:
    frame = encode(Ping(), 0x01020304)
    assert frame == MAGIC + bytes([MessageType.PING, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0])


def test_exit_code_folds_outcomes() -> None:
    assert ExecResult(ExecOutcome.EXITED, 3).exit_code == 3
    assert ExecResult(ExecOutcome.SIGNALED, 9).exit_code == 137
    assert ExecResult(ExecOutcome.TIMED_OUT, 9).exit_code == 124
    assert ExecResult(ExecOutcome.START_FAILED, 2).exit_code == 127
    assert ExecResult(ExecOutcome.EXITED, 0).ok
    assert not ExecResult(ExecOutcome.SIGNALED, 0).ok


def test_oversized_frame_is_rejected_from_the_header_alone() -> None:
    decoder = Decoder()
    decoder.receive_data(HEADER.pack(MAGIC, MessageType.EXEC_RESULT, 0, 0, 1,
                                     MAX_FRAME_BYTES + 1))
    with pytest.raises(AgentFrameTooLargeError) as info:
        decoder.next_frame()
    assert isinstance(info.value, FrameTooLargeError)
    small = Decoder(max_frame_bytes=8)
    small.receive_data(encode(Pong(guest_time_ns=1, uptime_ns=2), 1))  # 16-byte payload
    with pytest.raises(AgentFrameTooLargeError, match="exceeds the 8-byte cap"):
        small.next_frame()


def _frame(kind: int, payload: bytes, *, flags: int = 0, magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, kind, flags, 0, 1, len(payload)) + payload


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_frame(MessageType.PING, b"", magic=b"XAGT"), "magic"),
        (b"FAGX", "magic"),
        (_frame(99, b""), "unknown message type 99"),
        (_frame(MessageType.PING, b"", flags=1), "flags"),
        (_frame(MessageType.PING, b"x"), "trailing"),
        (_frame(MessageType.BEFORE_SUSPEND, b"\0\0"), "needs 4 more bytes"),
        (_frame(MessageType.EXEC_RESULT, b"\x07" + b"\0" * 13), "unknown ExecOutcome 7"),
        (_frame(MessageType.EXEC_RESULT, b"\0" * 5 + b"\x04" + b"\0" * 8), "flags"),
        (_frame(MessageType.ERROR, struct.pack(">HI", 1, 2) + b"\xff\xfe"), "not UTF-8"),
        (_frame(MessageType.EXEC, b"\0" + b"\0\0\0\1" + b"\0\0\0\0" + b"\0\0"), "argc 0"),
        (_frame(MessageType.EXEC_RESULT, b"\0" * 6 + struct.pack(">I", 2**31)), "stdout of"),
        (_frame(MessageType.HOOKS_RESULT, b"\0" * 8 + b"\xff\xff"), "hooks exceed"),
        # Sessions: every length, count and enum is checked before anything is kept.
        (_frame(MessageType.SESSION_OUTPUT, b"\x01" + struct.pack(">I", MAX_CHUNK_BYTES + 1)
                + b"x" * (MAX_CHUNK_BYTES + 1)), "output of 65537 bytes exceeds"),
        (_frame(MessageType.SESSION_OUTPUT, b"\x03" + struct.pack(">I", 0)), "OutputStream 3"),
        (_frame(MessageType.SESSION_OUTPUT, b"\x01" + struct.pack(">I", 5) + b"ab"),
         "needs 5 more bytes"),
        (_frame(MessageType.SESSION_INPUT_ACK, struct.pack(">I", SESSION_WINDOW + 1)),
         "exceeds the 262144-byte window"),
        (_frame(MessageType.SESSION_ACK, struct.pack(">I", 2**32 - 1)), "window"),
        (_frame(MessageType.SESSION_SIGNAL, b"\0"), "signal 0"),
        (_frame(MessageType.SESSION_SIGNAL, b"\x41"), "signal 65"),
        (_frame(MessageType.SESSION_EXIT, b"\x09\0\0\0\0"), "unknown ExecOutcome 9"),
        (_frame(MessageType.SESSION_EXIT, b"\0\0\0\0\0\0"), "trailing"),
        (_frame(MessageType.SESSION_OPEN, b"\x04" + b"\0" * 8), "unknown flags 0x4"),
        (_frame(MessageType.SESSION_OPEN, b"\x02" + b"\0" * 4 + struct.pack(">I", 65)),
         "term of 65 bytes"),
        (_frame(MessageType.SESSION_OPEN, b"\x02" + b"\0" * 8 + b"\0\0"), "argc 0"),
        (_frame(MessageType.SESSION_EOF, b"x"), "trailing"),
        (_frame(MessageType.SESSION_RESIZE, b"\0\x18\0"), "needs 2 more bytes"),
    ],
)
def test_malformed_frames_raise_remote_errors(data: bytes, match: str) -> None:
    decoder = Decoder()
    decoder.receive_data(data)
    with pytest.raises(AgentProtocolError, match=match) as info:
        decoder.next_frame()
    assert isinstance(info.value, RemoteProtocolError)


def test_resync_skips_garbage_and_broken_frames() -> None:
    good = encode(Hello(protocol_version=1, agent_version="v", boot_id="b"))
    broken = _frame(99, b"zz")  # a well-formed header of an unknown type
    noise = b"\x00FAG" + b"junk" + broken + b"FA"
    for step in (1, 3, None):
        decoder = Decoder(resync=True)
        frames = []
        data = noise + good + b"tail-garbage"
        chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        for chunk in chunks:
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        assert [f.message for f in frames] == [Hello(1, "v", "b")]
        assert decoder.skipped_bytes >= len(noise)


def test_discard_partial_gives_up_on_a_stale_header() -> None:
    decoder = Decoder(resync=True)
    stale = HEADER.pack(MAGIC, MessageType.EXEC_RESULT, 0, 0, 9, 1000) + b"only a bit"
    decoder.receive_data(stale + encode(Hello(1, "v", "b")))
    assert decoder.next_frame() is None  # the stale frame swallows the HELLO
    decoder.discard_partial()
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.message == Hello(1, "v", "b")


def test_strict_decoder_does_not_discard() -> None:
    decoder = Decoder()
    partial = encode(Ping())[:10]
    decoder.receive_data(partial)
    decoder.discard_partial()
    assert decoder.buffered_bytes == len(partial)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Exec(argv=()), "argv needs"),
        (Exec(argv=(b"a\0b",)), "NUL"),
        (Exec(argv=(b"cat",), stdin=b"x" * (MAX_STDIN_BYTES + 1)), "stdin"),
        (Exec(argv=(b"cat",), timeout_ms=0), "timeout_ms"),
        (Exec(argv=(b"cat",), max_output_bytes=-1), "max_output_bytes"),
        (BeforeSuspend(timeout_ms=0), "timeout_ms"),
        (SessionOpen(argv=()), "argv needs"),
        (SessionOpen(argv=(b"sh",), rows=70000), "window size"),
        (SessionOpen(argv=(b"sh",), term=b"x" * 65), "term"),
        (SessionOpen(argv=(b"sh",), term=b"a\0b"), "term"),
        (SessionInput(b"x" * (MAX_CHUNK_BYTES + 1)), "chunk"),
        (SessionResize(rows=-1, cols=80), "window size"),
        (SessionSignal(0), "signal"),
        (SessionSignal(65), "signal"),
        (SessionAck(SESSION_WINDOW + 1), "acknowledgement"),
        (SessionAck(-1), "acknowledgement"),
    ],
)
def test_encoder_rejects_invalid_requests(message: Message, match: str) -> None:
    with pytest.raises(AgentRequestError, match=match):
        encode(message, 1)


def test_encoder_enforces_the_frame_cap() -> None:
    with pytest.raises(AgentRequestError, match="frame cap"):
        encode(Exec(argv=(b"x" * 100,)), 1, max_frame_bytes=64)
