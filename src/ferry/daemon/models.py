"""The API's request and reply bodies: pydantic models, validated before any work.

Requests forbid unknown fields and bound every size a client can choose;
replies are what ``/openapi.json`` documents.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 4096
MAX_PATH = 4096
MAX_ARGV = 256
MAX_PUBLISH = 64
VM_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- the node ---------------------------------------------------------------------------

class Accelerator(Reply):
    accel: str
    reason: str


class Capacity(Reply):
    cpus: int
    memory_bytes: int
    memory_available_bytes: int


class Node(Reply):
    name: str
    version: str
    qemu: str
    accelerator: Accelerator
    capacity: Capacity
    vms: int
    memory_committed_bytes: int
    warm_vms: int = 0
    """VMs resumed ahead of need, waiting to be claimed by a run (``--warm-vms``); their
    RAM is not in ``memory_committed_bytes``."""
    """Guest RAM of the running VMs (their packages' machine sizes)."""


# -- VMs --------------------------------------------------------------------------------

class VM(Reply):
    vm_id: str
    status: str
    """``running``, ``receiving``, ``migrating``, ``stopping`` or ``suspended``."""
    pid: int | None = None
    package: str | None = None
    forwards: list[str] = []
    resume_ms: float | None = None
    memory_bytes: int | None = None
    """Guest RAM (QEMU's ``-m``); None for a suspended VM."""
    started_at: float | None = None
    """Unix time its holder started (None: suspended)."""
    labels: dict[str, str] = {}
    mirror_to: dict[str, Any] | None = None
    """Where it is mirrored (url, interval_s, endpoint_url, region, profile), if it is."""


class VMDetail(VM):
    qemu_pid: int | None = None
    memory_io: dict[str, int] = {}
    qemu_usage: dict[str, float] = {}
    migration: dict[str, Any] | None = None
    """An outgoing migration's progress while one runs."""
    user_data: dict[str, Any] | None = None
    """How its user data went: kind, exit_code, duration_s, failed_step."""
    mirror: dict[str, Any] | None = None
    """Its mirror to S3 while it runs: state, checkpoints, recovery point, last pause."""


class MirrorTo(Request):
    """A bucket prefix to mirror a VM to (``--mirror s3://BUCKET/PREFIX`` and its options);
    credentials come from the node's own environment, never from a request."""

    url: str = Field(min_length=6, max_length=1024, pattern=r"^s3://[^\s]+$")
    interval_s: float = Field(default=2.0, gt=0, le=86400)
    endpoint_url: str | None = Field(default=None, max_length=MAX_TEXT)
    region: str | None = Field(default=None, max_length=64)
    profile: str | None = Field(default=None, max_length=128)


class RunVM(Request):
    """Run a signed package here (``ferry vm run FILE``), or an OCI image
(``ferry vm run oci://REF``: pulled, booted until ready and snapshotted once, then
resumed)."""

    package: str = Field(min_length=1, max_length=MAX_PATH,
                         description="path of the package file on this host, or oci://REF")
    name: str | None = Field(default=None, pattern=VM_ID_PATTERN)
    publish: list[str] = Field(default=[], max_length=MAX_PUBLISH,
                               description="forwards, as ferry vm run -p: [ADDR:]HOST:GUEST[/udp]")
    labels: dict[str, str] = Field(default={}, max_length=32,
                                   description="the VM's labels (KEY: VALUE)")
    service_address: str | None = Field(
        default=None, max_length=15, pattern=r"^[0-9.]+$",
        description="an IPv4 address of the hosts' network that follows the VM when it "
                    "migrates, as ferry vm run --service-address (no warm VM is claimed "
                    "for it)")
    env: list[str] = Field(default=[], max_length=MAX_ARGV,
                           description="NAME=VALUE, as ferry vm run -e: an oci:// image's "
                                       "process, or a package VM's /run/ferry/env and every "
                                       "command its agent starts")
    user_data: str | None = Field(
        default=None, max_length=64 * 1024,
        description="a '#!' script or '#cloud-config' (write_files, runcmd) run once "
                    "after the resume, as ferry vm run --user-data (packages only)")
    user_data_timeout_s: float = Field(default=300.0, gt=0, le=86400)
    volumes: list[str] = Field(default=[], max_length=16,
                               description="NAME[:DISK], as ferry vm run --volume (packages "
                                           "only; no warm VM is claimed for them)")
    entrypoint: str | None = Field(default=None, max_length=MAX_TEXT,
                                   description="oci:// only: replaces the image's entrypoint")
    args: list[str] = Field(default=[], max_length=MAX_ARGV,
                            description="oci:// only: replace the image's cmd")
    readiness: str | None = Field(default=None, max_length=MAX_TEXT,
                                  description="oci:// only: 'tcp:PORT' or a shell command")
    memory_mib: int | None = Field(default=None, ge=16, le=65536,
                                   description="oci:// only: guest RAM")
    mirror: MirrorTo | None = Field(
        default=None, description="mirror the running VM to a bucket prefix, as ferry vm "
                                  "run --mirror (no warm VM is claimed for it); in a "
                                  "cluster, a node that dies has its mirrored VMs "
                                  "restored elsewhere")


class RestoreVM(Request):
    """Resume a mirrored VM from the last complete checkpoint of its mirror (``ferry vm
    restore s3://BUCKET/PREFIX``)."""

    url: str = Field(min_length=6, max_length=1024, pattern=r"^s3://[^\s]+$")
    name: str | None = Field(default=None, pattern=VM_ID_PATTERN,
                             description="VM id here (default: the mirrored VM's)")
    endpoint_url: str | None = Field(default=None, max_length=MAX_TEXT)
    region: str | None = Field(default=None, max_length=64)
    profile: str | None = Field(default=None, max_length=128)
    publish: list[str] = Field(default=[], max_length=MAX_PUBLISH)
    mirror: MirrorTo | None = Field(default=None,
                                    description="mirror the restored VM to this (other) "
                                                "prefix")


class Volume(BaseModel):
    name: str
    size_bytes: int
    created_at: float
    in_use: bool
    """A running VM holds it."""
    path: str


class CreateVolume(Request):
    name: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?$")
    size_mib: int = Field(ge=1, le=1024 * 1024)


class ContinueVM(Request):
    """Continue a suspended VM."""

    publish: list[str] | None = Field(default=None, max_length=MAX_PUBLISH,
                                      description="forwards (default: the ones it had)")


class SnapshotVM(Request):
    """Stop the VM into a signed package (``ferry vm migrate ID --to-package FILE``)."""

    file: str = Field(min_length=1, max_length=MAX_PATH)
    overwrite: bool = False


class StopMode(enum.Enum):
    DISCARD = "discard"
    SUSPEND = "suspend"


class StopVM(Request):
    mode: StopMode = StopMode.DISCARD


class Stopped(Reply):
    vm_id: str
    mode: str
    state_bytes: int | None = None


class ExecVM(Request):
    argv: list[str] = Field(min_length=1, max_length=MAX_ARGV)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    stdin: str = Field(default="", max_length=1024 * 1024)


class Executed(Reply):
    exit_code: int
    outcome: str
    stdout: str
    stderr: str


class MigrateVM(Request):
    """Live-migrate to a ``ferry vm receive`` on another host."""

    to: str = Field(pattern=r"^[^\s:]{1,255}:[0-9]{1,5}$", description="HOST:PORT")
    token: str | None = Field(default=None, max_length=MAX_TEXT,
                              description="the receiver's one-time token")
    tls_cert: str | None = Field(default=None, max_length=MAX_PATH)
    tls_key: str | None = Field(default=None, max_length=MAX_PATH)
    tls_ca: str | None = Field(default=None, max_length=MAX_PATH)
    ram: Literal["auto", "qemu", "engine"] = "auto"
    precopy_only: bool = False
    max_mbit: float | None = Field(default=None, gt=0, le=1_000_000,
                                   description="cap what the source sends, Mbit/s")
    timeout_s: float | None = Field(default=None, gt=0, le=86_400,
                                    description="cancel if not handed off by then")
    compression: Literal["auto", "none", "zstd"] = Field(
        default="auto", description="what QEMU's stream compresses on the link")


class ReceiveVM(Request):
    """Wait for one VM migrating here (``ferry vm receive --listen ... --detach``)."""

    listen: str = Field(pattern=r"^[^\s:]{1,255}:[0-9]{1,5}$", description="ADDR:PORT")
    name: str | None = Field(default=None, pattern=VM_ID_PATTERN)
    publish: list[str] | None = Field(default=None, max_length=MAX_PUBLISH,
                                      description="forwards here (default: the source's)")
    precopy_only: bool = False
    tls_cert: str | None = Field(default=None, max_length=MAX_PATH)
    tls_key: str | None = Field(default=None, max_length=MAX_PATH)
    tls_ca: str | None = Field(default=None, max_length=MAX_PATH)


class StartFromRegistry(Request):
    """Start a VM from a package a registry (``ferry vm registry``) serves: post-copy, it
    runs here before every block arrived."""

    registry: str = Field(pattern=r"^[^\s:]{1,255}:[0-9]{1,5}$", description="HOST:PORT")
    package: str = Field(min_length=1, max_length=255, pattern=r"^[^/\x00]+$",
                         description="package file name on the registry")
    name: str | None = Field(default=None, pattern=VM_ID_PATTERN)
    publish: list[str] | None = Field(default=None, max_length=MAX_PUBLISH)
    token: str | None = Field(default=None, max_length=MAX_TEXT)
    tls_cert: str | None = Field(default=None, max_length=MAX_PATH)
    tls_key: str | None = Field(default=None, max_length=MAX_PATH)
    tls_ca: str | None = Field(default=None, max_length=MAX_PATH)
    precopy_only: bool = False


class BuildImage(Request):
    """Build a blueprint's kernel, initramfs and root disk (``ferry vm build``)."""

    blueprint: str = Field(min_length=1, max_length=MAX_PATH,
                           description="a shipped blueprint's name, or an absolute .toml path")


class Receiving(Reply):
    address: list[str | int]
    """[ADDR, PORT] the receiver listens on."""
    pid: int
    token: str | None
    """The one-time token the source must present (None with mutual TLS)."""


# -- operations -------------------------------------------------------------------------

class OpState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Operation(Reply):
    id: str
    kind: str
    vm_id: str | None
    state: OpState
    created: float
    """Unix time."""
    finished: float | None = None
    progress: dict[str, Any] | None = None
    """While a migration runs: ``phase``, ``bytes_sent``, ``cycles``, ``elapsed_s``."""
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    """A problem body (see :mod:`ferry.daemon.problems`) when ``state`` is ``failed``."""


# -- packages ---------------------------------------------------------------------------

class AddPackage(Request):
    file: str = Field(min_length=1, max_length=MAX_PATH)


class Package(Reply):
    package_id: str
    name: str
    directory: str
    memory_mib: int
    disks: list[str]
    size_bytes: int = 0
    """Disk space the cache entry takes."""
    in_use: bool | None = None
    """A VM on this node runs on it, or is suspended on it (then it cannot be removed)."""


class Verified(Reply):
    file: str
    name: str
    key_id: str
    """The signing key's id (it is on this host's trust list)."""
    package_id: str


class Removed(Reply):
    package_ids: list[str]
    freed_bytes: int


# -- migrations -------------------------------------------------------------------------

class Migration(Reply):
    """One outgoing live migration this node's daemon started (``/v1/migrations``)."""

    id: str
    operation: str | None = None
    """The daemon's operation that ran it, if this daemon started it and remembers it."""
    vm_id: str
    to: str
    state: OpState
    started: float
    """Unix time."""
    finished: float | None = None
    progress: dict[str, Any] | None = None
    """While it runs: ``phase``, ``bytes_sent``, ``cycles``, ``elapsed_s``."""
    summary: dict[str, Any] | None = None
    """Once it ended: the migration summary (``ferry vm migrate --json``), or an export's
    figures."""
    error: str | None = None
