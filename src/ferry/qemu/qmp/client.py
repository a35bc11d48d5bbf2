"""An asyncio QMP client over a UNIX socket, wrapping :class:`QMPProtocol`.

::

    async with await QMPClient.connect_unix(path, name="vm1") as qmp:
        status = await qmp.execute("query-status")
        mark = qmp.event_mark()
        await qmp.execute("cont")
        await qmp.wait_event("RESUME", since=mark, timeout_s=5)

One reader task owns the socket's receiving side: it feeds the protocol
core, resolves the future of each reply by id and appends events to a
bounded history. When the connection ends (EOF, error, :meth:`close`) every
pending :meth:`execute` and :meth:`wait_event` fails with
:class:`QMPConnectionError` instead of hanging. Every message is traced at
DEBUG on a child logger per connection (``-->`` sent, ``<--`` received).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from ferry.errors import BrokenResourceError
from ferry.qemu.qmp.errors import (
    QMPConnectionError,
    QMPError,
    QMPStateError,
    QMPTimeoutError,
    command_error,
)
from ferry.qemu.qmp.protocol import (
    CAPABILITIES_COMMAND,
    ErrorReply,
    Event,
    Greeting,
    QMPProtocol,
    Reply,
)
from ferry.transport.streams import ConnectTimeoutError
from ferry.transport.unix import socket_when_listening

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
"""Default deadline of one command. Most commands answer in microseconds;
a paused TCG guest's ``quit`` or ``migrate`` can take a moment on a loaded host."""

EVENT_HISTORY = 1024
"""Events kept for :meth:`QMPClient.wait_event`; the oldest are dropped beyond it."""

_READ_CHUNK_BYTES = 64 * 1024


