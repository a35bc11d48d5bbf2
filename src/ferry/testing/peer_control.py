"""Drive a :mod:`ferry.testing.peer` process on a host: the client side of its JSON lines.

Used by the end-to-end tests and ``bench/live_migrate.py``::

    async with PeerProcess.start(hosts["a"], args, log_path) as a:
        await a.request({"cmd": "boot", "rootfs": str(img.rootfs)})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.errors import FerryError
from ferry.testing.hosts import HostNamespace

PEER_MODULE = "ferry.testing.peer"


class PeerCommandError(FerryError):
    """A peer answered a command with ``ok: false``."""

    def __init__(self, cmd: str, reply: dict[str, Any]) -> None:
        super().__init__(f"peer {cmd} failed: {reply.get('error')}")
        self.reply = reply


class PeerProcess:
    """One running peer; replies and events are read by a background task."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._lock = asyncio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, host: HostNamespace, args: Sequence[str],
                    log_path: Path) -> AsyncIterator[PeerProcess]:
        argv = host.exec_argv([sys.executable, "-m", PEER_MODULE, "--host-ns", host.namespace,
                               "--host-address", host.address, "--log-file", str(log_path),
                               *args])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        peer = cls(proc, host.name)
        try:
            ready = await peer.next_event(timeout_s=60.0)
            if ready.get("event") != "ready":
                raise FerryError(f"peer on {host.name} did not start: {ready}")
            yield peer
        finally:
            await peer.close()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            (self._replies if "reply" in msg else self.events).put_nowait(msg)
        self.events.put_nowait({"event": "exited"})
        self._replies.put_nowait({"reply": None, "ok": False, "error": "peer exited"})

    async def request(self, req: dict[str, Any], *, timeout_s: float = 300.0,
                      check: bool = True) -> dict[str, Any]:
        """Send a command and wait for its reply (``PeerCommandError`` if not ok)."""
        async with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            await self.proc.stdin.drain()
            async with asyncio.timeout(timeout_s):
                reply = await self._replies.get()
        if check and not reply.get("ok"):
            raise PeerCommandError(str(req.get("cmd")), reply)
        return reply

    async def next_event(self, name: str | None = None, *,
                         timeout_s: float = 300.0) -> dict[str, Any]:
        """The next event (skipping others until ``name`` if given)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.events.get()
                if name is None or event.get("event") in (name, "exited"):
                    return event

    def kill(self) -> None:
        """SIGKILL the peer (its QEMU dies with it)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Ask the peer to quit; kill it if it does not exit in time."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        await cancel_and_wait(self._reader)
