"""A VM holder's control socket: typed requests and replies, their codec, server and client.

Every process holding a VM (:mod:`ferry.node.holder`) listens on
``<run dir>/control.sock``. A client connects, sends one request line and
reads one reply line (UTF-8 JSON, ``\\n``-terminated, at most
:data:`MAX_LINE_BYTES`)::

    → {"op": "status"}
    ← {"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 4711, ...}
    → {"op": "exec", "argv": ["redis-cli", "dbsize"], "shell": null, "timeout_s": 30,
       "stdin": "<base64>"}
    ← {"ok": true, "op": "exec", "exit_code": 0, "outcome": "EXITED",
       "stdout": "<base64>", "stderr": "<base64>"}
    → {"op": "stop", "mode": "discard" | "suspend"}
    ← {"ok": true, "op": "stop", "mode": "suspend", "state_bytes": 72226, ...}
                                         (after the VM, its run dir and network are gone)
    → {"op": "migrate", "to": [HOST, PORT], "access": {...}, "precopy_only": false,
       "ram": "auto" | "qemu" | "engine"}
    → {"op": "migrate", "package": FILE, "key": KEYFILE | null, "overwrite": false}
    ← {"ok": true, "op": "migrate", "summary": {...}, "source": {...}, "destination": {...}}
    ← {"ok": true, "op": "export", "package": FILE, "key_id": ..., "state_bytes": ...}
    → {"op": "migrate-cancel"}         (Ctrl-C on the client: cancel unless handed off)
    ← {"ok": true, "op": "migrate-cancel", "cancelled": true, "reason": ""}
    ← {"ok": false, "error": "...", "kind": "LiveMigrationError", "handed_off": false}
    → {"op": "session", "argv": [...] | null, "shell": null | "...", "tty": true,
       "rows": 24, "cols": 80, "term": "xterm"}
    ← {"ok": true, "op": "session", "pid": 231}      then frames both ways (below)
    → {"op": "attach"}
    ← {"ok": true, "op": "attach"}                   then frames both ways (below)
    ← {"ok": false, "error": "... already attached ...", "kind": "ConsoleBusyError"}

``session`` (``ferry vm exec -i/-t``) and ``attach`` (``ferry vm attach``) keep the
connection after the reply line: it carries the frames of :mod:`ferry.node.interactive`
until either side closes it. A holder serves one console attacher at a time.

Each message is a frozen dataclass; :func:`decode_request` and
:func:`decode_reply` check every field's type and raise
:class:`ControlProtocolError` on anything else. The socket is created
owner-only (umask 077) in a 0700 directory: whoever can use it controls the VM.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ferry.errors import ConfigError, FerryError
from ferry.guest.agent import ExecResult
from ferry.live.errors import LiveMigrationError, MalformedSummaryError
from ferry.live.rampath import RamPath
from ferry.migration.autocompress import LinkCompression
from ferry.net import PortForward
from ferry.node import history, interactive
from ferry.node.record import HolderState
from ferry.vm.errors import ControlError, VMNotFoundError
from ferry.vm.labels import check_labels
from ferry.vm.registry import check_vm_id
from ferry.vm.stopmode import StopMode

if TYPE_CHECKING:
    # Imported where a request or reply is decoded: TLS certificates (cryptography) and
    # the migration summary's codec cost every CLI command ~0.15 s otherwise.
    from ferry.live.access import Access
    from ferry.live.summary import MigrationSummary

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4 * 1024 * 1024
"""Covers an exec's 1 MiB stdin and 1 MiB of each output stream in base64."""
CONNECT_TIMEOUT_S = 5.0
MAX_FORWARDS = 64
MAX_MBIT = 1_000_000.0
MAX_TIMEOUT_S = 86_400.0
SERVER_DRAIN_S = 30.0
"""How long closing the socket waits for requests in flight (a ``stop`` waits for cleanup)."""


class ControlProtocolError(ControlError):
    """A control message that is not valid JSON, too long, or has a wrong field."""


class RemoteOpError(ControlError):
    """The holder ran the request and it failed there; ``kind`` is its error class."""

    def __init__(self, message: str, *, vm: str | None, kind: str) -> None:
        super().__init__(message, vm=vm)
        self.kind = kind


class ControlOp(enum.Enum):
    STATUS = "status"
    STOP = "stop"
    EXEC = "exec"
    MIGRATE = "migrate"
    MIGRATE_CANCEL = "migrate-cancel"
    CLAIM = "claim"
    SESSION = "session"
    ATTACH = "attach"


# -- requests ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusRequest:
    op = ControlOp.STATUS


