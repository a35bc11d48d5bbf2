"""Summaries of a device file: size, blocks, which blocks hold data, hashes.

Used by ``ferry inspect`` so a user can check what a migration produced
(the per-block hashes are the ones the migration protocol verifies).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES, Geometry
from ferry.storage.hashing import block_hash
from ferry.storage.providers.file import FileDevice

READ_CHUNK_BLOCKS = 64


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    path: str
    size_bytes: int
    block_size_bytes: int
    block_count: int
    allocated_blocks: int
    zero_blocks: int
    sha256: str
    block_hashes: list[str] = field(default_factory=list)


async def inspect_file(
    path: Path, *, block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES, with_hashes: bool = False
) -> DeviceSummary:
    """Read the whole file once and summarise it."""
    dev = FileDevice(path, read_only=True)
    try:
        g = Geometry(dev.size_bytes, block_size_bytes)
        allocated = dev.allocated_blocks(block_size_bytes)
        whole = hashlib.sha256()
        hashes: list[str] = []
        zero_blocks = 0
        zero_hashes: dict[int, bytes] = {}
        for first in range(0, g.block_count, READ_CHUNK_BLOCKS):
            last = min(first + READ_CHUNK_BLOCKS, g.block_count) - 1
            offset = g.block_offset(first)
            data = await dev.read_at(offset, g.block_offset(last) + g.block_length(last) - offset)
            whole.update(data)
            view = memoryview(data)
            pos = 0
            for block in range(first, last + 1):
                n = g.block_length(block)
                h = block_hash(view[pos : pos + n])
                if h == zero_hashes.setdefault(n, block_hash(bytes(n))):
                    zero_blocks += 1
                if with_hashes:
                    hashes.append(h.hex())
                pos += n
        return DeviceSummary(
            str(path),
            g.size_bytes,
            block_size_bytes,
            g.block_count,
            len(allocated),
            zero_blocks,
            whole.hexdigest(),
            hashes,
        )
    finally:
        await dev.close()
