"""Progress display for long CLI operations (rich), fed by polling library objects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from ferry.aio import cancel_and_wait

Sample = Callable[[], tuple[str, int, int]]
"""Returns (description, completed, total)."""


@contextlib.asynccontextmanager
async def show_progress(
    console: Console, sample: Sample, *, enabled: bool = True, interval_s: float = 0.1
) -> AsyncIterator[None]:
    """Render ``sample()`` as a progress bar until the block exits."""
    if not enabled:
        yield
        return
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("starting", total=None)

    async def poll() -> None:
        while True:
            desc, done, total = sample()
            progress.update(task, description=desc, completed=done, total=total or None)
            await asyncio.sleep(interval_s)

    with progress:
        poller = asyncio.create_task(poll())
        try:
            yield
        finally:
            await cancel_and_wait(poller)
            desc, done, total = sample()
            progress.update(task, description=desc, completed=done, total=total or None)
