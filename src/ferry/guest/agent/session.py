"""One streaming command in the guest: what ``ferry vm exec -it`` talks to.

An :class:`AgentSession` is made by :meth:`AgentClient.session
<ferry.guest.agent.client.AgentClient.session>`; the client's reader feeds it
the frames that carry its id (``SESSION_OUTPUT``, ``SESSION_INPUT_ACK``,
``SESSION_EXIT``, an ``ERROR``). Flow control is a window per direction
(:data:`~ferry.guest.agent.protocol.SESSION_WINDOW`): :meth:`write` waits
while that much stdin is unacknowledged, and output is acknowledged only as
:meth:`read` hands it out, so a slow reader stops the command's output in
the guest instead of filling memory here.

Contract on failure: when the agent connection ends, or the agent answers a
session request with an ERROR, every pending and later :meth:`read`,
:meth:`write` and :meth:`wait` raises that error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ferry.guest.agent.errors import AgentError, AgentRemoteError
from ferry.guest.agent.protocol import (
    MAX_CHUNK_BYTES,
    SESSION_WINDOW,
    ErrorCode,
    ErrorReply,
    Message,
    SessionAck,
    SessionEof,
    SessionExit,
    SessionInput,
    SessionInputAck,
    SessionOutput,
    SessionRequest,
    SessionResize,
    SessionSignal,
    SessionStarted,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Send = Callable[[SessionRequest, int], Awaitable[None]]


class AgentSession:
    """A command started by ``SESSION_OPEN`` whose stdio streams both ways."""

    def __init__(self, session_id: int, send: Send, *, name: str = "") -> None:
        self.id = session_id
        self.pid: int | None = None
        """The command's pid in the guest, once started (None if it never started)."""
        self._send = send
        self._log = log.getChild(name or str(session_id))
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._exit: asyncio.Future[SessionExit] = loop.create_future()
        self._output: asyncio.Queue[SessionOutput | None] = asyncio.Queue()
        self._in_flight = 0
        self._window = asyncio.Event()
        self._window.set()
        self._failure: AgentError | None = None
        self._stdin_closed = False

    def __repr__(self) -> str:
        return f"<AgentSession #{self.id} pid={self.pid} ended={self.ended}>"

    @property
    def ended(self) -> bool:
        """The agent reported the command's end (or the session failed)."""
        return self._exit.done()

    # -- what the caller does -----------------------------------------------------------

    async def read(self) -> SessionOutput | None:
        """The next chunk of output; None once the command ended and all output was read."""
        chunk = await self._output.get()
        if chunk is None:
            self._output.put_nowait(None)  # every later read sees the end too
            if self._failure is not None:
                raise self._failure
            return None
        if not self._exit.done():
            await self._send(SessionAck(len(chunk.data)), self.id)
        return chunk

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin, waiting while the window is full."""
        if self._stdin_closed:
            raise AgentError("stdin of the session is closed")
        view = memoryview(data)
        while view:
            chunk = bytes(view[:MAX_CHUNK_BYTES])
            while self._in_flight + len(chunk) > SESSION_WINDOW and self._failure is None:
                self._window.clear()
                await self._window.wait()
            self._check()
            if self._exit.done():
                return  # the command is gone: nobody will read it
            self._in_flight += len(chunk)
            await self._send(SessionInput(chunk), self.id)
            view = view[len(chunk):]

    async def close_stdin(self) -> None:
        """No more input (on a pty the agent types the terminal's EOF character)."""
        self._check()
        if not self._stdin_closed and not self._exit.done():
            self._stdin_closed = True
            await self._send(SessionEof(), self.id)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the pty's window size (the command gets SIGWINCH)."""
        self._check()
        if not self._exit.done():
            await self._send(SessionResize(rows, cols), self.id)

    async def signal(self, signum: int) -> None:
        """Send ``signum`` to the command's process group."""
        self._check()
        if not self._exit.done():
            await self._send(SessionSignal(signum), self.id)

    async def wait(self) -> SessionExit:
        """How the command ended (after its output was sent)."""
        return await asyncio.shield(self._exit)

    async def wait_started(self) -> None:
        await asyncio.shield(self._started)

    # -- what the client's reader does ----------------------------------------------------

    def feed(self, message: Message) -> None:
        """A frame for this session arrived."""
        match message:
            case SessionStarted(pid=pid):
                self.pid = pid
                _resolve(self._started, None)
            case SessionOutput():
                if not self._exit.done():
                    self._output.put_nowait(message)
            case SessionInputAck(count=count):
                self._in_flight = max(0, self._in_flight - count)
                self._window.set()
            case SessionExit():
                _resolve(self._started, None)  # START_FAILED comes without STARTED
                _resolve(self._exit, message)
                self._output.put_nowait(None)
                self._window.set()
            case ErrorReply(code=ErrorCode.NO_SESSION) if self._exit.done():
                pass  # a request that crossed the command's end
            case ErrorReply():
                self.fail(AgentRemoteError(message.code, message.message))
            case _:
                self.fail(AgentError(f"unexpected {type(message).__name__} in session "
                                     f"#{self.id}"))

    def fail(self, error: AgentError) -> None:
        """The session is over without an exit status: every call raises ``error``."""
        if self._failure is not None or self._exit.done():
            return
        self._failure = error
        self._log.debug("session failed: %s", error)
        for future in (self._started, self._exit):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting
        self._output.put_nowait(None)
        self._window.set()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure


def _resolve(future: asyncio.Future[_T], value: _T) -> None:
    if not future.done():
        future.set_result(value)
