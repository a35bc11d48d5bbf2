"""The guest agent in a real guest under QEMU: liveness, exec, hooks, clock, reconnect.

One guest with the agent serves the whole module (boots take seconds under
TCG); every test connects its own client, so each one also exercises the
agent noticing a host leave and a new one arrive. Calls to a guest without
an agent time out with a clear error: tests/unit/guest/agent/test_agent_client.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from ferry.guest.agent import AgentHookError, AgentTimeoutError, ExecOutcome, connect_agent
from ferry.guest.agent.protocol import (
    HEADER,
    MAGIC,
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    SESSION_WINDOW,
    Decoder,
    ErrorCode,
    ErrorReply,
    Frame,
    Hello,
    HelloRequest,
    Message,
    MessageType,
    OutputStream,
    SessionExit,
    SessionInput,
    SessionOpen,
    SessionOutput,
    SessionStarted,
    encode,
)
from ferry.guest.files import MARKER_AGENT, MARKER_READY
from ferry.guest.image import build_blueprint
from ferry.guest.image.blueprint import parse_blueprint
from ferry.hostconfig import HostConfig
from ferry.qemu.accel import best_accel
from ferry.qemu.argv import (
    AgentChannel,
    FileDisk,
    QemuConfig,
    SerialToFile,
    argv_for,
    host_tsc_khz,
    kernel_cmdline,
)
from ferry.shape import MachineShape

pytestmark = pytest.mark.e2e

# These tests call the library directly: they pass it the host configuration of the
# environment they run in (FERRY_CACHE_DIR, FERRY_ACCEL ...), as the CLI does.
HOST = HostConfig.from_environ(os.environ)

BOOT_DEADLINE_S = 120.0  # generous: TCG on a shared 2-core machine
READY_DEADLINE_S = 60.0

AGENT_BLUEPRINT = """
name = "agent-test"
disk_size_mib = 16

