"""Fixtures for package tests: keys, a trust list holding the signer, a VM dir, a package."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.package import (
    PackageInfo,
    SigningKey,
    TrustStore,
    generate_key,
    load_private_key,
    write_package,
)

from .package_helpers import MANIFEST, make_vm_dir


@pytest.fixture
def signer(tmp_path: Path) -> SigningKey:
    info = generate_key(tmp_path / "keys" / "signer.key", comment="signer@test")
    return load_private_key(info.private_key_path)


@pytest.fixture
def stranger(tmp_path: Path) -> SigningKey:
    info = generate_key(tmp_path / "keys" / "stranger.key", comment="stranger@test")
    return load_private_key(info.private_key_path)


@pytest.fixture
def trust(signer: SigningKey) -> TrustStore:
    return TrustStore.of(signer.public)


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    return make_vm_dir(tmp_path / "vm")


@pytest.fixture
def package(tmp_path: Path, vm_dir: Path, signer: SigningKey) -> PackageInfo:
    return write_package(vm_dir, tmp_path / "vm.ferry", signer, manifest=MANIFEST)
