"""Small asyncio helpers that keep cancellation honest.

``task.cancel()`` followed by ``with suppress(CancelledError): await task``
swallows the *caller's* cancellation too, if it arrives during that wait:
Ctrl-C is then ignored and the command runs on. These helpers swallow only
the child's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import traceback
from types import TracebackType
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


class StackSafe:
    """An async context manager made safe to enter into an ``AsyncExitStack``.

    A manager whose ``__aexit__`` raises the very exception it was handed (as
    ``asyncio.TaskGroup`` does with a CancelledError) makes Python 3.11's
    ``AsyncExitStack`` link that exception into its own ``__context__`` chain,
    and the next exit callback that raises then walks the cycle forever (a
    process spinning at 100 % CPU on Ctrl-C). This wrapper returns instead, so
    the stack propagates the exception it already holds.
    """

    def __init__(self, inner: contextlib.AbstractAsyncContextManager[Any]) -> None:
        self._inner = inner

    async def __aenter__(self) -> Any:
        return await self._inner.__aenter__()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        try:
            return await self._inner.__aexit__(et, e, tb)
        except BaseException as raised:
            if e is not None and raised is e:
                return False
            raise


def await_chain(coro: object) -> str:
    """Where a suspended coroutine waits, outermost first: each coroutine it awaits in
    turn (``Task.print_stack`` shows only the outermost frame), then what the innermost
    awaits (a future, another task)."""
    lines = []
    for _ in range(200):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, '
                     f"in {frame.f_code.co_name}")
        awaited = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if awaited is None or not (hasattr(awaited, "cr_frame")
                                   or hasattr(awaited, "gi_frame")):
            if awaited is not None:
                lines.append(f"  awaiting {awaited!r:.300}")
            break
        coro = awaited
    return "\n".join(lines)


def log_task_stacks(logger: logging.Logger) -> None:
    """Log where every task of the running loop waits (and every thread's stack):
    what a holder writes to its log on SIGUSR1, for a migration that seems stuck."""
    for task in asyncio.all_tasks():
        logger.warning("task %s:\n%s", task.get_name(), await_chain(task.get_coro()))
    for ident, frame in sys._current_frames().items():
        logger.warning("thread %d:\n%s", ident, "".join(traceback.format_stack(frame)))
