"""The host side of the guest agent: an asyncio client over any ferry Stream.

QEMU listens on the agent's UNIX socket (``AgentChannel``: chardev
``server=on,wait=off``) and the host connects with :func:`connect_agent`::

    async with connect_agent(vm_dir / "agent.sock") as agent:
        hello = await agent.wait_ready(timeout_s=60)
        result = await agent.exec(["cat", "/proc/version"], timeout_s=10)
        await agent.before_suspend(timeout_s=30)     # hooks + sync, then snapshot
        ...
        await agent.after_resume(timeout_s=30)       # clock + hooks on the new host

Theory of operation. Two tasks live in a TaskGroup for as long as the
client is open: a reader that decodes frames (:mod:`ferry.guest.agent.protocol`)
and resolves the future of the request each reply names, and a greeter that
sends HELLO_REQUEST every second until the agent's HELLO arrives. Until then
the decoder runs in resync mode (a new connection may begin with bytes of an
old one); after it, any malformed byte is a protocol error. Every call waits
for the HELLO and its reply inside one deadline and raises
:class:`AgentTimeoutError` when it passes. When the connection ends (QEMU
exited, the client was closed, the agent sent garbage) every pending call
fails with :class:`AgentDisconnectedError` or :class:`AgentProtocolError`
instead of hanging. The agent serves one request at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from ferry.errors import BrokenResourceError, TransportError
from ferry.guest.agent.errors import (
    AgentConnectError,
    AgentDisconnectedError,
    AgentError,
    AgentHookError,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeoutError,
    AgentUnsupportedError,
)
from ferry.guest.agent.protocol import (
    MAX_OUTPUT_BYTES,
    SESSION_PROTOCOL_VERSION,
    AfterResume,
    BeforeSuspend,
    Decoder,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecResult,
    Frame,
    Hello,
    HelloRequest,
    HooksResult,
    Ping,
    Pong,
    Reply,
    Request,
    SessionOpen,
    SessionRequest,
    SessionSignal,
    encode,
)
from ferry.guest.agent.session import AgentSession
from ferry.transport.base import Stream
from ferry.transport.unix import connect_unix_when_listening

log = logging.getLogger(__name__)

ANSWER_GRACE_S = 2.0
"""How long after a command's own timeout the host still waits for the
agent's answer (it must kill the command and send what it collected)."""
HELLO_RETRY_S = 1.0
"""Interval of HELLO_REQUESTs until the agent answers (it may miss one that
arrives while it still sees the previous host's hang-up)."""

_R = TypeVar("_R", bound=Reply)


