"""A Redis write load that proves a migration loses nothing a client saw acknowledged.

:class:`RedisWriter` sends ``SET w:<n> <n>`` one at a time to the VM's
forwarded port, records every write Redis acknowledged, and measures the
longest gap between two acknowledgements (reconnects included). When a
connection breaks or a reply takes too long it reconnects, trying the
preferred address first, then the others: after a migration the client finds
the VM on its new host. :meth:`RedisWriter.lost` reads every acknowledged key
back. RESP is spoken directly (a few lines) to need no client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from ferry.net import socket_in_netns

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 5.0
MGET_BATCH = 500


def command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisWriter:
    """Continuous SETs to ``targets`` (host, port) from inside ``namespace``."""

    def __init__(self, targets: Sequence[tuple[str, int]], *, namespace: str | None = None,
                 prefix: str = "w") -> None:
        self.targets = list(targets)
        self.namespace = namespace
        self.prefix = prefix
        self.preferred = 0
        self.acknowledged: list[int] = []
        self.max_stall_s = 0.0
        self.reconnects = 0
        self._last_ack: float | None = None
        self._acked = asyncio.Event()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        order = self.targets[self.preferred:] + self.targets[:self.preferred]
        while True:
            for host, port in order:
                sock = await socket_in_netns(self.namespace)
                writer: asyncio.StreamWriter | None = None
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await asyncio.get_running_loop().sock_connect(sock, (host, port))
                    reader, writer = await asyncio.open_connection(sock=sock)
                    async with asyncio.timeout(REPLY_TIMEOUT_S):
                        writer.write(command("PING"))
                        if (await reader.readline()).strip() != b"+PONG":
                            raise ConnectionError("no PONG")
                    return reader, writer
                except (OSError, TimeoutError, ConnectionError):
                    # Once a transport owns the socket, close it through the transport:
                    # closing the socket under it leaves the transport registered on
                    # the fd number, and the next socket that gets that number fails
                    # in sock_connect ("File descriptor N is used by transport").
                    if writer is not None:
                        writer.close()
                    else:
                        sock.close()
            await asyncio.sleep(0.01)

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set."""
        n = len(self.acknowledged)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        self._last_ack = time.monotonic()
        try:
            while not stop.is_set():
                if writer is None or reader is None:
                    reader, writer = await self._connect()
                key = f"{self.prefix}:{n}"
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT_S):
                        writer.write(command("SET", key, str(n)))
                        line = await reader.readline()
                except (OSError, TimeoutError):
                    line = b""
                if line.strip() != b"+OK":
                    writer.close()
                    reader = writer = None
                    self.reconnects += 1
                    continue  # retry the same key: SET is idempotent
                now = time.monotonic()
                self.max_stall_s = max(self.max_stall_s, now - self._last_ack)
                self._last_ack = now
                self.acknowledged.append(n)
                self._acked.set()
                n += 1
        finally:
            if writer is not None:
                writer.close()

    async def wait_acknowledged(self, count: int) -> None:
        """Wait until at least ``count`` writes were acknowledged."""
        while len(self.acknowledged) < count:
            self._acked.clear()
            await self._acked.wait()

    async def lost(self) -> list[int]:
        """Acknowledged writes that cannot be read back (should be none)."""
        reader, writer = await self._connect()
        missing: list[int] = []
        try:
            for start in range(0, len(self.acknowledged), MGET_BATCH):
                batch = self.acknowledged[start:start + MGET_BATCH]
                writer.write(command("MGET", *(f"{self.prefix}:{i}" for i in batch)))
                header = await reader.readline()
                if not header.startswith(b"*"):
                    raise ConnectionError(f"unexpected MGET reply {header!r}")
                for i in batch:
                    size = int((await reader.readline())[1:])
                    value = None
                    if size >= 0:
                        value = (await reader.readexactly(size + 2))[:-2]
                    if value != str(i).encode():
                        missing.append(i)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return missing
