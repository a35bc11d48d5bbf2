"""An in-memory bucket with the :class:`~ferry.s3.store.ObjectStore` interface, and faults.

For unit tests of what sits on S3 (devices, mirrors) without a server: the same
calls, the same typed errors, plus switches a test flips to take S3 away
(:attr:`MemoryObjectStore.down`) or to fail after a number of writes
(:attr:`MemoryObjectStore.puts_left`). Thread-safe (S3 devices call it from their
threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ferry.buffers import Buffer
from ferry.s3.errors import (
    S3ConflictError,
    S3NotFoundError,
    S3ObjectTooLargeError,
    S3UnreachableError,
)
from ferry.s3.store import ObjectInfo, ObjectStore


class MemoryObjectStore(ObjectStore):
    """One bucket held in a dict."""

    def __init__(self, bucket: str = "memory") -> None:  # no client: nothing to reach
        self.bucket = bucket
        self.endpoint = "memory://"
        self.objects: dict[str, bytes] = {}
        self.down = False
        """True: every call fails as an unreachable endpoint does."""
        self.puts_left: int | None = None
        """Writes that still succeed (None: all); then the endpoint is unreachable."""
        self.lose_reply: Callable[[str], bool] = lambda key: False
        """True for a key: its write is stored, then reported failed (a reply lost in a
        timeout): the caller cannot tell it landed."""
        self.puts = 0
        self._lock = threading.Lock()

    def _check(self, key: str | None, *, put: bool = False) -> None:
        if put and self.puts_left is not None:
            if self.puts_left <= 0:
                self.down = True
            self.puts_left -= 1
        if self.down:
            raise S3UnreachableError("connection refused (memory store is down)",
                                     endpoint=self.endpoint, bucket=self.bucket, key=key)

    def get(self, key: str, *, max_bytes: int) -> bytes:
        with self._lock:
            self._check(key)
            data = self.objects.get(key)
        if data is None:
            raise S3NotFoundError("get: NoSuchKey", endpoint=self.endpoint,
                                  bucket=self.bucket, key=key)
        if len(data) > max_bytes:
            raise S3ObjectTooLargeError(f"{len(data)} bytes, more than the {max_bytes} "
                                        "allowed", endpoint=self.endpoint, bucket=self.bucket,
                                        key=key)
        return data

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        with self._lock:
            self._check(key, put=True)
            if create_only and key in self.objects:
                raise S3ConflictError("put: PreconditionFailed", endpoint=self.endpoint,
                                      bucket=self.bucket, key=key)
            self.objects[key] = bytes(data)
            self.puts += 1
            if self.lose_reply(key):
                raise S3UnreachableError("read timeout (the write landed)",
                                         endpoint=self.endpoint, bucket=self.bucket, key=key)

    def size_of(self, key: str) -> int | None:
        with self._lock:
            self._check(key)
            data = self.objects.get(key)
        return None if data is None else len(data)

    def list(self, prefix: str, *, limit: int | None = None) -> Iterator[ObjectInfo]:
        with self._lock:
            self._check(prefix)
            keys = sorted(k for k in self.objects if k.startswith(prefix))
            found = [ObjectInfo(k, len(self.objects[k])) for k in keys[:limit]]
        yield from found

    def delete(self, key: str) -> None:
        with self._lock:
            self._check(key)
            self.objects.pop(key, None)

    def ensure_bucket(self) -> None:
        self._check(None)
