"""``ferry vm migrate``'s progress reporter ends when the migration does, whatever its
wait does with a cancellation (the CI hang of 2026-12-03: Python 3.11's wait_for, inside
the control client's connect, dropped the cancel; the reporter polled on forever and the
command never exited)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.cli.vm_migrate import report_progress
from ferry.node.control import ControlClient


class SwallowingClient:
    """A status call that, like 3.11's wait_for racing a completed connect, returns
    normally when cancelled."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def status(self) -> Any:
        self.called.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.sleep(0.05)
        return type("Status", (), {"migration": None})()


async def test_the_reporter_ends_once_done_even_if_its_cancel_is_swallowed() -> None:
    client = SwallowingClient()
    lines: list[str] = []
    done = asyncio.Event()
    task = asyncio.create_task(report_progress(client, lines.append, done))  # type: ignore[arg-type]
    await client.called.wait()  # inside a status call: where the cancel gets lost
    done.set()
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.done()


async def test_the_reporter_stops_at_once_when_done_between_polls() -> None:
    done = asyncio.Event()
    client = ControlClient(Path("/nonexistent/ferry-control.sock"))
    task = asyncio.create_task(report_progress(client, lambda line: None, done))
    await asyncio.sleep(0.01)
    done.set()
    async with asyncio.timeout(1):
        await task
