"""A VM's checkpoint in a bucket: one record naming a consistent set of device checkpoints.

A mirrored VM (:mod:`ferry.s3.mirror`) lives under one prefix ``P/`` of a bucket::

    P/objects/<sha256 hex>                        content-addressed objects (device
                                                  objects, kernel, initramfs, device states)
    P/devices/<device>/<countdown>.manifest       each device's checkpoints (ferry.s3.device)
    P/vm/<2**64-1 - sequence:020d>.checkpoint     one VM checkpoint (this module)

A VM checkpoint record is a small JSON document::

    {"format": "ferry-vm-checkpoint", "version": 1,
     "sequence": 7, "created_unix_ns": 1764780000123456789,
     "vm_id": "web1", "package_id": "<hex>",
     "manifest": {...},                           the VM manifest (ferry.vm.manifest) as JSON
     "files": {"kernel": {"sha256": HEX, "size_bytes": N},
               "initramfs": {...}, "state": {...}},
     "devices": {"memory": 12, "disk.root": 9}}   device name -> its manifest's sequence

``created_unix_ns`` is when the VM was paused for this checkpoint: the guest RAM,
disks and device state it names are all of that moment (the *recovery point*).

Why a record is never torn: it is written last, create-only (``If-None-Match:
*``), after every device manifest and object it names is in the bucket; a
reader takes the newest record (keys count down, so the first one listed). An
interrupted checkpoint leaves the previous record the newest. The record is
read with a size bound and checked field by field before anything is trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ferry.errors import ConfigError
from ferry.s3.device import MAX_SEQUENCE, Layout
from ferry.s3.errors import (
    CheckpointConflictError,
    CheckpointNotFoundError,
    ManifestFormatError,
    ObjectCorruptError,
    ObjectMissingError,
    S3ConflictError,
    S3NotFoundError,
    S3ObjectTooLargeError,
)
from ferry.s3.store import ObjectStore

FORMAT = "ferry-vm-checkpoint"
VERSION = 1
MAX_RECORD_BYTES = 2 << 20
"""A record is a few KB (the VM manifest is about 2 KB); the bound keeps a hostile one small."""
MAX_FILE_BYTES = 1 << 30
"""Kernel, initramfs and device state are read whole; 1 GiB bounds such a read."""
FILES = ("kernel", "initramfs", "state")
_KEY = re.compile(r"(\d{20})\.checkpoint")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class FileRef:
    """A content-addressed object: its SHA-256 and length."""

    sha256: str
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size_bytes": self.size_bytes}


@dataclass(frozen=True, slots=True)
class VMCheckpoint:
    """One complete, consistent checkpoint of a mirrored VM."""

    sequence: int
    created_unix_ns: int
    vm_id: str
    package_id: str
    manifest: dict[str, Any]
    files: dict[str, FileRef]
    devices: dict[str, int]

    def __post_init__(self) -> None:
        if not 1 <= self.sequence < MAX_SEQUENCE:
            raise ConfigError(f"VM checkpoint sequence {self.sequence} out of range")
        if set(self.files) != set(FILES):
            raise ConfigError(f"VM checkpoint files must be {FILES}, not {sorted(self.files)}")
        for name, seq in self.devices.items():
            if not _DEVICE.fullmatch(name) or not 1 <= seq < MAX_SEQUENCE:
                raise ConfigError(f"VM checkpoint device {name!r}: {seq}")

    @property
    def created_unix_s(self) -> float:
        return self.created_unix_ns / 1e9

    def encode(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "version": VERSION, "sequence": self.sequence,
            "created_unix_ns": self.created_unix_ns, "vm_id": self.vm_id,
            "package_id": self.package_id, "manifest": self.manifest,
            "files": {k: v.to_json() for k, v in self.files.items()},
            "devices": self.devices}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, *, key: str) -> VMCheckpoint:
        """Parse and check a record; :class:`ManifestFormatError` if it is not a valid one."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError("not a ferry VM checkpoint")
            if d.get("version") != VERSION:
                raise ValueError(f"version {d.get('version')!r}, this ferry reads {VERSION}")
            files = {}
            for name, ref in dict(d["files"]).items():
                sha, size = ref["sha256"], ref["size_bytes"]
                if (not isinstance(sha, str) or not _HEX64.fullmatch(sha)
                        or type(size) is not int or not 0 <= size <= MAX_FILE_BYTES):
                    raise ValueError(f"bad file {name!r}")
                files[str(name)] = FileRef(sha, size)
            devices = {str(k): v for k, v in dict(d["devices"]).items()}
            if any(type(v) is not int for v in devices.values()):
                raise ValueError("device sequences must be integers")
            for field in ("sequence", "created_unix_ns"):
                if type(d[field]) is not int or d[field] < 0:
                    raise ValueError(f"bad {field}")
            if not isinstance(d["manifest"], dict):
                raise ValueError("bad manifest")
            return cls(d["sequence"], d["created_unix_ns"], str(d["vm_id"]),
                       str(d["package_id"]), d["manifest"], files, devices)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ManifestFormatError(f"VM checkpoint: {exc}", key=key) from exc


