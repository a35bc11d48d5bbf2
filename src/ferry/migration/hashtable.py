"""Block hashes by block index, stored in chunks allocated on first use.

The receiver records the hash each block arrived with and the source's final
hashes. A Python list or dict per block costs 8-100 bytes per block of the
*device* (a list of 2^31 ``None`` is 16 GiB) whatever the peer actually sent;
here a chunk of :data:`CHUNK_BLOCKS` hashes (16 KiB of hashes plus a 128-byte
bit-set) is allocated only when a block in it is recorded, so memory follows
the blocks received.
"""

from __future__ import annotations

from ferry.storage.hashing import BLOCK_HASH_BYTES

CHUNK_BLOCKS = 1024


class _Chunk:
    __slots__ = ("count", "hashes", "present")

    def __init__(self) -> None:
        self.hashes = bytearray(CHUNK_BLOCKS * BLOCK_HASH_BYTES)
        self.present = bytearray(CHUNK_BLOCKS // 8)
        self.count = 0


class BlockHashTable:
    """A sparse map block index -> 16-byte hash for blocks ``0..block_count-1``."""

    def __init__(self, block_count: int) -> None:
        if block_count < 0:
            raise ValueError("block_count must be >= 0")
        self.block_count = block_count
        self._chunks: dict[int, _Chunk] = {}
        self._count = 0

    def __len__(self) -> int:
        """How many blocks have a hash."""
        return self._count

    def _locate(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.block_count:
            raise IndexError(f"block {block} outside 0..{self.block_count - 1}")
        return divmod(block, CHUNK_BLOCKS)

    def set(self, block: int, digest: bytes) -> None:
        if len(digest) != BLOCK_HASH_BYTES:
            raise ValueError(f"a block hash is {BLOCK_HASH_BYTES} bytes")
        index, slot = self._locate(block)
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = _Chunk()
        byte, bit = divmod(slot, 8)
        if not chunk.present[byte] & (1 << bit):
            chunk.present[byte] |= 1 << bit
            chunk.count += 1
            self._count += 1
        start = slot * BLOCK_HASH_BYTES
        chunk.hashes[start : start + BLOCK_HASH_BYTES] = digest

    def get(self, block: int) -> bytes | None:
        index, slot = self._locate(block)
        chunk = self._chunks.get(index)
        byte, bit = divmod(slot, 8)
        if chunk is None or not chunk.present[byte] & (1 << bit):
            return None
        start = slot * BLOCK_HASH_BYTES
        return bytes(chunk.hashes[start : start + BLOCK_HASH_BYTES])

    def compare(self, other: BlockHashTable) -> tuple[list[int], list[int]]:
        """Compare with ``other``, which holds a hash for every block.

        Returns the blocks this table has no hash for, and the blocks whose
        hashes differ (ascending). Whole chunks that match are compared as
        bytes, so the usual case (everything arrived and matches) costs one
        ``memcmp`` per 1024 blocks instead of a lookup per block.
        """
        if other.block_count != self.block_count:
            raise ValueError("tables of different block counts")
        missing: list[int] = []
        differing: list[int] = []
        chunks = -(-self.block_count // CHUNK_BLOCKS)
        for index in range(chunks):
            first = index * CHUNK_BLOCKS
            count = min(CHUNK_BLOCKS, self.block_count - first)
            mine = self._chunks.get(index)
            theirs = other._chunks.get(index)
            if mine is None:
                missing.extend(range(first, first + count))
                continue
            whole = theirs is not None and mine.count == theirs.count == count
            if whole and theirs is not None and mine.hashes == theirs.hashes:
                continue
            for block in range(first, first + count):
                got = self.get(block)
                if got is None:
                    missing.append(block)
                elif got != other.get(block):
                    differing.append(block)
        return missing, differing

    def discard(self, block: int) -> None:
        index, slot = self._locate(block)
        chunk = self._chunks.get(index)
        byte, bit = divmod(slot, 8)
        if chunk is None or not chunk.present[byte] & (1 << bit):
            return
        chunk.present[byte] &= ~(1 << bit) & 0xFF
        chunk.count -= 1
        self._count -= 1
        if not chunk.count:
            del self._chunks[index]
