"""The VM manifest: what a snapshot package holds and how to resume it.

A package directory written by :func:`ferry.vm.snapshot.snapshot` looks like::

    manifest.json          this manifest (also embedded in the signed package header)
    memory                 guest RAM, raw, memory_mib MiB (mostly holes)
    state.bin              QEMU's device state (migration stream without RAM)
    disks/root.img         the root disk (raw ext4)
    boot/vmlinuz           the kernel, boot/initramfs.cpio
    hashes/<device>.xxh3   XXH3-128 of every block of a device, 16 bytes each, in order

The manifest (``format`` = ``ferry-vm``, ``version`` = 1) records the machine
QEMU must recreate exactly (machine type, CPU model, vCPUs, memory size,
the QEMU version that saved the state,
accelerator, the device set implied by ``agent`` and ``network``), every
device's size and block size, the agent settings and the guest network
settings baked in at boot. Block hashes are XXH3-128 (``ferry.storage.hashing``)
like the migration protocol's; the package signature covers them through the
SHA-256 of every file, so they need no cryptographic strength of their own.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from ferry.shape import MachineShape
from ferry.vm.errors import ManifestError

FORMAT = "ferry-vm"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MEMORY_PATH = "memory"
STATE_PATH = "state.bin"
KERNEL_PATH = "boot/vmlinuz"
INITRAMFS_PATH = "boot/initramfs.cpio"
BOOT_CONSOLE_PATH = "boot-console.log"
"""In a package directory made on this host (``ferry vm run oci://``): the console of the
boot its snapshot was taken in, which ``ferry vm logs`` shows before the VM's own."""
MAX_MANIFEST_BYTES = 1024 * 1024
"""A manifest is about 2 KB; the cap keeps a hostile one from filling memory."""


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device file of the package and its block hashes."""

    name: str
    path: str
    size_bytes: int
    block_size_bytes: int
    hashes_path: str


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """The QEMU machine a resume must recreate exactly, as the manifest's JSON records it.

    The fields are the on-disk format (their names are the JSON keys); :attr:`shape`
    is the validated :class:`~ferry.shape.MachineShape` every user of the record takes.
    """

    machine: str
    cpu_model: str
    vcpus: int
    memory_mib: int
    accel: str
    qemu: str = ""
    """The QEMU version that saved the device state ("": not recorded, older packages)."""

    @classmethod
    def recording(cls, shape: MachineShape, *, accel: str, qemu: str) -> MachineSpec:
        """The record of a microvm of ``shape`` saved under ``accel`` by QEMU ``qemu``."""
        return cls(machine="microvm", cpu_model=shape.cpu_model, vcpus=shape.vcpus,
                   memory_mib=shape.memory_mib, accel=accel, qemu=qemu)

    @property
    def shape(self) -> MachineShape:
        """Memory, vCPUs and CPU model; ConfigError if they are out of the shape's bounds."""
        return MachineShape(self.memory_mib, self.vcpus, self.cpu_model)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The guest agent in the image and its hooks (run by the guest itself)."""

    enabled: bool
    before_suspend: tuple[str, ...] = ()
    after_resume: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GuestNetwork:
    """The guest's network as configured at boot (fixed for every VM, see ferry.net)."""

    ip: str
    prefix_len: int
    gateway: str
    mac: str


@dataclass(frozen=True, slots=True)
class VMManifest:
    """Everything needed to resume a snapshot; see the module docstring."""

    name: str
    blueprint: str
    image_key: str
    created: str
    machine: MachineSpec
    kernel_cmdline: str
    kernel: str
    initramfs: str
    state: str
    state_bytes: int
    memory: DeviceEntry
    disks: tuple[DeviceEntry, ...]
    agent: AgentSettings
    network: GuestNetwork
    readiness: str | None = None

    def __post_init__(self) -> None:
        for part in (self, self.machine, self.memory, *self.disks, self.agent, self.network):
            _check_types(part)
        if self.memory.size_bytes != self.machine.memory_mib * 1024 * 1024:
            raise ManifestError(f"memory device has {self.memory.size_bytes} bytes, the "
                                f"machine {self.machine.memory_mib} MiB")
        for entry in (self.memory, *self.disks):
            _check_rel(entry.path)
            _check_rel(entry.hashes_path)
            if entry.size_bytes <= 0 or entry.block_size_bytes <= 0:
                raise ManifestError(f"device {entry.name}: sizes must be positive")
        for rel in (self.kernel, self.initramfs, self.state):
            _check_rel(rel)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": FORMAT, "version": FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: object) -> VMManifest:
        """Validate a decoded manifest; raises :class:`ManifestError`."""
        if not isinstance(data, dict):
            raise ManifestError("the manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a ferry VM manifest (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest version {data.get('version')!r}")
        try:
            fields = {k: v for k, v in data.items() if k not in ("format", "version")}
            fields["machine"] = MachineSpec(**fields["machine"])
            fields["memory"] = DeviceEntry(**fields["memory"])
            fields["disks"] = tuple(DeviceEntry(**d) for d in fields["disks"])
            agent = fields["agent"]
            fields["agent"] = AgentSettings(
                enabled=agent["enabled"], before_suspend=tuple(agent["before_suspend"]),
                after_resume=tuple(agent["after_resume"]))
            fields["network"] = GuestNetwork(**fields["network"])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest: {exc!r:.300}") from exc

    @classmethod
    def load(cls, package_dir: Path) -> VMManifest:
        """Read ``package_dir/manifest.json``."""
        path = package_dir / MANIFEST_NAME
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} exceeds {MAX_MANIFEST_BYTES} bytes")
        try:
            return cls.from_json(json.loads(raw))
        except ValueError as exc:
            raise ManifestError(f"{path} is not JSON: {exc}") from exc

    def write(self, package_dir: Path) -> Path:
        path = package_dir / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return path


def _check_rel(rel: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"path {rel!r} must be relative, without '.' or '..'")


def _check_types(obj: Any) -> None:
    """Every field of a manifest dataclass holds the type its annotation names (a manifest
    may come from a peer: a string where a number belongs must not reach arithmetic)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ManifestError(f"manifest field {type(obj).__name__}.{f.name} has the wrong "
                                f"type ({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if isinstance(hint, type) and is_dataclass(hint):
        return isinstance(value, hint)
    return False
