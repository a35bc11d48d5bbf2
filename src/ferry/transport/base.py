"""The byte-stream interface every transport implements.

Modelled on trio's ``Stream``: the migration protocol only needs an ordered,
reliable, bidirectional byte stream, so TCP, UNIX sockets, TLS and a pipe pair
are interchangeable behind it.

Contract:

* ``send_all(data)`` sends every byte or raises :class:`BrokenResourceError`
  (peer gone) / :class:`ClosedResourceError` (we closed it). Concurrent
  ``send_all`` calls on one stream are not allowed.
* ``receive_some(max_bytes)`` returns 1..max_bytes bytes, or ``b""`` once the
  peer has closed its sending side cleanly; a broken link raises
  :class:`BrokenResourceError`.
* ``send_eof()`` closes our sending side; transports that cannot half-close
  (TLS) raise ``HalfCloseUnsupportedError``.
* ``aclose()`` is idempotent and always releases the underlying resource,
  even when cancelled.
* ``peer`` is a human-readable name of the other end, used in errors and logs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ferry.buffers import Buffer


@runtime_checkable
class Stream(Protocol):
    @property
    def peer(self) -> str: ...

    async def send_all(self, data: Buffer) -> None: ...

    async def receive_some(self, max_bytes: int = 262144) -> bytes: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...
