"""OCI and Docker manifests, indexes and image configs: parsing and checks, no I/O.

A registry answers a reference with either an *index* (OCI image index or Docker
manifest list: one manifest per platform) or a *manifest* (one config blob and the
layer blobs, bottom first). ferry takes the ``linux/amd64`` manifest of an index,
checks every descriptor against its limits before anything is downloaded, and reads
from the config what the image runs (:class:`ImageConfig`).

Sizes are bounded: a manifest or config over :data:`MAX_MANIFEST_BYTES` (containerd
and skopeo use the same 4 MiB), more than :data:`MAX_LAYERS` layers (overlayfs'
practical limit of 128 lower directories, which Docker also enforces), or one layer
over the caller's limit is refused by :class:`ImageTooLargeError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ferry.oci.errors import ImageIntegrityError, ImageTooLargeError, ManifestError, PlatformError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 128
GUEST_OS = "linux"
GUEST_ARCH = "amd64"  # ferry's guests are x86_64 microvms

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
# Layer media type -> compression ("" for none).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_PORT_RE = re.compile(r"^([0-9]{1,5})(?:/(tcp|udp|sctp))?$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A pointer to a blob: its media type, digest and size in bytes."""

    media_type: str
    digest: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """One image manifest: its own digest, its config and its layers (bottom first)."""

    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ExposedPort:
    port: int
    proto: str  # tcp, udp or sctp

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What an image runs, from its config's ``config`` object (all optional there)."""

    architecture: str
    os: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str
    exposed_ports: tuple[ExposedPort, ...]
    stop_signal: str
    diff_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "os": self.os,
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
                "env": list(self.env), "workdir": self.workdir, "user": self.user,
                "exposed_ports": [str(p) for p in self.exposed_ports],
                "stop_signal": self.stop_signal, "diff_ids": list(self.diff_ids)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        ports = []
        for text in data["exposed_ports"]:
            port, proto = text.split("/")
            ports.append(ExposedPort(int(port), proto))
        return cls(architecture=data["architecture"], os=data["os"],
                   entrypoint=tuple(data["entrypoint"]), cmd=tuple(data["cmd"]),
                   env=tuple(data["env"]), workdir=data["workdir"], user=data["user"],
                   exposed_ports=tuple(ports), stop_signal=data["stop_signal"],
                   diff_ids=tuple(data["diff_ids"]))


def _load(raw: bytes, what: str, reference: str) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageTooLargeError(f"{what} is {len(raw)} bytes, over the limit of "
                                 f"{MAX_MANIFEST_BYTES}", reference=reference)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not JSON: {exc}", reference=reference) from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{what} is not a JSON object", reference=reference)
    return data


def _descriptor(item: Any, what: str, reference: str) -> Descriptor:
    if not isinstance(item, dict):
        raise ManifestError(f"{what} is not an object", reference=reference)
    media, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
    if not isinstance(media, str) or not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ManifestError(f"{what} lacks a media type or a sha256 digest",
                            reference=reference)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{what} has no valid size", reference=reference)
    return Descriptor(media, digest, size)


def is_index(raw: bytes, reference: str) -> bool:
    """Whether ``raw`` is an index / manifest list rather than a single manifest."""
    data = _load(raw, "manifest", reference)
    media = data.get("mediaType")
    if media in INDEX_TYPES:
        return True
    if media in MANIFEST_TYPES:
        return False
    if media is None and "manifests" in data and "layers" not in data:
        return True  # OCI's mediaType is optional
    if media is None and "layers" in data:
        return False
    raise ManifestError(f"unsupported manifest type {media!r} (schema 1 and artifacts are "
                        "not images ferry runs)", reference=reference)


def select_platform(raw: bytes, reference: str) -> str:
    """The digest of the ``linux/amd64`` manifest in index ``raw``."""
    data = _load(raw, "index", reference)
    entries = data.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError("index has no manifests list", reference=reference)
    seen: list[str] = []
    for i, item in enumerate(entries):
        desc = _descriptor(item, f"index entry {i}", reference)
        platform = item.get("platform") or {}
        if not isinstance(platform, dict):
            continue
        os_, arch = platform.get("os"), platform.get("architecture")
        seen.append(f"{os_}/{arch}")
        if os_ == GUEST_OS and arch == GUEST_ARCH and desc.media_type in MANIFEST_TYPES:
            return desc.digest
    raise PlatformError(f"no {GUEST_OS}/{GUEST_ARCH} image in the index (it has "
                        f"{', '.join(seen) or 'none'})", reference=reference)


