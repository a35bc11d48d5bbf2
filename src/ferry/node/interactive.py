"""The interactive stream of ``ferry vm exec -it`` and ``ferry vm attach``: a sans-IO codec.

After the holder accepted a ``session`` or ``attach`` request on its control
socket (:mod:`ferry.node.control`: one JSON line each way), the connection
carries frames in both directions until either side closes it. The daemon's
WebSocket routes carry the same frames, one per binary message. Layout
(integers big-endian)::

    +------+----------------+------------------------------------+
    | type | payload_length | payload (<= MAX_PAYLOAD_BYTES)     |
    | u8   | u32            |                                    |
    +------+----------------+------------------------------------+

    client -> holder                 payload
    1   INPUT                        data (stdin; the console's input)
    2   EOF                          (empty) no more stdin
    3   RESIZE                       rows u16 | cols u16
    4   SIGNAL                       signal u8 (1..64)

    holder -> client
    16  OUTPUT                       stream u8 (1 stdout, 2 stderr) | data
    17  EXIT                         exit_code i32 | outcome u8 (ExecOutcome)
    18  ERROR                        message (UTF-8, <= 4 KiB): the stream ends

Data is at most :data:`MAX_DATA_BYTES` per frame (the agent's chunk). The
decoder checks the length against the cap as soon as the 5-byte header is in,
before buffering anything, and raises :class:`StreamProtocolError` on an
unknown type or a payload that does not parse. Flow control is the transport's
(a socket's buffers, the WebSocket's): a side that does not read stops the
other, and through the agent's window, the command in the guest.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ferry.guest.agent.protocol import MAX_CHUNK_BYTES, MAX_SIGNAL, ExecOutcome, OutputStream
from ferry.vm.errors import ControlError

HEADER = struct.Struct(">BI")
HEADER_BYTES: Final = HEADER.size
MAX_DATA_BYTES: Final = MAX_CHUNK_BYTES
MAX_ERROR_BYTES: Final = 4096
MAX_PAYLOAD_BYTES: Final = MAX_DATA_BYTES + 1
"""The largest payload: an OUTPUT's stream byte and a full chunk."""

_SIZE = struct.Struct(">HH")
_EXIT = struct.Struct(">iB")


class StreamProtocolError(ControlError):
    """Bytes on an interactive stream that are not a valid frame."""


class FrameType(enum.IntEnum):
    INPUT = 1
    EOF = 2
    RESIZE = 3
    SIGNAL = 4
    OUTPUT = 16
    EXIT = 17
    ERROR = 18


@dataclass(frozen=True, slots=True)
class Input:
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    pass


@dataclass(frozen=True, slots=True)
class Resize:
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class Signal:
    signal: int


@dataclass(frozen=True, slots=True)
class Output:
    stream: OutputStream
    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    exit_code: int
    outcome: ExecOutcome


@dataclass(frozen=True, slots=True)
class Error:
    message: str


ClientEvent = Input | Eof | Resize | Signal
HolderEvent = Output | Exit | Error
Event = ClientEvent | HolderEvent


def encode(event: Event) -> bytes:
    """One frame; :class:`StreamProtocolError` if ``event`` breaks the limits."""
    match event:
        case Input(data=data):
            kind, payload = FrameType.INPUT, _data(data)
        case Eof():
            kind, payload = FrameType.EOF, b""
        case Resize(rows=rows, cols=cols):
            if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
                raise StreamProtocolError(f"window size {rows}x{cols} out of range")
            kind, payload = FrameType.RESIZE, _SIZE.pack(rows, cols)
        case Signal(signal=signum):
            if not 0 < signum <= MAX_SIGNAL:
                raise StreamProtocolError(f"signal {signum} not in 1..{MAX_SIGNAL}")
            kind, payload = FrameType.SIGNAL, bytes([signum])
        case Output(stream=stream, data=data):
            kind, payload = FrameType.OUTPUT, bytes([stream]) + _data(data)
        case Exit(exit_code=code, outcome=outcome):
            if not -(1 << 31) <= code < 1 << 31:
                raise StreamProtocolError(f"exit code {code} out of i32 range")
            kind, payload = FrameType.EXIT, _EXIT.pack(code, outcome)
        case Error(message=message):
            kind, payload = FrameType.ERROR, message.encode()[:MAX_ERROR_BYTES]
    return HEADER.pack(kind, len(payload)) + payload


def _data(data: bytes) -> bytes:
    if len(data) > MAX_DATA_BYTES:
        raise StreamProtocolError(f"{len(data)} bytes of data exceed {MAX_DATA_BYTES}")
    return data


def chunks(data: bytes) -> list[bytes]:
    """``data`` cut into pieces one frame each can carry."""
    return [data[i:i + MAX_DATA_BYTES] for i in range(0, len(data), MAX_DATA_BYTES)]


def decode_payload(kind_raw: int, payload: bytes) -> Event:
    """The event of one frame (a WebSocket message is one frame)."""
    try:
        kind = FrameType(kind_raw)
    except ValueError:
        raise StreamProtocolError(f"unknown frame type {kind_raw}") from None
    n = len(payload)
    match kind:
        case FrameType.INPUT if n <= MAX_DATA_BYTES:
            return Input(payload)
        case FrameType.EOF if n == 0:
            return Eof()
        case FrameType.RESIZE if n == _SIZE.size:
            rows, cols = _SIZE.unpack(payload)
            return Resize(rows, cols)
        case FrameType.SIGNAL if n == 1 and 0 < payload[0] <= MAX_SIGNAL:
            return Signal(payload[0])
        case FrameType.OUTPUT if 1 <= n <= MAX_PAYLOAD_BYTES:
            try:
                return Output(OutputStream(payload[0]), payload[1:])
            except ValueError:
                raise StreamProtocolError(f"unknown output stream {payload[0]}") from None
        case FrameType.EXIT if n == _EXIT.size:
            code, outcome = _EXIT.unpack(payload)
            try:
                return Exit(code, ExecOutcome(outcome))
            except ValueError:
                raise StreamProtocolError(f"unknown outcome {outcome}") from None
        case FrameType.ERROR if n <= MAX_ERROR_BYTES:
            return Error(payload.decode(errors="replace"))
    raise StreamProtocolError(f"malformed {kind.name} frame of {n} bytes")


def decode_frame(frame: bytes) -> Event:
    """The event of exactly one whole frame (header included)."""
    if len(frame) < HEADER_BYTES:
        raise StreamProtocolError(f"a frame of {len(frame)} bytes has no header")
    kind, length = HEADER.unpack_from(frame)
    if length != len(frame) - HEADER_BYTES:
        raise StreamProtocolError(f"frame length {length} does not match its "
                                  f"{len(frame) - HEADER_BYTES} payload bytes")
    return decode_payload(kind, frame[HEADER_BYTES:])


_TYPES = frozenset(FrameType)


class Decoder:
    """Bytes in, events out (h11-style): ``receive_data``, then ``next_event`` until None."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event | None:
        if len(self._buf) < HEADER_BYTES:
            return None
        kind, length = HEADER.unpack_from(self._buf)
        if kind not in _TYPES:
            raise StreamProtocolError(f"unknown frame type {kind}")
        if length > MAX_PAYLOAD_BYTES:
            raise StreamProtocolError(f"a frame of {length} bytes exceeds the "
                                      f"{MAX_PAYLOAD_BYTES}-byte cap")
        if len(self._buf) < HEADER_BYTES + length:
            return None
        payload = bytes(self._buf[HEADER_BYTES:HEADER_BYTES + length])
        del self._buf[:HEADER_BYTES + length]
        return decode_payload(kind, payload)
