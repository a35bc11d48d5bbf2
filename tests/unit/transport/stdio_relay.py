"""A child process for the subprocess-pipe conformance run.

Usage: ``python stdio_relay.py SOCKET_PATH``. Relays bytes between its
stdin/stdout (via ferry's ``stdio_stream``) and a UNIX socket connection,
forwarding EOF per direction, so the test's ``subprocess_stream`` end and the
accepted socket end behave as one connected pair. Exits when both directions
reached EOF, or as soon as either breaks.
"""

from __future__ import annotations

import asyncio
import sys

from ferry.errors import BrokenResourceError
from ferry.transport.base import Stream
from ferry.transport.pipe import stdio_stream
from ferry.transport.unix import connect_unix


async def pump(source: Stream, sink: Stream) -> None:
    while data := await source.receive_some():
        await sink.send_all(data)
    await sink.send_eof()


async def main(path: str) -> int:
    stdio = await stdio_stream()
    sock = await connect_unix(path)
    status = 0
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pump(stdio, sock))
            tg.create_task(pump(sock, stdio))
    except* BrokenResourceError:
        status = 1
    finally:
        await sock.aclose()
        await stdio.aclose()
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
