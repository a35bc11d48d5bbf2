"""Small asyncio helpers that keep cancellation honest.

``task.cancel()`` followed by ``with suppress(CancelledError): await task``
swallows the *caller's* cancellation too, if it arrives during that wait:
Ctrl-C is then ignored and the command runs on. These helpers swallow only
the child's.
"""

from __future__ import annotations

import asyncio
from typing import Any


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Future[Any], *, swallow_errors: bool = False) -> None:
    """Cancel ``task`` and wait until it has ended.

    The task's own CancelledError is swallowed; the caller's is not.
    ``swallow_errors`` also swallows any exception the task ended with.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if _cancelling():
            raise
    except Exception:
        if not swallow_errors:
            raise


async def wait_briefly(task: asyncio.Future[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``task`` to end, without cancelling it.

    Its outcome is not raised; the caller's cancellation is.
    """
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        if _cancelling():
            raise
    except Exception:
        pass
