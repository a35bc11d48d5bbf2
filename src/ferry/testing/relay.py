"""A loopback port of this namespace made reachable inside another one.

Test services (SeaweedFS, for one) bind 127.0.0.1 in the root namespace; the
hosts of :mod:`ferry.testing.hosts` are namespaces on a switch without an
uplink. :func:`relay_into` listens on 127.0.0.1:PORT *inside* a host's namespace
(the socket is made there, the loop here serves it) and pipes every connection
to the same port here, so a daemon on that host reaches the service at the
address every other process uses, ``http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from ferry.net.netns import socket_in_netns

CHUNK_BYTES = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass


@contextlib.asynccontextmanager
async def relay_into(namespace: str, port: int) -> AsyncIterator[None]:
    """127.0.0.1:``port`` inside ``namespace`` reaches 127.0.0.1:``port`` here."""
    sock = await socket_in_netns(namespace)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    open_writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            open_writers.discard(writer)
            return
        open_writers.add(up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                open_writers.discard(w)

    server = await asyncio.start_server(serve, sock=sock)
    try:
        yield
    finally:
        server.close()
        for w in list(open_writers):  # the pipes end: nothing is cancelled mid-read
            w.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)
