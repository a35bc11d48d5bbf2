"""Errors of the networking layer (namespaces, links, nftables, port forwards).

::

    FerryError
    ├── ConfigError
    │   └── NetConfigError          a bad VM id, address, port or forward spec
    │       └── WildcardAddressError  a forward on 0.0.0.0/:: without allow_wildcard
    └── NetError                    setting up or tearing down networking failed
        ├── NetCommandError         a command failed (.argv, .returncode, .stderr)
        ├── NamespaceError          missing, already exists, or unusable (.namespace)
        ├── AddressPoolExhaustedError  no free /30 left in the link pool
        └── ForwardError            a port forward could not bind or relay (.forward)
"""

from __future__ import annotations

from collections.abc import Sequence

from ferry.errors import ConfigError, FerryError


class NetConfigError(ConfigError):
    """A VM id, address, port or forward specification is invalid."""


class WildcardAddressError(NetConfigError):
    """A port forward asked for a wildcard address without ``allow_wildcard=True``."""


class NetError(FerryError):
    """Setting up or tearing down VM networking failed."""


class NetCommandError(NetError):
    """An external networking command (``ip``, ``nft``, ``sysctl``) exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip() or "no error output"
        super().__init__(f"{' '.join(argv)!s} failed with exit {returncode}: {detail}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class NamespaceError(NetError):
    """A network namespace is missing, already exists, or cannot be entered."""

    def __init__(self, message: str, *, namespace: str) -> None:
        super().__init__(f"netns {namespace}: {message}")
        self.namespace = namespace


class AddressPoolExhaustedError(NetError):
    """Every /30 of the veth address pool is in use in this parent namespace."""


class ForwardError(NetError):
    """A port forward could not bind its host address or failed while relaying."""

    def __init__(self, message: str, *, forward: str) -> None:
        super().__init__(f"forward {forward}: {message}")
        self.forward = forward
