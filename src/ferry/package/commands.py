"""One function per CLI verb, resolving the CLI's defaults, so the CLI only parses arguments.

==========================  =====================================================
``ferry key create``        :func:`key_create`
``ferry key trust``         :func:`key_trust`
``ferry package create``    :func:`package_create`
``ferry package verify``    :func:`package_verify`
``ferry package extract``   :func:`package_extract`
==========================  =====================================================

Defaults come from the caller's :class:`~ferry.hostconfig.HostConfig`: the
signing key at ``host.signing_key`` (``$FERRY_SIGNING_KEY`` or
``~/.config/ferry/keys/signing.key``), the trust list at ``host.trust_dir``
(``$FERRY_TRUST_DIR`` or ``~/.config/ferry/trusted-keys``); the VM manifest is the
package directory's ``manifest.json`` (written by the VM layer), which is
also shipped as an ordinary content file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ferry.hostconfig import HostConfig
from ferry.package.errors import PackageSourceError
from ferry.package.format import PackageInfo
from ferry.package.keys import (
    KeyInfo,
    PublicKey,
    generate_key,
    load_private_key,
    load_public_key,
)
from ferry.package.progress import ProgressCallback
from ferry.package.reader import extract_package, verify_package
from ferry.package.trust import TrustStore
from ferry.package.writer import write_package

MANIFEST_NAME = "manifest.json"

PathArg = str | os.PathLike[str]


def _trust(trust_path: PathArg | None, host: HostConfig) -> TrustStore:
    if trust_path is None:
        return TrustStore.for_host(host)
    return TrustStore.from_path(trust_path)


def key_create(
    path: PathArg | None = None,
    *,
    host: HostConfig,
    comment: str | None = None,
    overwrite: bool = False,
    trust: bool = False,
    trust_path: PathArg | None = None,
) -> KeyInfo:
    """Create a signing key; with ``trust`` also add it to this host's trust list."""
    info = generate_key(path or host.signing_key, comment=comment, overwrite=overwrite)
    if trust:
        key_trust(info.public_key_path, host=host, trust_path=trust_path)
    return info


def key_trust(pubkey_file: PathArg, *, host: HostConfig,
              trust_path: PathArg | None = None) -> PublicKey:
    """Add a ``.pub`` file to the trust list (default: this host's trust directory)."""
    key = load_public_key(pubkey_file)
    target = Path(trust_path) if trust_path is not None else host.trust_dir
    TrustStore.from_path(target, missing_ok=True).add(key)
    return key


def package_create(
    src_dir: PathArg,
    out_file: PathArg,
    *,
    key_path: PathArg,
    manifest_path: PathArg | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PackageInfo:
    """Sign and pack a package directory with the key at ``key_path`` (the CLI's default:
    ``HostConfig.signing_key``); the manifest defaults to its ``manifest.json``."""
    key = load_private_key(key_path)
    mpath = Path(manifest_path) if manifest_path is not None else Path(src_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except FileNotFoundError:
        if manifest_path is not None:
            raise PackageSourceError(f"{mpath}: manifest file does not exist") from None
        manifest = {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PackageSourceError(f"{mpath}: cannot read the manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise PackageSourceError(f"{mpath}: the manifest must be a JSON object")
    return write_package(
        src_dir, out_file, key, manifest=manifest, progress=progress, overwrite=overwrite
    )


def package_verify(
    file: PathArg,
    *,
    host: HostConfig,
    trust_path: PathArg | None = None,
    progress: ProgressCallback | None = None,
) -> PackageInfo:
    """Verify a package against a trust list (default: ``host``'s)."""
    return verify_package(file, _trust(trust_path, host), progress=progress)


def package_extract(
    file: PathArg,
    dest_dir: PathArg,
    *,
    host: HostConfig,
    trust_path: PathArg | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PackageInfo:
    """Verify and extract a package into ``dest_dir`` (default trust list: ``host``'s)."""
    return extract_package(
        file, dest_dir, _trust(trust_path, host), overwrite=overwrite, progress=progress
    )
