"""Sans-IO codec of the ferry migration protocol (version 1).

Turns the events of :mod:`ferry.protocol.messages` into bytes and bytes back
into events, h11-style: :meth:`Connection.receive_data` buffers what the
transport read, :meth:`Connection.next_event` returns one decoded event at a
time, :meth:`Connection.send` returns the frame pieces to write. No sockets,
no asyncio, no conversation state: the codec validates *frames*; the order of
the conversation (Hello first, DirtyAck before data, ...) is the migrator's
job. ``docs/wire-protocol.md`` is the full specification with examples.

Frame layout (all integers big-endian, unsigned)::

    +--------+--------+-----------------+-----------------------------------+
    | type   | flags  | reserved        | payload_length                    |
    | u8     | u8 = 0 | u16 = 0         | u32  (<= max_frame_bytes)         |
    +--------+--------+-----------------+-----------------------------------+
    | payload: payload_length bytes, layout chosen by `type`                |
    +-----------------------------------------------------------------------+

Payloads (``str`` = u16 byte length + UTF-8; ``runs`` = u32 run count +
that many ``first u32 | count u32`` pairs of consecutive block indices;
``hash`` = 16-byte XXH3-128)::

    type                  payload
    1  HELLO              version u16 | n u16 | n x device
                            device = name str (1..255 bytes) | size_bytes u64
                                   | block_size_bytes u32 (> 0)
                                   | has_base u8 (0/1) | [base_hash 32 bytes]
    2  HELLO_ACK          version u16 | n u16 | n x have_base u8 (0/1)
    3  WRITE_BLOCKS       device u16 | first_block u32 | encoding u8 | count u32
                          | count x hash | data (rest of payload)
    4  YOU_HAVE           device u16 | runs
    5  NEED_AT            device u16 | offset u64 | length u64 (> 0)
    6  DONT_NEED_AT       device u16 | offset u64 | length u64 (> 0)
    7  DIRTY_LIST         device u16 | sequence u32 | runs
    8  DIRTY_ACK          device u16 | sequence u32
    9  READ_AT            request_id u32 | device u16 | offset u64 | length u32 (> 0)
    10 READ_AT_RESPONSE   request_id u32 | status u8 | status 0: data (rest)
                                                   | status 1: error str
    11 CUSTOM             sequence u32 | kind u32 | payload (rest)
    12 CUSTOM_ACK         sequence u32
    13 BLOCK_HASHES       device u16 | first_block u32 | count u32 | count x hash
    14 COMPLETED          device u16
    15 COMPLETED_ACK      device u16
    16 ERROR              code u16 | reason str

Every decoder bounds sizes before it allocates: the payload length against
``max_frame_bytes`` as soon as the header is in, every count against the
bytes actually present and against its own cap. Malformed input raises
:class:`~ferry.errors.RemoteProtocolError` (or :class:`FrameTooLargeError`);
an event we cannot represent raises :class:`~ferry.errors.LocalProtocolError`
when sent.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

from ferry.errors import ConfigError, FrameTooLargeError, LocalProtocolError, RemoteProtocolError
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

_KiB: Final = 1024
_MiB: Final = 1024 * _KiB

BLOCK_HASH_BYTES: Final = 16
"""Every block hash on the wire is 16 bytes (XXH3-128, ``storage.hashing``; a test
keeps the two in step, so changing the hash is a deliberate protocol change)."""

HEADER: Final = struct.Struct(">BBHI")
HEADER_BYTES: Final = HEADER.size  # 8

MAX_BLOCK_DATA_BYTES: Final = 16 * _MiB
"""Most block data one WriteBlocks frame is meant to carry (the migrator sends
about 1 MiB; 16 MiB leaves room for bigger batches on fast links)."""

DEFAULT_MAX_FRAME_BYTES: Final = MAX_BLOCK_DATA_BYTES + 256 * _KiB
"""Cap on a frame's payload length. 16 MiB of block data plus room for the
hashes of 4096 blocks (64 KiB), the fixed fields, and the worst-case growth of
incompressible data under zstd/LZ4 (about 1/256 of the input, 64 KiB here).
Like Firecracker's snapshot size cap it exists so a broken or hostile peer
cannot make us buffer gigabytes from one 8-byte header."""

DEFAULT_MAX_DEVICES: Final = 1024
DEFAULT_MAX_BLOCKS_PER_FRAME: Final = 4096

DEFAULT_MAX_BLOCKS_PER_LIST: Final = 1 << 20
"""Cap on the block indices one YouHave/DirtyList expands to. Runs make a
list tiny on the wire, so the cap bounds the memory of the decoded tuple
instead (about 40 MB of Python ints); 1 Mi blocks is 64 GiB of 64 KiB blocks.
Senders split longer lists over several frames."""

BASE_HASH_BYTES: Final = 32  # SHA-256
MAX_DEVICE_NAME_BYTES: Final = 255  # like a file name; keeps Hello small
MAX_STRING_BYTES: Final = 0xFFFF  # u16 length prefix

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_BLOCK_INDEX_LIMIT: Final = 1 << 32  # block indices are u32: first + count <= 2**32

_S_U8: Final = struct.Struct(">B")
_S_U16: Final = struct.Struct(">H")
_S_U32: Final = struct.Struct(">I")
_S_HELLO: Final = struct.Struct(">HH")
_S_DEVICE: Final = struct.Struct(">QIB")
_S_WRITE: Final = struct.Struct(">HIBI")
_S_RANGE: Final = struct.Struct(">HQQ")
_S_DIRTY: Final = struct.Struct(">HI")
_S_READ_AT: Final = struct.Struct(">IHQI")
_S_READ_RESP: Final = struct.Struct(">IB")
_S_CUSTOM: Final = struct.Struct(">II")
_S_HASHES: Final = struct.Struct(">HII")
_S_ERROR: Final = struct.Struct(">H")
_MIN_DEVICE_BYTES: Final = 2 + 1 + _S_DEVICE.size  # name length, 1-byte name, fixed fields

Piece = bytes | memoryview
"""One piece of an encoded frame; write them in order (``writelines``)."""


class MessageType(enum.IntEnum):
    """The ``type`` byte of a frame. Stable: never renumber, only add."""

    HELLO = 1
    HELLO_ACK = 2
    WRITE_BLOCKS = 3
    YOU_HAVE = 4
    NEED_AT = 5
    DONT_NEED_AT = 6
    DIRTY_LIST = 7
    DIRTY_ACK = 8
    READ_AT = 9
    READ_AT_RESPONSE = 10
    CUSTOM = 11
    CUSTOM_ACK = 12
    BLOCK_HASHES = 13
    COMPLETED = 14
    COMPLETED_ACK = 15
    ERROR = 16


class ReadStatus(enum.IntEnum):
    """The ``status`` byte of a READ_AT_RESPONSE frame."""

    OK = 0
    ERROR = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Size caps a :class:`Connection` enforces on what it receives and sends.

    Both peers normally use the defaults; ``send`` refuses to produce a frame
    its own limits would reject, so two default peers never disagree.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_devices: int = DEFAULT_MAX_DEVICES
    max_blocks_per_frame: int = DEFAULT_MAX_BLOCKS_PER_FRAME
    max_blocks_per_list: int = DEFAULT_MAX_BLOCKS_PER_LIST

    def __post_init__(self) -> None:
        if not 64 <= self.max_frame_bytes <= _U32:
            raise ConfigError(f"max_frame_bytes must be in 64..{_U32}, got {self.max_frame_bytes}")
        if not 1 <= self.max_devices <= _U16:
            raise ConfigError(f"max_devices must be in 1..{_U16}, got {self.max_devices}")
        if not 1 <= self.max_blocks_per_frame <= _U32:
            raise ConfigError(f"max_blocks_per_frame must be >= 1, got {self.max_blocks_per_frame}")
        if not 1 <= self.max_blocks_per_list <= _U32:
            raise ConfigError(f"max_blocks_per_list must be >= 1, got {self.max_blocks_per_list}")


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Not a frame: the peer closed its sending side cleanly, between frames."""