class AgentClient:
    """A connection to one guest agent. Make it with :func:`connect_agent` or :func:`open_agent`."""

    def __init__(self, stream: Stream, *, name: str | None = None) -> None:
        self._stream = stream
        self._name = name or stream.peer
        self._log = log.getChild(self._name.replace(".", "_"))
        self._decoder = Decoder(resync=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._sessions: dict[int, AgentSession] = {}
        self._ready = asyncio.Event()  # set on HELLO *or* on failure: check _failure
        self._failure: AgentError | None = None
        self._send_lock = asyncio.Lock()
        self.hello: Hello | None = None
        """The agent's latest HELLO (version, boot id), once it arrived."""

    def __repr__(self) -> str:
        return f"<AgentClient {self._name} ready={self.hello is not None}>"

    @property
    def closed(self) -> bool:
        return self._failure is not None

    # -- public calls -----------------------------------------------------------

    async def wait_ready(self, timeout_s: float = 30.0) -> Hello:
        """Wait until the agent announced itself (it is alive and serving)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._wait_hello()
        except TimeoutError as exc:
            raise AgentTimeoutError("hello", timeout_s) from exc

    async def ping(self, timeout_s: float = 5.0) -> Pong:
        """A round trip through the agent; returns the guest's clocks."""
        return await self._call("ping", Ping, timeout_s, Pong)

    async def exec(
        self,
        argv: Sequence[str | bytes] | str,
        *,
        stdin: bytes = b"",
        timeout_s: float = 30.0,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Run a command in the guest and return how it ended and what it printed.

        ``argv`` as a list is executed directly (``execvp``); as a string it is
        run by ``/bin/sh -c``. The guest kills the command's process group
        after ``timeout_s`` (``result.outcome`` is ``TIMED_OUT``); if no answer
        comes ``ANSWER_GRACE_S`` later, :class:`AgentTimeoutError` is raised.
        A non-zero exit is a result, not an error.
        """
        args, shell = _argv(argv)
        request = Exec(argv=args, shell=shell, stdin=stdin, timeout_ms=_ms(timeout_s),
                       max_output_bytes=max_output_bytes)
        encode(request, 1)  # reject a bad request now, not inside the deadline
        return await self._call("exec", lambda: request, timeout_s + ANSWER_GRACE_S, ExecResult)

    @asynccontextmanager
    async def session(
        self,
        argv: Sequence[str | bytes] | str,
        *,
        tty: bool = False,
        rows: int = 0,
        cols: int = 0,
        term: str = "",
        timeout_s: float = 30.0,
    ) -> AsyncIterator[AgentSession]:
        """Start a command whose stdin, stdout and stderr stream (on a pty with ``tty``).

        ``argv`` as for :meth:`exec`. ``timeout_s`` bounds the start only: the
        command runs until it exits. Leaving the block before it exited kills its
        process group (SIGKILL). A command that cannot start is a session whose
        :meth:`~AgentSession.wait` says ``START_FAILED``. Needs an agent of
        protocol 2 (:class:`AgentUnsupportedError` otherwise).
        """
        args, shell = _argv(argv)
        request = SessionOpen(argv=args, shell=shell, tty=tty, rows=rows, cols=cols,
                              term=term.encode())
        encode(request, 1)  # reject a bad request now
        try:
            async with asyncio.timeout(timeout_s):
                hello = await self._wait_hello()
        except TimeoutError as exc:
            raise AgentTimeoutError("session", timeout_s) from exc
        if hello.protocol_version < SESSION_PROTOCOL_VERSION:
            raise AgentUnsupportedError(
                f"the guest's agent ({hello.agent_version}, protocol {hello.protocol_version}) "
                f"has no interactive sessions: rebuild the VM's image")
        session_id = self._next_id()
        session = AgentSession(session_id, self._send_session, name=f"{self._name}.{session_id}")
        self._sessions[session_id] = session
        try:
            self._log.debug("--> SessionOpen #%d tty=%s", session_id, tty)
            await self._send(encode(request, session_id))
            try:
                async with asyncio.timeout(timeout_s):
                    await session.wait_started()
            except TimeoutError as exc:
                raise AgentTimeoutError("session", timeout_s) from exc
            yield session
        finally:
            self._sessions.pop(session_id, None)
            if not session.ended and self._failure is None:
                with contextlib.suppress(AgentError):
                    await self._send(encode(SessionSignal(signal.SIGKILL), session_id))
            session.fail(AgentDisconnectedError(f"session #{session_id} closed"))

    async def before_suspend(self, timeout_s: float = 30.0, *, check: bool = True) -> HooksResult:
        """Run the blueprint's before-suspend hooks in the guest, then ``sync``.

        With ``check``, a hook that failed or timed out raises :class:`AgentHookError`.
        """
        result = await self._call("before_suspend",
                                  lambda: BeforeSuspend(timeout_ms=_ms(timeout_s)),
                                  timeout_s + ANSWER_GRACE_S, HooksResult)
        return _checked("before_suspend", result, check)

    async def after_resume(
        self, timeout_s: float = 30.0, *, host_time_ns: int | None = None, check: bool = True,
    ) -> HooksResult:
        """Set the guest clock to the host's (or ``host_time_ns``), then run after-resume hooks.

        The host time is read just before the request is sent, after the
        agent is known to be there. ``result.clock_offset_ns`` is how far the
        guest clock moved.
        """
        def request() -> AfterResume:
            now = time.time_ns() if host_time_ns is None else host_time_ns
            return AfterResume(timeout_ms=_ms(timeout_s), host_time_ns=now)

        result = await self._call("after_resume", request, timeout_s + ANSWER_GRACE_S,
                                  HooksResult)
        return _checked("after_resume", result, check)

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with AgentDisconnectedError."""
        self._fail(AgentDisconnectedError(f"agent client {self._name} closed"))
        await self._stream.aclose()

    # -- machinery ------------------------------------------------------------------

    async def _wait_hello(self) -> Hello:
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure
        assert self.hello is not None
        return self.hello

    def _next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    async def _send_session(self, request: SessionRequest, session_id: int) -> None:
        if self._failure is not None:
            raise self._failure
        await self._send(encode(request, session_id))

    async def _call(self, operation: str, make: Callable[[], Request], timeout_s: float,
                    expect: type[_R]) -> _R:
        if self._failure is not None:
            raise self._failure
        request_id = self._next_id()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_hello()
                request = make()
                self._pending[request_id] = future
                self._log.debug("--> %s #%d", type(request).__name__, request_id)
                await self._send(encode(request, request_id))
                reply = await future
        except TimeoutError as exc:
            raise AgentTimeoutError(operation, timeout_s) from exc
        finally:
            self._pending.pop(request_id, None)
        if isinstance(reply, ErrorReply):
            raise AgentRemoteError(reply.code, reply.message)
        if not isinstance(reply, expect):
            raise AgentProtocolError(f"agent answered {operation} with {type(reply).__name__}")
        return reply

    async def _send(self, frame: bytes) -> None:
        try:
            async with self._send_lock:
                await self._stream.send_all(frame)
        except TransportError as exc:
            failure = AgentDisconnectedError(f"agent connection {self._name} broke: {exc}")
            self._fail(failure)
            raise failure from exc

    def _fail(self, error: AgentError) -> None:
        """Enter the closed state: every pending and future call raises ``error``."""
        if self._failure is not None:
            return
        self._failure = error
        self._ready.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for session in self._sessions.values():
            session.fail(error)

    def _dispatch(self, frame: Frame) -> None:
        message = frame.message
        self._log.debug("<-- %s #%d", type(message).__name__, frame.request_id)
        if isinstance(message, Hello):
            if self.hello is None:
                self._log.info("agent ready: %s, boot %s", message.agent_version,
                               message.boot_id)
            self.hello = message
            self._decoder.resync = False
            self._ready.set()
            return
        session = self._sessions.get(frame.request_id)
        if session is not None:
            session.feed(message)
            return
        future = self._pending.get(frame.request_id)
        if future is None:
            if isinstance(message, ErrorReply) and message.code is not ErrorCode.NO_SESSION:
                self._log.warning("agent reported %s: %s", message.code.name, message.message)
            else:  # an answer to a call that timed out, or to an old connection
                self._log.debug("ignoring %s for unknown request #%d",
                                type(message).__name__, frame.request_id)
            return
        if isinstance(message, Reply):
            if not future.done():
                future.set_result(message)
        else:
            self._fail(AgentProtocolError(f"agent sent a request: {type(message).__name__}"))

    async def _read_loop(self) -> None:
        """Decode frames until the connection ends; never raises (it fails the client)."""
        try:
            while True:
                data = await self._stream.receive_some()
                if not data:
                    raise AgentDisconnectedError(f"agent connection {self._name} closed by peer")
                self._decoder.receive_data(data)
                while (frame := self._decoder.next_frame()) is not None:
                    self._dispatch(frame)
        except AgentError as exc:
            self._fail(exc)
        except TransportError as exc:
            self._fail(AgentDisconnectedError(f"agent connection {self._name} broke: {exc}"))

    async def _greet(self) -> None:
        """Ask for HELLO every HELLO_RETRY_S until it comes; never raises."""
        while self.hello is None and self._failure is None:
            try:
                await self._send(encode(HelloRequest()))
            except AgentError:
                return
            try:
                async with asyncio.timeout(HELLO_RETRY_S):
                    await self._ready.wait()
            except TimeoutError:
                # A stale header from an old conversation may claim a payload that
                # never comes; give up on it so the scan reaches the HELLO.
                self._decoder.discard_partial()


def _argv(argv: Sequence[str | bytes] | str) -> tuple[tuple[bytes, ...], bool]:
    """A list is execvp'd; a string runs through ``sh -c``."""
    if isinstance(argv, str):
        return (argv.encode(),), True
    return tuple(a.encode() if isinstance(a, str) else bytes(a) for a in argv), False


def _ms(timeout_s: float) -> int:
    return max(1, round(timeout_s * 1000))


def _checked(operation: str, result: HooksResult, check: bool) -> HooksResult:
    if check:
        for hook in result.hooks:
            if not hook.ok:
                raise AgentHookError(
                    f"{operation} hook {hook.command!r} ended {hook.outcome.name} "
                    f"(code {hook.code}): {hook.output[-400:].decode(errors='replace')}",
                    result)
    return result


@asynccontextmanager
async def open_agent(stream: Stream, *, name: str | None = None) -> AsyncIterator[AgentClient]:
    """Run an :class:`AgentClient` over ``stream``; closes the stream on exit."""
    client = AgentClient(stream, name=name)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(client._read_loop())
        tg.create_task(client._greet())
        try:
            yield client
        finally:
            await client.aclose()


@asynccontextmanager
async def connect_agent(
    socket_path: str | os.PathLike[str], *, connect_timeout_s: float = 10.0,
) -> AsyncIterator[AgentClient]:
    """Connect to the agent socket QEMU listens on, retrying while QEMU starts.

    QEMU's socket chardev serves one client at a time: a second connection
    waits until the first is closed.
    """
    path = os.fspath(socket_path)
    try:
        stream = await connect_unix_when_listening(path, timeout_s=connect_timeout_s)
    except BrokenResourceError as exc:  # also ConnectTimeoutError
        raise AgentConnectError(f"cannot connect to agent socket {path}: {exc}") from exc
    async with open_agent(stream, name=os.path.basename(path)) as client:
        yield client
