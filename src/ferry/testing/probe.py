"""Is a Redis guest answering yet? The first-PONG probe of the resume benchmarks.

:func:`first_pong` measures what a user waiting for a resumed Redis sees: the
seconds until a ``PING`` on a forwarded port is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

ATTEMPT_EVERY_S = 0.005
ATTEMPT_TIMEOUT_S = 2.0
STALL_S = 0.05
"""serial probing: an attempt still unanswered after this gets company (a SYN lost to a
guest still booting would otherwise cost TCP's 1 s retransmit; this bounds how late a
cold boot is seen to answer)."""
PING_DEADLINE_S = 240.0


async def ping_once(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await reader.readline()).startswith(b"+PONG")
    finally:
        writer.close()


async def first_pong(port: int, probe: str = "serial") -> float:
    """Seconds until a PING on ``port`` is answered.

    ``serial`` (default): one client at a time, like a user retrying: a refused
    connection is retried 5 ms after the previous attempt began; an accepted one
    is waited for (ferry holds it until the guest runs), with a second attempt
    joining every ``STALL_S`` while none answers. ``flood``: a new attempt
    every 5 ms regardless, each one more connection the guest must serve.
    """
    t0 = time.monotonic()
    won: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def attempt() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                if await ping_once(port) and not won.done():
                    won.set_result(time.monotonic() - t0)

    tasks: set[asyncio.Task[None]] = set()
    try:
        while not won.done():
            if time.monotonic() - t0 > PING_DEADLINE_S:
                raise TimeoutError(f"no PONG on port {port} within {PING_DEADLINE_S} s")
            started = time.monotonic()
            task = asyncio.create_task(attempt())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if probe == "flood":
                await asyncio.wait([won], timeout=ATTEMPT_EVERY_S)
                continue
            pending: list[asyncio.Future[Any]] = [won, task]
            await asyncio.wait(pending, timeout=STALL_S, return_when=asyncio.FIRST_COMPLETED)
            pause = ATTEMPT_EVERY_S - (time.monotonic() - started)
            if task.done() and not won.done() and pause > 0:
                await asyncio.wait([won], timeout=pause)
        return won.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
