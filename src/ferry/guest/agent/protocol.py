"""Sans-IO codec of the guest agent protocol (version 2; version 1 lacks sessions).

The host and the agent inside the guest talk over a virtio-serial port: the
host end is a UNIX socket QEMU listens on. This module turns messages into
frames and bytes back into messages; it does no I/O. The agent's C source
(``ferry/guest/files/agent/agent.c``) implements the same layout;
``docs/agent.md`` is the specification with example conversations.

Frame layout (integers big-endian)::

    +---------+------+--------+----------+------------+----------------+
    | magic   | type | flags  | reserved | request_id | payload_length |
    | "FAGT"  | u8   | u8 = 0 | u16 = 0  | u32        | u32 (<= cap)   |
    +---------+------+--------+----------+------------+----------------+
    | payload: payload_length bytes, layout chosen by `type`            |
    +-------------------------------------------------------------------+

The magic lets a reader that joined mid-stream find the next frame: after a
snapshot/restore the host side is a new connection and bytes of the old
conversation may still be in flight. :class:`Decoder` in ``resync`` mode
skips to the next magic instead of failing; in strict mode any malformed
byte raises :class:`AgentProtocolError`.

Payload fields: ``u8/u16/u32/i32/i64``; ``bytes`` = u32 length + data;
``argv`` = u16 count + count x bytes::

    host -> guest                    payload
    1   HELLO_REQUEST                (empty) ask the agent to (re)send HELLO
    2   PING                         (empty)
    3   EXEC                         flags u8 (bit 0: shell) | timeout_ms u32
                                     | max_output_bytes u32 | argv | stdin bytes
    4   BEFORE_SUSPEND               timeout_ms u32
    5   AFTER_RESUME                 timeout_ms u32 | host_time_ns i64
    6   SESSION_OPEN                 flags u8 (bit 0: shell, bit 1: tty) | rows u16
                                     | cols u16 | term bytes (<= 64) | argv
    7   SESSION_INPUT                data bytes (<= 64 KiB; within the window)
    8   SESSION_EOF                  (empty) close the command's stdin (tty: type VEOF)
    9   SESSION_RESIZE               rows u16 | cols u16 (TIOCSWINSZ)
    10  SESSION_SIGNAL               signal u8 (1..64), sent to the command's process group
    11  SESSION_ACK                  bytes u32: output the host has taken

    guest -> host
    128 HELLO                        protocol u16 | agent_version bytes | boot_id bytes
    129 PONG                         guest_time_ns i64 | uptime_ns i64
    130 EXEC_RESULT                  outcome u8 | code i32 | flags u8 (bit 0/1:
                                     stdout/stderr truncated) | stdout bytes | stderr bytes
    131 HOOKS_RESULT                 clock_offset_ns i64 | count u16 | count x
                                     (command bytes | outcome u8 | code i32 | output bytes)
    132 ERROR                        code u16 | message bytes
    133 SESSION_STARTED              pid u32
    134 SESSION_OUTPUT               stream u8 (1 stdout, 2 stderr) | data bytes (<= 64 KiB)
    135 SESSION_INPUT_ACK            bytes u32: stdin written to the command
    136 SESSION_EXIT                 outcome u8 | code i32

Sessions (version 2): every frame of a session carries the request id of its
SESSION_OPEN. Each direction has a window of :data:`SESSION_WINDOW` bytes:
the agent sends no more output than that unacknowledged (SESSION_ACK), the
host sends no more stdin than that unacknowledged (SESSION_INPUT_ACK).

Requests carry a non-zero ``request_id``; the reply carries the same one.
HELLO and HELLO_REQUEST use 0. An ERROR with id 0 is about the stream itself
(a malformed frame), not one request.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final, NoReturn, TypeVar

from ferry.guest.agent.errors import (
    AgentFrameTooLargeError,
    AgentProtocolError,
    AgentRequestError,
)

PROTOCOL_VERSION: Final = 2
SESSION_PROTOCOL_VERSION: Final = 2
"""The first protocol version whose agent serves sessions (``exec -it``)."""
MAGIC: Final = b"FAGT"
HEADER = struct.Struct(">4sBBHII")
HEADER_BYTES: Final = HEADER.size  # 16

MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
"""Largest payload either side accepts (same constant in agent.c). Two full
output streams plus framing fit; a bogus length from a corrupt header cannot
make the reader allocate more than this."""
MAX_OUTPUT_BYTES: Final = 1024 * 1024
"""The agent keeps at most this much of each of stdout and stderr."""
MAX_STDIN_BYTES: Final = 1024 * 1024
MAX_ARGS: Final = 4096
MAX_HOOKS: Final = 64
MAX_TIMEOUT_MS: Final = 24 * 3600 * 1000
MAX_CHUNK_BYTES: Final = 64 * 1024
"""Data in one SESSION_INPUT or SESSION_OUTPUT frame (same constant in agent.c)."""
SESSION_WINDOW: Final = 256 * 1024
"""Unacknowledged bytes per session and direction (same constant in agent.c): what
either side may have to buffer for one session."""
MAX_TERM_BYTES: Final = 64
MAX_SIGNAL: Final = 64


class MessageType(enum.IntEnum):
    HELLO_REQUEST = 1
    PING = 2
    EXEC = 3
    BEFORE_SUSPEND = 4
    AFTER_RESUME = 5
    SESSION_OPEN = 6
    SESSION_INPUT = 7
    SESSION_EOF = 8
    SESSION_RESIZE = 9
    SESSION_SIGNAL = 10
    SESSION_ACK = 11
    HELLO = 128
    PONG = 129
    EXEC_RESULT = 130
    HOOKS_RESULT = 131
    ERROR = 132
    SESSION_STARTED = 133
    SESSION_OUTPUT = 134
    SESSION_INPUT_ACK = 135
    SESSION_EXIT = 136


class ExecOutcome(enum.IntEnum):
    """How a command ended; ``code`` is read according to it."""

    EXITED = 0  # code: exit status
    SIGNALED = 1  # code: signal number
    TIMED_OUT = 2  # killed (SIGKILL to its process group) at the deadline
    START_FAILED = 3  # code: errno of fork/exec


class ErrorCode(enum.IntEnum):
    MALFORMED = 1  # a frame the agent could not parse
    UNKNOWN_TYPE = 2  # a message type the agent does not know
    TOO_LARGE = 3  # a frame above the agent's size cap
    INTERNAL = 4  # a system call failed in the agent (message names it)
    CLOCK = 5  # clock_settime failed
    NO_SESSION = 6  # a session request names no open session
    BUSY = 7  # the agent has as many sessions open as it serves


class OutputStream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


# -- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloRequest:
    """Ask the agent to announce itself (sent by a host on connect)."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; the agent answers with :class:`Pong`."""