@dataclass(frozen=True, slots=True)
class StopRequest:
    op = ControlOp.STOP
    mode: StopMode = StopMode.DISCARD


def _check_command(what: str, argv: tuple[str, ...] | None, shell: str | None) -> None:
    """An exec's or session's command: a list argv (execvp) or a shell string, never both."""
    if (argv is None) == (shell is None):
        raise ControlProtocolError(f"{what} needs exactly one of argv or shell")
    if argv is not None and not argv:
        raise ControlProtocolError(f"{what} needs a command")


def _command_fields(argv: Sequence[str] | str) -> dict[str, Any]:
    """``argv`` (a list, or a string for ``sh -c``) as the request's fields."""
    return {"shell": argv} if isinstance(argv, str) else {"argv": tuple(argv)}


def _command(argv: tuple[str, ...] | None, shell: str | None) -> list[str] | str:
    return list(argv) if argv is not None else str(shell)


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """A list argv (execvp) or a shell string (``sh -c``), never both."""

    op = ControlOp.EXEC
    argv: tuple[str, ...] | None = None
    shell: str | None = None
    stdin: bytes = b""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check_command("exec", self.argv, self.shell)
        if not self.timeout_s > 0:
            raise ControlProtocolError("exec timeout_s must be positive")

    @classmethod
    def of(cls, argv: Sequence[str] | str, *, stdin: bytes = b"",
           timeout_s: float = 30.0) -> ExecRequest:
        return cls(**_command_fields(argv), stdin=stdin, timeout_s=timeout_s)

    @property
    def command(self) -> list[str] | str:
        return _command(self.argv, self.shell)


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    """Live to ``to`` (authenticating with ``access``), or into the package file ``package``."""

    op = ControlOp.MIGRATE
    to: tuple[str, int] | None = None
    access: Access | None = None
    precopy_only: bool = False
    package: Path | None = None
    key: Path | None = None
    overwrite: bool = False
    ram: RamPath = RamPath.AUTO
    """How guest RAM moves (a live migration only)."""
    migration_id: str | None = None
    """The id the holder records the migration under (:mod:`ferry.node.history`); None:
    it makes one."""
    max_mbit: float | None = None
    """A cap on what the source sends, in Mbit/s (a live migration only)."""
    timeout_s: float | None = None
    """Cancel the migration if it has not handed off by then (the VM stays here)."""
    compression: LinkCompression = LinkCompression.AUTO
    """What QEMU's stream compresses on the link (a live migration only)."""

    def __post_init__(self) -> None:
        if self.max_mbit is not None and not 0 < self.max_mbit <= MAX_MBIT:
            raise ControlProtocolError(f"max_mbit must be in (0, {MAX_MBIT}]")
        if self.timeout_s is not None and not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ControlProtocolError(f"timeout_s must be in (0, {MAX_TIMEOUT_S}]")
        if self.migration_id is not None:
            try:
                history.check_id(self.migration_id)
            except ValueError as exc:
                raise ControlProtocolError(str(exc)) from None
        if (self.to is None) == (self.package is None):
            raise ControlProtocolError("migrate needs exactly one of to or package")
        if self.to is not None and self.access is None:
            raise ControlProtocolError("a live migration needs access")


@dataclass(frozen=True, slots=True)
class MigrateCancelRequest:
    op = ControlOp.MIGRATE_CANCEL


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Make a warm VM (``HolderState.WARM``) the VM ``vm_id`` with ``forwards``."""

    op = ControlOp.CLAIM
    vm_id: str
    forwards: tuple[PortForward, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_vm_id(self.vm_id)
            check_labels(self.labels)
        except ConfigError as exc:
            raise ControlProtocolError(str(exc)) from None
        if len(self.forwards) > MAX_FORWARDS:
            raise ControlProtocolError(f"at most {MAX_FORWARDS} forwards")


MAX_TERM_CHARS = 64


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A command with its stdio streamed (``exec -i``), on a pty with ``tty`` (``-t``)."""

    op = ControlOp.SESSION
    argv: tuple[str, ...] | None = None
    shell: str | None = None
    tty: bool = False
    rows: int = 0
    cols: int = 0
    term: str = ""

    def __post_init__(self) -> None:
        _check_command("session", self.argv, self.shell)
        if not (0 <= self.rows <= 0xFFFF and 0 <= self.cols <= 0xFFFF):
            raise ControlProtocolError(f"window size {self.rows}x{self.cols} out of range")
        if len(self.term) > MAX_TERM_CHARS or not self.term.isprintable():
            raise ControlProtocolError(f"term must be at most {MAX_TERM_CHARS} printable "
                                       f"characters")

    @classmethod
    def of(cls, argv: Sequence[str] | str, **options: Any) -> SessionRequest:
        return cls(**_command_fields(argv), **options)

    @property
    def command(self) -> list[str] | str:
        return _command(self.argv, self.shell)