# --------------------------------------------------------------------------- encoding


def _uint(value: object, maximum: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{what} must be an integer in 0..{maximum}, got {value!r}")
    return value


def _positive(value: object, maximum: int, what: str) -> int:
    if not isinstance(value, int) or not 1 <= value <= maximum:
        raise LocalProtocolError(f"{what} must be an integer in 1..{maximum}, got {value!r}")
    return value


def _string(value: object, max_bytes: int, what: str, *, min_bytes: int = 0) -> bytes:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8: {exc}") from exc
    if not min_bytes <= len(raw) <= max_bytes:
        raise LocalProtocolError(
            f"{what} must be {min_bytes}..{max_bytes} bytes of UTF-8, got {len(raw)}"
        )
    return _S_U16.pack(len(raw)) + raw


def _buffer(value: object, what: str) -> Piece:
    """A byte-oriented view of ``value`` without copying it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        try:
            return memoryview(value).cast("B")
        except TypeError as exc:
            raise LocalProtocolError(f"{what} must be a contiguous buffer: {exc}") from exc
    raise LocalProtocolError(f"{what} must be bytes-like, got {type(value).__name__}")


def _hashes(hashes: object, limits: Limits) -> bytes:
    if not isinstance(hashes, tuple | list):
        raise LocalProtocolError(f"hashes must be a tuple, got {type(hashes).__name__}")
    _positive(len(hashes), limits.max_blocks_per_frame, "block count")
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != BLOCK_HASH_BYTES:
            raise LocalProtocolError(f"every hash must be {BLOCK_HASH_BYTES} bytes, got {h!r}")
    return b"".join(hashes)


def _block_span(first_block: object, count: int) -> int:
    first = _uint(first_block, _U32, "first_block")
    if first + count > _BLOCK_INDEX_LIMIT:
        raise LocalProtocolError(f"blocks {first}+{count} run past the u32 block index space")
    return first


def _runs(blocks: object, limits: Limits) -> bytes:
    """Run-length encode block indices, keeping their order (and duplicates)."""
    if not isinstance(blocks, tuple | list):
        raise LocalProtocolError(f"blocks must be a tuple, got {type(blocks).__name__}")
    _uint(len(blocks), limits.max_blocks_per_list, "block list length")
    flat: list[int] = []
    run_first = run_next = -1
    for block in blocks:
        _uint(block, _U32, "block index")
        if block != run_next:
            if run_first >= 0:
                flat += (run_first, run_next - run_first)
            run_first = block
        run_next = block + 1
    if run_first >= 0:
        flat += (run_first, run_next - run_first)
    return _S_U32.pack(len(flat) // 2) + struct.pack(f">{len(flat)}I", *flat)


def _device_info(info: object) -> bytes:
    if not isinstance(info, DeviceInfo):
        raise LocalProtocolError(f"devices must be DeviceInfo, got {type(info).__name__}")
    name = _string(info.name, MAX_DEVICE_NAME_BYTES, "device name", min_bytes=1)
    size = _uint(info.size_bytes, _U64, "size_bytes")
    block_size = _positive(info.block_size_bytes, _U32, "block_size_bytes")
    if info.base_hash is None:
        return name + _S_DEVICE.pack(size, block_size, 0)
    if not isinstance(info.base_hash, bytes) or len(info.base_hash) != BASE_HASH_BYTES:
        raise LocalProtocolError(f"base_hash must be {BASE_HASH_BYTES} bytes or None")
    return name + _S_DEVICE.pack(size, block_size, 1) + info.base_hash


def _payload(event: Event, limits: Limits) -> tuple[MessageType, list[Piece]]:
    """The message type and payload pieces of ``event``; validates every field."""
    match event:
        case WriteBlocks():
            try:
                encoding = Encoding(event.encoding)
            except ValueError:
                raise LocalProtocolError(f"unknown encoding {event.encoding!r}") from None
            hashes = _hashes(event.hashes, limits)
            count = len(event.hashes)
            fixed = _S_WRITE.pack(
                _uint(event.device, _U16, "device"),
                _block_span(event.first_block, count),
                encoding,
                count,
            )
            data = _buffer(event.data, "data")
            has_data = len(data) > 0
            if has_data == (encoding is Encoding.ZEROES):
                rule = "empty" if encoding is Encoding.ZEROES else "non-empty"
                raise LocalProtocolError(f"{encoding.name} WriteBlocks must have {rule} data")
            return MessageType.WRITE_BLOCKS, [fixed + hashes, data]
        case Hello():
            if not isinstance(event.devices, tuple | list):
                raise LocalProtocolError("Hello.devices must be a tuple")
            n = _uint(len(event.devices), limits.max_devices, "device count")
            head = _S_HELLO.pack(_uint(event.version, _U16, "version"), n)
            return MessageType.HELLO, [head + b"".join(_device_info(d) for d in event.devices)]
        case HelloAck():
            if not isinstance(event.have_base, tuple | list) or not all(
                isinstance(b, bool) for b in event.have_base
            ):
                raise LocalProtocolError("HelloAck.have_base must be a tuple of bools")
            n = _uint(len(event.have_base), limits.max_devices, "device count")
            head = _S_HELLO.pack(_uint(event.version, _U16, "version"), n)
            return MessageType.HELLO_ACK, [head + bytes(event.have_base)]
        case YouHave():
            device = _S_U16.pack(_uint(event.device, _U16, "device"))
            return MessageType.YOU_HAVE, [device + _runs(event.blocks, limits)]
        case NeedAt() | DontNeedAt():
            offset = _uint(event.offset, _U64, "offset")
            length = _positive(event.length, min(_U64, _U64 + 1 - offset), "length")
            fixed = _S_RANGE.pack(_uint(event.device, _U16, "device"), offset, length)
            kind = MessageType.NEED_AT if isinstance(event, NeedAt) else MessageType.DONT_NEED_AT
            return kind, [fixed]
        case DirtyList():
            fixed = _S_DIRTY.pack(
                _uint(event.device, _U16, "device"), _uint(event.sequence, _U32, "sequence")
            )
            return MessageType.DIRTY_LIST, [fixed + _runs(event.blocks, limits)]
        case DirtyAck():
            fixed = _S_DIRTY.pack(
                _uint(event.device, _U16, "device"), _uint(event.sequence, _U32, "sequence")
            )
            return MessageType.DIRTY_ACK, [fixed]
        case ReadAt():
            fixed = _S_READ_AT.pack(
                _uint(event.request_id, _U32, "request_id"),
                _uint(event.device, _U16, "device"),
                _uint(event.offset, _U64, "offset"),
                _positive(event.length, _U32, "length"),
            )
            return MessageType.READ_AT, [fixed]
        case ReadAtResponse():
            request_id = _uint(event.request_id, _U32, "request_id")
            data = _buffer(event.data, "data")
            if event.error is None:
                return MessageType.READ_AT_RESPONSE, [
                    _S_READ_RESP.pack(request_id, ReadStatus.OK),
                    data,
                ]
            if len(data):
                raise LocalProtocolError("a ReadAtResponse with an error must carry no data")
            reason = _string(event.error, MAX_STRING_BYTES, "error")
            return MessageType.READ_AT_RESPONSE, [
                _S_READ_RESP.pack(request_id, ReadStatus.ERROR) + reason
            ]
        case Custom():
            fixed = _S_CUSTOM.pack(
                _uint(event.sequence, _U32, "sequence"), _uint(event.kind, _U32, "kind")
            )
            return MessageType.CUSTOM, [fixed, _buffer(event.payload, "payload")]
        case CustomAck():
            return MessageType.CUSTOM_ACK, [_S_U32.pack(_uint(event.sequence, _U32, "sequence"))]
        case BlockHashes():
            hashes = _hashes(event.hashes, limits)
            count = len(event.hashes)
            fixed = _S_HASHES.pack(
                _uint(event.device, _U16, "device"),
                _block_span(event.first_block, count),
                count,
            )
            return MessageType.BLOCK_HASHES, [fixed + hashes]
        case Completed():
            return MessageType.COMPLETED, [_S_U16.pack(_uint(event.device, _U16, "device"))]
        case CompletedAck():
            return MessageType.COMPLETED_ACK, [_S_U16.pack(_uint(event.device, _U16, "device"))]
        case Error():
            try:
                code = ErrorCode(event.code)
            except ValueError:
                raise LocalProtocolError(f"unknown error code {event.code!r}") from None
            reason = _string(event.reason, MAX_STRING_BYTES, "reason")
            return MessageType.ERROR, [_S_ERROR.pack(code) + reason]
    raise LocalProtocolError(f"not a protocol event: {type(event).__name__}")


def encode_pieces(event: Event, limits: Limits = DEFAULT_LIMITS) -> list[Piece]:
    """Encode one event as frame pieces; block data is referenced, not copied.

    Raises LocalProtocolError if the event is invalid or its frame would
    exceed ``limits``.
    """
    message_type, pieces = _payload(event, limits)
    pieces = [p for p in pieces if len(p)]  # b"" would read as EOF to a piece-wise writer
    length = sum(len(p) for p in pieces)
    if length > limits.max_frame_bytes:
        raise LocalProtocolError(
            f"{message_type.name} payload of {length} bytes exceeds the frame cap "
            f"of {limits.max_frame_bytes}"
        )
    header = HEADER.pack(message_type, 0, 0, length)
    if pieces and isinstance(pieces[0], bytes):  # merge the small fixed fields with the header
        return [header + pieces[0], *pieces[1:]]
    return [header, *pieces]


def encode(event: Event, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode one event as one frame (copies block data; see encode_pieces)."""
    return b"".join(encode_pieces(event, limits))


# --------------------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked cursor over one frame's payload."""

    __slots__ = ("_end", "_mv", "_pos", "_what")

    def __init__(self, payload: memoryview, what: MessageType) -> None:
        self._mv = payload
        self._pos = 0
        self._end = len(payload)
        self._what = what

    def fail(self, message: str) -> NoReturn:
        raise RemoteProtocolError(f"{self._what.name}: {message}")

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _advance(self, n: int) -> int:
        pos = self._pos
        if n > self._end - pos:
            self.fail(f"payload truncated ({self._end} bytes)")
        self._pos = pos + n
        return pos

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        values: tuple[int, ...] = layout.unpack_from(self._mv, self._advance(layout.size))
        return values

    def u8(self) -> int:
        return self.unpack(_S_U8)[0]

    def u16(self) -> int:
        return self.unpack(_S_U16)[0]

    def u32(self) -> int:
        return self.unpack(_S_U32)[0]

    def raw(self, n: int) -> bytes:
        pos = self._advance(n)
        return bytes(self._mv[pos : pos + n])

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def string(self, max_bytes: int, what: str) -> str:
        n = self.u16()
        if n > max_bytes:
            self.fail(f"{what} of {n} bytes exceeds {max_bytes}")
        try:
            return str(self.raw(n), "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def end(self) -> None:
        if self._pos != self._end:
            self.fail(f"{self._end - self._pos} trailing bytes")


def _read_hashes(r: _Reader, count: int, limits: Limits) -> tuple[bytes, ...]:
    if count == 0:
        r.fail("block count is zero")
    if count > limits.max_blocks_per_frame:
        r.fail(f"{count} blocks exceed the limit of {limits.max_blocks_per_frame}")
    if count * BLOCK_HASH_BYTES > r.remaining:
        r.fail(f"{count} hashes do not fit in the payload")
    raw = r.raw(count * BLOCK_HASH_BYTES)
    return tuple(raw[i : i + BLOCK_HASH_BYTES] for i in range(0, len(raw), BLOCK_HASH_BYTES))


def _check_span(r: _Reader, first_block: int, count: int) -> None:
    if first_block + count > _BLOCK_INDEX_LIMIT:
        r.fail(f"blocks {first_block}+{count} run past the u32 block index space")


def _read_runs(r: _Reader, limits: Limits) -> tuple[int, ...]:
    n = r.u32()
    if n * 8 != r.remaining:
        r.fail(f"{n} runs do not match the {r.remaining} payload bytes left")
    values = r.unpack(struct.Struct(f">{2 * n}I"))
    runs = list(zip(values[::2], values[1::2], strict=True))
    total = 0
    for first, count in runs:
        if count == 0:
            r.fail(f"empty run at block {first}")
        _check_span(r, first, count)
        total += count
    if total > limits.max_blocks_per_list:  # checked before the tuple is built
        r.fail(f"list of {total} blocks exceeds the limit of {limits.max_blocks_per_list}")
    return tuple(itertools.chain.from_iterable(range(f, f + c) for f, c in runs))


def _decode_hello(r: _Reader, limits: Limits) -> Hello:
    version, n = r.unpack(_S_HELLO)
    if n > limits.max_devices:
        r.fail(f"{n} devices exceed the limit of {limits.max_devices}")
    if n * _MIN_DEVICE_BYTES > r.remaining:
        r.fail(f"{n} devices do not fit in the payload")
    devices = []
    for _ in range(n):
        name = r.string(MAX_DEVICE_NAME_BYTES, "device name")
        if not name:
            r.fail("empty device name")
        size_bytes, block_size_bytes, has_base = r.unpack(_S_DEVICE)
        if block_size_bytes == 0:
            r.fail(f"device {name!r} has a zero block size")
        if has_base > 1:
            r.fail(f"device {name!r}: has_base flag {has_base} is not 0 or 1")
        base_hash = r.raw(BASE_HASH_BYTES) if has_base else None
        devices.append(DeviceInfo(name, size_bytes, block_size_bytes, base_hash))
    r.end()
    return Hello(version=version, devices=tuple(devices))


def _decode_hello_ack(r: _Reader, limits: Limits) -> HelloAck:
    version, n = r.unpack(_S_HELLO)
    if n > limits.max_devices:
        r.fail(f"{n} devices exceed the limit of {limits.max_devices}")
    if n != r.remaining:
        r.fail(f"{n} have_base flags do not match the {r.remaining} payload bytes left")
    flags = r.raw(n)
    if flags.strip(b"\x00\x01"):
        r.fail("have_base flag is not 0 or 1")
    return HelloAck(version=version, have_base=tuple(f == 1 for f in flags))


def _decode_write_blocks(r: _Reader, limits: Limits) -> WriteBlocks:
    device, first_block, encoding_value, count = r.unpack(_S_WRITE)
    try:
        encoding = Encoding(encoding_value)
    except ValueError:
        r.fail(f"unknown encoding {encoding_value}")
    _check_span(r, first_block, count)
    hashes = _read_hashes(r, count, limits)
    data = r.rest()
    if (len(data) == 0) != (encoding is Encoding.ZEROES):
        r.fail(f"{encoding.name} data of {len(data)} bytes")
    return WriteBlocks(device, first_block, encoding, hashes, data)


def _decode_you_have(r: _Reader, limits: Limits) -> YouHave:
    device = r.u16()
    return YouHave(device=device, blocks=_read_runs(r, limits))


def _read_range(r: _Reader) -> tuple[int, int, int]:
    device, offset, length = r.unpack(_S_RANGE)
    if length == 0:
        r.fail("zero length")
    if offset + length > _U64 + 1:
        r.fail("range runs past 2**64")
    r.end()
    return device, offset, length


def _decode_need_at(r: _Reader, limits: Limits) -> NeedAt:
    return NeedAt(*_read_range(r))


def _decode_dont_need_at(r: _Reader, limits: Limits) -> DontNeedAt:
    return DontNeedAt(*_read_range(r))


def _decode_dirty_list(r: _Reader, limits: Limits) -> DirtyList:
    device, sequence = r.unpack(_S_DIRTY)
    return DirtyList(device=device, sequence=sequence, blocks=_read_runs(r, limits))


def _decode_dirty_ack(r: _Reader, limits: Limits) -> DirtyAck:
    device, sequence = r.unpack(_S_DIRTY)
    r.end()
    return DirtyAck(device=device, sequence=sequence)


def _decode_read_at(r: _Reader, limits: Limits) -> ReadAt:
    request_id, device, offset, length = r.unpack(_S_READ_AT)
    if length == 0:
        r.fail("zero length")
    r.end()
    return ReadAt(request_id=request_id, device=device, offset=offset, length=length)


def _decode_read_at_response(r: _Reader, limits: Limits) -> ReadAtResponse:
    request_id, status = r.unpack(_S_READ_RESP)
    if status == ReadStatus.OK:
        return ReadAtResponse(request_id=request_id, data=r.rest())
    if status != ReadStatus.ERROR:
        r.fail(f"unknown status {status}")
    error = r.string(MAX_STRING_BYTES, "error")
    r.end()
    return ReadAtResponse(request_id=request_id, data=b"", error=error)


def _decode_custom(r: _Reader, limits: Limits) -> Custom:
    sequence, kind = r.unpack(_S_CUSTOM)
    with contextlib.suppress(ValueError):  # known kinds as EventKind; any u32 is allowed
        kind = EventKind(kind)
    return Custom(sequence=sequence, kind=kind, payload=r.rest())


def _decode_custom_ack(r: _Reader, limits: Limits) -> CustomAck:
    sequence = r.u32()
    r.end()
    return CustomAck(sequence=sequence)


def _decode_block_hashes(r: _Reader, limits: Limits) -> BlockHashes:
    device, first_block, count = r.unpack(_S_HASHES)
    _check_span(r, first_block, count)
    hashes = _read_hashes(r, count, limits)
    r.end()
    return BlockHashes(device=device, first_block=first_block, hashes=hashes)


def _decode_completed(r: _Reader, limits: Limits) -> Completed:
    device = r.u16()
    r.end()
    return Completed(device=device)


def _decode_completed_ack(r: _Reader, limits: Limits) -> CompletedAck:
    device = r.u16()
    r.end()
    return CompletedAck(device=device)


def _decode_error(r: _Reader, limits: Limits) -> Error:
    code_value = r.u16()
    try:
        code = ErrorCode(code_value)
    except ValueError:
        r.fail(f"unknown error code {code_value}")
    reason = r.string(MAX_STRING_BYTES, "reason")
    r.end()
    return Error(code=code, reason=reason)


_DECODERS: Final[dict[MessageType, Callable[[_Reader, Limits], Event]]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.HELLO_ACK: _decode_hello_ack,
    MessageType.WRITE_BLOCKS: _decode_write_blocks,
    MessageType.YOU_HAVE: _decode_you_have,
    MessageType.NEED_AT: _decode_need_at,
    MessageType.DONT_NEED_AT: _decode_dont_need_at,
    MessageType.DIRTY_LIST: _decode_dirty_list,
    MessageType.DIRTY_ACK: _decode_dirty_ack,
    MessageType.READ_AT: _decode_read_at,
    MessageType.READ_AT_RESPONSE: _decode_read_at_response,
    MessageType.CUSTOM: _decode_custom,
    MessageType.CUSTOM_ACK: _decode_custom_ack,
    MessageType.BLOCK_HASHES: _decode_block_hashes,
    MessageType.COMPLETED: _decode_completed,
    MessageType.COMPLETED_ACK: _decode_completed_ack,
    MessageType.ERROR: _decode_error,
}


def decode_header(
    buffer: bytes | bytearray | memoryview, offset: int = 0, limits: Limits = DEFAULT_LIMITS
) -> tuple[MessageType, int]:
    """Check the 8-byte frame header at ``offset``; return its type and payload length.

    Raises FrameTooLargeError as soon as the header is in, before any of the
    payload is buffered.
    """
    type_value, flags, reserved, length = HEADER.unpack_from(buffer, offset)
    if length > limits.max_frame_bytes:
        raise FrameTooLargeError(
            f"frame payload of {length} bytes exceeds the cap of {limits.max_frame_bytes}"
        )
    try:
        message_type = MessageType(type_value)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type {type_value}") from None
    if flags or reserved:
        raise RemoteProtocolError(
            f"{message_type.name}: flags {flags:#x} / reserved {reserved:#x} must be zero"
        )
    return message_type, length


def decode_payload(
    message_type: MessageType, payload: memoryview, limits: Limits = DEFAULT_LIMITS
) -> Event:
    """Decode one payload whose header :func:`decode_header` accepted.

    The event holds copies: it never references ``payload``.
    """
    return _DECODERS[message_type](_Reader(payload, message_type), limits)


def decode_frame(frame: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Event:
    """Decode exactly one complete frame."""
    with memoryview(frame) as mv:
        if len(mv) < HEADER_BYTES:
            raise RemoteProtocolError(f"truncated frame ({len(mv)} bytes)")
        message_type, length = decode_header(mv, 0, limits)
        if len(mv) != HEADER_BYTES + length:
            raise RemoteProtocolError(
                f"{message_type.name}: frame of {len(mv)} bytes, "
                f"header says {HEADER_BYTES + length}"
            )
        with mv[HEADER_BYTES:] as payload:
            return decode_payload(message_type, payload, limits)


# --------------------------------------------------------------------------- connection


RECEIVE_CHUNK_BYTES: Final = 64 * _KiB
"""Least free space :meth:`Connection.get_buffer` offers (more if the frame in
progress needs it): big enough that a burst of small frames arrives in one
``recv``, small enough that making room rarely moves much."""


class Connection:
    """One side of a migration connection: buffers bytes in, frames events out.

    Usage, with any transport::

        conn = Connection()
        await stream.send_all(encode(Hello(...)))      # or writelines(conn.send(ev))
        while True:
            event = conn.next_event()
            if event is None:
                conn.receive_data(await stream.receive_some())
                continue
            if isinstance(event, ConnectionClosed):
                break
            ...

    With a transport that can read into a buffer (``recv_into``), skip the
    copy of ``receive_data``: read into ``conn.get_buffer()`` and report the
    count with ``conn.buffer_updated(n)`` (0 means EOF), like asyncio's
    ``BufferedProtocol``.

    ``next_event`` raises RemoteProtocolError on malformed input, and keeps
    raising it afterwards: the byte stream cannot be resynchronised. ``send``
    holds no state; sending after the peer closed is allowed (half-close).
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_blocks_per_frame: int = DEFAULT_MAX_BLOCKS_PER_FRAME,
        max_blocks_per_list: int = DEFAULT_MAX_BLOCKS_PER_LIST,
    ) -> None:
        self.limits = Limits(
            max_frame_bytes, max_devices, max_blocks_per_frame, max_blocks_per_list
        )
        # Received bytes live in _buffer[_start:_end]. The bytearray is never
        # resized, only replaced by a bigger one, so views handed out by
        # get_buffer() cannot block it; it grows to fit the largest frame seen.
        self._buffer = bytearray()
        self._start = 0
        self._end = 0
        self._lent: int | None = None  # length of the view get_buffer() handed out
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as events."""
        return self._end - self._start

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the transport; ``b""`` means the peer closed (EOF)."""
        self._lent = None  # the room a pending get_buffer() view covered may move
        if not len(data):
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        with memoryview(data) as whole, whole.cast("B") as view:
            n = len(view)
            self._reserve(n)
            self._buffer[self._end : self._end + n] = view
        self._end += n

    def get_buffer(self, min_bytes: int = 1) -> memoryview:
        """A writable view of free space at the end of the receive buffer.

        Read the transport's next bytes into it, then call
        :meth:`buffer_updated` with the count. The view holds at least
        ``min_bytes`` and the rest of the frame in progress; for a large frame
        it ends exactly where that frame ends, so the frame is complete
        without its bytes being moved again. It is only valid until the next
        call of a receive method. Call ``next_event`` until it returns None
        first, so the view is sized for the frame actually in progress.
        """
        if min_bytes < 1:
            raise ValueError(f"min_bytes must be >= 1, not {min_bytes}")
        if self._eof:
            raise LocalProtocolError("get_buffer() after EOF")
        rest = self._frame_rest()
        self._reserve(max(min_bytes, rest, RECEIVE_CHUNK_BYTES))
        stop = len(self._buffer)
        if rest >= RECEIVE_CHUNK_BYTES and self._end + max(rest, min_bytes) < stop:
            stop = self._end + max(rest, min_bytes)
        self._lent = stop - self._end
        with memoryview(self._buffer) as whole:
            return whole[self._end : stop]

    def buffer_updated(self, nbytes: int) -> None:
        """Report that ``nbytes`` were written into the last :meth:`get_buffer`
        view; 0 means the peer closed (EOF), like ``receive_data(b"")``."""
        lent, self._lent = self._lent, None
        if lent is None:
            raise LocalProtocolError("buffer_updated() without a preceding get_buffer()")
        if not 0 <= nbytes <= lent:
            raise ValueError(f"buffer_updated({nbytes}) for a view of {lent} bytes")
        if nbytes == 0:
            self._eof = True
            return
        self._end += nbytes

    def _frame_rest(self) -> int:
        """Bytes still missing of the frame at the front of the buffer."""
        available = self._end - self._start
        if available < HEADER_BYTES:
            return HEADER_BYTES - available
        length: int = HEADER.unpack_from(self._buffer, self._start)[3]
        if length > self.limits.max_frame_bytes:
            return 0  # next_event refuses the frame; do not make room for it
        return max(HEADER_BYTES + length - available, 0)

    def _reserve(self, n: int) -> None:
        """Make at least ``n`` bytes of free space after ``_end``.

        Buffered bytes move to the front only when no more of them remain
        than were consumed before them, so moving costs no more than the
        bytes consumed since (O(n) overall); otherwise the buffer grows.
        """
        start, end, capacity = self._start, self._end, len(self._buffer)
        if start == end:
            self._start = self._end = start = end = 0
        if capacity - end >= n:
            return
        held = end - start
        if held <= start and capacity - held >= n:
            with memoryview(self._buffer) as mv:
                mv[:held] = mv[start:end]  # memmove: the ranges may overlap
        else:
            biggest = self.limits.max_frame_bytes + HEADER_BYTES + RECEIVE_CHUNK_BYTES
            new = bytearray(max(held + n, min(2 * capacity, biggest)))
            new[:held] = memoryview(self._buffer)[start:end]
            self._buffer = new
        self._start, self._end = 0, held

    def next_event(self) -> Event | ConnectionClosed | None:
        """The next complete event; None if more data is needed; ConnectionClosed after EOF."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | ConnectionClosed | None:
        buffer, start = self._buffer, self._start
        available = self._end - start
        if available >= HEADER_BYTES:
            message_type, length = decode_header(buffer, start, self.limits)
            end = start + HEADER_BYTES + length
            if end <= self._end:
                with memoryview(buffer) as mv, mv[start + HEADER_BYTES : end] as payload:
                    event = decode_payload(message_type, payload, self.limits)
                self._start = end
                return event
        if not self._eof:
            return None
        if available:
            raise RemoteProtocolError(f"truncated frame at EOF ({available} bytes buffered)")
        return ConnectionClosed()

    def send(self, event: Event) -> list[Piece]:
        """Encode ``event`` as frame pieces to write in order (block data is not copied)."""
        return encode_pieces(event, self.limits)


def iter_events(conn: Connection) -> Iterator[Event | ConnectionClosed]:
    """Every event ``conn`` can produce from the data it holds now."""
    while (event := conn.next_event()) is not None:
        yield event
        if isinstance(event, ConnectionClosed):
            return
