"""The local terminal of ``ferry vm exec -it`` and ``ferry vm attach``: raw mode, its size,
stdin as an asyncio queue.

Raw mode is entered in a ``with`` block and always left on the way out, also when
the block ends by an error or by cancellation: SIGINT and SIGTERM cancel the
command's task (:func:`ferry.cli.failure.run_command`), SIGHUP too while
inside :func:`signals_cancel`. (In raw mode Ctrl-C is the byte 0x03 for the
guest, not SIGINT.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import threading
import tty
from collections.abc import Callable, Iterator

STDIN_CHUNK_BYTES = 65536
STDIN_QUEUE_CHUNKS = 4
"""Chunks read ahead of the remote side: more waits (the reader thread blocks)."""
CANCELLING_SIGNALS = (signal.SIGHUP,)
"""SIGINT and SIGTERM already cancel every command (ferry.cli.failure)."""


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """``fd``'s terminal in raw mode (no echo, no line editing, no signal keys) while inside;
    nothing happens when ``fd`` is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; (0, 0) when it is none."""
    try:
        s = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return s.lines, s.columns


@contextlib.contextmanager
def signals_cancel(task: asyncio.Task[object]) -> Iterator[None]:
    """SIGHUP (the terminal went away) cancels ``task`` while inside, so its ``finally``
    restores the terminal instead of the process dying with it left raw."""
    loop = asyncio.get_running_loop()
    for sig in CANCELLING_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in CANCELLING_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def on_resize(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` in the loop on every SIGWINCH while inside."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGWINCH, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


def read_stdin(fd: int) -> asyncio.Queue[bytes]:
    """Chunks of ``fd`` as they are read, ``b""`` at its end.

    A daemon thread does the blocking reads (stdin may be a terminal, a pipe or a
    regular file, which the event loop cannot watch); the bounded queue holds it
    back when the remote side is slower. It dies with the process.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(STDIN_QUEUE_CHUNKS)

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, STDIN_CHUNK_BYTES)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except (Exception, asyncio.CancelledError):
                return  # the loop is gone
            if not data:
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue
