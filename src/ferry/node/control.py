"""The supervisor's control socket: one JSON request line, one JSON reply line.

Every running VM's supervisor listens on ``<run dir>/control.sock``. A
client connects, sends one request and reads one reply::

    → {"op": "status"}
    ← {"ok": true, "vm_id": "r1", "status": "running", "qemu_pid": 4711, ...}
    → {"op": "exec", "argv": ["redis-cli", "dbsize"], "timeout_s": 30, "stdin": "<base64>"}
    → {"op": "exec", "shell": "echo $HOSTNAME", "timeout_s": 30}
    ← {"ok": true, "exit_code": 0, "outcome": "EXITED", "stdout": "<base64>", "stderr": "<base64>"}
    → {"op": "stop", "mode": "discard" | "suspend"}
    ← {"ok": true, "mode": "suspend", "state_bytes": 72226}      (after the VM is gone)
    ← {"ok": false, "error": "...", "kind": "AgentTimeoutError"}  (any failure)

Lines are UTF-8 JSON ending in ``\\n``, at most :data:`MAX_LINE_BYTES`. The
socket is created owner-only (umask 077) in a 0700 directory: whoever can use it controls
the VM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ferry.guest.agent import ExecResult
from ferry.vm.errors import ControlError, VMNotFoundError

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4 * 1024 * 1024
"""Covers an exec's 1 MiB stdin and 1 MiB of each output stream in base64."""
CONNECT_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def encode_exec(result: ExecResult) -> dict[str, Any]:
    return {"exit_code": result.exit_code, "outcome": result.outcome.name,
            "stdout": base64.b64encode(result.stdout).decode(),
            "stderr": base64.b64encode(result.stderr).decode()}


@contextlib.asynccontextmanager
async def serve_control(path: Path, handler: Handler) -> AsyncIterator[None]:
    """Serve ``handler`` on the UNIX socket ``path`` until the block exits.

    Leaving waits for requests in flight (a ``stop`` replies after the VM is
    gone, which happens inside this block) and then removes the socket.
    """
    tasks: set[asyncio.Task[None]] = set()

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            try:
                line = await reader.readuntil(b"\n")
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("the request is not a JSON object")
                reply = await handler(request)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}", "kind": "BadRequest"}
            except Exception as exc:
                log.info("control request failed: %s", exc)
                reply = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    _unlink(path)
    old_umask = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(serve_one, os.fspath(path),
                                                 limit=MAX_LINE_BYTES)
    finally:
        os.umask(old_umask)
    try:
        yield
    finally:
        server.close()
        if tasks:
            await asyncio.wait(list(tasks), timeout=30.0)
        _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def request(path: Path, payload: dict[str, Any], *, timeout_s: float = 60.0,
                  vm: str | None = None) -> dict[str, Any]:
    """Send one request to a supervisor and return its (``ok``) reply; else ControlError."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(os.fspath(path), limit=MAX_LINE_BYTES),
            CONNECT_TIMEOUT_S)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VMNotFoundError("no such VM runs on this host (see 'ferry vm list')",
                              vm=vm) from exc
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"cannot reach the supervisor on {path}: {exc}", vm=vm) from exc
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout_s)
        reply = json.loads(line)
    except TimeoutError as exc:
        raise ControlError(f"no reply to {payload.get('op')} within {timeout_s} s",
                           vm=vm) from exc
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
            ValueError) as exc:
        raise ControlError(f"the supervisor's reply to {payload.get('op')} broke: {exc}",
                           vm=vm) from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise ControlError(f"{payload.get('op')} failed: {error}", vm=vm)
    return reply


def exec_payload(argv: Sequence[str] | str, *, stdin: bytes = b"",
                 timeout_s: float = 30.0) -> dict[str, Any]:
    """The ``exec`` request for a list argv (execvp) or a shell string (``sh -c``)."""
    payload: dict[str, Any] = {"op": "exec", "timeout_s": timeout_s,
                               "stdin": base64.b64encode(stdin).decode()}
    if isinstance(argv, str):
        payload["shell"] = argv
    else:
        payload["argv"] = list(argv)
    return payload


def decode_exec(reply: dict[str, Any]) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of an ``exec`` reply."""
    return (int(reply["exit_code"]), base64.b64decode(reply["stdout"]),
            base64.b64decode(reply["stderr"]))
