"""The local terminal of exec -it and attach: raw mode is always left, the detach key."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import struct
import termios
from collections.abc import Iterator

import pytest

from ferry.cli import interactive, terminal
from ferry.node import interactive as ia


@pytest.fixture
def tty_pair() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def _lflag(fd: int) -> int:
    return int(termios.tcgetattr(fd)[3])


def test_raw_mode_is_left_on_an_error(tty_pair: tuple[int, int]) -> None:
    _, slave = tty_pair
    before = termios.tcgetattr(slave)
    assert _lflag(slave) & termios.ICANON
    seen: list[int] = []

    def fail_inside() -> None:
        with terminal.raw_mode(slave):
            seen.append(_lflag(slave))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert not seen[0] & (termios.ICANON | termios.ECHO | termios.ISIG)
    assert termios.tcgetattr(slave) == before


async def test_raw_mode_is_left_on_cancellation(tty_pair: tuple[int, int]) -> None:
    _, slave = tty_pair
    before = termios.tcgetattr(slave)
    entered = asyncio.Event()

    async def session() -> None:
        with terminal.raw_mode(slave):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(session())
    await entered.wait()
    assert termios.tcgetattr(slave) != before
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert termios.tcgetattr(slave) == before


def test_raw_mode_on_a_pipe_does_nothing() -> None:
    r, w = os.pipe()
    try:
        with terminal.raw_mode(r):
            pass
    finally:
        os.close(r)
        os.close(w)


def test_size_of_a_terminal_and_of_a_pipe(tty_pair: tuple[int, int]) -> None:
    master, slave = tty_pair
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    assert terminal.size(slave) == (33, 101)
    r, w = os.pipe()
    try:
        assert terminal.size(r) == (0, 0)
    finally:
        os.close(r)
        os.close(w)


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[ia.Event] = []

    async def send(self, event: ia.Event) -> None:
        self.sent.append(event)


async def test_the_detach_key_is_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for chunk in (b"ls\r", b"ab\x1dcd", b"never"):
        queue.put_nowait(chunk)
    monkeypatch.setattr(terminal, "read_stdin", lambda fd: queue)
    channel = FakeChannel()
    detached = asyncio.Event()
    await asyncio.wait_for(
        interactive._send_console_input(channel, detached), 5)  # type: ignore[arg-type]
    assert detached.is_set()
    assert channel.sent == [ia.Input(b"ls\r"), ia.Input(b"ab")]
