"""Block content hashes.

Migration integrity uses XXH3-128: it detects corruption and logic errors
(a stale block, a lost write) at memory speed (> 10 GB/s), so hashing every
block on both sides costs little against a loopback copy. It is *not* a
defence against a malicious peer; that is TLS's job on the wire and the
ed25519 signature's job for packages, which hash with SHA-256.
"""

from __future__ import annotations

import xxhash

from ferry.buffers import Buffer

BLOCK_HASH_BYTES = 16


def block_hash(data: Buffer) -> bytes:
    """16-byte XXH3-128 digest of one block's contents."""
    return xxhash.xxh3_128_digest(data)
