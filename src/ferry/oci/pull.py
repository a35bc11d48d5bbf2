"""``ferry image pull``: an OCI image from a registry to an ext4 root filesystem, cached.

Steps, each refusing bad input with a typed one-line error (:mod:`ferry.oci.errors`):

1. ``skopeo inspect --raw`` fetches what the reference names. An index (multi-platform)
   gives its ``linux/amd64`` manifest, fetched again by digest. The manifest's SHA-256 is
   checked against the digest asked for (``REPO@sha256:...``) or listed in the index,
   and becomes the image's identity: cache entries are keyed by it.
2. The manifest's descriptors are checked against the limits (layer count, each layer's
   compressed size) and the config (``skopeo inspect --config --raw``) against its
   digest and the platform, **before** any layer is downloaded.
3. ``skopeo copy docker://REPO@DIGEST oci:LAYOUT`` downloads exactly that manifest (a tag
   moved meanwhile changes nothing) and verifies each blob's digest.
4. ferry re-reads every blob of the layout: the manifest and config against the digests
   of step 1-2, each layer against its digest, and its *uncompressed* stream against the
   config's ``diff_ids`` and the size limit (a small compressed layer can expand without
   bound).
5. ``umoci unpack`` applies the layers (whiteouts, opaque directories, hard links, owners,
   modes; ownership needs root, as every VM command does).
6. ``mkfs.ext4 -d`` writes the tree into ``rootfs.ext4`` (owners, modes and hard links
   kept, no mount needed), with :data:`FREE_SPACE_MIB` of room for the guest to write.

With :attr:`PullPolicy.MISSING` a tag this host pulled before is not asked about again
(``<cache>/oci/tags/`` remembers what it named), as ``docker run`` uses a local image.

The entry (``<cache>/oci/images/<manifest hex>/``: ``rootfs.ext4``, ``image.json``,
``manifest.json``, ``config.json``) is built in a temporary directory beside it and renamed
into place at the end, so a failure or Ctrl-C at any step leaves nothing half-cached.
"""

from __future__ import annotations

import asyncio
import enum
import gzip
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from ferry.guest.image.cache import building
from ferry.oci import manifest as mf
from ferry.oci import tools
from ferry.oci.errors import (
    ImageIntegrityError,
    ImageTooLargeError,
    ManifestError,
)
from ferry.oci.reference import ImageReference, parse_reference

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
DEFAULT_MAX_LAYER_BYTES = 4 * 1024**3
"""Per layer, compressed and uncompressed: 4 GiB holds CUDA-sized layers, stops bombs."""
FREE_SPACE_MIB = 128
"""Room left in the root filesystem for the guest's writes (the file is sparse)."""
_CHUNK = 1024 * 1024
_LAYOUT_TAG = "image"


class PullPolicy(enum.Enum):
    """When to ask the registry what a tag names (``docker run --pull``)."""

    ALWAYS = "always"  # every time (``ferry image pull``)
    MISSING = "missing"  # only if this host never pulled the tag (``ferry vm run``'s default)


@dataclass(frozen=True, slots=True)
class PullOptions:
    """``max_layer_bytes``: per layer; ``tls_verify``: None verifies unless loopback;
    ``policy``: see :class:`PullPolicy`."""

    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES
    tls_verify: bool | None = None
    policy: PullPolicy = PullPolicy.ALWAYS

    def __post_init__(self) -> None:
        if self.max_layer_bytes <= 0:
            raise ValueError("max_layer_bytes must be positive")


@dataclass(frozen=True, slots=True)
class PulledImage:
    """A cached image: its root filesystem and what it runs."""

    reference: str
    digest: str  # of the manifest
    config: mf.ImageConfig
    entry: Path
    rootfs_size_bytes: int
    content_bytes: int  # of the unpacked files
    cache_hit: bool

    @property
    def rootfs(self) -> Path:
        return self.entry / "rootfs.ext4"

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest,
                "config": self.config.to_json(), "rootfs": str(self.rootfs),
                "rootfs_size_bytes": self.rootfs_size_bytes,
                "content_bytes": self.content_bytes, "cache_hit": self.cache_hit}