@dataclass(frozen=True, slots=True)
class Exec:
    """Run ``argv`` (or, with ``shell``, ``/bin/sh -c argv[0]``) in the guest."""

    argv: tuple[bytes, ...]
    shell: bool = False
    stdin: bytes = b""
    timeout_ms: int = 30_000
    max_output_bytes: int = MAX_OUTPUT_BYTES


@dataclass(frozen=True, slots=True)
class BeforeSuspend:
    """Run the blueprint's before-suspend hooks, then ``sync()``."""

    timeout_ms: int


@dataclass(frozen=True, slots=True)
class AfterResume:
    """Set the guest clock to ``host_time_ns`` (Unix ns), then run after-resume hooks."""

    timeout_ms: int
    host_time_ns: int


def _check_size(rows: int, cols: int) -> None:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise AgentRequestError(f"window size {rows}x{cols} out of u16 range")


@dataclass(frozen=True, slots=True)
class SessionOpen:
    """Start ``argv`` (or ``sh -c argv[0]``) with its stdio streamed; on a pty with ``tty``.

    ``rows``/``cols`` of 0 leave the pty's size unset; ``term`` becomes ``$TERM``.
    """

    argv: tuple[bytes, ...]
    shell: bool = False
    tty: bool = False
    rows: int = 0
    cols: int = 0
    term: bytes = b""


@dataclass(frozen=True, slots=True)
class SessionInput:
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionEof:
    """No more stdin: the agent closes the command's stdin (on a pty: types VEOF)."""


@dataclass(frozen=True, slots=True)
class SessionResize:
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class SessionSignal:
    """Send ``signal`` to the session's process group."""

    signal: int


@dataclass(frozen=True, slots=True)
class SessionAck:
    """The host took ``count`` bytes of output: the agent may send that much more."""

    count: int


