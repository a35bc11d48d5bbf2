"""Signing keys and trust lists: files, permissions, formats, lookups."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from ferry.hostconfig import HostConfig
from ferry.package import (
    KeyFileError,
    PackageExistsError,
    PublicKey,
    TrustStore,
    generate_key,
    key_id_of,
    load_private_key,
    load_public_key,
    parse_public_key,
)
from ferry.package.commands import key_create, key_trust


def test_generate_writes_private_0600_and_one_line_public(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not widen the private key
    try:
        info = generate_key(tmp_path / "k" / "signing.key", comment="alice@host")
    finally:
        os.umask(old)
    assert stat.S_IMODE(info.private_key_path.stat().st_mode) == 0o600
    assert info.public_key_path == tmp_path / "k" / "signing.key.pub"
    line = info.public_key_path.read_text()
    kind, b64, comment = line.rstrip("\n").split(" ")
    assert (kind, comment) == ("ferry-ed25519", "alice@host")
    raw = base64.b64decode(b64)
    assert len(raw) == 32
    assert info.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id_of(raw)
    assert line.count("\n") == 1


def test_load_round_trip_signs_and_verifies(tmp_path: Path) -> None:
    info = generate_key(tmp_path / "signing.key", comment="c")
    key = load_private_key(info.private_key_path)
    pub = load_public_key(info.public_key_path)
    assert key.key_id == pub.key_id == info.key_id
    assert key.public == pub
    sig = key.sign(b"message")
    assert pub.verify(sig, b"message")
    assert not pub.verify(sig, b"messagE")


def test_refuses_to_overwrite_unless_told(tmp_path: Path) -> None:
    first = generate_key(tmp_path / "signing.key")
    pem = first.private_key_path.read_bytes()
    with pytest.raises(PackageExistsError):
        generate_key(tmp_path / "signing.key")
    assert first.private_key_path.read_bytes() == pem
    second = generate_key(tmp_path / "signing.key", overwrite=True)
    assert second.key_id != first.key_id
    assert load_private_key(second.private_key_path).key_id == second.key_id
    assert stat.S_IMODE(second.private_key_path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    info = generate_key(tmp_path / "signing.key")
    info.private_key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(info.private_key_path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519 AAAA comment",
        "ferry-ed25519 not-base64!",
        f"ferry-ed25519 {base64.b64encode(b'short').decode()}",
    ],
)
def test_malformed_public_keys(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.pub"
    path.write_text(text + "\n")
    with pytest.raises(KeyFileError, match=str(path)):
        load_public_key(path)


def test_not_a_private_key(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_private_key(path)


def test_trust_directory_add_and_lookup(tmp_path: Path) -> None:
    alice = generate_key(tmp_path / "alice.key", comment="alice")
    bob = generate_key(tmp_path / "bob.key", comment="bob")
    trust_dir = tmp_path / "trusted"
    store = TrustStore.from_path(trust_dir, missing_ok=True)
    assert len(store) == 0
    assert not store.is_trusted(alice.key_id)

    store = store.add(alice.public_key_path)
    assert store.is_trusted(alice.key_id)
    assert not store.is_trusted(bob.key_id)
    assert (trust_dir / f"{alice.key_id}.pub").is_file()

    reloaded = TrustStore.from_path(trust_dir)  # persisted, not only in memory
    assert reloaded.is_trusted(alice.key_id)
    assert reloaded.get(alice.key_id) == alice.public_key
    assert not reloaded.is_trusted(bob.key_id)
    assert reloaded.add(alice.public_key_path) == reloaded  # idempotent


def test_trust_file_with_comments(tmp_path: Path) -> None:
    alice = generate_key(tmp_path / "alice.key", comment="alice")
    bob = generate_key(tmp_path / "bob.key", comment="bob")
    trust_file = tmp_path / "trusted-keys"
    trust_file.write_text(f"# our signers\n\n{alice.public_key.to_line()}\n")
    store = TrustStore.from_path(trust_file)
    assert store.is_trusted(alice.key_id)
    assert not store.is_trusted(bob.key_id)
    store.add(bob.public_key_path)
    again = TrustStore.from_path(trust_file)
    assert {k.key_id for k in again} == {alice.key_id, bob.key_id}
    assert trust_file.read_text().startswith("# our signers\n")


def test_bad_line_in_trust_file_names_the_line(tmp_path: Path) -> None:
    trust_file = tmp_path / "trusted-keys"
    trust_file.write_text("# ok\nferry-ed25519 ###\n")
    with pytest.raises(KeyFileError, match=r"trusted-keys:2"):
        TrustStore.from_path(trust_file)


def test_missing_trust_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        TrustStore.from_path(tmp_path / "nope")
    assert len(TrustStore.from_path(tmp_path / "nope", missing_ok=True)) == 0


def test_host_trust_store_is_empty_until_the_directory_exists(tmp_path: Path) -> None:
    host = HostConfig.from_environ({"HOME": str(tmp_path), "FERRY_TRUST_DIR":
                                    str(tmp_path / "explicit")})
    store = TrustStore.for_host(host)
    assert len(store) == 0
    assert store.path == tmp_path / "explicit"


def test_cli_key_create_with_trust_uses_the_host_config(tmp_path: Path) -> None:
    host = HostConfig.from_environ({"HOME": str(tmp_path / "home"),
                                    "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
                                    "FERRY_SIGNING_KEY": str(tmp_path / "k" / "me.key")})
    info = key_create(host=host, trust=True, comment="me")
    assert info.private_key_path == tmp_path / "k" / "me.key"
    assert TrustStore.for_host(host).is_trusted(info.key_id)
    assert host.trust_dir == tmp_path / "cfg" / "ferry" / "trusted-keys"
    other = generate_key(tmp_path / "other.key")
    assert key_trust(other.public_key_path, host=host).key_id == other.key_id
    assert TrustStore.for_host(host).is_trusted(other.key_id)


def test_public_key_line_round_trip() -> None:
    key = PublicKey(bytes(range(32)), "a comment with spaces")
    assert parse_public_key(key.to_line()) == key
    assert parse_public_key(PublicKey(bytes(32)).to_line()).comment == ""