class ClientState(enum.Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event as received, with its arrival sequence number (see :meth:`event_mark`)."""

    seq: int
    event: Event

    @property
    def name(self) -> str:
        return self.event.name

    @property
    def data(self) -> dict[str, Any]:
        return self.event.data


class QMPClient:
    """One QMP connection. Build it with :meth:`connect_unix`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 name: str = "qmp") -> None:
        self.log = logger.getChild(name)
        self.state = ClientState.CONNECTING
        self.greeting: Greeting | None = None
        self._reader = reader
        self._writer = writer
        self._proto = QMPProtocol()
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._events: collections.deque[EventRecord] = collections.deque(maxlen=EVENT_HISTORY)
        self._seq = 0
        self._event_arrived = asyncio.Event()
        self._greeted: asyncio.Future[Greeting] = asyncio.get_running_loop().create_future()
        self._disconnect_reason = "not connected"
        self._task = asyncio.create_task(self._read_loop(), name=f"qmp-reader {name}")

    # -- construction ----------------------------------------------------------

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], *, name: str = "qmp",
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> QMPClient:
        """Connect to QEMU's ``-qmp unix:PATH,server=on`` and negotiate capabilities.

        Retries until the socket accepts (QEMU creates it while starting up)
        or ``timeout_s`` passes (:class:`QMPTimeoutError`).
        """
        address = os.fspath(path)
        deadline = time.monotonic() + timeout_s
        try:
            sock = await socket_when_listening(address, timeout_s=timeout_s)
        except ConnectTimeoutError as exc:
            raise QMPTimeoutError(f"QMP socket {address} not accepting: {exc}") from exc
        except BrokenResourceError as exc:
            raise QMPConnectionError(f"cannot connect to {address}: {exc}") from exc
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        client = cls(reader, writer, name=name)
        try:
            remaining = max(0.0, deadline - time.monotonic())
            await client._negotiate(timeout_s=max(remaining, 1.0))
        except BaseException:
            await client.close()
            raise
        return client

    async def _negotiate(self, *, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                self.greeting = await asyncio.shield(self._greeted)
        except TimeoutError as exc:
            raise QMPTimeoutError(f"no QMP greeting within {timeout_s} s") from exc
        await self._call(CAPABILITIES_COMMAND, None, timeout_s)
        self.state = ClientState.RUNNING
        self.log.debug("capabilities negotiated, QEMU %s",
                       self.greeting.version.get("qemu", self.greeting.version))

    # -- commands ----------------------------------------------------------------

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        """Run ``command`` and return its result (the ``return`` value).

        Raises :class:`QMPCommandError` (or a subclass) if QEMU answers with an
        error, :class:`QMPTimeoutError` after ``timeout_s``, and
        :class:`QMPConnectionError` if the connection is or gets lost.
        """
        if self.state is not ClientState.RUNNING:
            if self.state is ClientState.DISCONNECTED:
                raise QMPConnectionError(f"{command}: {self._disconnect_reason}")
            raise QMPStateError(f"{command}: client is {self.state.value}")
        return await self._call(command, arguments, timeout_s)

    async def _call(self, command: str, arguments: dict[str, Any] | None,
                    timeout_s: float) -> Any:
        if self.state is ClientState.DISCONNECTED:
            raise QMPConnectionError(f"{command}: {self._disconnect_reason}")
        msg_id, data = self._proto.command(command, arguments)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (command, future)
        try:
            self.log.debug("--> %s", data.decode().rstrip())
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                raise QMPConnectionError(f"{command}: cannot send: {exc}") from exc
            try:
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError as exc:
                raise QMPTimeoutError(f"{command}: no reply within {timeout_s} s") from exc
        finally:
            self._pending.pop(msg_id, None)

    # -- events ------------------------------------------------------------------

    def event_mark(self) -> int:
        """The sequence number of the latest event; pass it as ``since`` to wait
        only for events that arrive after this call (no race with a command's
        reply overtaking its event)."""
        return self._seq

    @property
    def events(self) -> list[EventRecord]:
        """The buffered event history, oldest first."""
        return list(self._events)

    async def wait_event(self, name: str, *, timeout_s: float, since: int = 0,
                         match: Callable[[Event], bool] | None = None) -> EventRecord:
        """The first event called ``name`` with sequence number above ``since``
        (and satisfying ``match``), waiting up to ``timeout_s`` for it."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for record in self._events:
                        if record.seq > since and record.name == name and (
                                match is None or match(record.event)):
                            return record
                    if self.state is ClientState.DISCONNECTED:
                        raise QMPConnectionError(
                            f"waiting for event {name}: {self._disconnect_reason}")
                    await self._event_arrived.wait()
        except TimeoutError as exc:
            raise QMPTimeoutError(f"no {name} event within {timeout_s} s") from exc

    # -- the reader ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "connection closed by QEMU"
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK_BYTES)
                if not data:
                    break
                for msg in self._proto.receive_data(data):
                    self._dispatch(msg)
        except QMPError as exc:
            reason = f"protocol error: {exc}"
            self.log.error("dropping connection: %s", exc)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        finally:
            self._disconnected(reason)

    def _dispatch(self, msg: Greeting | Reply | ErrorReply | Event) -> None:
        if isinstance(msg, Greeting):
            self.log.debug("<-- greeting %s", msg.version)
            if not self._greeted.done():
                self._greeted.set_result(msg)
            return
        if isinstance(msg, Event):
            self.log.debug("<-- event %s %s", msg.name, msg.data)
            self._seq += 1
            self._events.append(EventRecord(self._seq, msg))
            self._event_arrived.set()
            self._event_arrived = asyncio.Event()
            return
        entry = self._pending.get(msg.id)
        if entry is None:
            self.log.warning("<-- reply to unknown or abandoned id %d", msg.id)
            return
        command, future = entry
        if isinstance(msg, Reply):
            self.log.debug("<-- %s #%d ok %s", command, msg.id, _short(msg.value))
            if not future.done():
                future.set_result(msg.value)
        else:
            self.log.debug("<-- %s #%d error %s: %s", command, msg.id, msg.error_class, msg.desc)
            if not future.done():
                future.set_exception(command_error(command, msg.error_class, msg.desc))

    def _disconnected(self, reason: str) -> None:
        if self.state is ClientState.DISCONNECTED:
            return
        self.state = ClientState.DISCONNECTED
        self._disconnect_reason = reason
        self._proto.close()
        self.log.debug("disconnected: %s", reason)
        for command, future in self._pending.values():
            if not future.done():
                future.set_exception(QMPConnectionError(f"{command}: {reason}"))
        if not self._greeted.done():
            self._greeted.set_exception(QMPConnectionError(f"no greeting: {reason}"))
        self._event_arrived.set()
        with contextlib.suppress(Exception):
            self._writer.close()

    # -- lifecycle ---------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection; pending calls fail with QMPConnectionError. Idempotent."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            self._disconnected("client closed")
            if self._greeted.done() and not self._greeted.cancelled():
                self._greeted.exception()  # mark retrieved
            with contextlib.suppress(OSError, RuntimeError):
                await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
