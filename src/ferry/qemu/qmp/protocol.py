"""The QMP wire protocol as a sans-IO state machine: bytes in, messages out.

QMP is JSON objects, one per line (QEMU ends each with ``\\r\\n``)::

    S: {"QMP": {"version": {...}, "capabilities": [...]}}        greeting
    C: {"execute": "qmp_capabilities", "id": 1}
    S: {"return": {}, "id": 1}                                    now READY
    C: {"execute": "stop", "id": 2}
    S: {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}
    S: {"return": {}, "id": 2}
    C: {"execute": "nope", "id": 3}
    S: {"error": {"class": "CommandNotFound", "desc": "..."}, "id": 3}

Theory of operation. :class:`QMPProtocol` never touches a socket: feed it
what arrived with :meth:`~QMPProtocol.receive_data`, which returns the
complete messages it holds; ask it for the bytes of a command with
:meth:`~QMPProtocol.command`. States and the input that moves them::

    AWAITING_GREETING --greeting--> NEGOTIATING --reply to qmp_capabilities--> READY
    any state --close()/malformed input--> CLOSED

Only ``qmp_capabilities`` may be sent before READY. A line longer than
:data:`MAX_MESSAGE_BYTES`, invalid JSON, or a message of no known shape
raises :class:`QMPProtocolError` and closes the machine.
"""

from __future__ import annotations

import enum
import itertools
import json
from dataclasses import dataclass
from typing import Any, NoReturn

from ferry.qemu.qmp.errors import QMPProtocolError, QMPStateError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Longest accepted line. The biggest replies ferry asks for (query-qmp-schema,
about 200 KB on QEMU 7.2) fit many times over; a runaway peer does not."""

CAPABILITIES_COMMAND = "qmp_capabilities"


class QMPState(enum.Enum):
    AWAITING_GREETING = "awaiting-greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first message: its version and offered capabilities."""

    version: dict[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful command result."""

    id: int
    value: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed command: QEMU's error class and human description."""

    id: int
    error_class: str
    desc: str


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous event (``STOP``, ``RESUME``, ``MIGRATION`` ...)."""

    name: str
    data: dict[str, Any]
    timestamp_s: float


Message = Greeting | Reply | ErrorReply | Event


class QMPProtocol:
    """The client side of one QMP connection, without I/O."""

    def __init__(self) -> None:
        self.state = QMPState.AWAITING_GREETING
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._capabilities_id: int | None = None

    # -- outgoing --------------------------------------------------------------

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Encode a command; returns its id (to match the reply) and the bytes to send."""
        if self.state is QMPState.CLOSED:
            raise QMPStateError("the connection is closed")
        if name == CAPABILITIES_COMMAND:
            if self.state is not QMPState.NEGOTIATING or self._capabilities_id is not None:
                raise QMPStateError(f"{CAPABILITIES_COMMAND} is only valid once, after the "
                                    f"greeting (state {self.state.value})")
        elif self.state is not QMPState.READY:
            raise QMPStateError(f"cannot send {name!r} before capabilities are negotiated "
                                f"(state {self.state.value})")
        msg_id = next(self._ids)
        if name == CAPABILITIES_COMMAND:
            self._capabilities_id = msg_id
        msg: dict[str, Any] = {"execute": name, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        return msg_id, json.dumps(msg, separators=(",", ":")).encode() + b"\n"

    def close(self) -> None:
        self.state = QMPState.CLOSED
        self._buffer.clear()

    # -- incoming --------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Message]:
        """Buffer ``data``; return every complete message it finished, in order."""
        if self.state is QMPState.CLOSED:
            raise QMPStateError("the connection is closed")
        self._buffer += data
        messages: list[Message] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_MESSAGE_BYTES:
                    self._fail(f"message longer than {MAX_MESSAGE_BYTES} bytes")
                return messages
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if len(line) > MAX_MESSAGE_BYTES:
                self._fail(f"message longer than {MAX_MESSAGE_BYTES} bytes")
            if line:
                messages.append(self._parse(line))

    def _fail(self, reason: str) -> NoReturn:
        self.close()
        raise QMPProtocolError(reason)

    def _parse(self, line: bytes) -> Message:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(f"invalid JSON: {exc}: {line[:200]!r}")
        if not isinstance(obj, dict):
            self._fail(f"message is not a JSON object: {line[:200]!r}")
        msg = self._classify(obj, line)
        if isinstance(msg, Greeting):
            if self.state is not QMPState.AWAITING_GREETING:
                self._fail("unexpected second greeting")
            self.state = QMPState.NEGOTIATING
        elif self.state is QMPState.AWAITING_GREETING:
            self._fail(f"expected the greeting first, got {line[:200]!r}")
        elif isinstance(msg, Reply) and msg.id == self._capabilities_id:
            # An ErrorReply to it leaves the state NEGOTIATING; the caller raises it.
            self.state = QMPState.READY
        return msg

    def _classify(self, obj: dict[str, Any], line: bytes) -> Message:
        if "QMP" in obj:
            qmp = obj["QMP"]
            if not isinstance(qmp, dict):
                self._fail(f"malformed greeting: {line[:200]!r}")
            caps = qmp.get("capabilities", [])
            return Greeting(version=dict(qmp.get("version", {})),
                            capabilities=tuple(str(c) for c in caps))
        if "event" in obj:
            ts = obj.get("timestamp", {})
            seconds = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 \
                if isinstance(ts, dict) else 0.0
            data = obj.get("data", {})
            return Event(name=str(obj["event"]), data=data if isinstance(data, dict) else {},
                         timestamp_s=float(seconds))
        msg_id = obj.get("id")
        if not isinstance(msg_id, int) or isinstance(msg_id, bool):
            self._fail(f"reply without an integer id: {line[:200]!r}")
        if "return" in obj:
            return Reply(id=msg_id, value=obj["return"])
        if "error" in obj and isinstance(obj["error"], dict):
            err = obj["error"]
            return ErrorReply(id=msg_id, error_class=str(err.get("class", "GenericError")),
                              desc=str(err.get("desc", "")))
        self._fail(f"message of unknown shape: {line[:200]!r}")