@dataclass(frozen=True, slots=True)
class AttachRequest:
    """The guest's serial console, interactive (one attacher at a time)."""

    op = ControlOp.ATTACH


StreamRequest = SessionRequest | AttachRequest
Request = (StatusRequest | StopRequest | ExecRequest | MigrateRequest | MigrateCancelRequest
           | ClaimRequest | SessionRequest | AttachRequest)


# -- replies -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusReply:
    op = ControlOp.STATUS
    vm_id: str
    state: HolderState
    pid: int
    qemu_pid: int | None = None
    forwards: tuple[str, ...] = ()
    memory_io: Mapping[str, int] = field(default_factory=dict)
    """Guest RAM read through FUSE (``IoCounters`` as a mapping); empty when not running."""
    qemu_usage: Mapping[str, float] = field(default_factory=dict)
    """QEMU's CPU use so far; empty when not running."""
    migration: Mapping[str, Any] | None = None
    """A running live migration's progress (:mod:`ferry.live.progress`), else None."""
    disk_io: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Per disk: NBD reads, writes, their bytes, flushes (QEMU's requests so far)."""
    vitals: Mapping[str, Any] | None = None
    """The agent's liveness and guest RAM's dirty rate (:mod:`ferry.node.vitals`)."""
    mirror: Mapping[str, Any] | None = None
    """The VM's mirror to S3 and its recovery point (:class:`ferry.s3.mirror.MirrorStatus`)."""


@dataclass(frozen=True, slots=True)
class ClaimReply:
    """The claimed VM runs: its ready report (as ``ferry vm run --detach`` prints it)."""

    op = ControlOp.CLAIM
    ready: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StopReply:
    op = ControlOp.STOP
    mode: StopMode
    state_bytes: int | None = None
    flush_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ExecReply:
    op = ControlOp.EXEC
    exit_code: int
    outcome: str
    stdout: bytes
    stderr: bytes

    @classmethod
    def of(cls, result: ExecResult) -> ExecReply:
        return cls(result.exit_code, result.outcome.name, result.stdout, result.stderr)


@dataclass(frozen=True, slots=True)
class MigrateReply:
    """A finished live migration: its summary, and both sides' reports as they came."""

    op = ControlOp.MIGRATE
    summary: MigrationSummary
    source: Mapping[str, Any]
    destination: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ExportReply:
    """A VM stopped into a signed package (the reply of ``migrate`` with ``package``)."""

    op = ControlOp.MIGRATE  # answers a migrate request; encoded with op "export"
    package: str
    key_id: str
    state_bytes: int
    paused_s: float
    total_s: float
    name: str


@dataclass(frozen=True, slots=True)
class MigrateCancelReply:
    op = ControlOp.MIGRATE_CANCEL
    cancelled: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SessionReply:
    """The session's command started (``pid`` in the guest; 0 if it could not start:
    its EXIT frame follows)."""

    op = ControlOp.SESSION
    pid: int


@dataclass(frozen=True, slots=True)
class AttachReply:
    op = ControlOp.ATTACH


@dataclass(frozen=True, slots=True)
class ErrorReply:
    error: str
    kind: str
    handed_off: bool | None = None
    """For a failed migrate: whether the VM had already moved (it then runs there)."""


Reply = (StatusReply | StopReply | ExecReply | MigrateReply | ExportReply | MigrateCancelReply
         | ClaimReply | SessionReply | AttachReply | ErrorReply)


# -- codec ---------------------------------------------------------------------------------

T = TypeVar("T")


def _get(d: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...],
         default: Any = ...) -> T:
    if key not in d:
        if default is ...:
            raise ControlProtocolError(f"missing field {key!r}")
        value: T = default
        return value
    value = d[key]
    if value is None and default is None:
        return value
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ControlProtocolError(f"field {key!r} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise ControlProtocolError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _b64(text: str, key: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ControlProtocolError(f"field {key!r} is not base64") from exc


def _mapping(d: Mapping[str, Any], key: str, *, optional: bool = False) -> dict[str, Any] | None:
    return _get(d, key, dict, None if optional else ...)


PROGRESS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "phase": str, "bytes_sent": int, "cycles": int, "elapsed_s": (int, float)}