[agent]
before_suspend = ["echo suspended > /root/suspend-hook", "test ! -e /root/fail-suspend"]
after_resume = ["date +%s > /root/resume-hook"]
"""


@dataclass(frozen=True, slots=True)
class Guest:
    agent_socket: Path
    qmp_socket: Path
    console: Path
    proc: subprocess.Popen[bytes]


def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``marker`` shows on the console; fail if QEMU dies (as test_guest_boot)."""
    start = time.monotonic()
    while time.monotonic() - start < BOOT_DEADLINE_S:
        if log.exists() and marker.encode() in log.read_bytes():
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"QEMU exited {proc.returncode} before {marker!r}: {err}\n"
                        f"console:\n{log.read_text(errors='replace') if log.exists() else ''}")
        time.sleep(0.05)
    pytest.fail(f"no {marker!r} within {BOOT_DEADLINE_S} s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def _guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # UNIX socket paths are limited to 107 bytes; pytest's tmp paths can be long.
    return tmp_path_factory.mktemp("agent")


def _boot(blueprint: str, out: Path) -> Iterator[Guest]:
    out.mkdir(parents=True, exist_ok=True)
    img = build_blueprint(parse_blueprint(blueprint, base_dir=out), out,
                          cache_dir=HOST.cache_root)
    agent_socket, qmp_socket, console = out / "agent.sock", out / "qmp.sock", out / "console.log"
    argv = argv_for(img.kernel, img.initramfs, QemuConfig(
        machine=MachineShape(img.blueprint.memory_mib),
        cmdline=kernel_cmdline(tsc_khz=host_tsc_khz()), disks=(FileDisk(img.rootfs),),
        serial=SerialToFile(console), qmp_socket=qmp_socket,
        agent=AgentChannel(agent_socket), accel=best_accel(HOST),
    ))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        guest = Guest(agent_socket, qmp_socket, console, proc)
        _wait_for(guest.console, MARKER_READY, proc)
        yield guest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(scope="module")
def guest(_guest_dir: Path) -> Iterator[Guest]:
    yield from _boot(AGENT_BLUEPRINT, _guest_dir / "with")


async def _qmp(path: Path, *commands: str) -> None:
    """Run QMP commands without arguments (``stop``, ``cont``)."""
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    try:
        await reader.readline()  # greeting
        for command in ("qmp_capabilities", *commands):
            writer.write(json.dumps({"execute": command}).encode() + b"\n")
            await writer.drain()
            while True:
                reply = json.loads(await reader.readline())
                if "error" in reply:
                    raise AssertionError(f"QMP {command}: {reply['error']}")
                if "return" in reply:
                    break
    finally:
        writer.close()
        await writer.wait_closed()


async def test_liveness_and_exec(guest: Guest) -> None:
    assert MARKER_AGENT in guest.console.read_text()
    async with connect_agent(guest.agent_socket) as agent:
        hello = await agent.wait_ready(READY_DEADLINE_S)
        assert hello.protocol_version == PROTOCOL_VERSION
        assert hello.agent_version.startswith("ferry-agent")
        assert len(hello.boot_id) == 36  # the kernel's random boot UUID
        pong = await agent.ping()
        assert pong.uptime_ns > 0

        r = await agent.exec(["echo", "hi"])
        assert (r.outcome, r.exit_code, r.stdout, r.stderr) == (ExecOutcome.EXITED, 0,
                                                                b"hi\n", b"")
        r = await agent.exec(["cat", "/proc/version"])
        assert r.ok
        assert r.stdout.startswith(b"Linux version ")

        r = await agent.exec("echo oops >&2; echo out; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"oops\n")
        r = await agent.exec(["/no/such/binary"])
        assert (r.outcome, r.code, r.exit_code) == (ExecOutcome.START_FAILED, 2, 127)
        r = await agent.exec("kill -TERM $$")
        assert (r.outcome, r.code) == (ExecOutcome.SIGNALED, 15)

        payload = os.urandom(200_000)  # larger than a virtio-serial write (32 KiB)
        r = await agent.exec(["cat"], stdin=payload)
        assert r.ok
        assert r.stdout == payload
        r = await agent.exec(["sha256sum"], stdin=payload)
        assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()

        r = await agent.exec("head -c 5000 /dev/zero; echo err >&2", max_output_bytes=1000)
        assert (len(r.stdout), r.stdout_truncated, r.stderr, r.stderr_truncated) == (
            1000, True, b"err\n", False)

        r = await agent.exec(["sleep", "30"], timeout_s=1.0)
        assert (r.outcome, r.exit_code) == (ExecOutcome.TIMED_OUT, 124)
        # A backgrounded daemon holding the pipes does not make exec wait for it.
        r = await agent.exec("sleep 30 & echo started", timeout_s=20)
        assert r.ok
        assert r.stdout == b"started\n"


async def test_before_suspend_runs_hooks_and_reports_failures(guest: Guest) -> None:
    async with connect_agent(guest.agent_socket) as agent:
        await agent.wait_ready(READY_DEADLINE_S)
        await agent.exec(["rm", "-f", "/root/suspend-hook", "/root/fail-suspend"])
        report = await agent.before_suspend(timeout_s=30)
        assert [h.command for h in report.hooks] == [
            "echo suspended > /root/suspend-hook", "test ! -e /root/fail-suspend"]
        assert report.ok
        assert report.clock_offset_ns == 0
        assert (await agent.exec(["cat", "/root/suspend-hook"])).stdout == b"suspended\n"

        await agent.exec(["touch", "/root/fail-suspend"])
        with pytest.raises(AgentHookError, match="test ! -e /root/fail-suspend") as info:
            await agent.before_suspend(timeout_s=30)
        assert [h.ok for h in info.value.report.hooks] == [True, False]
        await agent.exec(["rm", "/root/fail-suspend"])


async def test_after_resume_sets_the_guest_clock(guest: Guest) -> None:
    skew_s = 1000
    async with connect_agent(guest.agent_socket) as agent:
        await agent.wait_ready(READY_DEADLINE_S)
        target_ns = time.time_ns() + skew_s * 1_000_000_000
        report = await agent.after_resume(timeout_s=30, host_time_ns=target_ns)
        guest_s = int((await agent.exec(["date", "+%s"])).stdout)
        offset_s = guest_s - time.time()
        # The guest now runs about 1000 s ahead of the host; the slack only
        # absorbs the round trips under TCG, far less than the skew itself.
        assert abs(offset_s - skew_s) < 60, offset_s
        assert abs(report.clock_offset_ns / 1e9 - skew_s) < 60
        hook_s = int((await agent.exec(["cat", "/root/resume-hook"])).stdout)
        assert abs(hook_s - guest_s) < 60  # the hook ran after the clock was set

        report = await agent.after_resume(timeout_s=30)  # back to the host's time
        assert abs(report.clock_offset_ns / 1e9 + skew_s) < 60
        guest_s = int((await agent.exec(["date", "+%s"])).stdout)
        assert abs(guest_s - time.time()) < 60


async def test_agent_announces_itself_when_a_host_connects(guest: Guest) -> None:
    """With no request at all, a newly connected host receives a HELLO (POLLHUP tracking).

    The agent only sees a hang-up that lasts until it polls (a host that
    reconnects at once is what HELLO_REQUEST is for), so this waits for the
    agent to log the disconnect before connecting.
    """
    marker = b"ferry-agent: host disconnected"
    async with connect_agent(guest.agent_socket) as agent:
        first = await agent.wait_ready(READY_DEADLINE_S)
        seen = guest.console.read_bytes().count(marker)
    deadline = time.monotonic() + READY_DEADLINE_S
    while guest.console.read_bytes().count(marker) == seen:
        assert time.monotonic() < deadline, "the agent never logged the disconnect"
        await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_unix_connection(os.fspath(guest.agent_socket))
    try:
        decoder = Decoder(resync=True)
        async with asyncio.timeout(READY_DEADLINE_S):
            while (frame := decoder.next_frame()) is None:
                data = await reader.read(4096)
                assert data, "QEMU closed the agent socket"
                decoder.receive_data(data)
        assert frame.message == first
    finally:
        writer.close()
        await writer.wait_closed()


async def test_reconnect_across_a_paused_vm(guest: Guest) -> None:
    """stop, drop the client, connect a new one, cont: the agent answers the new host.

    This is the same QEMU process; a restore into a new QEMU (new socket) is
    the runtime's test once it exists.
    """
    async with connect_agent(guest.agent_socket) as agent:
        hello = await agent.wait_ready(READY_DEADLINE_S)
        assert (await agent.exec(["echo", "before"])).stdout == b"before\n"
        await _qmp(guest.qmp_socket, "stop")
    # The guest is paused: it cannot see this host leave and the next arrive.
    async with connect_agent(guest.agent_socket) as agent:
        await _qmp(guest.qmp_socket, "cont")
        assert await agent.wait_ready(READY_DEADLINE_S) == hello  # same boot
        r = await agent.exec(["echo", "after"])
        assert r.stdout == b"after\n"
    # A pending call fails with a timeout while the VM is stopped, and the
    # agent answers again once it runs.
    async with connect_agent(guest.agent_socket) as agent:
        await agent.wait_ready(READY_DEADLINE_S)
        await _qmp(guest.qmp_socket, "stop")
        try:
            with pytest.raises(AgentTimeoutError, match=r"did not answer ping within 1\.0 s"):
                await agent.ping(timeout_s=1.0)
        finally:
            await _qmp(guest.qmp_socket, "cont")
        assert (await agent.exec(["echo", "again"])).stdout == b"again\n"


_M = TypeVar("_M", bound=Message)


class RawAgent:
    """Frames to and from the agent with no client in between: what a hostile host sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder(resync=True)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> Frame:
        async with asyncio.timeout(READY_DEADLINE_S):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.reader.read(65536)
                assert data, "QEMU closed the agent socket"
                self.decoder.receive_data(data)
        return frame

    async def until(self, request_id: int, kind: type[_M]) -> _M:
        """The next message of ``request_id`` of type ``kind`` (skipping others of it)."""
        while True:
            f = await self.frame()
            if f.request_id == request_id and isinstance(f.message, kind):
                return f.message

    async def error(self, request_id: int) -> ErrorCode:
        return (await self.until(request_id, ErrorReply)).code


def _raw(kind: MessageType, request_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, kind, 0, 0, request_id, len(payload)) + payload


async def test_sessions_refuse_hostile_frames_and_end_with_their_host(guest: Guest) -> None:
    reader, writer = await asyncio.open_unix_connection(os.fspath(guest.agent_socket))
    raw = RawAgent(reader, writer)
    try:
        await raw.send(encode(HelloRequest()))
        await raw.until(0, Hello)
        # No such session; a bad open (unknown flag bit; a term over 64 bytes).
        await raw.send(encode(SessionInput(b"x"), 99))
        assert await raw.until(99, ErrorReply) == ErrorReply(ErrorCode.NO_SESSION,
                                                             "no open session 99")
        await raw.send(_raw(MessageType.SESSION_OPEN, 3, b"\x04" + bytes(8)))
        assert await raw.error(3) is ErrorCode.MALFORMED
        await raw.send(_raw(MessageType.SESSION_OPEN, 4, b"\x00" + bytes(4)
                            + (65).to_bytes(4, "big") + b"x" * 65 + b"\x00\x01"
                            + (3).to_bytes(4, "big") + b"cat"))
        assert await raw.error(4) is ErrorCode.MALFORMED
        # A real session: a chunk over 64 KiB and signal 0 are refused, it goes on.
        await raw.send(encode(SessionOpen(argv=(b"sh", b"-c", b"read x; echo got-$x")), 5))
        await raw.until(5, SessionStarted)
        big = MAX_CHUNK_BYTES + 1
        await raw.send(_raw(MessageType.SESSION_INPUT, 5, big.to_bytes(4, "big") + b"y" * big))
        assert await raw.error(5) is ErrorCode.MALFORMED
        await raw.send(_raw(MessageType.SESSION_SIGNAL, 5, b"\x00"))
        assert await raw.error(5) is ErrorCode.MALFORMED
        await raw.send(encode(SessionInput(b"fine\n"), 5))
        assert await raw.until(5, SessionOutput) == SessionOutput(OutputStream.STDOUT,
                                                                  b"got-fine\n")
        assert await raw.until(5, SessionExit) == SessionExit(ExecOutcome.EXITED, 0)
        # A session whose host acknowledges nothing: no output beyond the window, and
        # stdin nobody reads overflows the window into TOO_LARGE (the pipe takes 64 KiB).
        await raw.send(encode(SessionOpen(argv=(b"sh", b"-c", b"yes | head -c 600000")), 6))
        got = 0
        while got < SESSION_WINDOW:
            got += len((await raw.until(6, SessionOutput)).data)
        assert got == SESSION_WINDOW
        for _ in range(10):
            await raw.send(encode(SessionInput(b"z" * MAX_CHUNK_BYTES), 6))
        assert await raw.error(6) is ErrorCode.TOO_LARGE
        # Eight sessions at most; the host leaving kills them all.
        for rid in range(10, 16):
            await raw.send(encode(SessionOpen(argv=(b"sleep", b"777"), tty=True), rid))
            await raw.until(rid, SessionStarted)
        await raw.send(encode(SessionOpen(argv=(b"sleep", b"777")), 16))
        await raw.until(16, SessionStarted)
        await raw.send(encode(SessionOpen(argv=(b"sleep", b"777")), 17))
        assert await raw.error(17) is ErrorCode.BUSY
    finally:
        writer.close()
        await writer.wait_closed()
    async with connect_agent(guest.agent_socket) as agent:
        await agent.wait_ready(READY_DEADLINE_S)
        r = await agent.exec("ps | grep -c '[s]leep 777'")
        assert r.stdout == b"0\n"
