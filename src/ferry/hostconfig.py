"""This host's ferry configuration: where its files live and how it runs QEMU.

One frozen value, read from the environment once, by the entry point (the
CLI), and passed down: library code takes a :class:`HostConfig` (or the one
path it needs) as a parameter and never reads ``os.environ`` itself.
:meth:`HostConfig.from_environ` is the only place these variables are read::

    variable                   field           default
    FERRY_RUN_DIR              run_root        /run/ferry  (tmpfs: gone at reboot)
    FERRY_STATE_DIR            state_root      /var/lib/ferry
    FERRY_CACHE_DIR            cache_root      ~/.cache/ferry  (built images, kernels)
    FERRY_PACKAGE_CACHE_DIR    package_cache   <cache_root>/packages
    FERRY_TRUST_DIR            trust_dir       $XDG_CONFIG_HOME/ferry/trusted-keys
    FERRY_SIGNING_KEY          signing_key     $XDG_CONFIG_HOME/ferry/keys/signing.key
    FERRY_ACCEL                accel           auto (None: probe KVM), kvm, tcg
    FERRY_QEMU_SANDBOX         qemu_sandbox    on; off, 0 or no turn it off

``$XDG_CONFIG_HOME`` defaults to ``~/.config``. An empty variable counts as
unset. The VM holders the CLI starts get the whole value on their request
pipe (:mod:`ferry.node.process`), so they see what the CLI saw.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError

RUN_DIR_ENV = "FERRY_RUN_DIR"
STATE_DIR_ENV = "FERRY_STATE_DIR"
CACHE_DIR_ENV = "FERRY_CACHE_DIR"
PACKAGE_CACHE_DIR_ENV = "FERRY_PACKAGE_CACHE_DIR"
TRUST_DIR_ENV = "FERRY_TRUST_DIR"
SIGNING_KEY_ENV = "FERRY_SIGNING_KEY"
ACCEL_ENV = "FERRY_ACCEL"
SANDBOX_ENV = "FERRY_QEMU_SANDBOX"

DEFAULT_RUN_ROOT = Path("/run/ferry")
"""A tmpfs on systemd hosts: sockets and pid records must not outlive a boot."""
DEFAULT_STATE_ROOT = Path("/var/lib/ferry")
_SANDBOX_OFF = ("off", "0", "no")


class Accel(enum.Enum):
    """QEMU's accelerator (here, not in ferry.qemu, so a host configuration can name one)."""

    TCG = "tcg"
    KVM = "kvm"


def parse_accel(text: str) -> Accel | None:
    """``auto`` (or empty) → None (probe), ``kvm``/``tcg`` → that accelerator."""
    value = text.strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Accel(value)
    except ValueError:
        raise ConfigError(f"{ACCEL_ENV}={value!r} is not one of auto, kvm, tcg") from None


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Where this host keeps ferry's files, and its QEMU choices (module docstring)."""

    run_root: Path
    state_root: Path
    cache_root: Path
    """Built images and guest kernels (:mod:`ferry.guest.image.cache`)."""
    package_cache: Path
    """Verified, extracted packages (:mod:`ferry.vm.pkgcache`)."""
    trust_dir: Path
    """The trust list: a directory of ``*.pub`` files, or one file (ferry.package.trust)."""
    signing_key: Path
    accel: Accel | None = None
    """None: probe KVM (:func:`ferry.qemu.accel.choose_accel`)."""
    qemu_sandbox: bool = True
    """Run QEMU under its seccomp sandbox where it supports one (ferry.qemu.sandbox)."""

    def __post_init__(self) -> None:
        for name in ("run_root", "state_root", "cache_root", "package_cache", "trust_dir",
                     "signing_key"):
            if not isinstance(getattr(self, name), Path):
                raise ConfigError(f"HostConfig.{name} must be a Path")
        if self.accel is not None and not isinstance(self.accel, Accel):
            raise ConfigError("HostConfig.accel must be an Accel or None")

    @property
    def net_run_dir(self) -> Path:
        """ferry.net's records (namespaces, links, nft tables) of this host's VMs."""
        return self.run_root / "net"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> HostConfig:
        """The configuration ``environ`` describes (the table in the module docstring).

        Raises :class:`ConfigError` for a ``FERRY_ACCEL`` that names no accelerator.
        """
        def get(name: str) -> str | None:
            return environ.get(name) or None

        home = Path(h) if (h := get("HOME")) else Path.home()
        config = Path(get("XDG_CONFIG_HOME") or home / ".config") / "ferry"
        cache = Path(get(CACHE_DIR_ENV) or home / ".cache" / "ferry")
        return cls(
            run_root=Path(get(RUN_DIR_ENV) or DEFAULT_RUN_ROOT),
            state_root=Path(get(STATE_DIR_ENV) or DEFAULT_STATE_ROOT),
            cache_root=cache,
            package_cache=Path(get(PACKAGE_CACHE_DIR_ENV) or cache / "packages"),
            trust_dir=Path(get(TRUST_DIR_ENV) or config / "trusted-keys"),
            signing_key=Path(get(SIGNING_KEY_ENV) or config / "keys" / "signing.key"),
            accel=parse_accel(environ.get(ACCEL_ENV, "")),
            qemu_sandbox=environ.get(SANDBOX_ENV, "on").lower() not in _SANDBOX_OFF,
        )

    def to_json(self) -> dict[str, Any]:
        """For a child process's request (:meth:`from_json` reads it back)."""
        return {"run_root": str(self.run_root), "state_root": str(self.state_root),
                "cache_root": str(self.cache_root), "package_cache": str(self.package_cache),
                "trust_dir": str(self.trust_dir), "signing_key": str(self.signing_key),
                "accel": None if self.accel is None else self.accel.value,
                "qemu_sandbox": self.qemu_sandbox}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostConfig:
        """The value :meth:`to_json` wrote; KeyError, TypeError or ValueError if it is not."""
        accel = data["accel"]
        sandbox = data["qemu_sandbox"]
        if not isinstance(sandbox, bool):
            raise TypeError(f"qemu_sandbox must be a bool, not {sandbox!r}")
        return cls(run_root=Path(data["run_root"]), state_root=Path(data["state_root"]),
                   cache_root=Path(data["cache_root"]),
                   package_cache=Path(data["package_cache"]),
                   trust_dir=Path(data["trust_dir"]), signing_key=Path(data["signing_key"]),
                   accel=None if accel is None else Accel(accel), qemu_sandbox=sandbox)