def images_dir(cache_dir: Path) -> Path:
    return cache_dir / "oci" / "images"


def entry_for(cache_dir: Path, digest: str) -> Path:
    return images_dir(cache_dir) / digest.removeprefix("sha256:")


def load_cached(cache_dir: Path, digest: str) -> PulledImage | None:
    """The cache entry of manifest ``digest``, if complete; else None."""
    entry = entry_for(cache_dir, digest)
    try:
        data = json.loads((entry / "image.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("format") != ENTRY_FORMAT or data.get("digest") != digest:
        return None
    return PulledImage(reference=data["reference"], digest=digest,
                       config=mf.ImageConfig.from_json(data["config"]), entry=entry,
                       rootfs_size_bytes=data["rootfs_size_bytes"],
                       content_bytes=data["content_bytes"], cache_hit=True)


def _tag_file(cache_dir: Path, ref: ImageReference) -> Path:
    key = hashlib.sha256(f"{ref.name}:{ref.tag}".encode()).hexdigest()
    return cache_dir / "oci" / "tags" / key


def _tag_digest(cache_dir: Path, ref: ImageReference) -> str | None:
    """The manifest digest ``ref``'s tag named when this host last pulled it."""
    try:
        data = json.loads(_tag_file(cache_dir, ref).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    digest = data.get("digest") if isinstance(data, dict) else None
    return digest if data.get("reference") == f"{ref.name}:{ref.tag}" and \
        isinstance(digest, str) else None


def _record_tag(cache_dir: Path, ref: ImageReference, digest: str) -> None:
    """Remember what ``ref``'s tag names (written to a temporary file, then renamed)."""
    if not ref.tag:
        return
    path = _tag_file(cache_dir, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"reference": f"{ref.name}:{ref.tag}", "digest": digest}) + "\n")
    os.replace(tmp, path)


def _tls_args(ref: ImageReference, options: PullOptions, flag: str) -> list[str]:
    verify = (not ref.is_loopback) if options.tls_verify is None else options.tls_verify
    return [] if verify else [f"{flag}=false"]


async def resolve(ref: ImageReference, options: PullOptions) -> tuple[str, bytes]:
    """The linux/amd64 manifest ``ref`` names: (its digest, its bytes), digests checked."""
    tls = _tls_args(ref, options, "--tls-verify")
    raw = await tools.skopeo(["inspect", "--raw", *tls, f"docker://{ref}"], reference=str(ref))
    if ref.digest and mf.sha256_digest(raw) != ref.digest:
        raise ImageIntegrityError(f"the registry's manifest has digest {mf.sha256_digest(raw)}, "
                                  f"not the {ref.digest} asked for", reference=str(ref))
    if mf.is_index(raw, str(ref)):
        digest = mf.select_platform(raw, str(ref))
        raw = await tools.skopeo(["inspect", "--raw", *tls, f"docker://{ref.pinned(digest)}"],
                                 reference=str(ref))
        if mf.sha256_digest(raw) != digest:
            raise ImageIntegrityError(f"the manifest of {digest} does not match that digest",
                                      reference=str(ref))
        if mf.is_index(raw, str(ref)):
            raise ManifestError("an index points to another index", reference=str(ref))
    return mf.sha256_digest(raw), raw


async def pull(reference: str | ImageReference, *, cache_dir: Path,
               options: PullOptions | None = None) -> PulledImage:
    """Pull ``reference`` into the cache (or find it there); see the module docstring."""
    opts = options or PullOptions()
    ref = reference if isinstance(reference, ImageReference) else parse_reference(reference)
    if ref.digest and (hit := load_cached(cache_dir, ref.digest)) is not None:
        return hit  # content-addressed: no need to ask the registry
    if opts.policy is PullPolicy.MISSING and not ref.digest:
        known = _tag_digest(cache_dir, ref)
        if known is not None and (hit := load_cached(cache_dir, known)) is not None:
            log.info("image %s: %s, pulled before (not asking the registry)", ref, known)
            return hit
    digest, raw = await resolve(ref, opts)
    if (hit := load_cached(cache_dir, digest)) is not None:
        log.info("image %s: cache hit %s", ref, hit.entry)
        _record_tag(cache_dir, ref, digest)
        return hit
    manifest = mf.parse_manifest(raw, str(ref), max_layer_bytes=opts.max_layer_bytes)
    tls = _tls_args(ref, opts, "--tls-verify")
    config_raw = await tools.skopeo(["inspect", "--config", "--raw", *tls,
                                     f"docker://{ref.pinned(digest)}"], reference=str(ref))
    config = mf.parse_config(config_raw, str(ref), expected_digest=manifest.config.digest)
    if len(config.diff_ids) != len(manifest.layers):
        raise ManifestError(f"{len(manifest.layers)} layers but {len(config.diff_ids)} "
                            "diff_ids in the config", reference=str(ref))
    started = time.monotonic()
    entry = entry_for(cache_dir, digest)
    with building(entry) as scratch:
        content = await _build(scratch, ref, manifest, config, opts, raw=raw,
                               config_raw=config_raw)
        size = (scratch / "rootfs.ext4").stat().st_size
        record = {"format": ENTRY_FORMAT, "reference": str(ref), "digest": digest,
                  "config": config.to_json(), "rootfs_size_bytes": size,
                  "content_bytes": content,
                  "layers": [{"digest": d.digest, "size_bytes": d.size_bytes}
                             for d in manifest.layers]}
        (scratch / "image.json").write_text(json.dumps(record, indent=2) + "\n")
    _record_tag(cache_dir, ref, digest)
    log.info("image %s: pulled %s in %.1f s", ref, digest, time.monotonic() - started)
    return PulledImage(reference=str(ref), digest=digest, config=config, entry=entry,
                       rootfs_size_bytes=size, content_bytes=content, cache_hit=False)


async def _build(scratch: Path, ref: ImageReference, manifest: mf.Manifest,
                 config: mf.ImageConfig, opts: PullOptions, *, raw: bytes,
                 config_raw: bytes) -> int:
    name = str(ref)
    layout = scratch / "layout"
    await tools.skopeo(["copy", "--quiet", *_tls_args(ref, opts, "--src-tls-verify"),
                        f"docker://{ref.pinned(manifest.digest)}", f"oci:{layout}:{_LAYOUT_TAG}"],
                       reference=name)
    await asyncio.to_thread(verify_layout, layout, manifest, config, name,
                            max_layer_bytes=opts.max_layer_bytes)
    bundle = scratch / "bundle"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    await tools.checked(["umoci", "unpack", *rootless, "--image", f"{layout}:{_LAYOUT_TAG}",
                         str(bundle)], reference=name, what="umoci unpack")
    await asyncio.to_thread(shutil.rmtree, layout)
    content, inodes = await asyncio.to_thread(tree_usage, bundle / "rootfs")
    size_mib = -(-content * 5 // 4 // 2**20) + FREE_SPACE_MIB  # 25 % for metadata
    image = scratch / "rootfs.ext4"
    with image.open("wb") as f:
        f.truncate(size_mib * 2**20)
    await tools.checked(["mkfs.ext4", "-q", "-F", "-L", f"oci-{manifest.digest[7:19]}",
                         "-N", str(inodes + inodes // 4 + 4096), "-d", str(bundle / "rootfs"),
                         str(image)], reference=name, what="mkfs.ext4")
    await asyncio.to_thread(shutil.rmtree, bundle)
    (scratch / "manifest.json").write_bytes(raw)
    (scratch / "config.json").write_bytes(config_raw)
    return content


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes of file data rounded to 4 KiB blocks, inode count) under ``root``."""
    seen: set[int] = set()
    total = inodes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            inodes += 1
            size = st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else 0
            total += -(-max(size, 1) // 4096) * 4096
    return total, inodes + 1


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _read_blob(layout: Path, desc: mf.Descriptor, what: str, name: str) -> bytes:
    path = _blob(layout, desc.digest)
    if path.stat().st_size > mf.MAX_MANIFEST_BYTES:
        raise ImageTooLargeError(f"{what} is over {mf.MAX_MANIFEST_BYTES} bytes", reference=name)
    data = path.read_bytes()
    if mf.sha256_digest(data) != desc.digest:
        raise ImageIntegrityError(f"{what} does not match its digest {desc.digest}",
                                  reference=name)
    return data


def verify_layout(layout: Path, manifest: mf.Manifest, config: mf.ImageConfig, name: str, *,
                  max_layer_bytes: int) -> None:
    """Check the copied layout's blobs against ``manifest`` and ``config`` (see step 4)."""
    try:
        index = json.loads((layout / "index.json").read_text())
        (top,) = index["manifests"]
        local = mf.Descriptor(top["mediaType"], top["digest"], top["size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"skopeo wrote an unexpected layout: {exc}", reference=name) from exc
    local_raw = _read_blob(layout, local, "local manifest", name)
    local_manifest = mf.parse_manifest(local_raw, name, max_layer_bytes=max_layer_bytes)
    # skopeo converts a Docker schema-2 manifest to OCI's; the blobs must stay the same.
    if local.digest != manifest.digest and (
            local_manifest.config.digest != manifest.config.digest
            or [d.digest for d in local_manifest.layers] != [d.digest for d in manifest.layers]):
        raise ImageIntegrityError("the copied manifest names other blobs than the registry's",
                                  reference=name)
    _read_blob(layout, manifest.config, "config", name)
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
        verify_layer(_blob(layout, desc.digest), desc, diff_id, f"layer {i}", name,
                     max_layer_bytes=max_layer_bytes)


class _HashingReader:
    """A file wrapper that hashes and counts what is read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def verify_layer(path: Path, desc: mf.Descriptor, diff_id: str, what: str, name: str, *,
                 max_layer_bytes: int) -> None:
    """Check one layer blob: its digest and size, then its uncompressed digest and size."""
    compression = mf.LAYER_TYPES[desc.media_type]
    with path.open("rb") as f:
        raw = _HashingReader(f)
        plain = hashlib.sha256()
        plain_bytes = 0
        opener: Callable[[Any], Any] = {
            "gzip": lambda r: gzip.GzipFile(fileobj=r, mode="rb"),
            "zstd": lambda r: zstandard.ZstdDecompressor().stream_reader(
                r, read_across_frames=True),
            "": lambda r: r,
        }[compression]
        try:
            stream = cast(IO[bytes], opener(raw))
            while chunk := stream.read(_CHUNK):
                plain.update(chunk)
                plain_bytes += len(chunk)
                if plain_bytes > max_layer_bytes:
                    raise ImageTooLargeError(
                        f"{what} ({desc.digest[:19]}) expands to over {max_layer_bytes} bytes, "
                        "the limit", reference=name)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError, ValueError) as exc:
            # gzip.BadGzipFile is an OSError, a bad deflate block a zlib.error, a
            # truncated stream an EOFError.
            raise ImageIntegrityError(f"{what} ({desc.digest[:19]}) is corrupt or truncated: "
                                      f"{exc}", reference=name) from exc
        raw.drain()
    if raw.count != desc.size_bytes or "sha256:" + raw.sha.hexdigest() != desc.digest:
        raise ImageIntegrityError(f"{what} does not match its digest {desc.digest}",
                                  reference=name)
    if "sha256:" + plain.hexdigest() != diff_id:
        raise ImageIntegrityError(f"{what} uncompressed does not match its diff_id {diff_id}",
                                  reference=name)