def _progress(value: Any) -> dict[str, Any] | None:
    """A status's ``migration``: None, or exactly :data:`PROGRESS_FIELDS`."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(PROGRESS_FIELDS):
        raise ControlProtocolError(f"bad migration progress {value!r:.200}")
    for key, kind in PROGRESS_FIELDS.items():
        _get(value, key, kind)
    return dict(value)


DISK_IO_FIELDS = ("reads", "read_bytes", "writes", "write_bytes", "flushes")
MAX_DISKS = 16
VITALS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "agent_up": bool, "agent_last_ok_s": (int, float, type(None)),
    "agent_rtt_ms": (int, float, type(None)), "agent_failures": int,
    "dirty_rate_mib_s": (int, float, type(None)), "dirty_rate_age_s": (int, float, type(None))}


def _disk_io(value: Any) -> dict[str, dict[str, int]]:
    """A status's ``disk_io``: at most :data:`MAX_DISKS` disks of :data:`DISK_IO_FIELDS`."""
    if not isinstance(value, dict) or len(value) > MAX_DISKS:
        raise ControlProtocolError(f"bad disk_io {value!r:.200}")
    out = {}
    for name, counters in value.items():
        if (not isinstance(name, str) or len(name) > 64 or not isinstance(counters, dict)
                or set(counters) != set(DISK_IO_FIELDS)):
            raise ControlProtocolError(f"bad disk_io entry {name!r:.40}")
        out[name] = {k: _get(counters, k, int) for k in DISK_IO_FIELDS}
    return out


def _vitals(value: Any) -> dict[str, Any] | None:
    """A status's ``vitals``: None, or exactly :data:`VITALS_FIELDS`."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(VITALS_FIELDS):
        raise ControlProtocolError(f"bad vitals {value!r:.200}")
    for key, kind in VITALS_FIELDS.items():
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise ControlProtocolError(f"bad vitals.{key} {value[key]!r:.40}")
    return dict(value)


MIRROR_FIELDS: dict[str, tuple[type, ...]] = {
    "url": (str,), "state": (str,), "checkpoints": (int,), "sequence": (int,),
    "started_unix_s": (int, float), "last_checkpoint_unix_s": (int, float, type(None)),
    "recovery_point_s": (int, float), "last_pause_ms": (int, float, type(None)),
    "max_pause_ms": (int, float, type(None)), "last_upload_s": (int, float, type(None)),
    "bytes_uploaded": (int,), "failures": (int,), "last_error": (str, type(None))}


def _mirror(value: Any) -> dict[str, Any] | None:
    """A status's ``mirror``: None, or exactly :data:`MIRROR_FIELDS`."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(MIRROR_FIELDS):
        raise ControlProtocolError(f"bad mirror {value!r:.200}")
    for key, kinds in MIRROR_FIELDS.items():
        v = value[key]
        if not isinstance(v, kinds) or isinstance(v, bool) or (
                isinstance(v, str) and len(v) > 4096):
            raise ControlProtocolError(f"bad mirror.{key} {v!r:.40}")
    return dict(value)


def _address(value: Any) -> tuple[str, int]:
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], int) or isinstance(value[1], bool)
            or not 0 < value[1] < 65536):
        raise ControlProtocolError(f"bad address {value!r}: use [HOST, PORT]")
    return value[0], value[1]


