"""The one block-device interface every ferry storage component speaks.

A *device* is a fixed-size array of bytes with positional reads and writes,
like Silo's ``ReadAt/WriteAt/Size/Flush/Close``. Providers (memory, file,
copy-on-write overlay, a remote peer) implement it; modules (dirty tracking,
volatility, locking, metrics, waiting cache) wrap one device and are
themselves devices, forwarding every method they do not change.

Contract for every implementation:

* ``read_at(offset, length)`` returns exactly ``length`` bytes; a range that
  is not inside ``[0, size_bytes)`` raises :class:`DeviceRangeError`.
* ``write_at(offset, data)`` writes all of ``data`` or raises; same range rule.
  It must not keep a reference to ``data`` after it returns: callers (the NBD
  server, the migration receiver) reuse their buffers.
* ``flush()`` makes completed writes durable at this layer (a no-op for memory).
* ``close()`` is idempotent; any other call after it raises
  :class:`DeviceClosedError`. Closing a decorator closes what it wraps.
* Cancellation: an operation cancelled while awaiting leaves the device
  consistent (a write is either applied or not; a half-applied write of one
  contiguous range may be visible, as with a disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ferry.buffers import Buffer
from ferry.errors import DeviceRangeError

DEFAULT_BLOCK_SIZE_BYTES = 64 * 1024
"""Default migration block size. 64 KiB matches Silo's default and is large
enough that per-block overheads (hash, frame header) are small against a
loopback copy, yet small enough that a post-copy fetch stays fast."""



@runtime_checkable
class Device(Protocol):
    """A fixed-size, byte-addressed block device."""

    @property
    def size_bytes(self) -> int: ...

    async def read_at(self, offset: int, length: int) -> bytes: ...

    async def write_at(self, offset: int, data: Buffer) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def check_range(size_bytes: int, offset: int, length: int, device: str | None = None) -> None:
    """Raise DeviceRangeError unless [offset, offset+length) lies inside the device."""
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise DeviceRangeError(
            f"range [{offset}, {offset + length}) outside device of {size_bytes} bytes",
            device=device,
        )


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a device of ``size_bytes`` splits into blocks of ``block_size_bytes``.

    The last block may be partial when the size is not a multiple of the block size.
    """

    size_bytes: int
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        if self.block_size_bytes <= 0 or self.block_size_bytes % 512:
            raise ValueError("block_size_bytes must be a positive multiple of 512")

    @property
    def block_count(self) -> int:
        return -(-self.size_bytes // self.block_size_bytes)

    def block_offset(self, block: int) -> int:
        return block * self.block_size_bytes

    def block_length(self, block: int) -> int:
        """Length of ``block`` in bytes (the last block may be short)."""
        start = block * self.block_size_bytes
        return min(self.block_size_bytes, self.size_bytes - start)

    def blocks_touching(self, offset: int, length: int) -> range:
        """Indices of every block overlapping [offset, offset+length)."""
        if length <= 0:
            return range(0)
        first = offset // self.block_size_bytes
        last = (offset + length - 1) // self.block_size_bytes
        return range(first, last + 1)

    def is_whole_block(self, offset: int, length: int) -> bool:
        """True if the range covers exactly one or more entire blocks."""
        bs = self.block_size_bytes
        if offset % bs:
            return False
        end = offset + length
        return end % bs == 0 or end == self.size_bytes
