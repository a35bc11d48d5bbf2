"""The trust list: which public keys may sign packages this host runs.

A trust list is either

* a directory (the default: the host's ``HostConfig.trust_dir``, ``$FERRY_TRUST_DIR``
  or ``$XDG_CONFIG_HOME/ferry/trusted-keys/``, i.e. ``~/.config/ferry/trusted-keys/``):
  every ``*.pub`` file in it holds one trusted key; :meth:`TrustStore.add`
  writes ``<key id>.pub`` there, so trusting and revoking are a file copy
  and a file removal; or
* a single file, one ``ferry-ed25519 <base64> [comment]`` line per key
  (blank lines and ``#`` comments allowed), like ssh's ``authorized_keys``.

Keys are looked up by id, but a package verifies only against the full key
held here, never against the copy the package carries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ferry.hostconfig import HostConfig
from ferry.package._atomic import io_error, write_file_atomic
from ferry.package.errors import KeyFileError
from ferry.package.keys import PUBLIC_KEY_SUFFIX, PublicKey, load_public_key, parse_public_key

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class TrustStore:
    """Trusted public keys by key id, and where they came from (for :meth:`add`)."""

    keys: Mapping[str, PublicKey]
    path: Path | None = None

    @classmethod
    def of(cls, *keys: PublicKey) -> TrustStore:
        """An in-memory trust list (tests, or a caller that manages keys itself)."""
        return cls({k.key_id: k for k in keys}, None)

    @classmethod
    def for_host(cls, host: HostConfig) -> TrustStore:
        """``host``'s trust list (``host.trust_dir``); empty if it does not exist."""
        return cls.from_path(host.trust_dir, missing_ok=True)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, missing_ok: bool = False) -> TrustStore:
        """Load a trust directory (``*.pub`` files) or a trust file (one key per line)."""
        p = Path(path)
        if not p.exists():
            if missing_ok:
                return cls({}, p)
            raise KeyFileError("trust list does not exist", path=str(p))
        keys: dict[str, PublicKey] = {}
        if p.is_dir():
            try:
                files = sorted(f for f in p.iterdir() if f.name.endswith(PUBLIC_KEY_SUFFIX))
            except OSError as exc:
                raise KeyFileError(f"cannot list: {exc.strerror}", path=str(p)) from exc
            for f in files:
                key = load_public_key(f)
                keys[key.key_id] = key
        else:
            for key in _parse_lines(p):
                keys[key.key_id] = key
        log.debug("trust list %s holds %d keys", p, len(keys))
        return cls(keys, p)

    def is_trusted(self, key_id: str) -> bool:
        return key_id in self.keys

    def get(self, key_id: str) -> PublicKey | None:
        return self.keys.get(key_id)

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self.keys.values())

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, pubkey: str | os.PathLike[str] | PublicKey) -> TrustStore:
        """Trust a key (a ``.pub`` file or a loaded key): persist it and return the new list.

        Into a directory it goes as ``<key id>.pub`` (created 0700 if missing);
        into a file it is appended as one line. Adding a key already trusted
        changes nothing.
        """
        key = pubkey if isinstance(pubkey, PublicKey) else load_public_key(pubkey)
        if self.path is None:
            return TrustStore({**self.keys, key.key_id: key}, None)
        if key.key_id in self.keys:
            return self
        line = (key.to_line() + "\n").encode("utf-8")
        if self.path.is_file():
            try:
                with self.path.open("ab") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise io_error(exc, self.path, "adding a key to the trust list") from exc
        else:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_file_atomic(
                self.path / f"{key.key_id}{PUBLIC_KEY_SUFFIX}", line, mode=0o644, overwrite=True
            )
        log.info("trusted key %s (%s) in %s", key.key_id, key.comment, self.path)
        return TrustStore({**self.keys, key.key_id: key}, self.path)


def _parse_lines(path: Path) -> Iterator[PublicKey]:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read trust list: {exc}", path=str(path)) from exc
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield parse_public_key(line, source=f"{path}:{n}")
