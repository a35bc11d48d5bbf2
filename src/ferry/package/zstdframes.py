"""Tracks zstd frame boundaries in a compressed byte stream, without decompressing.

The ``zstandard`` stream reader returns end-of-file quietly when its input
stops in the middle of a frame, so a package cut off a few bytes before its
end (in the frame checksum, or in tar padding) would read as complete. This
sans-IO walker follows the frame layout (RFC 8878: magic, frame header,
3-byte block headers, optional checksum; skippable frames) by looking at
headers only, and tells whether the stream stopped exactly at a frame end.
"""

from __future__ import annotations

import enum

from ferry.package.errors import PackageFormatError

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC = 0x184D2A50
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)
_BLOCK_TYPE_RLE = 1
_BLOCK_TYPE_RESERVED = 3
_CHECKSUM_BYTES = 4


class _State(enum.Enum):
    MAGIC = enum.auto()
    DESCRIPTOR = enum.auto()
    HEADER_REST = enum.auto()
    BLOCK_HEADER = enum.auto()
    BLOCK_BODY = enum.auto()
    CHECKSUM = enum.auto()
    SKIPPABLE_SIZE = enum.auto()
    SKIPPABLE_BODY = enum.auto()


class ZstdFrameTracker:
    """Feed compressed bytes in any split; ask :attr:`at_frame_end` when input ends."""

    def __init__(self) -> None:
        self._state = _State.MAGIC
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._last_block = False
        self._has_checksum = False
        self.frames = 0

    @property
    def at_frame_end(self) -> bool:
        """True when everything fed so far is whole frames (and at least one)."""
        return self._state is _State.MAGIC and not self._buf and self.frames > 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if not self._skip:
                    self._after_body()
                continue
            take = min(self._need - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._on_field(field)

    def _expect(self, state: _State, need: int) -> None:
        self._state, self._need = state, need

    def _skip_body(self, state: _State, nbytes: int) -> None:
        self._state, self._skip = state, nbytes
        if not nbytes:
            self._after_body()

    def _on_field(self, field: bytes) -> None:
        value = int.from_bytes(field, "little")
        match self._state:
            case _State.MAGIC:
                if value == ZSTD_MAGIC:
                    self._expect(_State.DESCRIPTOR, 1)
                elif value & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC:
                    self._expect(_State.SKIPPABLE_SIZE, 4)
                else:
                    raise PackageFormatError(
                        f"not zstd data (or garbage after the package): magic {field.hex()}"
                    )
            case _State.DESCRIPTOR:
                if value & 0x08:
                    raise PackageFormatError("corrupt zstd frame header (reserved bit set)")
                single_segment = bool(value & 0x20)
                self._has_checksum = bool(value & 0x04)
                fcs_flag = value >> 6
                fcs = 1 if fcs_flag == 0 and single_segment else _FCS_BYTES[fcs_flag]
                rest = (0 if single_segment else 1) + _DICT_ID_BYTES[value & 0x03] + fcs
                if rest:
                    self._expect(_State.HEADER_REST, rest)
                else:
                    self._expect(_State.BLOCK_HEADER, 3)
            case _State.HEADER_REST:
                self._expect(_State.BLOCK_HEADER, 3)
            case _State.BLOCK_HEADER:
                block_type = (value >> 1) & 0x03
                if block_type == _BLOCK_TYPE_RESERVED:
                    raise PackageFormatError("corrupt zstd block header (reserved block type)")
                self._last_block = bool(value & 0x01)
                size = 1 if block_type == _BLOCK_TYPE_RLE else value >> 3
                self._skip_body(_State.BLOCK_BODY, size)
            case _State.SKIPPABLE_SIZE:
                self._skip_body(_State.SKIPPABLE_BODY, value)
            case _:  # bodies are consumed by skipping, never as fields
                raise AssertionError(self._state)

    def _after_body(self) -> None:
        if self._state is _State.BLOCK_BODY and not self._last_block:
            self._expect(_State.BLOCK_HEADER, 3)
        elif self._state is _State.BLOCK_BODY and self._has_checksum:
            self._skip_body(_State.CHECKSUM, _CHECKSUM_BYTES)
        else:
            if self._state is not _State.SKIPPABLE_BODY:
                self.frames += 1
            self._expect(_State.MAGIC, 4)
