"""The asyncio QMP client against a scripted QMP server on a real UNIX socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.qemu.qmp import (
    ClientState,
    QMPClient,
    QMPCommandError,
    QMPCommandNotFoundError,
    QMPConnectionError,
    QMPTimeoutError,
)

GREETING = {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[bool]]
"""Handles one command; returns False to hang up."""


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


@contextlib.asynccontextmanager
async def fake_qmp(path: Path, handler: Handler) -> AsyncIterator[list[str]]:
    """A QMP server: greeting, qmp_capabilities, then ``handler`` per command."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_line(GREETING))
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                seen.append(cmd["execute"])
                if cmd["execute"] == "qmp_capabilities":
                    writer.write(_line({"return": {}, "id": cmd["id"]}))
                elif not await handler(cmd, writer):
                    break
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    async with server:
        yield seen


async def _echo(cmd: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
    name = cmd["execute"]
    if name == "cont":
        # The event overtakes the reply, as QEMU's RESUME often does.
        writer.write(_line({"event": "RESUME", "data": {},
                            "timestamp": {"seconds": 1, "microseconds": 0}}))
        writer.write(_line({"return": {}, "id": cmd["id"]}))
    elif name == "query-status":
        writer.write(_line({"return": {"status": "running"}, "id": cmd["id"]}))
    elif name == "hang":
        pass
    elif name == "hangup":
        return False
    else:
        writer.write(_line({"error": {"class": "CommandNotFound",
                                      "desc": f"The command {name} has not been found"},
                            "id": cmd["id"]}))
    return True


async def test_execute_returns_results_and_typed_errors(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    sock = tmp_path / "qmp.sock"
    caplog.set_level(logging.DEBUG, logger="ferry.qemu.qmp")
    async with fake_qmp(sock, _echo) as seen, \
            await QMPClient.connect_unix(sock, name="t") as qmp:
        assert qmp.state is ClientState.RUNNING
        assert await qmp.execute("query-status") == {"status": "running"}
        with pytest.raises(QMPCommandNotFoundError) as err:
            await qmp.execute("bogus")
        assert isinstance(err.value, QMPCommandError)
        assert err.value.error_class == "CommandNotFound"
        assert "bogus" in err.value.desc
        assert await qmp.execute("query-status") == {"status": "running"}
    assert seen == ["qmp_capabilities", "query-status", "bogus", "query-status"]
    assert any("-->" in r.message and "query-status" in r.message for r in caplog.records)
    assert any("<--" in r.message for r in caplog.records)


async def test_event_that_overtakes_its_reply_is_not_missed(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    async with fake_qmp(sock, _echo), await QMPClient.connect_unix(sock) as qmp:
        mark = qmp.event_mark()
        await qmp.execute("cont")
        record = await qmp.wait_event("RESUME", since=mark, timeout_s=5)
        assert record.seq > mark
        # Nothing newer: waiting again after the mark of now times out.
        with pytest.raises(QMPTimeoutError):
            await qmp.wait_event("RESUME", since=qmp.event_mark(), timeout_s=0.1)


async def test_disconnect_fails_pending_calls_and_waiters(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    async with fake_qmp(sock, _echo), await QMPClient.connect_unix(sock) as qmp:
        waiter = asyncio.create_task(qmp.wait_event("SHUTDOWN", timeout_s=30))
        pending = asyncio.create_task(qmp.execute("hang", timeout_s=30))
        await asyncio.sleep(0.05)
        with pytest.raises(QMPConnectionError):
            await qmp.execute("hangup", timeout_s=30)
        with pytest.raises(QMPConnectionError):
            await pending
        with pytest.raises(QMPConnectionError):
            await waiter
        assert qmp.state is ClientState.DISCONNECTED
        with pytest.raises(QMPConnectionError):
            await qmp.execute("query-status")


async def test_command_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    async with fake_qmp(sock, _echo), await QMPClient.connect_unix(sock) as qmp:
        with pytest.raises(QMPTimeoutError):
            await qmp.execute("hang", timeout_s=0.1)
        # A late or missing reply does not poison the connection.
        assert await qmp.execute("query-status") == {"status": "running"}


async def test_connect_times_out_without_a_server(tmp_path: Path) -> None:
    with pytest.raises(QMPTimeoutError):
        await QMPClient.connect_unix(tmp_path / "missing.sock", timeout_s=0.2)


async def test_close_fails_pending_calls(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    async with fake_qmp(sock, _echo):
        qmp = await QMPClient.connect_unix(sock)
        pending = asyncio.create_task(qmp.execute("hang", timeout_s=30))
        await asyncio.sleep(0.05)
        await qmp.close()
        await qmp.close()  # idempotent
        with pytest.raises(QMPConnectionError):
            await pending
