"""A bytes-bounded LRU of verified objects, keyed by their SHA-256.

Content addressing makes the cache safe to share: a digest names one content,
whichever device or checkpoint asked for it, and an entry never goes stale.
Only objects whose bytes matched their digest are put here.
"""

from __future__ import annotations

from collections import OrderedDict

from ferry.errors import ConfigError

DEFAULT_CACHE_BYTES = 64 << 20
"""16 objects of 4 MiB: enough for a guest's working set of hot objects while a
lazy device warms up; a host with many devices can share one larger cache."""


class ObjectCache:
    """LRU by bytes: holds at most ``capacity_bytes`` of object data.

    An object larger than the capacity is not kept (the read still succeeds).
    Not thread-safe: used from the event loop only.
    """

    def __init__(self, capacity_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if capacity_bytes < 0:
            raise ConfigError("cache capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held now (never more than ``capacity_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._entries

    def get(self, digest: bytes) -> bytes | None:
        data = self._entries.get(digest)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        old = self._entries.pop(digest, None)
        if old is not None:
            self._bytes -= len(old)
        if len(data) > self.capacity_bytes:
            return
        while self._bytes + len(data) > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)
        self._entries[digest] = data
        self._bytes += len(data)
