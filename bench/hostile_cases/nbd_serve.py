"""Serve a 16 MiB memory device as export ``disk`` on a UNIX socket, the way the
VM runtime serves a guest's disks (``NBDServer.serve_unix``); prints
``listening`` once ready and serves until killed.

Usage: ``python bench/hostile_cases/nbd_serve.py SOCKET``
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.providers.memory import MemoryDevice

SIZE_BYTES = 16 * 1024 * 1024


async def serve(path: str) -> None:
    async with NBDServer({"disk": Export(MemoryDevice(SIZE_BYTES))}).serve_unix(path):
        print("listening", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sys.argv[1]))
