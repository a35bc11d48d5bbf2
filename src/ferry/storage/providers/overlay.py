"""A copy-on-write overlay: a writable device over a read-only base.

Reads of blocks the overlay has never written come from the base; the first
write to a block puts it in the overlay (copying the base block first when
the write covers only part of it). The base is never written, so many
overlays can share one base image.

Overlay data lives in a sparse file at ``path`` (same offsets as the device).
Which blocks the overlay holds is kept in a sidecar *map* file,
``path + ".map"``, so the overlay can be closed and reopened later::

    offset  size  field
    0       8     magic b"FERRYOVL"
    8       4     version (u32, little-endian) = 1
    12      4     block_size_bytes (u32)
    16      8     size_bytes of the device (u64)
    24      2     n = length of base_id (u16, 1..MAX_BASE_ID_BYTES)
    26      n     base_id: who the base is; reopening over another base fails
    26+n    m     bitmap, m = ceil(block_count / 8); bit (b % 8) of byte
                  (b // 8) is set when block b is held by the overlay
    26+n+m  4     CRC-32 of every byte before it (u32)

Crash safety. A block's data is written to the data file before its bit is
set in memory; ``flush()`` fsyncs the data file, then writes the whole map to
``path + ".map.tmp"``, fsyncs it, renames it over the map and fsyncs the
directory. So the map on disk always describes data that is on disk: after a
crash the overlay reopens in the state of the last ``flush()`` plus, at
worst, some later writes to blocks that were already in the overlay, which is
the usual contract of a disk that lost its volatile cache. ``close()``
flushes. The map is rewritten whole because it is small (2 MiB for 1 TiB at
64 KiB blocks) and replacing it atomically never leaves a torn map.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from ferry.buffers import Buffer
from ferry.errors import BaseMismatchError, ConfigError, DeviceClosedError, DeviceError
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, Device, Geometry, check_range
from ferry.storage.providers.file import FileDevice, translate_os_error

logger = logging.getLogger(__name__)

MAP_MAGIC = b"FERRYOVL"
MAP_VERSION = 1
MAX_BASE_ID_BYTES = 256
"""Cap on the base identity (a digest or a name fits easily); it bounds the
header a reader must trust before checking the CRC."""

_HEADER = struct.Struct("<8sIIQH")
_CRC = struct.Struct("<I")


class OverlayMapError(DeviceError):
    """An overlay's map file is corrupt, truncated or of another format."""


