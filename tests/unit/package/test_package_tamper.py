"""Hostile packages: every kind of damage is refused with a typed error, and leaves nothing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ferry.package import (
    PackageError,
    PackageFormatError,
    PackageInfo,
    PackageTamperedError,
    PackageTruncatedError,
    SignatureError,
    SigningKey,
    TrustStore,
    UntrustedKeyError,
    extract_package,
    verify_package,
)
from ferry.package.format import HEADER_NAME, MAX_HEADER_BYTES, SIGNATURE_NAME

from .package_helpers import (
    MANIFEST,
    Entry,
    craft,
    flip_byte,
    header_for,
    leftovers,
    members_of,
    signature_for,
    signed_entries,
)


def refused(path: Path, trust: TrustStore, tmp_path: Path) -> PackageError:
    """Both verify and extract must refuse, with the same error type, leaving no output."""
    with pytest.raises(PackageError) as verified:
        verify_package(path, trust)
    dest = tmp_path / "dest"
    with pytest.raises(PackageError) as extracted:
        extract_package(path, dest, trust)
    assert type(extracted.value) is type(verified.value)
    assert not dest.exists()
    assert not leftovers(tmp_path)
    return verified.value


def test_flipped_byte_in_file_data_is_tampering(
    tmp_path: Path, vm_dir: Path, package: PackageInfo, trust: TrustStore
) -> None:
    # state.bin is random, so zstd stores it verbatim: find its bytes in the package.
    needle = (vm_dir / "state.bin").read_bytes()[20_000:20_032]
    offset = package.path.read_bytes().find(needle)
    assert offset > 0
    flip_byte(package.path, offset + 5)
    err = refused(package.path, trust, tmp_path)
    assert isinstance(err, PackageTamperedError)
    assert err.path == "state.bin"
    assert "state.bin" in str(err)


def test_flipped_byte_anywhere_never_verifies(
    tmp_path: Path, package: PackageInfo, trust: TrustStore
) -> None:
    original = package.path.read_bytes()
    for offset in range(0, len(original), len(original) // 37):
        package.path.write_bytes(original)
        flip_byte(package.path, offset)
        with pytest.raises(PackageError):
            verify_package(package.path, trust)
    assert not leftovers(tmp_path)


def test_modified_header_breaks_the_signature(
    tmp_path: Path, package: PackageInfo, trust: TrustStore
) -> None:
    members = members_of(package.path)
    header = members[0][1]
    assert b'"tiny-vm"' in header
    members[0] = (HEADER_NAME, header.replace(b'"tiny-vm"', b'"evil-vm"'))
    craft(package.path, [Entry(n, d) for n, d in members])
    err = refused(package.path, trust, tmp_path)
    assert type(err) is SignatureError
    assert "does not verify" in str(err)


def test_signature_by_another_key_is_untrusted(
    tmp_path: Path, package: PackageInfo, trust: TrustStore, stranger: SigningKey
) -> None:
    members = members_of(package.path)
    members[-1] = (SIGNATURE_NAME, signature_for(members[0][1], stranger))
    craft(package.path, [Entry(n, d) for n, d in members])
    err = refused(package.path, trust, tmp_path)
    assert isinstance(err, UntrustedKeyError)
    assert err.key_id == stranger.key_id


def test_signature_by_a_trusted_but_different_key_is_refused(
    tmp_path: Path, package: PackageInfo, signer: SigningKey, stranger: SigningKey
) -> None:
    members = members_of(package.path)
    members[-1] = (SIGNATURE_NAME, signature_for(members[0][1], stranger))
    craft(package.path, [Entry(n, d) for n, d in members])
    err = refused(package.path, TrustStore.of(signer.public, stranger.public), tmp_path)
    assert type(err) is SignatureError
    assert signer.key_id in str(err)
    assert stranger.key_id in str(err)


@pytest.mark.parametrize("trusted", ["nobody", "someone else"])
def test_valid_signature_by_an_untrusted_key(
    tmp_path: Path, package: PackageInfo, signer: SigningKey, stranger: SigningKey, trusted: str
) -> None:
    trust = TrustStore.of() if trusted == "nobody" else TrustStore.of(stranger.public)
    err = refused(package.path, trust, tmp_path)
    assert isinstance(err, UntrustedKeyError)
    assert err.key_id == signer.key_id
    assert signer.key_id in str(err)


def test_garbage_signature_is_a_signature_error(
    tmp_path: Path, package: PackageInfo, trust: TrustStore
) -> None:
    members = members_of(package.path)
    members[-1] = (SIGNATURE_NAME, b'{"not":"a signature"}')
    craft(package.path, [Entry(n, d) for n, d in members])
    assert type(refused(package.path, trust, tmp_path)) is SignatureError


def test_truncation_anywhere_is_detected(
    tmp_path: Path, package: PackageInfo, trust: TrustStore
) -> None:
    original = package.path.read_bytes()
    n = len(original)
    for cut in sorted({0, 1, 4, 10, 100, n // 3, n // 2, n - 1000, n - 20, n - 4, n - 1}):
        package.path.write_bytes(original[:cut])
        with pytest.raises(PackageTruncatedError):
            verify_package(package.path, trust)
    package.path.write_bytes(original[: n // 2])
    assert isinstance(refused(package.path, trust, tmp_path), PackageTruncatedError)


@pytest.mark.parametrize("tail", [b"garbage!", b"\x00" * 64, b"\x28\xb5\x2f\xfd"])
def test_appended_bytes_are_refused(
    tmp_path: Path, package: PackageInfo, trust: TrustStore, tail: bytes
) -> None:
    with package.path.open("ab") as fh:
        fh.write(tail)
    assert isinstance(refused(package.path, trust, tmp_path), PackageFormatError)


def test_not_a_package_at_all(tmp_path: Path, trust: TrustStore) -> None:
    path = tmp_path / "random.ferry"
    path.write_bytes(b"hello, this is not zstd" * 100)
    assert isinstance(refused(path, trust, tmp_path), PackageFormatError)


FILES = {"memory.bin": bytes(5000) + b"data", "state.bin": b"device state"}


def crafted_refusal(tmp_path: Path, signer: SigningKey, body: list[Entry]) -> PackageError:
    path = craft(tmp_path / "crafted.ferry", signed_entries(FILES, signer, body))
    return refused(path, TrustStore.of(signer.public), tmp_path)


def test_crafted_valid_package_is_accepted(tmp_path: Path, signer: SigningKey) -> None:
    """The crafting helper itself makes good packages: the refusals below are about one flaw."""
    path = craft(tmp_path / "crafted.ferry", signed_entries(FILES, signer))
    info = extract_package(path, tmp_path / "out", TrustStore.of(signer.public))
    assert info.manifest == MANIFEST
    assert (tmp_path / "out" / "state.bin").read_bytes() == b"device state"


GOOD = [Entry(n, d) for n, d in sorted(FILES.items())]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (Entry("../escape", b"x"), "traversal"),
        (Entry("/etc/evil", b"x"), "absolute"),
        (Entry("a/../../escape", b"x"), "traversal"),
        (Entry("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink"),
        (Entry("hard", kind=tarfile.LNKTYPE, linkname="memory.bin"), "hard link"),
        (Entry("dev", kind=tarfile.CHRTYPE), "character device"),
        (Entry("blk", kind=tarfile.BLKTYPE), "block device"),
        (Entry("fifo", kind=tarfile.FIFOTYPE), "FIFO"),
        (Entry("dir", kind=tarfile.DIRTYPE), "directory"),
        (Entry("unlisted.bin", b"x"), "not listed"),
        (Entry("state.bin", b"device state"), "twice"),
        (Entry(HEADER_NAME, b"{}"), "not listed"),
    ],
)
def test_crafted_hostile_members_are_format_errors(
    tmp_path: Path, signer: SigningKey, extra: Entry, message: str
) -> None:
    err = crafted_refusal(tmp_path, signer, [*GOOD, extra])
    assert isinstance(err, PackageFormatError)
    assert message in str(err)


def test_hostile_pax_path_is_refused(tmp_path: Path, signer: SigningKey) -> None:
    sneaky = Entry("harmless", b"x", pax={"path": "../../etc/cron.d/evil"})
    err = crafted_refusal(tmp_path, signer, [*GOOD, sneaky])
    assert isinstance(err, PackageFormatError)
    assert "traversal" in str(err)


def test_oversized_pax_header_is_refused(tmp_path: Path, signer: SigningKey) -> None:
    big = Entry("memory.bin", FILES["memory.bin"], pax={"comment": "x" * 100_000})
    err = crafted_refusal(tmp_path, signer, [big, GOOD[1]])
    assert isinstance(err, PackageFormatError)
    assert "pax header" in str(err)


def test_listed_file_missing(tmp_path: Path, signer: SigningKey) -> None:
    err = crafted_refusal(tmp_path, signer, [GOOD[0]])
    assert isinstance(err, PackageFormatError)
    assert "missing" in str(err)
    assert "state.bin" in str(err)


def test_wrong_size_is_tampering(tmp_path: Path, signer: SigningKey) -> None:
    err = crafted_refusal(tmp_path, signer, [GOOD[0], Entry("state.bin", b"device state!")])
    assert isinstance(err, PackageTamperedError)
    assert err.path == "state.bin"


def test_header_must_come_first(tmp_path: Path, signer: SigningKey) -> None:
    entries = signed_entries(FILES, signer)
    entries[0], entries[1] = entries[1], entries[0]
    err = refused(craft(tmp_path / "p.ferry", entries), TrustStore.of(signer.public), tmp_path)
    assert isinstance(err, PackageFormatError)
    assert "first" in str(err)


def test_signature_must_come_last(tmp_path: Path, signer: SigningKey) -> None:
    entries = [*signed_entries(FILES, signer), Entry("late.bin", b"x")]
    err = refused(craft(tmp_path / "p.ferry", entries), TrustStore.of(signer.public), tmp_path)
    assert isinstance(err, PackageFormatError)
    assert "last" in str(err)


def test_missing_signature(tmp_path: Path, signer: SigningKey) -> None:
    entries = signed_entries(FILES, signer)[:-1]
    err = refused(craft(tmp_path / "p.ferry", entries), TrustStore.of(signer.public), tmp_path)
    assert isinstance(err, PackageFormatError)
    assert "no signature" in str(err)


def test_oversized_header_is_refused_before_it_is_loaded(
    tmp_path: Path, signer: SigningKey
) -> None:
    entries = [Entry(HEADER_NAME, b" " * (MAX_HEADER_BYTES + 1))]
    err = refused(craft(tmp_path / "p.ferry", entries), TrustStore.of(signer.public), tmp_path)
    assert isinstance(err, PackageFormatError)
    assert "allowed" in str(err)


def test_non_canonical_header_is_refused(tmp_path: Path, signer: SigningKey) -> None:
    header = header_for(FILES, signer).replace(b'{"created"', b'{ "created"')
    entries = [
        Entry(HEADER_NAME, header),
        *GOOD,
        Entry(SIGNATURE_NAME, signature_for(header, signer)),
    ]
    err = refused(craft(tmp_path / "p.ferry", entries), TrustStore.of(signer.public), tmp_path)
    assert isinstance(err, PackageFormatError)
    assert "canonical" in str(err)
