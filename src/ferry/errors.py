"""ferry's exception tree.

Every error ferry raises derives from :class:`FerryError`. Third-party
exceptions (``OSError``, ``ssl.SSLError``, ``zstd.ZstdError`` ...) are
translated once, where they cross into ferry, with ``raise X(...) from exc``.
Errors carry the context a reader needs (``device``, ``block``, ``peer``)
as attributes, not only in the message::

    FerryError
    ├── ConfigError                 bad configuration or arguments
    ├── DeviceError                 a block device refused an operation (.device)
    │   ├── DeviceRangeError        offset/length outside the device
    │   ├── DeviceClosedError       operation on a closed device
    │   ├── ReadOnlyError           write to a read-only device or gate
    │   └── BaseMismatchError       an overlay's base is not the one it was made for
    ├── ProtocolError               the migration wire protocol was violated
    │   ├── LocalProtocolError      we tried to send something invalid (our bug)
    │   └── RemoteProtocolError     the peer sent malformed or unexpected bytes
    │       └── FrameTooLargeError  a frame exceeded the negotiated size cap
    ├── TransportError              a byte stream failed (.peer)
    │   ├── ClosedResourceError     we already closed this stream
    │   ├── BrokenResourceError     the peer went away or the link broke
    │   ├── TLSConfigError          certificates/keys missing or invalid
    │   └── AuthenticationError     the peer did not prove who it is (token, credentials)
    ├── MigrationError              a migration failed (.device, .phase)
    │   ├── IntegrityError          block contents do not match their hash (.block)
    │   ├── PeerError               the peer reported an error (.reason)
    │   └── MigrationStateError     an operation is invalid in the current state
    └── DeadlineError               an operation exceeded its deadline

The NBD, FUSE and VM layers add their own subtrees under FerryError.
"""

from __future__ import annotations


class FerryError(Exception):
    """Root of every error ferry raises on purpose."""


class ConfigError(FerryError):
    """Configuration or arguments are invalid."""


class DeviceError(FerryError):
    """A block device refused an operation."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(f"{device}: {message}" if device else message)
        self.device = device


class DeviceRangeError(DeviceError):
    """An offset/length lies outside the device."""


class DeviceClosedError(DeviceError):
    """The device was used after close()."""


class ReadOnlyError(DeviceError):
    """A write reached a read-only device or a closed write gate."""


class BaseMismatchError(DeviceError):
    """A copy-on-write overlay was opened over a base it was not made for."""


class ProtocolError(FerryError):
    """The migration wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed, oversized or unexpected data."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame announced a payload larger than the size cap."""


class TransportError(FerryError):
    """A byte stream failed."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(f"{message} (peer {peer})" if peer else message)
        self.peer = peer


class ClosedResourceError(TransportError):
    """The stream was already closed by us."""


class BrokenResourceError(TransportError):
    """The peer went away, or the link broke, while the stream was in use."""


class TLSConfigError(TransportError):
    """TLS certificates or keys are missing or invalid."""


class AuthenticationError(TransportError):
    """The peer did not authenticate: a wrong or missing token, a refused
    token, a connection from another user, or no proof within the deadline."""


class MigrationError(FerryError):
    """A migration failed."""

    def __init__(
        self, message: str, *, device: str | None = None, phase: str | None = None
    ) -> None:
        where = ", ".join(
            p
            for p in (f"device {device}" if device else "", f"phase {phase}" if phase else "")
            if p
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.device = device
        self.phase = phase


class IntegrityError(MigrationError):
    """Block contents do not match the hash the source sent."""

    def __init__(self, message: str, *, device: str, block: int) -> None:
        super().__init__(f"{message}: block {block}", device=device)
        self.block = block


class PeerError(MigrationError):
    """The peer reported an error and gave up."""

    def __init__(self, reason: str, *, code: int = 0) -> None:
        super().__init__(f"peer reported error {code}: {reason}")
        self.reason = reason
        self.code = code


class MigrationStateError(MigrationError):
    """An operation is not valid in the migration's current state."""


class DeadlineError(FerryError):
    """An operation exceeded its deadline."""
