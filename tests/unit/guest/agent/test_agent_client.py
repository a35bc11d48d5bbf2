"""AgentClient against a scripted agent on an in-memory stream pair."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ferry.errors import DeadlineError
from ferry.guest.agent import (
    AgentClient,
    AgentConnectError,
    AgentDisconnectedError,
    AgentHookError,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeoutError,
    connect_agent,
    open_agent,
)
from ferry.guest.agent.protocol import (
    AfterResume,
    BeforeSuspend,
    Decoder,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecOutcome,
    ExecResult,
    Frame,
    Hello,
    HelloRequest,
    HookResult,
    HooksResult,
    Message,
    Ping,
    Pong,
    encode,
)
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair

HELLO = Hello(protocol_version=1, agent_version="fake 1", boot_id="boot-1")
Handler = Callable[[Frame], Message | None]


def echo_handler(frame: Frame) -> Message | None:
    """Answers like a real agent would, deterministically."""
    m = frame.message
    match m:
        case Ping():
            return Pong(guest_time_ns=1, uptime_ns=2)
        case Exec():
            return ExecResult(outcome=ExecOutcome.EXITED, code=len(m.argv),
                              stdout=b" ".join(m.argv) + (b"[sh]" if m.shell else b""),
                              stderr=m.stdin)
        case BeforeSuspend():
            return HooksResult(clock_offset_ns=0, hooks=(
                HookResult("sync", ExecOutcome.EXITED, 0, b""),))
        case AfterResume():
            return HooksResult(clock_offset_ns=m.host_time_ns)
    return None


async def fake_agent(stream: Stream, handler: Handler, *, hello: bool = True,
                     seen: list[Frame] | None = None) -> None:
    decoder = Decoder()
    try:
        while data := await stream.receive_some():
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                if seen is not None:
                    seen.append(frame)
                if isinstance(frame.message, HelloRequest):
                    if hello:
                        await stream.send_all(encode(HELLO))
                    continue
                reply = handler(frame)
                if reply is not None:
                    await stream.send_all(encode(reply, frame.request_id))
    finally:
        await stream.aclose()


@asynccontextmanager
async def agent_pair(handler: Handler = echo_handler, *, hello: bool = True,
                     seen: list[Frame] | None = None) -> AsyncIterator[AgentClient]:
    host, guest = memory_stream_pair(names=("host", "guest"))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(fake_agent(guest, handler, hello=hello, seen=seen))
        async with open_agent(host, name="test") as client:
            yield client
        await task


async def test_ready_and_calls() -> None:
    async with agent_pair() as agent:
        assert await agent.wait_ready(5) == HELLO
        assert agent.hello == HELLO
        assert await agent.ping() == Pong(1, 2)
        r = await agent.exec(["echo", "hi"], stdin=b"input")
        assert (r.exit_code, r.stdout, r.stderr) == (2, b"echo hi", b"input")
        r = await agent.exec("echo hi | wc -c")
        assert r.stdout == b"echo hi | wc -c[sh]"
        report = await agent.before_suspend()
        assert report.ok
        assert report.hooks[0].command == "sync"


async def test_concurrent_calls_match_replies_by_id() -> None:
    async with agent_pair() as agent:
        results = await asyncio.gather(*(agent.exec(["x"] * n) for n in range(1, 20)))
    assert [r.exit_code for r in results] == list(range(1, 20))


async def test_after_resume_sends_the_host_clock() -> None:
    async with agent_pair() as agent:
        before = time.time_ns()
        report = await agent.after_resume()
        assert before <= report.clock_offset_ns <= time.time_ns()
        fixed = await agent.after_resume(host_time_ns=123)
        assert fixed.clock_offset_ns == 123


async def test_no_agent_times_out_with_a_clear_error() -> None:
    async with agent_pair(hello=False) as agent:
        with pytest.raises(AgentTimeoutError, match=r"agent did not answer hello within 0\.3 s"):
            await agent.wait_ready(0.3)
        with pytest.raises(AgentTimeoutError, match=r"did not answer ping within 0\.2 s") as info:
            await agent.ping(timeout_s=0.2)
        assert isinstance(info.value, DeadlineError)


async def test_unanswered_exec_times_out_and_a_late_reply_is_ignored() -> None:
    late: list[Frame] = []

    def handler(frame: Frame) -> Message | None:
        if isinstance(frame.message, Exec) and not late:
            late.append(frame)  # never answer the first exec
            return None
        return echo_handler(frame)

    async with agent_pair(handler) as agent:
        with pytest.raises(AgentTimeoutError, match=r"did not answer exec within 2\.1 s"):
            await agent.exec(["sleep"], timeout_s=0.1)
        assert (await agent.exec(["a", "b"])).exit_code == 2  # still usable


async def test_error_reply_raises_remote_error() -> None:
    async with agent_pair(lambda f: ErrorReply(ErrorCode.CLOCK, "clock_settime: EPERM")) as agent:
        with pytest.raises(AgentRemoteError, match="CLOCK: clock_settime: EPERM") as info:
            await agent.after_resume()
        assert info.value.code is ErrorCode.CLOCK


async def test_failed_hook_raises_unless_unchecked() -> None:
    failing = HooksResult(clock_offset_ns=0, hooks=(
        HookResult("redis-cli save", ExecOutcome.EXITED, 1, b"ERR no disk"),))
    async with agent_pair(lambda f: failing) as agent:
        with pytest.raises(AgentHookError, match=r"'redis-cli save' ended EXITED.*ERR no disk"):
            await agent.before_suspend()
        assert await agent.before_suspend(check=False) == failing


async def test_disconnect_fails_pending_calls() -> None:
    host, guest = memory_stream_pair()
    async with open_agent(host) as agent:
        await guest.send_all(encode(HELLO))
        await agent.wait_ready(5)
        call = asyncio.create_task(agent.exec(["sleep", "100"], timeout_s=100))
        await asyncio.sleep(0.05)
        assert not call.done()
        await guest.aclose()  # QEMU went away
        with pytest.raises(AgentDisconnectedError, match="closed by peer"):
            await call
        with pytest.raises(AgentDisconnectedError):
            await agent.ping()


async def test_closing_the_client_fails_waiters() -> None:
    host, guest = memory_stream_pair()
    async with open_agent(host) as agent:
        waiter = asyncio.create_task(agent.wait_ready(100))
        await asyncio.sleep(0.05)
        await agent.aclose()
        with pytest.raises(AgentDisconnectedError, match="closed"):
            await waiter
    await guest.aclose()


async def test_stale_bytes_before_hello_are_skipped() -> None:
    host, guest = memory_stream_pair()
    async with open_agent(host) as agent:
        stale = encode(ExecResult(ExecOutcome.EXITED, 0, b"old"), 99)
        await guest.send_all(b"garbage" + stale[5:] + stale + encode(HELLO))
        assert await agent.wait_ready(5) == HELLO
        await guest.send_all(b"garbage after hello")
        with pytest.raises(AgentProtocolError, match="magic"):
            await agent.ping(timeout_s=5)
    await guest.aclose()


async def test_greeter_repeats_hello_request() -> None:
    seen: list[Frame] = []
    host, guest = memory_stream_pair()
    async with asyncio.TaskGroup() as tg, open_agent(host) as agent:
        task = tg.create_task(fake_agent(guest, echo_handler, hello=False, seen=seen))
        with pytest.raises(AgentTimeoutError):
            await agent.wait_ready(1.5)
        assert sum(isinstance(f.message, HelloRequest) for f in seen) >= 2
        await agent.aclose()
    assert task.done()


async def test_connect_to_missing_socket_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(AgentConnectError, match="cannot connect to agent socket"):
        async with connect_agent(tmp_path / "nope.sock", connect_timeout_s=0.2):
            pass


async def test_connect_over_a_real_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        while data := await reader.read(65536):
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                reply = HELLO if isinstance(frame.message, HelloRequest) else echo_handler(frame)
                assert reply is not None
                writer.write(encode(reply, frame.request_id))
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    async with server, connect_agent(path) as agent:
        await agent.wait_ready(5)
        assert (await agent.exec(["a"])).stdout == b"a"