@dataclass(frozen=True, slots=True)
class SessionStarted:
    pid: int


@dataclass(frozen=True, slots=True)
class SessionOutput:
    stream: OutputStream
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionInputAck:
    """The command took ``count`` bytes of stdin: the host may send that much more."""

    count: int


@dataclass(frozen=True, slots=True)
class SessionExit:
    """How a session's command ended (START_FAILED: it never ran; code is the errno)."""

    outcome: ExecOutcome
    code: int

    @property
    def exit_code(self) -> int:
        return ExecResult(self.outcome, self.code).exit_code


@dataclass(frozen=True, slots=True)
class Hello:
    """The agent's announcement: sent at start, on reconnect and on request."""

    protocol_version: int
    agent_version: str
    boot_id: str


@dataclass(frozen=True, slots=True)
class Pong:
    guest_time_ns: int  # CLOCK_REALTIME
    uptime_ns: int  # CLOCK_BOOTTIME


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command did. ``exit_code`` folds the outcome into one shell-style int."""

    outcome: ExecOutcome
    code: int
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def exit_code(self) -> int:
        """Exit status; 128+signal if signalled; 124 if timed out; 127 if it never started."""
        match self.outcome:
            case ExecOutcome.EXITED:
                return self.code
            case ExecOutcome.SIGNALED:
                return 128 + self.code
            case ExecOutcome.TIMED_OUT:
                return 124
            case ExecOutcome.START_FAILED:
                return 127

    @property
    def ok(self) -> bool:
        return self.outcome is ExecOutcome.EXITED and self.code == 0


@dataclass(frozen=True, slots=True)
class HookResult:
    """One hook command: how it ended and its stdout+stderr (bounded)."""

    command: str
    outcome: ExecOutcome
    code: int
    output: bytes = b""

    @property
    def ok(self) -> bool:
        return self.outcome is ExecOutcome.EXITED and self.code == 0


@dataclass(frozen=True, slots=True)
class HooksResult:
    """Reply to before_suspend/after_resume; ``clock_offset_ns`` is new minus old time."""

    clock_offset_ns: int
    hooks: tuple[HookResult, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hooks)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: ErrorCode
    message: str


Request = HelloRequest | Ping | Exec | BeforeSuspend | AfterResume | SessionOpen
SessionRequest = SessionInput | SessionEof | SessionResize | SessionSignal | SessionAck
Reply = Hello | Pong | ExecResult | HooksResult | ErrorReply | SessionStarted
SessionEvent = SessionOutput | SessionInputAck | SessionExit
Message = Request | SessionRequest | Reply | SessionEvent


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: the message and the request it belongs to (0: none)."""

    request_id: int
    message: Message


# -- encoding ---------------------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