def parse_manifest(raw: bytes, reference: str, *, max_layer_bytes: int) -> Manifest:
    """Parse image manifest ``raw`` and check its descriptors against the limits."""
    data = _load(raw, "manifest", reference)
    if data.get("schemaVersion") != 2:
        raise ManifestError(f"schemaVersion {data.get('schemaVersion')!r} is not 2",
                            reference=reference)
    config = _descriptor(data.get("config"), "config descriptor", reference)
    if config.size_bytes > MAX_MANIFEST_BYTES:
        raise ImageTooLargeError(f"config is {config.size_bytes} bytes, over the limit of "
                                 f"{MAX_MANIFEST_BYTES}", reference=reference)
    items = data.get("layers")
    if not isinstance(items, list) or not items:
        raise ManifestError("manifest has no layers", reference=reference)
    if len(items) > MAX_LAYERS:
        raise ImageTooLargeError(f"{len(items)} layers, over the limit of {MAX_LAYERS}",
                                 reference=reference)
    layers = tuple(_descriptor(item, f"layer {i}", reference) for i, item in enumerate(items))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"layer {i} has unsupported media type {layer.media_type!r}",
                                reference=reference)
        if layer.size_bytes > max_layer_bytes:
            raise ImageTooLargeError(
                f"layer {i} ({layer.digest[:19]}) is {layer.size_bytes} bytes compressed, "
                f"over the limit of {max_layer_bytes}", reference=reference)
    return Manifest(sha256_digest(raw), config, layers)


def _strings(value: Any, what: str, reference: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"config {what} is not a list of strings", reference=reference)
    return tuple(value)


def _string(value: Any, what: str, reference: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestError(f"config {what} is not a string", reference=reference)
    return value


def parse_config(raw: bytes, reference: str, *, expected_digest: str) -> ImageConfig:
    """Parse image config ``raw`` (checked against its digest) and check its platform."""
    if sha256_digest(raw) != expected_digest:
        raise ImageIntegrityError(f"config does not match its digest {expected_digest}",
                                  reference=reference)
    data = _load(raw, "config", reference)
    arch, os_ = data.get("architecture"), data.get("os")
    if os_ != GUEST_OS or arch != GUEST_ARCH:
        raise PlatformError(f"built for {os_}/{arch}, not {GUEST_OS}/{GUEST_ARCH}",
                            reference=reference)
    inner = data.get("config") or {}
    if not isinstance(inner, dict):
        raise ManifestError("config's config is not an object", reference=reference)
    ports: list[ExposedPort] = []
    exposed = inner.get("ExposedPorts") or {}
    if not isinstance(exposed, dict):
        raise ManifestError("config ExposedPorts is not an object", reference=reference)
    for key in sorted(exposed):
        m = _PORT_RE.match(key)
        if not m or not 0 < int(m.group(1)) < 65536:
            raise ManifestError(f"bad exposed port {key!r}", reference=reference)
        ports.append(ExposedPort(int(m.group(1)), m.group(2) or "tcp"))
    rootfs = data.get("rootfs") or {}
    diff_ids = _strings(rootfs.get("diff_ids") if isinstance(rootfs, dict) else None,
                        "rootfs.diff_ids", reference)
    if not all(_DIGEST_RE.match(d) for d in diff_ids):
        raise ManifestError("config rootfs.diff_ids are not sha256 digests", reference=reference)
    return ImageConfig(
        architecture=arch, os=os_,
        entrypoint=_strings(inner.get("Entrypoint"), "Entrypoint", reference),
        cmd=_strings(inner.get("Cmd"), "Cmd", reference),
        env=_strings(inner.get("Env"), "Env", reference),
        workdir=_string(inner.get("WorkingDir"), "WorkingDir", reference),
        user=_string(inner.get("User"), "User", reference),
        exposed_ports=tuple(ports),
        stop_signal=_string(inner.get("StopSignal"), "StopSignal", reference),
        diff_ids=diff_ids)


def config_labels(raw: bytes) -> dict[str, str]:
    """The ``config.Labels`` of an image config (already parsed once by
    :func:`parse_config`); labels that are not strings are left out."""
    data = json.loads(raw)
    inner = data.get("config") if isinstance(data, dict) else None
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
