"""``ferry vm exec -i/-t`` and ``ferry vm attach``: the local end of an interactive stream.

Both open a stream on the VM's holder (:meth:`ControlClient.stream
<ferry.node.control.ControlClient.stream>`, frames of :mod:`ferry.node.interactive`)
and pump it: the local stdin to the VM, the VM's output to the local stdout
and stderr. With a terminal on stdin, ``-t`` and ``attach`` put it in raw mode
(keys go to the guest as typed, Ctrl-C included) and restore it on the way out,
whatever the way; ``-t`` also forwards window-size changes (SIGWINCH).

``attach`` ends when the user types :data:`DETACH_KEY` (Ctrl-], as in telnet),
which is not sent to the guest; the guest goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence

from ferry.cli import terminal
from ferry.node import interactive
from ferry.node.control import AttachRequest, Channel, ControlClient, SessionRequest
from ferry.vm.errors import ControlError

DETACH_KEY = b"\x1d"
"""Ctrl-] ends ``ferry vm attach`` (telnet's escape character)."""
DETACH_NAME = "Ctrl-]"
STDIN, STDOUT, STDERR = 0, 1, 2
DEFAULT_TERM = "xterm"


async def exec_session(client: ControlClient, argv: Sequence[str], *, stdin: bool,
                       tty: bool) -> int:
    """Run ``argv`` in the VM with stdin streamed (``stdin``) and/or on a pty (``tty``);
    returns its exit code (shell-style: 128+signal, 127 if it could not start)."""
    rows, cols = terminal.size(STDOUT if os.isatty(STDOUT) else STDIN) if tty else (0, 0)
    term = os.environ.get("TERM", DEFAULT_TERM) if tty else ""
    req = SessionRequest.of(list(argv), tty=tty, rows=rows, cols=cols,
                            term=term if term.isprintable() and len(term) <= 64 else "")
    task = asyncio.current_task()
    assert task is not None
    async with client.stream(req) as (_, channel):
        raw = terminal.raw_mode(STDIN) if tty and stdin else contextlib.nullcontext()
        with terminal.signals_cancel(task), raw, contextlib.ExitStack() as stack:
            pumps: list[asyncio.Task[object]] = []
            if stdin:
                pumps.append(asyncio.create_task(_send_stdin(channel)))
            if tty and os.isatty(STDOUT):
                resized = asyncio.Event()
                stack.enter_context(terminal.on_resize(resized.set))
                pumps.append(asyncio.create_task(_send_sizes(channel, resized)))
            try:
                return await _receive(channel)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)


async def attach(client: ControlClient, vm_id: str) -> int:
    """The VM's serial console until :data:`DETACH_KEY` (0), or until it closes (1)."""
    task = asyncio.current_task()
    assert task is not None
    async with client.stream(AttachRequest()) as (_, channel):
        if os.isatty(STDIN):
            _say(f"attached to the console of {vm_id}; detach with {DETACH_NAME}")
        detached = asyncio.Event()
        with terminal.signals_cancel(task), terminal.raw_mode(STDIN):
            pump = asyncio.create_task(_send_console_input(channel, detached))
            receive = asyncio.create_task(_receive(channel))
            try:
                await asyncio.wait([receive, asyncio.create_task(detached.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (pump, receive):
                    t.cancel()
                results = await asyncio.gather(pump, receive, return_exceptions=True)
        if detached.is_set():
            _say(f"detached from the console of {vm_id}")
            return 0
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                raise result
        return 1


async def _receive(channel: Channel) -> int:
    """Write OUTPUT frames out until EXIT (its code) or ERROR (raised)."""
    while True:
        event = await channel.receive()
        match event:
            case interactive.Output(stream=stream, data=data):
                _write(STDERR if stream == 2 else STDOUT, data)
            case interactive.Exit(exit_code=code):
                return code
            case interactive.Error(message=message):
                raise ControlError(message)
            case None:
                raise ControlError("the VM's holder closed the stream")
            case _:
                raise interactive.StreamProtocolError(
                    f"the holder sent {type(event).__name__}")


async def _send_stdin(channel: Channel) -> None:
    queue = terminal.read_stdin(STDIN)
    while data := await queue.get():
        for piece in interactive.chunks(data):
            await channel.send(interactive.Input(piece))
    await channel.send(interactive.Eof())


async def _send_console_input(channel: Channel, detached: asyncio.Event) -> None:
    queue = terminal.read_stdin(STDIN)
    while data := await queue.get():
        before, key, _ = data.partition(DETACH_KEY)
        for piece in interactive.chunks(before):
            await channel.send(interactive.Input(piece))
        if key:
            detached.set()
            return
    await asyncio.Event().wait()  # stdin ended (not a terminal): go on showing the console


async def _send_sizes(channel: Channel, resized: asyncio.Event) -> None:
    while True:
        await resized.wait()
        resized.clear()
        rows, cols = terminal.size(STDOUT)
        await channel.send(interactive.Resize(rows, cols))


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _say(line: str) -> None:
    """A line of ours on stderr, readable in raw mode too."""
    sys.stderr.write(f"\r\nferry: {line}\r\n" if os.isatty(STDIN) else f"ferry: {line}\n")
    sys.stderr.flush()
