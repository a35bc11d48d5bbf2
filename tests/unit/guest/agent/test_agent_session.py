"""AgentClient.session against a scripted agent: the stream, both windows, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from ferry.guest.agent import (
    AgentClient,
    AgentDisconnectedError,
    AgentRemoteError,
    AgentSession,
    AgentUnsupportedError,
    open_agent,
)
from ferry.guest.agent.protocol import (
    MAX_CHUNK_BYTES,
    SESSION_WINDOW,
    Decoder,
    ErrorCode,
    ErrorReply,
    ExecOutcome,
    Frame,
    Hello,
    HelloRequest,
    Message,
    OutputStream,
    SessionAck,
    SessionEof,
    SessionExit,
    SessionInput,
    SessionInputAck,
    SessionOpen,
    SessionOutput,
    SessionResize,
    SessionSignal,
    SessionStarted,
    encode,
)
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair

HELLO = Hello(protocol_version=2, agent_version="fake 1.1", boot_id="boot-1")

Script = Callable[["FakeAgent", Frame], Awaitable[None]]


class FakeAgent:
    """Decodes what the host sends, answers through ``script``, and keeps a log."""

    def __init__(self, stream: Stream, script: Script, hello: Hello = HELLO) -> None:
        self.stream = stream
        self.script = script
        self.hello = hello
        self.frames: list[Frame] = []
        self.acked_output = 0
        self.ack_event = asyncio.Event()
        self.closed = False

    async def send(self, message: Message, request_id: int) -> None:
        await self.stream.send_all(encode(message, request_id))

    async def run(self) -> None:
        decoder = Decoder()
        try:
            while not self.closed and (data := await self.stream.receive_some()):
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not None:
                    self.frames.append(frame)
                    if isinstance(frame.message, HelloRequest):
                        await self.send(self.hello, 0)
                    elif isinstance(frame.message, SessionAck):
                        self.acked_output += frame.message.count
                        self.ack_event.set()
                    else:
                        await self.script(self, frame)
        finally:
            await self.stream.aclose()


@asynccontextmanager
async def agent_with(script: Script, hello: Hello = HELLO
                     ) -> AsyncIterator[tuple[AgentClient, FakeAgent]]:
    host, guest = memory_stream_pair(names=("host", "guest"))
    fake = FakeAgent(guest, script, hello)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(fake.run())
        async with open_agent(host, name="test") as client:
            yield client, fake
        await task


async def upper_cat(fake: FakeAgent, frame: Frame) -> None:
    """A session that echoes its stdin upper-cased (acknowledging it), exits 3 at EOF."""
    rid, m = frame.request_id, frame.message
    match m:
        case SessionOpen():
            await fake.send(SessionStarted(pid=42), rid)
        case SessionInput(data=data):
            await fake.send(SessionOutput(OutputStream.STDOUT, data.upper()), rid)
            await fake.send(SessionInputAck(len(data)), rid)
        case SessionEof():
            await fake.send(SessionOutput(OutputStream.STDERR, b"bye"), rid)
            await fake.send(SessionExit(ExecOutcome.EXITED, 3), rid)


async def _read_all(session: AgentSession) -> tuple[bytes, bytes]:
    out = {OutputStream.STDOUT: b"", OutputStream.STDERR: b""}
    while (chunk := await session.read()) is not None:
        out[chunk.stream] += chunk.data
    return out[OutputStream.STDOUT], out[OutputStream.STDERR]


async def test_a_session_streams_both_ways_and_reports_the_exit() -> None:
    async with (agent_with(upper_cat) as (agent, fake),
                agent.session(["cat"], tty=True, rows=24, cols=80, term="xterm") as s):
        assert s.pid == 42
        await s.write(b"hello ")
        first = await s.read()
        await s.write(b"world")
        second = await s.read()
        await s.resize(40, 120)
        await s.signal(2)
        await s.close_stdin()
        stdout, stderr = await _read_all(s)
        ended = await s.wait()
    assert first == SessionOutput(OutputStream.STDOUT, b"HELLO ")
    assert second == SessionOutput(OutputStream.STDOUT, b"WORLD")
    assert (stdout, stderr) == (b"", b"bye")
    assert (ended.outcome, ended.exit_code) == (ExecOutcome.EXITED, 3)
    opened = fake.frames[1]
    assert opened.message == SessionOpen(argv=(b"cat",), tty=True, rows=24, cols=80,
                                         term=b"xterm")
    sent = [f.message for f in fake.frames if f.request_id == opened.request_id]
    assert SessionResize(40, 120) in sent
    assert SessionSignal(2) in sent
    # Output was acknowledged as it was read (not what came with the exit: nobody needs it).
    assert fake.acked_output == len(b"HELLO WORLD")


async def test_stdin_never_exceeds_the_window() -> None:
    """The agent acknowledges nothing until a whole window is in flight: a client that
    sent more before the acknowledgement would be caught here."""
    in_flight = 0
    total = 0

    async def slow(fake: FakeAgent, frame: Frame) -> None:
        nonlocal in_flight, total
        rid, m = frame.request_id, frame.message
        match m:
            case SessionOpen():
                await fake.send(SessionStarted(pid=1), rid)
            case SessionInput(data=data):
                assert len(data) <= MAX_CHUNK_BYTES
                in_flight += len(data)
                total += len(data)
                assert in_flight <= SESSION_WINDOW
                if in_flight == SESSION_WINDOW:
                    await fake.send(SessionInputAck(in_flight), rid)
                    in_flight = 0
            case SessionEof():
                await fake.send(SessionExit(ExecOutcome.EXITED, 0), rid)

    data = bytes(range(256)) * 2400  # 614400 bytes: two full windows and a part
    async with agent_with(slow) as (agent, _), agent.session("cat > /dev/null") as s:
        await asyncio.wait_for(s.write(data), 10)
        await s.close_stdin()
        assert (await s.wait()).exit_code == 0
    assert total == len(data)


async def test_a_command_that_cannot_start_is_an_exit_without_a_pid() -> None:
    async def fail(fake: FakeAgent, frame: Frame) -> None:
        await fake.send(SessionExit(ExecOutcome.START_FAILED, 2), frame.request_id)

    async with agent_with(fail) as (agent, _), agent.session(["nope"]) as s:
        assert s.pid is None
        assert await s.read() is None
        assert (await s.wait()).exit_code == 127


async def test_an_error_reply_fails_the_open() -> None:
    async def busy(fake: FakeAgent, frame: Frame) -> None:
        await fake.send(ErrorReply(ErrorCode.BUSY, "8 sessions are open already"),
                        frame.request_id)

    async with agent_with(busy) as (agent, _):
        with pytest.raises(AgentRemoteError, match="BUSY"):
            async with agent.session(["sh"]):
                pass


async def test_an_old_agent_has_no_sessions() -> None:
    old = Hello(protocol_version=1, agent_version="ferry-agent 1.0", boot_id="b")
    async with agent_with(upper_cat, old) as (agent, _):
        with pytest.raises(AgentUnsupportedError, match="rebuild"):
            async with agent.session(["sh"]):
                pass


async def test_the_connection_ending_fails_the_session() -> None:
    async def start_then_vanish(fake: FakeAgent, frame: Frame) -> None:
        if isinstance(frame.message, SessionOpen):
            await fake.send(SessionStarted(pid=5), frame.request_id)
            await fake.send(SessionOutput(OutputStream.STDOUT, b"partial"), frame.request_id)
            fake.closed = True
            await fake.stream.aclose()

    async with agent_with(start_then_vanish) as (agent, _), agent.session(["sh"]) as s:
        chunk = await s.read()
        assert chunk is not None
        assert chunk.data == b"partial"
        with pytest.raises(AgentDisconnectedError):
            await s.read()
        with pytest.raises(AgentDisconnectedError):
            await s.wait()


async def test_leaving_early_kills_the_command() -> None:
    async with agent_with(upper_cat) as (agent, fake):
        async with agent.session(["sleep", "1000"]) as s:
            rid = s.id
        for _ in range(50):
            if any(f.request_id == rid and isinstance(f.message, SessionSignal)
                   for f in fake.frames):
                break
            await asyncio.sleep(0.01)
    assert Frame(rid, SessionSignal(9)) in fake.frames
