"""ed25519 signing keys for packages.

A key pair lives in two files:

* the private key, ``<path>``: PKCS#8 PEM, unencrypted, mode 0600. Loading
  refuses a file that group or others can read (as ssh does), because a
  leaked key lets anyone sign packages every host trusting it will run;
* the public key, ``<path>.pub``: one line of text,
  ``ferry-ed25519 <base64 of the 32 raw key bytes> <comment>``, easy to paste
  into a trust list, a chat or a config-management template.

A key id is the first 16 hex characters (64 bits) of the SHA-256 of the raw
public key: short enough to read aloud, long enough that nobody stumbles on a
collision. The id only *names* a key; verification always uses the full key
held by the trust list.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ferry.package._atomic import write_file_atomic
from ferry.package.errors import KeyFileError

log = logging.getLogger(__name__)

PUBLIC_KEY_TYPE = "ferry-ed25519"
"""First word of a public-key line; names the algorithm like ssh's ``ssh-ed25519``."""
PUBLIC_KEY_SUFFIX = ".pub"
KEY_ID_HEX_CHARS = 16
RAW_PUBLIC_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 * 1024
"""Key files are a few hundred bytes; a cap keeps a wrong path (a disk image) from being slurped."""


def key_id_of(raw_public_key: bytes) -> str:
    """Short fingerprint of a raw 32-byte ed25519 public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX_CHARS]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A trusted or presented ed25519 public key with its id and comment."""

    raw: bytes
    comment: str = ""

    def __post_init__(self) -> None:
        if len(self.raw) != RAW_PUBLIC_KEY_BYTES:
            raise ValueError(f"an ed25519 public key has 32 bytes, not {len(self.raw)}")
        if "\n" in self.comment or "\r" in self.comment:
            raise ValueError("a key comment must fit on one line")

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def to_line(self) -> str:
        """The one-line text form, without the trailing newline."""
        b64 = base64.b64encode(self.raw).decode("ascii")
        return f"{PUBLIC_KEY_TYPE} {b64} {self.comment}".rstrip()

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's ed25519 signature of ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A loaded private key, ready to sign."""

    private: Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Where :func:`generate_key` put a new key pair, and its id."""

    key_id: str
    private_key_path: Path
    public_key_path: Path
    public_key: PublicKey


def public_key_path_for(private_key_path: Path) -> Path:
    """``key`` -> ``key.pub``."""
    return private_key_path.with_name(private_key_path.name + PUBLIC_KEY_SUFFIX)


def default_comment() -> str:
    """``user@host``, like ssh-keygen, so a trust list says whose key each line is."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def generate_key(
    path: str | os.PathLike[str], *, comment: str | None = None, overwrite: bool = False
) -> KeyInfo:
    """Create a new ed25519 key pair: ``path`` (private, 0600) and ``path.pub``.

    Refuses to replace existing files unless ``overwrite`` is set: losing a
    signing key silently would make every host that trusts it reject new
    packages.
    """
    priv_path = Path(path)
    pub_path = public_key_path_for(priv_path)
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    public = PublicKey(raw, default_comment() if comment is None else comment)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    priv_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_atomic(priv_path, pem, mode=0o600, overwrite=overwrite)
    write_file_atomic(
        pub_path, (public.to_line() + "\n").encode("utf-8"), mode=0o644, overwrite=overwrite
    )
    log.info("created signing key %s at %s", public.key_id, priv_path)
    return KeyInfo(public.key_id, priv_path, pub_path, public)


def _read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror}", path=str(path)) from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError("too large to be a key file", path=str(path))
    return data


def load_private_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load a private key written by :func:`generate_key` (or any PKCS#8 ed25519 PEM)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror}", path=str(p)) from exc
    if stat.S_IMODE(mode) & 0o077:
        raise KeyFileError(
            f"private key is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            "run chmod 600 on it",
            path=str(p),
        )
    data = _read_small(p)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"not an unencrypted PEM private key: {exc}", path=str(p)) from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError("not an ed25519 private key", path=str(p))
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    comment = ""
    pub_path = public_key_path_for(p)
    if pub_path.is_file():
        try:
            on_disk = load_public_key(pub_path)
        except KeyFileError:
            on_disk = None
        if on_disk is not None and on_disk.raw == raw:
            comment = on_disk.comment
    return SigningKey(private, PublicKey(raw, comment))


def parse_public_key(line: str, *, source: str = "<string>") -> PublicKey:
    """Parse one ``ferry-ed25519 <base64> [comment]`` line."""
    parts = line.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] != PUBLIC_KEY_TYPE:
        raise KeyFileError(f"expected '{PUBLIC_KEY_TYPE} <base64> [comment]'", path=source)
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError("public key is not valid base64", path=source) from exc
    if len(raw) != RAW_PUBLIC_KEY_BYTES:
        raise KeyFileError(f"public key has {len(raw)} bytes, expected 32", path=source)
    return PublicKey(raw, parts[2] if len(parts) > 2 else "")


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load a one-line public key file (``*.pub``)."""
    p = Path(path)
    try:
        text = _read_small(p).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError("public key file is not UTF-8 text", path=str(p)) from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"expected one key line, found {len(lines)}", path=str(p))
    return parse_public_key(lines[0], source=str(p))
