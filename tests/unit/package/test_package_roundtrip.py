"""write -> verify -> extract gives back the same files, manifest and signer; outputs are atomic."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.package import (
    PackageExistsError,
    PackageInfo,
    PackageNoSpaceError,
    PackageSourceError,
    Phase,
    Progress,
    SigningKey,
    TrustStore,
    extract_package,
    verify_package,
    write_package,
)
from ferry.package.format import HEADER_NAME, SIGNATURE_NAME

from .package_helpers import MANIFEST, leftovers, members_of, tree


def test_round_trip_preserves_files_and_manifest(
    tmp_path: Path, vm_dir: Path, package: PackageInfo, trust: TrustStore, signer: SigningKey
) -> None:
    verified = verify_package(package.path, trust)
    assert verified.manifest == MANIFEST
    assert verified.key_id == signer.key_id
    assert verified.header == package.header
    assert verified.compressed_bytes == package.path.stat().st_size

    dest = tmp_path / "restored"
    extracted = extract_package(package.path, dest, trust)
    assert extracted.manifest == MANIFEST
    assert tree(dest) == tree(vm_dir)
    assert (dest / "empty.txt").stat().st_size == 0
    listed = {e.path: (e.size_bytes, e.sha256) for e in extracted.files}
    for rel, data in tree(vm_dir).items():
        assert listed[rel] == (len(data), hashlib.sha256(data).hexdigest())
    assert not leftovers(tmp_path)


def test_layout_is_header_first_then_files_then_signature(package: PackageInfo) -> None:
    names = [n for n, _ in members_of(package.path)]
    assert names[0] == HEADER_NAME
    assert names[-1] == SIGNATURE_NAME
    assert sorted(names[1:-1]) == sorted(e.path for e in package.files)


def test_zero_heavy_memory_compresses_and_extracts_sparse(
    tmp_path: Path, signer: SigningKey, trust: TrustStore
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 8 * 1024 * 1024
    with (src / "memory.bin").open("wb") as fh:  # 8 MiB, one page of data in the middle
        fh.truncate(size)
        fh.seek(size // 2)
        fh.write(b"\xab" * 4096)
    info = write_package(src, tmp_path / "m.ferry", signer, manifest={})
    assert info.compressed_bytes < 64 * 1024  # zstd turns the zeros into almost nothing

    extract_package(info.path, tmp_path / "out", trust)
    out = tmp_path / "out" / "memory.bin"
    assert out.read_bytes() == (src / "memory.bin").read_bytes()
    assert out.stat().st_blocks * 512 < size // 4  # the zero runs stayed holes


def test_progress_reports_every_phase_up_to_the_total(
    tmp_path: Path, vm_dir: Path, signer: SigningKey, trust: TrustStore
) -> None:
    seen: list[Progress] = []
    info = write_package(vm_dir, tmp_path / "p.ferry", signer, manifest={}, progress=seen.append)
    verify_package(info.path, trust, progress=seen.append)
    extract_package(info.path, tmp_path / "out", trust, progress=seen.append)
    total = info.total_bytes
    for phase in Phase:
        reports = [p for p in seen if p.phase is phase]
        assert reports, phase
        assert reports[-1].done_bytes == reports[-1].total_bytes == total
        dones = [p.done_bytes for p in reports]
        assert dones == sorted(dones)


def test_write_refuses_existing_output_unless_overwrite(
    tmp_path: Path, vm_dir: Path, signer: SigningKey, package: PackageInfo, trust: TrustStore
) -> None:
    before = package.path.read_bytes()
    with pytest.raises(PackageExistsError):
        write_package(vm_dir, package.path, signer, manifest={})
    assert package.path.read_bytes() == before
    info = write_package(vm_dir, package.path, signer, manifest={"v": 2}, overwrite=True)
    assert verify_package(info.path, trust).manifest == {"v": 2}
    assert not leftovers(tmp_path)


def test_extract_refuses_existing_dest_unless_overwrite(
    tmp_path: Path, vm_dir: Path, package: PackageInfo, trust: TrustStore
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(PackageExistsError):
        extract_package(package.path, dest, trust)
    assert tree(dest) == {"old.txt": b"old"}
    extract_package(package.path, dest, trust, overwrite=True)
    assert tree(dest) == tree(vm_dir)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("bad", ["symlink", "fifo", "reserved"])
def test_write_refuses_what_a_package_cannot_carry(
    tmp_path: Path, vm_dir: Path, signer: SigningKey, bad: str
) -> None:
    import os

    if bad == "symlink":
        (vm_dir / "link").symlink_to("memory.bin")
    elif bad == "fifo":
        os.mkfifo(vm_dir / "pipe")
    else:
        (vm_dir / HEADER_NAME).write_text("{}")
    with pytest.raises(PackageSourceError):
        write_package(vm_dir, tmp_path / "x.ferry", signer, manifest={})
    assert not (tmp_path / "x.ferry").exists()
    assert not leftovers(tmp_path)


def test_write_detects_a_file_changing_between_hash_and_write(
    tmp_path: Path, vm_dir: Path, signer: SigningKey
) -> None:
    target = vm_dir / "state.bin"

    def mutate(p: Progress) -> None:
        # After the hashing pass, before the writing pass reads the file again.
        if p.phase is Phase.HASHING and p.done_bytes == p.total_bytes:
            data = bytearray(target.read_bytes())
            data[100] ^= 1
            target.write_bytes(bytes(data))

    with pytest.raises(PackageSourceError, match="changed while being packaged"):
        write_package(vm_dir, tmp_path / "x.ferry", signer, manifest={}, progress=mutate)
    assert not (tmp_path / "x.ferry").exists()
    assert not leftovers(tmp_path)


def test_manifest_must_be_json(tmp_path: Path, vm_dir: Path, signer: SigningKey) -> None:
    with pytest.raises(PackageSourceError, match="manifest"):
        write_package(vm_dir, tmp_path / "x.ferry", signer, manifest={"bad": object()})
    assert not leftovers(tmp_path)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, so writing beyond it hits a real ENOSPC."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_write_on_a_full_disk_leaves_nothing(
    tiny_fs: Path, vm_dir: Path, signer: SigningKey
) -> None:
    with pytest.raises(PackageNoSpaceError, match="no space left"):
        write_package(vm_dir, tiny_fs / "vm.ferry", signer, manifest={})
    assert list(tiny_fs.iterdir()) == []


def test_extract_on_a_full_disk_leaves_nothing(
    tiny_fs: Path, package: PackageInfo, trust: TrustStore
) -> None:
    with pytest.raises(PackageNoSpaceError, match="no space left"):
        extract_package(package.path, tiny_fs / "restored", trust)
    assert list(tiny_fs.iterdir()) == []


def test_cli_functions_use_the_host_key_trust_and_default_manifest(
    tmp_path: Path, vm_dir: Path
) -> None:
    from ferry.hostconfig import HostConfig
    from ferry.package import UntrustedKeyError
    from ferry.package.commands import (
        key_create,
        key_trust,
        package_create,
        package_extract,
        package_verify,
    )

    # The library reads no environment: the host configuration is passed in.
    host = HostConfig.from_environ({"HOME": str(tmp_path / "home"),
                                    "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    key = key_create(host=host)
    assert key.private_key_path == tmp_path / "cfg" / "ferry" / "keys" / "signing.key"
    info = package_create(vm_dir, tmp_path / "vm.ferry", key_path=host.signing_key)
    assert info.manifest == MANIFEST  # read from vm_dir/manifest.json
    with pytest.raises(UntrustedKeyError):  # created, but not yet trusted by this host
        package_verify(info.path, host=host)
    key_create(tmp_path / "unused.key", host=host)  # another key does not help
    key_trust(key.public_key_path, host=host)
    assert (host.trust_dir / f"{key.key_id}.pub").is_file()
    assert package_verify(info.path, host=host).key_id == key.key_id
    package_extract(info.path, tmp_path / "out", host=host)
    assert tree(tmp_path / "out") == tree(vm_dir)