def _bytes(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def _timeout(ms: int) -> bytes:
    if not 0 < ms <= MAX_TIMEOUT_MS:
        raise AgentRequestError(f"timeout_ms must be 1..{MAX_TIMEOUT_MS}, got {ms}")
    return _U32.pack(ms)


def _payload(message: Message) -> tuple[MessageType, bytes]:
    match message:
        case HelloRequest():
            return MessageType.HELLO_REQUEST, b""
        case Ping():
            return MessageType.PING, b""
        case Exec():
            _check_argv(message.argv)
            if len(message.stdin) > MAX_STDIN_BYTES:
                raise AgentRequestError(
                    f"stdin of {len(message.stdin)} bytes exceeds {MAX_STDIN_BYTES}")
            if not 0 <= message.max_output_bytes <= MAX_OUTPUT_BYTES:
                raise AgentRequestError(f"max_output_bytes must be 0..{MAX_OUTPUT_BYTES}")
            parts = [_U8.pack(1 if message.shell else 0), _timeout(message.timeout_ms),
                     _U32.pack(message.max_output_bytes), _U16.pack(len(message.argv))]
            parts += [_bytes(a) for a in message.argv]
            parts.append(_bytes(message.stdin))
            return MessageType.EXEC, b"".join(parts)
        case BeforeSuspend():
            return MessageType.BEFORE_SUSPEND, _timeout(message.timeout_ms)
        case AfterResume():
            return MessageType.AFTER_RESUME, (_timeout(message.timeout_ms)
                                              + _I64.pack(message.host_time_ns))
        case Hello():
            return MessageType.HELLO, (_U16.pack(message.protocol_version)
                                       + _bytes(message.agent_version.encode())
                                       + _bytes(message.boot_id.encode()))
        case Pong():
            return MessageType.PONG, _I64.pack(message.guest_time_ns) + _I64.pack(
                message.uptime_ns)
        case ExecResult():
            flags = (1 if message.stdout_truncated else 0) | (2 if message.stderr_truncated else 0)
            return MessageType.EXEC_RESULT, (
                _U8.pack(message.outcome) + _I32.pack(message.code) + _U8.pack(flags)
                + _bytes(message.stdout) + _bytes(message.stderr))
        case HooksResult():
            if len(message.hooks) > MAX_HOOKS:
                raise AgentRequestError(f"at most {MAX_HOOKS} hooks")
            parts = [_I64.pack(message.clock_offset_ns), _U16.pack(len(message.hooks))]
            for h in message.hooks:
                parts += [_bytes(h.command.encode()), _U8.pack(h.outcome), _I32.pack(h.code),
                          _bytes(h.output)]
            return MessageType.HOOKS_RESULT, b"".join(parts)
        case ErrorReply():
            return MessageType.ERROR, _U16.pack(message.code) + _bytes(message.message.encode())
        case SessionOpen():
            _check_argv(message.argv)
            _check_size(message.rows, message.cols)
            if len(message.term) > MAX_TERM_BYTES or b"\0" in message.term:
                raise AgentRequestError(f"term must be at most {MAX_TERM_BYTES} bytes, no NUL")
            flags = (1 if message.shell else 0) | (2 if message.tty else 0)
            parts = [_U8.pack(flags), _U16.pack(message.rows), _U16.pack(message.cols),
                     _bytes(message.term), _U16.pack(len(message.argv))]
            parts += [_bytes(a) for a in message.argv]
            return MessageType.SESSION_OPEN, b"".join(parts)
        case SessionInput():
            return MessageType.SESSION_INPUT, _bytes(_chunk(message.data))
        case SessionEof():
            return MessageType.SESSION_EOF, b""
        case SessionResize():
            _check_size(message.rows, message.cols)
            return MessageType.SESSION_RESIZE, _U16.pack(message.rows) + _U16.pack(message.cols)
        case SessionSignal():
            if not 0 < message.signal <= MAX_SIGNAL:
                raise AgentRequestError(f"signal must be 1..{MAX_SIGNAL}, got {message.signal}")
            return MessageType.SESSION_SIGNAL, _U8.pack(message.signal)
        case SessionAck():
            return MessageType.SESSION_ACK, _count(message.count)
        case SessionStarted():
            return MessageType.SESSION_STARTED, _U32.pack(message.pid)
        case SessionOutput():
            return MessageType.SESSION_OUTPUT, (_U8.pack(message.stream)
                                                + _bytes(_chunk(message.data)))
        case SessionInputAck():
            return MessageType.SESSION_INPUT_ACK, _count(message.count)
        case SessionExit():
            return MessageType.SESSION_EXIT, _U8.pack(message.outcome) + _I32.pack(message.code)


def _check_argv(argv: tuple[bytes, ...]) -> None:
    if not argv or len(argv) > MAX_ARGS:
        raise AgentRequestError(f"argv needs 1..{MAX_ARGS} items, got {len(argv)}")
    if any(b"\0" in a for a in argv):
        raise AgentRequestError("argv items must not contain NUL bytes")


def _chunk(data: bytes) -> bytes:
    if len(data) > MAX_CHUNK_BYTES:
        raise AgentRequestError(f"a chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
    return data


def _count(n: int) -> bytes:
    if not 0 <= n <= SESSION_WINDOW:
        raise AgentRequestError(f"an acknowledgement of {n} bytes is not in 0..{SESSION_WINDOW}")
    return _U32.pack(n)


def encode(message: Message, request_id: int = 0, *,
           max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One complete frame for ``message``."""
    if not 0 <= request_id <= 0xFFFFFFFF:
        raise AgentRequestError(f"request_id {request_id} out of u32 range")
    kind, payload = _payload(message)
    if len(payload) > max_frame_bytes:
        raise AgentRequestError(f"{kind.name} payload of {len(payload)} bytes exceeds "
                                f"the {max_frame_bytes}-byte frame cap")
    return HEADER.pack(MAGIC, kind, 0, 0, request_id, len(payload)) + payload


# -- decoding ---------------------------------------------------------------


_E = TypeVar("_E", bound=enum.IntEnum)


class _Reader:
    """Bounds-checked cursor over one payload."""

    def __init__(self, data: bytes, kind: MessageType) -> None:
        self._data = data
        self._pos = 0
        self._kind = kind

    def fail(self, message: str) -> NoReturn:
        raise AgentProtocolError(f"malformed {self._kind.name} frame: {message}")

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            self.fail(f"needs {n} more bytes at offset {self._pos}, "
                      f"has {len(self._data) - self._pos}")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def num(self, layout: struct.Struct) -> int:
        value: int = layout.unpack(self._take(layout.size))[0]
        return value

    def blob(self, cap: int, what: str) -> bytes:
        n = self.num(_U32)
        if n > cap:
            self.fail(f"{what} of {n} bytes exceeds {cap}")
        return self._take(n)

    def text(self, cap: int, what: str) -> str:
        try:
            return self.blob(cap, what).decode()
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def enum(self, cls: type[_E], layout: struct.Struct) -> _E:
        value = self.num(layout)
        try:
            return cls(value)
        except ValueError:
            self.fail(f"unknown {cls.__name__} {value}")

    def window(self, what: str) -> int:
        n = self.num(_U32)
        if n > SESSION_WINDOW:
            self.fail(f"{what} {n} exceeds the {SESSION_WINDOW}-byte window")
        return n

    def end(self) -> None:
        if self._pos != len(self._data):
            self.fail(f"{len(self._data) - self._pos} trailing bytes")


def _decode(kind: MessageType, r: _Reader) -> Message:
    match kind:
        case MessageType.HELLO_REQUEST:
            return HelloRequest()
        case MessageType.PING:
            return Ping()
        case MessageType.EXEC:
            flags = r.num(_U8)
            if flags & ~1:
                r.fail(f"unknown flags {flags:#x}")
            timeout_ms, max_out = r.num(_U32), r.num(_U32)
            argc = r.num(_U16)
            if not 0 < argc <= MAX_ARGS:
                r.fail(f"argc {argc} not in 1..{MAX_ARGS}")
            argv = tuple(r.blob(MAX_FRAME_BYTES, "argument") for _ in range(argc))
            return Exec(argv=argv, shell=bool(flags & 1), stdin=r.blob(MAX_STDIN_BYTES, "stdin"),
                        timeout_ms=timeout_ms, max_output_bytes=max_out)
        case MessageType.BEFORE_SUSPEND:
            return BeforeSuspend(timeout_ms=r.num(_U32))
        case MessageType.AFTER_RESUME:
            return AfterResume(timeout_ms=r.num(_U32), host_time_ns=r.num(_I64))
        case MessageType.HELLO:
            return Hello(protocol_version=r.num(_U16), agent_version=r.text(256, "agent_version"),
                         boot_id=r.text(256, "boot_id"))
        case MessageType.PONG:
            return Pong(guest_time_ns=r.num(_I64), uptime_ns=r.num(_I64))
        case MessageType.EXEC_RESULT:
            outcome, code, flags = r.enum(ExecOutcome, _U8), r.num(_I32), r.num(_U8)
            if flags & ~3:
                r.fail(f"unknown flags {flags:#x}")
            return ExecResult(outcome=outcome, code=code,
                              stdout=r.blob(MAX_OUTPUT_BYTES, "stdout"),
                              stderr=r.blob(MAX_OUTPUT_BYTES, "stderr"),
                              stdout_truncated=bool(flags & 1), stderr_truncated=bool(flags & 2))
        case MessageType.HOOKS_RESULT:
            offset, count = r.num(_I64), r.num(_U16)
            if count > MAX_HOOKS:
                r.fail(f"{count} hooks exceed {MAX_HOOKS}")
            hooks = tuple(
                HookResult(command=r.text(MAX_FRAME_BYTES, "command"),
                           outcome=r.enum(ExecOutcome, _U8), code=r.num(_I32),
                           output=r.blob(MAX_OUTPUT_BYTES, "output"))
                for _ in range(count))
            return HooksResult(clock_offset_ns=offset, hooks=hooks)
        case MessageType.ERROR:
            return ErrorReply(code=r.enum(ErrorCode, _U16), message=r.text(65536, "message"))
        case MessageType.SESSION_OPEN:
            flags = r.num(_U8)
            if flags & ~3:
                r.fail(f"unknown flags {flags:#x}")
            rows, cols = r.num(_U16), r.num(_U16)
            term = r.blob(MAX_TERM_BYTES, "term")
            argc = r.num(_U16)
            if not 0 < argc <= MAX_ARGS:
                r.fail(f"argc {argc} not in 1..{MAX_ARGS}")
            argv = tuple(r.blob(MAX_FRAME_BYTES, "argument") for _ in range(argc))
            return SessionOpen(argv=argv, shell=bool(flags & 1), tty=bool(flags & 2),
                               rows=rows, cols=cols, term=term)
        case MessageType.SESSION_INPUT:
            return SessionInput(r.blob(MAX_CHUNK_BYTES, "input"))
        case MessageType.SESSION_EOF:
            return SessionEof()
        case MessageType.SESSION_RESIZE:
            return SessionResize(rows=r.num(_U16), cols=r.num(_U16))
        case MessageType.SESSION_SIGNAL:
            sig = r.num(_U8)
            if not 0 < sig <= MAX_SIGNAL:
                r.fail(f"signal {sig} not in 1..{MAX_SIGNAL}")
            return SessionSignal(sig)
        case MessageType.SESSION_ACK:
            return SessionAck(r.window("acknowledged"))
        case MessageType.SESSION_STARTED:
            return SessionStarted(r.num(_U32))
        case MessageType.SESSION_OUTPUT:
            return SessionOutput(r.enum(OutputStream, _U8), r.blob(MAX_CHUNK_BYTES, "output"))
        case MessageType.SESSION_INPUT_ACK:
            return SessionInputAck(r.window("acknowledged"))
        case MessageType.SESSION_EXIT:
            return SessionExit(outcome=r.enum(ExecOutcome, _U8), code=r.num(_I32))


class Decoder:
    """Turns received bytes into :class:`Frame`\\ s, one at a time (h11-style).

    ``resync=True`` makes the decoder skip garbage (bytes before a magic, a
    frame whose header or payload does not parse) instead of raising: the
    host uses it until the agent's HELLO, because a new connection may
    start in the middle of an old conversation's bytes.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES, resync: bool = False) -> None:
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self.resync = resync
        self.skipped_bytes = 0  # garbage dropped in resync mode, for logs and tests

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def discard_partial(self) -> None:
        """In resync mode, give up on a frame whose payload never completed.

        A stale header from an old conversation can claim a payload that will
        never arrive; the client calls this when it has waited long enough.
        """
        if self.resync and self._buf.startswith(MAGIC):
            self._skip(1)

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self.skipped_bytes += n

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        while True:
            if self.resync:
                at = self._buf.find(MAGIC)
                if at < 0:  # keep a tail that may be the start of a magic
                    self._skip(max(0, len(self._buf) - (len(MAGIC) - 1)))
                    return None
                self._skip(at)
            if len(self._buf) < HEADER_BYTES:
                if not self.resync and self._buf[:len(MAGIC)] != MAGIC[:len(self._buf)]:
                    raise AgentProtocolError(f"bad frame magic {bytes(self._buf[:4])!r}")
                return None
            try:
                return self._one_frame()
            except AgentProtocolError:
                if not self.resync:
                    raise
                self._skip(1)  # not a real frame start: look for the next magic

    def _one_frame(self) -> Frame | None:
        magic, kind_raw, flags, reserved, request_id, length = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise AgentProtocolError(f"bad frame magic {magic!r}")
        if length > self.max_frame_bytes:
            raise AgentFrameTooLargeError(
                f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte cap")
        try:
            kind = MessageType(kind_raw)
        except ValueError:
            raise AgentProtocolError(f"unknown message type {kind_raw}") from None
        if flags or reserved:
            raise AgentProtocolError(f"non-zero flags/reserved in {kind.name} header")
        if len(self._buf) < HEADER_BYTES + length:
            return None
        payload = bytes(self._buf[HEADER_BYTES:HEADER_BYTES + length])
        reader = _Reader(payload, kind)
        message = _decode(kind, reader)
        reader.end()
        del self._buf[:HEADER_BYTES + length]
        return Frame(request_id=request_id, message=message)