class OverlayDevice:
    """A copy-on-write :class:`~ferry.storage.device.Device` over ``base``.

    ``base_id`` names the base (for instance a digest of the image); it is
    recorded in the map and checked on reopen, raising
    :class:`BaseMismatchError` when the overlay is opened over another base.
    Closing the overlay closes ``base`` unless ``close_base=False`` (for a
    base shared by several overlays).
    """

    def __init__(
        self,
        base: Device,
        path: str | os.PathLike[str],
        *,
        block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
        base_id: bytes,
        name: str | None = None,
        close_base: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.map_path = self.path + ".map"
        self.name = name if name is not None else f"overlay:{self.path}"
        if not 1 <= len(base_id) <= MAX_BASE_ID_BYTES:
            raise ConfigError(f"base_id must be 1..{MAX_BASE_ID_BYTES} bytes")
        try:
            self._geometry = Geometry(base.size_bytes, block_size_bytes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._base = base
        self._base_id = bytes(base_id)
        self._close_base = close_base
        self._closed = False
        self._map_dirty = False
        size = self._geometry.size_bytes
        loaded = self._load_map()
        if loaded is None:
            # A new overlay: any data file left without a map is stale.
            try:
                os.truncate(self.path, 0)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise translate_os_error(exc, "reset overlay data", self.name) from exc
            self._bitmap = bytearray(self._bitmap_len())
            self._data = FileDevice(self.path, size_bytes=size, create=True, name=self.name)
            try:
                self._save_map()
            except BaseException:
                self._data.close_sync()
                raise
            logger.debug("%s: new overlay of %d bytes", self.name, size)
        else:
            # The map refers to data in this file: it must still be there.
            self._data = FileDevice(self.path, size_bytes=size, name=self.name)
            self._bitmap = loaded
            logger.debug(
                "%s: reopened, %d of %d blocks in the overlay",
                self.name,
                len(self.overlay_blocks()),
                self._geometry.block_count,
            )
        self._write_lock = asyncio.Lock()

    # -- map file ---------------------------------------------------------

    def _load_map(self) -> bytearray | None:
        try:
            with open(self.map_path, "rb") as f:
                raw = f.read(_HEADER.size + MAX_BASE_ID_BYTES + self._bitmap_len() + _CRC.size + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise translate_os_error(exc, f"read map {self.map_path}", self.name) from exc
        return self._parse_map(raw)

    def _bitmap_len(self) -> int:
        return -(-self._geometry.block_count // 8)

    def _parse_map(self, raw: bytes) -> bytearray:
        def corrupt(why: str) -> OverlayMapError:
            return OverlayMapError(f"map {self.map_path} is unusable: {why}", device=self.name)

        if len(raw) < _HEADER.size:
            raise corrupt(f"truncated header ({len(raw)} bytes)")
        magic, version, block_size, size, id_len = _HEADER.unpack_from(raw)
        if magic != MAP_MAGIC:
            raise corrupt("bad magic, not an overlay map")
        if version != MAP_VERSION:
            raise corrupt(f"unsupported version {version}")
        if not 1 <= id_len <= MAX_BASE_ID_BYTES:
            raise corrupt(f"base_id length {id_len} out of range")
        if block_size != self._geometry.block_size_bytes:
            raise OverlayMapError(
                f"map was made with {block_size}-byte blocks, "
                f"not {self._geometry.block_size_bytes}",
                device=self.name,
            )
        if size != self._geometry.size_bytes:
            raise BaseMismatchError(
                f"overlay was made for a {size}-byte base, this base has "
                f"{self._geometry.size_bytes} bytes",
                device=self.name,
            )
        body_len = _HEADER.size + id_len + self._bitmap_len()
        if len(raw) != body_len + _CRC.size:
            raise corrupt(f"{len(raw)} bytes, expected {body_len + _CRC.size}")
        (crc,) = _CRC.unpack_from(raw, body_len)
        if zlib.crc32(raw[:body_len]) != crc:
            raise corrupt("checksum mismatch")
        base_id = raw[_HEADER.size : _HEADER.size + id_len]
        if base_id != self._base_id:
            raise BaseMismatchError(
                f"overlay was made over base {base_id.hex()}, not {self._base_id.hex()}",
                device=self.name,
            )
        bitmap = bytearray(raw[_HEADER.size + id_len : body_len])
        spare = len(bitmap) * 8 - self._geometry.block_count
        if spare and bitmap[-1] >> (8 - spare):
            raise corrupt("bits set beyond the last block")
        return bitmap

    def _save_map(self) -> None:
        body = (
            _HEADER.pack(
                MAP_MAGIC,
                MAP_VERSION,
                self._geometry.block_size_bytes,
                self._geometry.size_bytes,
                len(self._base_id),
            )
            + self._base_id
            + self._bitmap
        )
        tmp = self.map_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, body + _CRC.pack(zlib.crc32(body)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.map_path)
            dir_fd = os.open(os.path.dirname(os.path.abspath(self.map_path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise translate_os_error(exc, f"write map {self.map_path}", self.name) from exc
        self._map_dirty = False

    # -- bitmap -----------------------------------------------------------

    def _held(self, block: int) -> bool:
        return bool(self._bitmap[block >> 3] & (1 << (block & 7)))

    def _hold(self, block: int) -> None:
        self._bitmap[block >> 3] |= 1 << (block & 7)

    def _iter_held(self) -> Iterator[int]:
        for i, byte in enumerate(self._bitmap):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield i * 8 + bit

    def overlay_blocks(self) -> frozenset[int]:
        """Blocks whose data the overlay holds (written since it was created)."""
        return frozenset(self._iter_held())

    def base_blocks(self) -> frozenset[int]:
        """Blocks still identical to the base (never written through the overlay)."""
        return frozenset(range(self._geometry.block_count)) - self.overlay_blocks()

    # -- device -----------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._geometry.size_bytes

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def base(self) -> Device:
        return self._base

    @property
    def base_id(self) -> bytes:
        """Who the base is (as given at creation and recorded in the map)."""
        return self._base_id

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceClosedError("device is closed", device=self.name)

    async def read_at(self, offset: int, length: int) -> bytes:
        self._check_open()
        check_range(self.size_bytes, offset, length, self.name)
        end = offset + length
        bs = self._geometry.block_size_bytes
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            # Extend a run of blocks that all come from the same place.
            held = self._held(pos // bs)
            run_end = min(end, (pos // bs + 1) * bs)
            while run_end < end and self._held(run_end // bs) == held:
                run_end = min(end, run_end + bs)
            if held:
                parts.append(self._data.read_sync(pos, run_end - pos))
            else:
                parts.append(await self._base.read_at(pos, run_end - pos))
            pos = run_end
        return b"".join(parts)

    async def write_at(self, offset: int, data: Buffer) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        check_range(self.size_bytes, offset, len(view), self.name)
        if not view:
            return
        blocks = self._geometry.blocks_touching(offset, len(view))
        # Writes are serialised so a copy-up (which awaits the base) cannot
        # overwrite a concurrent write to the same block with base data.
        async with self._write_lock:
            for block in {blocks[0], blocks[-1]}:
                if not self._held(block) and not self._covers(offset, len(view), block):
                    await self._copy_up(block)
            self._data.write_sync(offset, view)
            for block in blocks:
                self._hold(block)
            self._map_dirty = True

    def _covers(self, offset: int, length: int, block: int) -> bool:
        start = self._geometry.block_offset(block)
        return offset <= start and start + self._geometry.block_length(block) <= offset + length

    async def _copy_up(self, block: int) -> None:
        start = self._geometry.block_offset(block)
        data = await self._base.read_at(start, self._geometry.block_length(block))
        self._data.write_sync(start, data)

    async def flush(self) -> None:
        """Make the data durable, then persist the map (see the module docstring)."""
        self._check_open()
        async with self._write_lock:
            self._data.flush_sync()
            if self._map_dirty:
                self._save_map()

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            try:
                await self._data.close()
            finally:
                if self._close_base:
                    await self._base.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
