"""The cluster's keys in etcd and the records stored under them.

::

    /ferry/nodes/<node>        NodeRecord   under the node's lease: gone when it stops
                                            heart-beating (lease expired) or leaves
    /ferry/state/<node>        NodeState    alive | dead | left (no lease: outlives it)
    /ferry/cordon/<node>       Cordon       present = no new VMs or migrations land there
    /ferry/vms/<vm>            Placement    which node holds the VM (no lease: a dead
                                            node's VMs stay known)
    /ferry/migrations/<id>     MigrationRecord   one VM moving between two nodes
    /ferry/operations/<id>     OperationRecord   an evacuation (drain, notice) and its result
    /ferry/drain/<node>        DrainRequest  ``ferry node drain``: the node watches its key

Every value is one JSON object (UTF-8, at most :data:`MAX_VALUE_BYTES`); a value that
does not decode, or lacks a field, is a :class:`~ferry.cluster.errors.ClusterError`
naming the key, never a crash. Names and ids are ``[a-z0-9-]`` (as VM ids are), so a
key never needs escaping and a prefix never matches a longer name by accident (every
prefix ends with ``/``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry.cluster.errors import ClusterError

ROOT = "/ferry/"
NODES = ROOT + "nodes/"
STATE = ROOT + "state/"
CORDON = ROOT + "cordon/"
VMS = ROOT + "vms/"
MIGRATIONS = ROOT + "migrations/"
OPERATIONS = ROOT + "operations/"
DRAIN = ROOT + "drain/"

MAX_VALUE_BYTES = 64 * 1024
"""A record is a few hundred bytes; anything far larger is not ferry's."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_name(name: str, what: str = "node name") -> str:
    if not _NAME_RE.match(name):
        raise ClusterError(f"{what} {name!r}: use 1-63 of [a-z0-9-], starting with a "
                           "letter or digit")
    return name


def key(prefix: str, name: str) -> bytes:
    return (prefix + check_name(name, "key name")).encode()


def name_of(prefix: str, raw_key: bytes) -> str:
    return raw_key.decode()[len(prefix):]


class NodeStatus(enum.StrEnum):
    ALIVE = "alive"
    DEAD = "dead"
    """Its lease expired: it stopped heart-beating without leaving."""
    LEFT = "left"
    """Its daemon stopped cleanly (its VMs may still run: they outlive the daemon)."""


class CordonReason(enum.StrEnum):
    MANUAL = "manual"  # ferry node cordon
    DRAIN = "drain"  # ferry node drain / POST /v1/node/drain
    NOTICE = "notice"  # a provider's preemption notice (ferry.spot)


class OpState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node says of itself, refreshed with every heartbeat."""

    name: str
    api: str
    """``HOST:PORT`` of its daemon's TCP API."""
    api_auth: list[str]
    """How the API authenticates: ``token``, ``mtls`` (the cluster's nodes share them)."""
    address: str
    """Where receivers for VMs migrating here listen (its host address)."""
    memory_bytes: int
    """Guest RAM this node offers to VMs."""
    max_vms: int
    memory_used_bytes: int = 0
    vms: int = 0
    max_incoming: int = 2
    """Migrations it accepts at once (each costs a receiver, CPU and link)."""
    heartbeat_at: float = 0.0
    version: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.memory_bytes < 0 or self.max_vms < 0 or self.max_incoming < 1:
            raise ClusterError(f"node {self.name}: capacity must be >= 0, "
                               "max_incoming >= 1")


@dataclass(frozen=True, slots=True)
class NodeState:
    status: NodeStatus
    since: float
    vms: list[str] = field(default_factory=list)
    """At death: the VMs its placement keys named (what was lost with it)."""


@dataclass(frozen=True, slots=True)
class Cordon:
    reason: CordonReason
    since: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Placement:
    vm: str
    node: str
    memory_bytes: int
    status: str
    updated: float
    mirror: dict[str, Any] | None = None
    """Where the VM is mirrored (:meth:`ferry.vm.mirroring.MirrorSpec.to_json`): if its
    node dies, another node restores it from there (:mod:`ferry.cluster.restore`)."""


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    id: str
    vm: str
    source: str
    target: str
    state: OpState
    started: float
    finished: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class OperationRecord:
    id: str
    kind: str
    node: str
    state: OpState
    started: float
    deadline_at: float
    finished: float | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DrainRequest:
    deadline_at: float
    """Wall-clock time (Unix seconds) every VM must be out by."""
    requested: float
    reason: CordonReason = CordonReason.DRAIN


R = TypeVar("R")


def encode(record: Any) -> bytes:
    return json.dumps(dataclasses.asdict(record), sort_keys=True).encode()


def decode(cls: type[R], raw: bytes, *, where: bytes | str = "") -> R:
    """``raw`` as a ``cls`` record; :class:`ClusterError` naming ``where`` if it is not
    one (too large, not JSON, a field missing or of the wrong type). Unknown fields are
    ignored (a newer ferry may add some)."""
    where = where.decode(errors="replace") if isinstance(where, bytes) else where
    if len(raw) > MAX_VALUE_BYTES:
        raise ClusterError(f"{where}: value of {len(raw)} bytes (at most {MAX_VALUE_BYTES})")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _coerce(f.name, hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and \
                    f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{f.name} missing")
        return cls(**kwargs)
    except ClusterError:
        raise
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"{where}: not a {cls.__name__} record ({exc})") from None


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        hint = args[0]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is Any:
        return value
    base = typing.get_origin(hint) or hint
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (isinstance(value, bool) and base is not bool):
        raise TypeError(f"{name} must be {getattr(hint, '__name__', hint)}, "
                        f"not {type(value).__name__}")
    if base is list and not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of strings")
    return value


def to_json(record: Any) -> dict[str, Any] | None:
    """A record as a JSON-ready dict (None stays None)."""
    return None if record is None else dict(json.loads(encode(record)))
