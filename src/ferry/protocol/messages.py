"""Events of the ferry migration protocol (version 1).

Each event is one frame on the wire (see ``ferry.protocol.codec`` for the byte
layout and ``docs/wire-protocol.md`` for the full specification). Events are
frozen value objects; the codec turns them into bytes and back and never does
I/O.

Direction: S = source (the side that owns the authority and sends data),
D = destination.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1


class Encoding(enum.IntEnum):
    """How the data of a :class:`WriteBlocks` frame is carried."""

    PLAIN = 0
    ZEROES = 1  # every block in the run is all zero bytes; no data follows
    ZSTD = 2
    LZ4 = 3


class ErrorCode(enum.IntEnum):
    """Why a peer gave up (carried in :class:`Error`)."""

    INTERNAL = 1
    VERSION = 2
    DEVICE_MISMATCH = 3
    INTEGRITY = 4
    PROTOCOL = 5
    CANCELLED = 6
    IO = 7


class EventKind(enum.IntEnum):
    """Kinds of :class:`Custom` events. Values >= 1024 are free for applications."""

    HANDOFF = 1  # S -> D: the source is suspended; D now holds the authority
    VM_STATE_READY = 2  # S -> D: the VM device state device is complete
    APPLICATION = 1024


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of a migrating group, as described in :class:`Hello`."""

    name: str
    size_bytes: int
    block_size_bytes: int
    base_hash: bytes | None = None  # SHA-256 of a read-only base the device overlays


@dataclass(frozen=True, slots=True)
class Hello:
    """S -> D, first frame: protocol version and the device group."""

    version: int
    devices: tuple[DeviceInfo, ...]


@dataclass(frozen=True, slots=True)
class HelloAck:
    """D -> S: accepts the group. ``have_base[i]`` is True if D holds device i's base."""

    version: int
    have_base: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class WriteBlocks:
    """S -> D: contents of ``len(hashes)`` consecutive blocks starting at ``first_block``.

    ``data`` is the encoded payload: the concatenated blocks for PLAIN, empty
    for ZEROES, one compressed frame of the concatenated blocks for ZSTD/LZ4.
    ``hashes`` holds the XXH3-128 of each block's *decoded* contents.
    """

    device: int
    first_block: int
    encoding: Encoding
    hashes: tuple[bytes, ...]
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class YouHave:
    """S -> D: these blocks are unchanged from the shared base D already holds."""

    device: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NeedAt:
    """D -> S: D needs the blocks covering this byte range now (post-copy fault)."""

    device: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DontNeedAt:
    """D -> S: D will never need this byte range again (it overwrote it locally)."""

    device: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DirtyList:
    """S -> D: these blocks changed since they were sent; D must treat them as absent.

    Data for them is only sent after D has answered with :class:`DirtyAck`
    carrying the same ``sequence``; for the final lists (the VM suspended) it
    follows the HANDOFF behind them without waiting (D applies events in order;
    docs/wire-protocol.md).
    """

    device: int
    sequence: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DirtyAck:
    """D -> S: the dirty list ``sequence`` of ``device`` has been applied."""

    device: int
    sequence: int


@dataclass(frozen=True, slots=True)
class ReadAt:
    """Either side: please send ``length`` bytes of ``device`` at ``offset``."""

    request_id: int
    device: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadAtResponse:
    """Reply to :class:`ReadAt`: the bytes, or an error message if ``error`` is set."""

    request_id: int
    data: bytes = field(repr=False)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Custom:
    """An application event (e.g. the authority hand-off) with an opaque payload."""

    sequence: int
    kind: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class CustomAck:
    """Acknowledges the :class:`Custom` event with the same ``sequence``."""

    sequence: int


@dataclass(frozen=True, slots=True)
class BlockHashes:
    """S -> D: final hashes of blocks ``first_block..`` of ``device``, sent before
    :class:`Completed` so D can verify the whole device."""

    device: int
    first_block: int
    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Completed:
    """S -> D: every block of ``device`` has been sent and its hashes announced."""

    device: int


@dataclass(frozen=True, slots=True)
class CompletedAck:
    """D -> S: ``device`` is complete and verified at D."""

    device: int


@dataclass(frozen=True, slots=True)
class Error:
    """Either side: giving up, with a reason. The connection closes after it."""

    code: ErrorCode
    reason: str


Event = (
    Hello
    | HelloAck
    | WriteBlocks
    | YouHave
    | NeedAt
    | DontNeedAt
    | DirtyList
    | DirtyAck
    | ReadAt
    | ReadAtResponse
    | Custom
    | CustomAck
    | BlockHashes
    | Completed
    | CompletedAck
    | Error
)