def record_key(layout: Layout, sequence: int) -> str:
    """Keys count down, as device manifests do: the newest record is listed first."""
    if not 1 <= sequence < MAX_SEQUENCE:
        raise ConfigError(f"VM checkpoint sequence {sequence} out of range")
    return f"{layout.root}vm/{MAX_SEQUENCE - sequence:020d}.checkpoint"


def list_records(store: ObjectStore, layout: Layout, *, newest: int | None = None) -> list[int]:
    """Sequences of the VM checkpoints under ``layout``, newest first (blocking)."""
    prefix = f"{layout.root}vm/"
    found = []
    for info in store.list(prefix, limit=newest):
        match = _KEY.fullmatch(info.key[len(prefix):])
        if match is not None and int(match.group(1)) < MAX_SEQUENCE:
            found.append(MAX_SEQUENCE - int(match.group(1)))
    return found


def load_record(store: ObjectStore, layout: Layout, sequence: int | None = None) -> VMCheckpoint:
    """The newest VM checkpoint (or ``sequence``); blocking. Raises
    :class:`CheckpointNotFoundError` if there is none, :class:`ManifestFormatError` if it
    is malformed (never a silent step back to an older one)."""
    if sequence is None:
        found = list_records(store, layout, newest=1)
        if not found:
            raise CheckpointNotFoundError(f"no VM checkpoint in s3://{store.bucket}/"
                                          f"{layout.root}vm/")
        sequence = found[0]
    key = record_key(layout, sequence)
    try:
        raw = store.get(key, max_bytes=MAX_RECORD_BYTES)
    except S3NotFoundError as exc:
        raise CheckpointNotFoundError(f"no VM checkpoint {sequence}: {exc}") from exc
    except S3ObjectTooLargeError as exc:
        raise ManifestFormatError(str(exc), key=key) from exc
    record = VMCheckpoint.decode(raw, key=key)
    if record.sequence != sequence:
        raise ManifestFormatError(f"holds sequence {record.sequence}, its name says "
                                  f"{sequence}", key=key)
    return record


def write_record(store: ObjectStore, layout: Layout, record: VMCheckpoint) -> int:
    """Write ``record`` create-only (blocking); returns its size. Raises
    :class:`CheckpointConflictError` if that sequence exists (another writer)."""
    raw = record.encode()
    try:
        store.put(record_key(layout, record.sequence), raw, create_only=True)
    except S3ConflictError as exc:
        raise CheckpointConflictError(f"VM checkpoint {record.sequence} was written by "
                                      "another writer first") from exc
    return len(raw)


def put_blob(store: ObjectStore, layout: Layout, data: bytes) -> FileRef:
    """Store ``data`` content-addressed (unless the bucket has it already); blocking."""
    digest = hashlib.sha256(data).digest()
    key = layout.object_key(digest)
    if store.size_of(key) != len(data):
        store.put(key, data)
    return FileRef(digest.hex(), len(data))


def get_blob(store: ObjectStore, layout: Layout, ref: FileRef) -> bytes:
    """The bytes of ``ref``, verified against its SHA-256 (blocking)."""
    key = layout.object_key(bytes.fromhex(ref.sha256))
    try:
        data = store.get(key, max_bytes=ref.size_bytes)
    except S3NotFoundError as exc:
        raise ObjectMissingError(f"named by a VM checkpoint but not in the bucket ({exc})",
                                 key=key) from exc
    except S3ObjectTooLargeError as exc:
        raise ObjectCorruptError(str(exc), key=key) from exc
    if len(data) != ref.size_bytes or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ObjectCorruptError("does not match its SHA-256: not used", key=key)
    return data