def _str_tuple(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ControlProtocolError(f"field {key!r} must be a list of strings")
    return tuple(value)


def _load(line: bytes) -> tuple[dict[str, Any], ControlOp | None]:
    if len(line) > MAX_LINE_BYTES:
        raise ControlProtocolError(f"message of {len(line)} bytes is over the "
                                   f"{MAX_LINE_BYTES}-byte limit")
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlProtocolError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ControlProtocolError("a control message is a JSON object")
    op = data.get("op")
    if op is None:
        return data, None
    if op == "export":
        return data, ControlOp.MIGRATE
    try:
        return data, ControlOp(op)
    except ValueError as exc:
        raise ControlProtocolError(f"unknown op {op!r}") from exc


def _dump(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


def encode_request(req: Request) -> bytes:
    match req:
        case ClaimRequest():
            return _encode_claim(req)
        case StopRequest(mode=mode):
            return _dump({"op": req.op.value, "mode": mode.value})
        case ExecRequest():
            return _dump({"op": req.op.value, "argv": None if req.argv is None
                          else list(req.argv), "shell": req.shell, "timeout_s": req.timeout_s,
                          "stdin": base64.b64encode(req.stdin).decode()})
        case SessionRequest():
            return _dump({"op": req.op.value, "argv": None if req.argv is None
                          else list(req.argv), "shell": req.shell, "tty": req.tty,
                          "rows": req.rows, "cols": req.cols, "term": req.term})
        case MigrateRequest():
            return _dump({"op": req.op.value, "to": None if req.to is None else list(req.to),
                          "access": None if req.access is None else req.access.to_json(),
                          "precopy_only": req.precopy_only, "ram": req.ram.value,
                          "package": None if req.package is None else str(req.package),
                          "key": None if req.key is None else str(req.key),
                          "overwrite": req.overwrite, "migration_id": req.migration_id,
                          "max_mbit": req.max_mbit, "timeout_s": req.timeout_s,
                          "compression": req.compression.value})
        case _:
            return _dump({"op": req.op.value})


def _encode_claim(req: ClaimRequest) -> bytes:
    return _dump({"op": req.op.value, "vm_id": req.vm_id,
                  "forwards": [f.to_json() for f in req.forwards], "labels": dict(req.labels)})


def decode_request(line: bytes) -> Request:
    """The request in ``line``; :class:`ControlProtocolError` if it is not a valid one."""
    d, op = _load(line)
    match op:
        case ControlOp.STATUS:
            return StatusRequest()
        case ControlOp.MIGRATE_CANCEL:
            return MigrateCancelRequest()
        case ControlOp.ATTACH:
            return AttachRequest()
        case ControlOp.SESSION:
            argv = d.get("argv")
            return SessionRequest(argv=None if argv is None else _str_tuple(argv, "argv"),
                                  shell=_get(d, "shell", str, None),
                                  tty=_get(d, "tty", bool, False), rows=_get(d, "rows", int, 0),
                                  cols=_get(d, "cols", int, 0), term=_get(d, "term", str, ""))
        case ControlOp.CLAIM:
            forwards = d.get("forwards", [])
            if not isinstance(forwards, list) or len(forwards) > MAX_FORWARDS:
                raise ControlProtocolError(f"forwards must be a list of at most {MAX_FORWARDS}")
            try:
                parsed = tuple(PortForward.from_json(f) for f in forwards)
            except (FerryError, TypeError, ValueError, KeyError) as exc:
                raise ControlProtocolError(f"bad forward: {exc}") from None
            return ClaimRequest(_get(d, "vm_id", str), parsed, _get(d, "labels", dict, {}))
        case ControlOp.STOP:
            try:
                return StopRequest(StopMode(_get(d, "mode", str, "discard")))
            except ValueError as exc:
                raise ControlProtocolError(f"bad stop mode {d.get('mode')!r}") from exc
        case ControlOp.EXEC:
            argv = d.get("argv")
            return ExecRequest(argv=None if argv is None else _str_tuple(argv, "argv"),
                               shell=_get(d, "shell", str, None),
                               stdin=_b64(_get(d, "stdin", str, ""), "stdin"),
                               timeout_s=float(_get(d, "timeout_s", (int, float), 30.0)))
        case ControlOp.MIGRATE:
            to = d.get("to")
            package = _get(d, "package", str, None)
            key = _get(d, "key", str, None)
            access = d.get("access")
            from ferry.live.access import Access

            try:
                parsed_access = None if access is None else Access.from_json(access)
            except (ConfigError, KeyError, TypeError) as exc:
                raise ControlProtocolError(f"bad access: {exc}") from exc
            ram = _get(d, "ram", str, RamPath.AUTO.value)
            try:
                ram_path = RamPath(ram)
            except ValueError as exc:
                raise ControlProtocolError(f"bad ram path {ram!r:.40}") from exc
            compression = _get(d, "compression", str, "auto")
            try:
                link_compression = LinkCompression(compression)
            except ValueError as exc:
                raise ControlProtocolError(f"bad compression {compression!r:.40}") from exc
            return MigrateRequest(to=None if to is None else _address(to), access=parsed_access,
                                  precopy_only=_get(d, "precopy_only", bool, False),
                                  ram=ram_path,
                                  package=None if package is None else Path(package),
                                  key=None if key is None else Path(key),
                                  overwrite=_get(d, "overwrite", bool, False),
                                  migration_id=_get(d, "migration_id", str, None),
                                  max_mbit=_get(d, "max_mbit", (int, float), None),
                                  timeout_s=_get(d, "timeout_s", (int, float), None),
                                  compression=link_compression)
        case None:
            raise ControlProtocolError("the request has no op")


def encode_reply(reply: Reply) -> bytes:
    match reply:
        case ErrorReply():
            return _dump({"ok": False, "error": reply.error, "kind": reply.kind,
                          "handed_off": reply.handed_off})
        case StatusReply():
            return _dump({"ok": True, "op": reply.op.value, "vm_id": reply.vm_id,
                          "state": reply.state.value, "pid": reply.pid, "qemu_pid": reply.qemu_pid,
                          "forwards": list(reply.forwards), "memory_io": dict(reply.memory_io),
                          "qemu_usage": dict(reply.qemu_usage),
                          "migration": None if reply.migration is None
                          else dict(reply.migration),
                          "disk_io": {k: dict(v) for k, v in reply.disk_io.items()},
                          "vitals": None if reply.vitals is None else dict(reply.vitals),
                          "mirror": None if reply.mirror is None else dict(reply.mirror)})
        case StopReply():
            return _dump({"ok": True, "op": reply.op.value, "mode": reply.mode.value,
                          "state_bytes": reply.state_bytes, "flush_bytes": reply.flush_bytes})
        case ExecReply():
            return _dump({"ok": True, "op": reply.op.value, "exit_code": reply.exit_code,
                          "outcome": reply.outcome,
                          "stdout": base64.b64encode(reply.stdout).decode(),
                          "stderr": base64.b64encode(reply.stderr).decode()})
        case MigrateReply():
            return _dump({"ok": True, "op": reply.op.value, "summary": reply.summary.to_json(),
                          "source": dict(reply.source),
                          "destination": None if reply.destination is None
                          else dict(reply.destination)})
        case ExportReply():
            return _dump({"ok": True, "op": "export", "package": reply.package,
                          "key_id": reply.key_id, "state_bytes": reply.state_bytes,
                          "paused_s": reply.paused_s, "total_s": reply.total_s,
                          "name": reply.name})
        case MigrateCancelReply():
            return _dump({"ok": True, "op": reply.op.value, "cancelled": reply.cancelled,
                          "reason": reply.reason})
        case ClaimReply():
            return _dump({"ok": True, "op": reply.op.value, "ready": dict(reply.ready)})
        case SessionReply():
            return _dump({"ok": True, "op": reply.op.value, "pid": reply.pid})
        case AttachReply():
            return _dump({"ok": True, "op": reply.op.value})


def decode_reply(line: bytes) -> Reply:
    """The reply in ``line``; :class:`ControlProtocolError` if it is not a valid one."""
    d, op = _load(line)
    if _get(d, "ok", bool) is False:
        return ErrorReply(_get(d, "error", str), _get(d, "kind", str, "Error"),
                          _get(d, "handed_off", bool, None))
    num = (int, float)
    match op:
        case ControlOp.STATUS:
            try:
                state = HolderState(_get(d, "state", str))
            except ValueError as exc:
                raise ControlProtocolError(f"bad state {d.get('state')!r}") from exc
            return StatusReply(_get(d, "vm_id", str), state, _get(d, "pid", int),
                               _get(d, "qemu_pid", int, None),
                               _str_tuple(d.get("forwards", []), "forwards"),
                               _mapping(d, "memory_io") or {}, _mapping(d, "qemu_usage") or {},
                               _progress(d.get("migration")), _disk_io(d.get("disk_io", {})),
                               _vitals(d.get("vitals")), _mirror(d.get("mirror")))
        case ControlOp.STOP:
            try:
                mode = StopMode(_get(d, "mode", str))
            except ValueError as exc:
                raise ControlProtocolError(f"bad stop mode {d.get('mode')!r}") from exc
            return StopReply(mode, _get(d, "state_bytes", int, None),
                             _get(d, "flush_bytes", int, None))
        case ControlOp.EXEC:
            return ExecReply(_get(d, "exit_code", int), _get(d, "outcome", str),
                             _b64(_get(d, "stdout", str), "stdout"),
                             _b64(_get(d, "stderr", str), "stderr"))
        case ControlOp.MIGRATE if d.get("op") == "export":
            return ExportReply(_get(d, "package", str), _get(d, "key_id", str),
                               _get(d, "state_bytes", int), float(_get(d, "paused_s", num)),
                               float(_get(d, "total_s", num)), _get(d, "name", str))
        case ControlOp.MIGRATE:
            from ferry.live.summary import MigrationSummary

            try:
                summary = MigrationSummary.from_json(_mapping(d, "summary"))
            except MalformedSummaryError as exc:
                raise ControlProtocolError(str(exc)) from exc
            source = _mapping(d, "source")
            assert source is not None
            return MigrateReply(summary, source, _mapping(d, "destination", optional=True))
        case ControlOp.MIGRATE_CANCEL:
            return MigrateCancelReply(_get(d, "cancelled", bool), _get(d, "reason", str, ""))
        case ControlOp.CLAIM:
            ready = _mapping(d, "ready")
            assert ready is not None
            return ClaimReply(ready)
        case ControlOp.SESSION:
            return SessionReply(_get(d, "pid", int))
        case ControlOp.ATTACH:
            return AttachReply()
        case None:
            raise ControlProtocolError("the reply has no op")


# -- server --------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Reply]]
StreamHandler = Callable[[StreamRequest, "Channel"], Awaitable[None]]


class Channel:
    """One control connection turned into an interactive stream (:mod:`ferry.node.interactive`).

    On the holder's side :meth:`accept` writes the reply line first; on the
    client's, :meth:`ControlClient.stream` has read it. :meth:`receive`
    returns None when the other side closed the connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = interactive.Decoder()
        self.accepted = False

    async def accept(self, reply: Reply) -> None:
        """The holder's reply line; the stream starts after it."""
        self._writer.write(encode_reply(reply))
        await self._writer.drain()
        self.accepted = True

    async def send(self, event: interactive.Event) -> None:
        self._writer.write(interactive.encode(event))
        await self._writer.drain()

    async def receive(self) -> interactive.Event | None:
        while (event := self._decoder.next_event()) is None:
            data = await self._reader.read(65536)
            if not data:
                return None
            self._decoder.receive_data(data)
        return event

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def error_reply(exc: BaseException) -> ErrorReply:
    handed_off = exc.handed_off if isinstance(exc, LiveMigrationError) else None
    return ErrorReply(str(exc), type(exc).__name__, handed_off)


@contextlib.asynccontextmanager
async def serve_control(path: Path, handler: Handler,
                        stream_handler: StreamHandler | None = None) -> AsyncIterator[None]:
    """Serve ``handler`` on the UNIX socket ``path`` until the block exits.

    ``session`` and ``attach`` requests go to ``stream_handler``, which accepts
    (:meth:`Channel.accept`) and then owns the connection until it returns; if
    it raises before accepting, the error is the reply. Leaving waits for
    requests in flight (a ``stop`` replies after the VM is gone, which happens
    inside this block), cancels interactive streams and removes the socket.
    """
    tasks: set[asyncio.Task[None]] = set()
    streams: set[asyncio.Task[None]] = set()

    async def serve_stream(req: StreamRequest, channel: Channel) -> Reply | None:
        if stream_handler is None:
            return ErrorReply(f"{req.op.value} is not served here", ControlError.__name__)
        task = asyncio.current_task()
        assert task is not None
        streams.add(task)
        try:
            await stream_handler(req, channel)
        except Exception as exc:
            if not channel.accepted:
                raise
            log.info("%s stream ended: %s", req.op.value, exc)
        finally:
            streams.discard(task)
        return None

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            reply: Reply | None
            try:
                req = decode_request(await reader.readuntil(b"\n"))
                if isinstance(req, SessionRequest | AttachRequest):
                    reply = await serve_stream(req, Channel(reader, writer))
                else:
                    reply = await handler(req)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                reply = ErrorReply(f"bad request: {exc}", ControlProtocolError.__name__)
            except ControlProtocolError as exc:
                reply = ErrorReply(f"bad request: {exc}", type(exc).__name__)
            except Exception as exc:
                log.info("control request failed: %s", exc)
                reply = error_reply(exc)
            if reply is not None:
                writer.write(encode_reply(reply))
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
        for stream in list(streams):  # an attached console must not hold the VM's ending
            stream.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=SERVER_DRAIN_S)
        _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- client --------------------------------------------------------------------------------

R = TypeVar("R", StatusReply, StopReply, ExecReply, MigrateCancelReply, ClaimReply)


@dataclass(frozen=True, slots=True)
class ControlClient:
    """Requests to the holder of ``vm_id`` on ``socket``; typed replies, typed errors.

    A failed ``migrate`` raises :class:`LiveMigrationError` (its ``handed_off``
    says where the VM runs); any other failed op :class:`RemoteOpError`; a VM
    that does not run here :class:`VMNotFoundError`.
    """

    socket: Path
    vm_id: str | None = None

    async def status(self) -> StatusReply:
        return await self._expect(StatusRequest(), StatusReply, 10.0)

    async def stop(self, mode: StopMode = StopMode.DISCARD, *,
                   timeout_s: float = 120.0) -> StopReply:
        return await self._expect(StopRequest(mode), StopReply, timeout_s)

    async def exec(self, argv: Sequence[str] | str, *, stdin: bytes = b"",
                   timeout_s: float = 30.0) -> ExecReply:
        return await self._expect(ExecRequest.of(argv, stdin=stdin, timeout_s=timeout_s),
                                  ExecReply, timeout_s + 10.0)

    async def claim(self, vm_id: str, forwards: Sequence[PortForward] = (),
                    labels: Mapping[str, str] | None = None, *,
                    timeout_s: float = 120.0) -> ClaimReply:
        """Make this warm VM the VM ``vm_id``; returns once it runs."""
        return await self._expect(ClaimRequest(vm_id, tuple(forwards), dict(labels or {})),
                                  ClaimReply, timeout_s)

    async def migrate_cancel(self) -> MigrateCancelReply:
        return await self._expect(MigrateCancelRequest(), MigrateCancelReply, 10.0)

    async def migrate(self, req: MigrateRequest, *,
                      timeout_s: float = 3600.0) -> MigrateReply | ExportReply:
        reply = await self.send(req, timeout_s=timeout_s)
        if isinstance(reply, ErrorReply):
            where = ("it runs on the destination" if reply.handed_off
                     else "the VM keeps running here")
            raise LiveMigrationError(f"{reply.error} ({where})", vm=self.vm_id,
                                     handed_off=bool(reply.handed_off))
        if not isinstance(reply, MigrateReply | ExportReply):
            raise ControlProtocolError(f"a {reply.op.value} reply to migrate", vm=self.vm_id)
        return reply

    @contextlib.asynccontextmanager
    async def stream(self, req: StreamRequest, *,
                     timeout_s: float = 60.0) -> AsyncIterator[tuple[Reply, Channel]]:
        """Open a ``session`` or ``attach`` stream: its accept reply and the channel.

        A refusal raises :class:`RemoteOpError` (``kind`` names the holder's error,
        e.g. ``ConsoleBusyError``); leaving closes the connection.
        """
        reader, writer = await self._connect()
        channel = Channel(reader, writer)
        try:
            try:
                writer.write(encode_request(req))
                await writer.drain()
                async with asyncio.timeout(timeout_s):
                    line = await reader.readline()
            except (OSError, TimeoutError, ValueError) as exc:
                raise ControlError(f"{req.op.value}: no reply from the VM's holder ({exc!r})",
                                   vm=self.vm_id) from exc
            if not line:
                raise ControlError(f"{req.op.value}: the VM's holder closed the connection",
                                   vm=self.vm_id)
            reply = decode_reply(line)
            if isinstance(reply, ErrorReply):
                raise RemoteOpError(f"{req.op.value} failed: {reply.error}", vm=self.vm_id,
                                    kind=reply.kind)
            yield reply, channel
        finally:
            await channel.aclose()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the connection
            # and drops a cancellation that arrives as the connect completes (a progress
            # reporter then never stopped, and `ferry vm migrate` never exited).
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await asyncio.open_unix_connection(os.fspath(self.socket),
                                                          limit=MAX_LINE_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise VMNotFoundError("no such VM runs on this host (see 'ferry vm list')",
                                  vm=self.vm_id) from exc
        except (OSError, TimeoutError) as exc:
            raise ControlError(f"cannot reach the VM's holder on {self.socket}: {exc}",
                               vm=self.vm_id) from exc

    async def _expect(self, req: Request, kind: type[R], timeout_s: float) -> R:
        reply = await self.send(req, timeout_s=timeout_s)
        if isinstance(reply, ErrorReply):
            raise RemoteOpError(f"{req.op.value} failed: {reply.error}", vm=self.vm_id,
                                kind=reply.kind)
        if not isinstance(reply, kind):
            raise ControlProtocolError(f"a {type(reply).__name__} answered {req.op.value}",
                                       vm=self.vm_id)
        return reply

    async def send(self, req: Request, *, timeout_s: float) -> Reply:
        """One request, its reply as it came (an :class:`ErrorReply` is returned)."""
        reader, writer = await self._connect()
        try:
            writer.write(encode_request(req))
            await writer.drain()
            async with asyncio.timeout(timeout_s):
                line = await reader.readline()
        except (OSError, TimeoutError, ValueError) as exc:
            raise ControlError(f"{req.op.value}: no reply from the VM's holder ({exc!r})",
                               vm=self.vm_id) from exc
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if not line:
            raise ControlError(f"{req.op.value}: the VM's holder closed the connection",
                               vm=self.vm_id)
        return decode_reply(line)
