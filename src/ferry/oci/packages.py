"""Signed ferry packages stored in OCI registries: ``ferry package push/pull oci://REF``.

A package travels as a one-layer image, so every registry and every tool that copies
images (skopeo, crane, docker's registry mirrors) carries it unchanged:

* the layer is an uncompressed tar holding one regular file, ``package.ferry`` (the
  package is zstd already; ``umoci raw add-layer`` gzips the layer, as it does any);
* the config says ``linux/amd64`` (what the package's guest is) and carries the labels
  ``org.ferry.package`` = ``1`` and ``org.ferry.package.key-id`` (who signed it);
* the layout is made with ``umoci`` and pushed with ``skopeo copy``.

A pull resolves and checks the manifest as an image pull does (:mod:`ferry.oci.pull`),
refuses an image without the label, downloads exactly that manifest with ``skopeo``,
re-checks the layer (digest, ``diff_id``, size limit), takes ``package.ferry`` out of it
into a temporary file beside the destination, and **verifies the signature and every
file's hash against this host's trust list** before renaming it into place: a package
that does not verify never appears under the destination name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError
from ferry.oci import manifest as mf
from ferry.oci import tools
from ferry.oci.errors import ImageNotFoundError, ManifestError, OCIError
from ferry.oci.pull import PullOptions, resolve, verify_layer
from ferry.oci.reference import ImageReference, parse_reference
from ferry.package import PackageExistsError, PackageInfo, TrustStore, verify_package

log = logging.getLogger(__name__)

LABEL = "org.ferry.package"
LABEL_KEY_ID = "org.ferry.package.key-id"
MEMBER = "package.ferry"
DEFAULT_MAX_PACKAGE_BYTES = 128 * 1024**3
"""A package holds a guest's RAM (at most 64 GiB, ferry.shape) and its disks."""
_TAG = "package"


@dataclass(frozen=True, slots=True)
class PushedPackage:
    reference: str
    key_id: str


@dataclass(frozen=True, slots=True)
class PulledPackage:
    reference: str
    digest: str  # of the manifest
    path: Path
    info: PackageInfo


def _tls(ref: ImageReference, options: PullOptions, flag: str) -> list[str]:
    verify = (not ref.is_loopback) if options.tls_verify is None else options.tls_verify
    return [] if verify else [f"{flag}=false"]


async def push_package(file: Path, reference: str, trust: TrustStore, *,
                       options: PullOptions | None = None,
                       overwrite: bool = False) -> PushedPackage:
    """Push package ``file`` (verified against ``trust`` first: only what this host would
    run goes out) as the one-layer image ``reference``; a tag that exists is replaced only
    with ``overwrite`` (as ``package push s3://`` does with a key)."""
    opts = options or PullOptions()
    ref = parse_reference(reference)
    if ref.digest:
        raise ConfigError("push to a tag, not a digest: the registry names what it stores")
    info = await asyncio.to_thread(verify_package, file, trust)
    name = str(ref)
    if not overwrite:
        try:
            await resolve(ref, opts)
        except ImageNotFoundError:
            pass
        else:
            raise PackageExistsError("exists in the registry (--overwrite replaces it)",
                                     path=name)
    with tempfile.TemporaryDirectory(prefix="ferry-push-") as tmp:
        layer = Path(tmp) / "layer.tar"
        await asyncio.to_thread(_write_layer, file, layer)
        layout = f"{Path(tmp) / 'layout'}:{_TAG}"
        for argv in (["umoci", "init", "--layout", str(Path(tmp) / "layout")],
                     ["umoci", "new", "--image", layout],
                     ["umoci", "raw", "add-layer", "--image", layout, str(layer)],
                     ["umoci", "config", "--image", layout, "--os", "linux",
                      "--architecture", mf.GUEST_ARCH, "--config.label", f"{LABEL}=1",
                      "--config.label", f"{LABEL_KEY_ID}={info.key_id}"]):
            await tools.checked(argv, reference=name, what=argv[1])
        await tools.skopeo(["copy", "--quiet", *_tls(ref, opts, "--dest-tls-verify"),
                            f"oci:{layout}", f"docker://{ref}"], reference=name)
    return PushedPackage(name, info.key_id)


def default_destination(reference: str) -> Path:
    """Where ``package pull oci://REF`` puts the file without DEST: ``<repo name>.ferry``."""
    return Path(parse_reference(reference).repository.rsplit("/", 1)[-1] + ".ferry")


def _write_layer(file: Path, layer: Path) -> None:
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(file), arcname=MEMBER)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        with file.open("rb") as f:
            tar.addfile(info, f)


async def pull_package(reference: str, dest: Path, trust: TrustStore, *,
                       options: PullOptions | None = None,
                       overwrite: bool = False) -> PulledPackage:
    """Pull the package image ``reference`` to ``dest``, verified against ``trust``."""
    opts = options or PullOptions(max_layer_bytes=DEFAULT_MAX_PACKAGE_BYTES)
    ref = parse_reference(reference)
    name = str(ref)
    if not overwrite and await asyncio.to_thread(dest.exists):
        raise ConfigError(f"{dest} exists (--overwrite replaces it)")
    digest, raw = await resolve(ref, opts)
    manifest = mf.parse_manifest(raw, name, max_layer_bytes=opts.max_layer_bytes)
    config_raw = await tools.skopeo(["inspect", "--config", "--raw",
                                     *_tls(ref, opts, "--tls-verify"),
                                     f"docker://{ref.pinned(digest)}"], reference=name)
    config = mf.parse_config(config_raw, name, expected_digest=manifest.config.digest)
    labels = mf.config_labels(config_raw)
    if labels.get(LABEL) != "1" or len(manifest.layers) != 1 or len(config.diff_ids) != 1:
        raise ManifestError(f"not a ferry package (no {LABEL} label, or not one layer)",
                            reference=name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ferry-pull-", dir=dest.parent) as tmp:
        layout = Path(tmp) / "layout"
        await tools.skopeo(["copy", "--quiet", *_tls(ref, opts, "--src-tls-verify"),
                            f"docker://{ref.pinned(digest)}", f"oci:{layout}:{_TAG}"],
                           reference=name)
        (layer,) = manifest.layers
        blob = layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
        await asyncio.to_thread(verify_layer, blob, layer, config.diff_ids[0], "layer 0", name,
                                max_layer_bytes=opts.max_layer_bytes)
        staged = Path(tmp) / MEMBER
        await asyncio.to_thread(_extract, blob, staged, name)
        await asyncio.to_thread(shutil.rmtree, layout)
        info = await asyncio.to_thread(verify_package, staged, trust)
        os.replace(staged, dest)
    return PulledPackage(name, digest, dest, info)


def _extract(blob: Path, out: Path, name: str) -> None:
    """Copy the layer's one member, ``package.ferry``, to ``out``."""
    try:
        with tarfile.open(blob, "r:*") as tar:
            members = tar.getmembers()
            if [(m.name, m.isfile()) for m in members] != [(MEMBER, True)]:
                raise ManifestError(f"the layer must hold exactly {MEMBER}",
                                    reference=name)
            src = tar.extractfile(members[0])
            assert src is not None  # a regular file
            with src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OCIError(f"cannot read the package layer: {exc}", reference=name) from exc
