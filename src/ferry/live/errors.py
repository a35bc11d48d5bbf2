"""Errors of live VM migration::

    FerryError
    ├── MigrationError
    │   ├── LiveMigrationError        the VM could not be moved (.vm, .handed_off)
    │   │   └── HandoffPayloadError   the HANDOFF payload is malformed
    │   └── PeerError
    │       └── RefusedError          the peer (a registry) refused the request
    └── ProtocolError
        └── RemoteProtocolError
            └── MalformedSummaryError a migration summary that does not decode
"""

from __future__ import annotations

from ferry.errors import MigrationError, PeerError, RemoteProtocolError


class LiveMigrationError(MigrationError):
    """Moving a running VM failed.

    ``handed_off`` says where the VM is: False means it still runs on (or was
    resumed on) the source and nothing was lost; True means the destination
    holds the authority and the failure happened in post-copy.
    """

    def __init__(self, message: str, *, vm: str | None, handed_off: bool,
                 phase: str | None = None) -> None:
        super().__init__(f"vm {vm}: {message}" if vm else message, phase=phase)
        self.vm = vm
        self.handed_off = handed_off


class HandoffPayloadError(LiveMigrationError):
    """The HANDOFF payload from the source is malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, vm=None, handed_off=False, phase="stop-and-copy")


class RefusedError(PeerError):
    """The peer refused the request outright (a registry without that package, or one
    that does not trust it); nothing was started."""

    def __init__(self, reason: str) -> None:
        MigrationError.__init__(self, f"the peer refused: {reason}")
        self.reason = reason
        self.code = 0


class MalformedSummaryError(RemoteProtocolError):
    """A migration summary (:meth:`ferry.live.summary.MigrationSummary.from_json`) with a
    missing or wrongly typed field, a value out of bounds, or too many entries: the
    fault of whoever sent it (a VM's holder, over its control socket)."""
